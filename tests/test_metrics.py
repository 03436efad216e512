"""SQuAD scoring: the official scorer, MindFormers' EmF1Metric, and our jieba-free segmentation."""

import json

import pytest

from llama.eval.metrics import (
    jieba_cut,
    longest_common_run,
    mindformers_em_f1,
    mindformers_segments,
    normalize_answer,
    score_answer,
    squad_official_scores,
)


def _squad_texts(path):
    """Every context, question and answer of a SQuAD file, and (golds per question)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    texts, golds = [], []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            texts.append(paragraph["context"])
            for qa in paragraph["qas"]:
                answers = [a["text"] for a in qa["answers"]]
                texts += [qa["question"], *answers]
                golds.append(answers)
    return texts, golds


def test_documented_case_differs_by_convention():
    scores = score_answer("The Denver Broncos", ["Denver Broncos"])
    assert scores["em_official"] == 1.0 and scores["f1_official"] == pytest.approx(1.0)
    assert scores["em_mindformers"] == 0.0 and scores["f1_mindformers"] == pytest.approx(0.75)


def test_mindformers_docstring_example():
    # EmF1Metric's own docstring: F1 75.0, Em 50.0 (the "。" is MindFormers punctuation, "," is not).
    result = mindformers_em_f1(["I love Beijing, because it's beautiful", "Hello world。"],
                               ["I love Beijing.", "Hello world"])
    assert result == pytest.approx({"squad_f1_mindformers": 75.0, "squad_em_mindformers": 50.0})


def test_mindformers_keeps_first_line_and_first_gold():
    assert score_answer("Denver Broncos\nThe question was", ["x", "Denver Broncos"])["em_mindformers"] == 0.0
    scores = score_answer("  Denver Broncos\nThe question was", ["Denver Broncos", "x"])
    assert scores["em_mindformers"] == 1.0 and scores["f1_mindformers"] == 1.0
    assert scores["em_official"] == 0.0  # the official scorer reads the whole prediction


def test_official_normalization():
    assert normalize_answer("  The  U.S.   Army, an army!") == "us army army"
    assert score_answer("an apple", ["Apple"])["em_official"] == 1.0
    # bag of words, best over golds: "red ball" vs "the big red ball" -> P 1, R 2/3
    assert score_answer("red ball", ["blue", "the big red ball"])["f1_official"] == pytest.approx(0.8)


def test_longest_common_run_is_contiguous():
    assert longest_common_run("abcde", "xbcdy") == 3
    assert longest_common_run("abc", "acb") == 1
    assert longest_common_run("", "abc") == 0


def test_official_scores_are_100_when_predictions_are_gold(fixtures):
    _, golds = _squad_texts(fixtures / "squad_dev_slice.json")
    last = [g[-1] for g in golds]  # any gold scores 100: the max runs over all of them
    assert squad_official_scores(last, golds) == {"squad_em_official": 100.0, "squad_f1_official": 100.0}
    assert mindformers_em_f1([g[0] for g in golds], golds) == {"squad_em_mindformers": 100.0,
                                                                 "squad_f1_mindformers": 100.0}
    shifted = squad_official_scores(last[1:] + last[:1], golds)
    assert shifted["squad_em_official"] < 10.0


def test_jieba_cut_edge_cases_agree_with_jieba():
    jieba = pytest.importorskip("jieba")
    text = "c#x c++ 3.5% u.s. a&b_c-d café 鿦x naïve\t\r\n 1,000.5 #&%. 东京 c## ++c"
    for sample in (text, text.replace("东京", "")):
        ours = mindformers_segments(sample)
        assert ours == mindformers_segments(sample, cut=lambda s: list(jieba.cut(s)))
    plain = "c#x c++ 3.5% u.s. a&b_c-d café 鿦x naïve\t\r\n 1,000.5 #&%."
    assert jieba_cut(plain) == list(jieba.cut(plain))


def _assert_segmentation_agrees(texts):
    jieba = pytest.importorskip("jieba")

    def cut(s):
        return list(jieba.cut(s))

    mismatches = [t for t in texts if mindformers_segments(t) != mindformers_segments(t, cut=cut)]
    assert not mismatches, mismatches[:3]


def test_segmentation_agrees_with_jieba_on_bundled_squad(fixtures):
    texts, _ = _squad_texts(fixtures / "squad_dev_slice.json")
    _assert_segmentation_agrees(texts)


@pytest.mark.slow
def test_segmentation_agrees_with_jieba_on_squad_dev(shared_data):
    texts, _ = _squad_texts(shared_data / "squad_v1.1" / "dev-v1.1.json")
    _assert_segmentation_agrees(texts)
