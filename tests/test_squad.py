"""SQuAD preprocessing: MindFormers' eval rows exactly, sound train rows at every length, bad input refused."""

import copy
import hashlib
import json

import numpy as np
import pytest

from llama.cli import run
from llama.data.records import read_columns, verify
from llama.data.squad import ANSWERS_FILE, RESPONSE, read_answers, read_squad, squad_columns
from llama.data.tokenizer import Tokenizer
from llama.errors import PipelineError

IGNORE = -100


@pytest.fixture(scope="module")
def tok(tok512):
    return Tokenizer(tok512)


@pytest.fixture(scope="module")
def squad_slice(fixtures):
    return json.loads((fixtures / "squad_dev_slice.json").read_text())


@pytest.fixture(scope="module")
def first(squad_slice):
    return read_squad(squad_slice, "first")


def test_first_keeps_each_paragraphs_first_question_and_all_keeps_every_question(squad_slice, first):
    paragraphs = squad_slice["data"][0]["paragraphs"]
    everything = read_squad(squad_slice, "all")
    assert len(first) == len(paragraphs) == 30 and len(everything) == 515
    assert [e.id for e in first] == [p["qas"][0]["id"] for p in paragraphs]
    assert [e.id for e in everything] == [qa["id"] for p in paragraphs for qa in p["qas"]]
    assert first[0].answers == ("Denver Broncos",) * 3 and first[0].context == paragraphs[0]["context"]
    assert first[0].prompt().startswith("Read the passage and answer the question below.\n\n### Instruction:\n")
    assert first[0].prompt().endswith(
        "\n\n### Input:\nWhich NFL team represented the AFC at Super Bowl 50?\n\n### Response:")


@pytest.fixture(scope="module")
def articles(fixtures):
    """SQuAD dev, all 48 articles, each with its first 4 paragraphs and their first questions."""
    return json.loads((fixtures / "squad_dev_first_questions.json").read_text())


def test_articles_select_by_position_like_a_slice(articles):
    titles = [article["title"] for article in articles["data"]]
    held_out, rest = read_squad(articles, "first", "0:6"), read_squad(articles, "first", "6:")
    assert len(held_out) == 24 and len(rest) == 4 * (len(titles) - 6)
    assert not {e.context for e in held_out} & {e.context for e in rest}
    assert held_out + rest == read_squad(articles, "first") == read_squad(articles, "first", ":")
    assert [e.id for e in read_squad(articles, "first", "2:3")] == \
        [p["qas"][0]["id"] for p in articles["data"][2]["paragraphs"]]
    for bad, message in (("3", "START:STOP"), ("a:b", "START:STOP"), ("-2:", "non-negative"),
                         ("60:", "selects none of the input's 48 articles")):
        with pytest.raises(PipelineError, match=message):
            read_squad(articles, "first", bad)


def test_eval_rows_are_bos_prompt_and_answer_ids_padded_with_0(tok, first):
    columns, stats = squad_columns(first, tok, 2048, "eval")
    assert columns["input_ids"].shape == columns["labels"].shape == (30, 2048)
    assert stats == {"truncated": 0, "clipped": 0, "mode": "eval"}
    for row, example in enumerate(first):
        prompt = [tok.bos_id] + tok.encode(example.prompt())
        answer = tok.encode(example.answers[0])
        assert columns["input_ids"][row].tolist() == prompt + [0] * (2048 - len(prompt))
        assert columns["labels"][row].tolist() == answer + [0] * (2048 - len(answer))


def train_parts(tok, example):
    return tok.encode(example.prompt()), tok.encode(example.answers[0])


def assert_train_row(tok, ids, labels, prompt, answer):
    """BOS + prompt + answer + EOS, padded with 0; labels only on answer and EOS."""
    length = 1 + len(prompt) + len(answer) + 1
    assert ids[:length].tolist() == [tok.bos_id] + prompt + answer + [tok.eos_id] and not ids[length:].any()
    assert labels.tolist() == [IGNORE] * (1 + len(prompt)) + answer + [tok.eos_id] + [IGNORE] * (len(ids) - length)


def test_train_rows_mask_bos_prompt_and_padding(tok, first):
    columns, stats = squad_columns(first, tok, 2048, "train")
    assert columns["input_ids"].shape == (30, 2049)
    assert stats == {"truncated": 0, "clipped": 0, "mode": "train"}
    for row, example in enumerate(first):
        assert_train_row(tok, columns["input_ids"][row], columns["labels"][row], *train_parts(tok, example))


def test_a_train_row_that_exactly_fills_the_length_keeps_its_labels(tok, first):
    """MindFormers masks the whole row here (its pad length is 0 and `labels[-0:]` is every label)."""
    prompt, answer = train_parts(tok, first[0])
    max_length = 1 + len(prompt) + len(answer)  # rows hold max_length + 1 = the whole sequence
    columns, stats = squad_columns(first[:1], tok, max_length, "train")
    assert stats["truncated"] == stats["clipped"] == 0
    assert_train_row(tok, columns["input_ids"][0], columns["labels"][0], prompt, answer)
    assert columns["labels"][0, -1] == tok.eos_id


def test_longer_train_rows_lose_context_but_keep_question_and_answer(tok, first):
    """MindFormers crashes on these (a negative pad length)."""
    max_length = min(sum(map(len, train_parts(tok, example))) for example in first[:3]) - 100
    columns, stats = squad_columns(first[:3], tok, max_length, "train")
    assert stats == {"truncated": 3, "clipped": 0, "mode": "train"}
    for row, example in enumerate(first[:3]):
        ids, labels = columns["input_ids"][row], columns["labels"][row]
        assert np.count_nonzero(ids) >= max_length - 3  # only as much context as needed is gone
        shortened = tok.decode(ids[1:np.flatnonzero(labels != IGNORE)[0]])
        assert shortened.endswith(example.prompt()[example.prompt().index("\n\n### Input:"):])
        assert len(shortened) < len(example.prompt())
        assert labels[labels != IGNORE].tolist() == tok.encode(example.answers[0]) + [tok.eos_id]


def test_rows_too_short_for_the_question_keep_the_response_marker_and_answer(tok, first):
    columns, stats = squad_columns(first[:3], tok, 40, "train")
    assert columns["input_ids"].shape == (3, 41) and stats["clipped"] == 3 and stats["truncated"] == 0
    for row, example in enumerate(first[:3]):
        ids, labels = columns["input_ids"][row], columns["labels"][row]
        answer = tok.encode(example.answers[0]) + [tok.eos_id]
        assert ids[0] == tok.bos_id and tok.decode(ids[:len(ids) - len(answer)]).endswith("### Response:")
        assert labels[labels != IGNORE].tolist() == answer
    eval_columns, eval_stats = squad_columns(first[:3], tok, 40, "eval")
    assert eval_stats["clipped"] == 3
    assert all(tok.decode(row).endswith("### Response:") for row in eval_columns["input_ids"])
    tiny, tiny_stats = squad_columns(first[:3], tok, 2, "train")  # not even the answer fits: no crash
    assert tiny["input_ids"].shape == (3, 3) and tiny_stats["clipped"] == 3


def test_train_answers_are_what_follows_the_response_marker_and_a_space(fixtures, first):
    """With a byte-level BPE tokenizer the answer's first token carries the space ("ĠDenver"), as a model
    writes it after "### Response:"; sentencepiece's dummy prefix gives the same ids as the answer alone."""
    bpe = fixtures / "bpe768" / "tokenizer.json"
    if not bpe.is_file():
        pytest.skip("no byte-level BPE tokenizer fixture here")
    tokenizer = Tokenizer(bpe)
    columns, _ = squad_columns(first[:5], tokenizer, 2048, "train")
    lead = tokenizer.encode(RESPONSE)
    for example, labels in zip(first, columns["labels"]):
        answer = labels[labels != IGNORE].tolist()[:-1]
        assert answer == tokenizer.encode(f"{RESPONSE} {example.answers[0]}")[len(lead):] != \
            tokenizer.encode(example.answers[0])
        assert tokenizer.decode(answer) == f" {example.answers[0]}"


def test_eval_matches_mindformers_on_squad_dev(llama2_tokenizer, shared_data, shared_fixtures):
    """squad_data_process.py --mode eval --max_length 2048 on dev-v1.1.json, every row."""
    reference = shared_fixtures / "mindformers_records"
    rows = json.loads((reference / "mf_squad_dev_eval_2048.json").read_text())
    squad = json.loads((shared_data / "squad_v1.1" / "dev-v1.1.json").read_text())
    columns, stats = squad_columns(read_squad(squad, "first"), Tokenizer(llama2_tokenizer), 2048, "eval")
    assert columns["input_ids"].shape == (len(rows), 2048) == (2067, 2048)
    assert stats["truncated"] == stats["clipped"] == 0

    def digest(row):
        return hashlib.sha256(np.ascontiguousarray(row, dtype=np.int32).tobytes()).hexdigest()[:16]

    for index, row in enumerate(rows):
        assert digest(columns["input_ids"][index]) == row["input_ids"], index
        assert digest(columns["labels"][index]) == row["labels"], index
    for name in ("input_ids", "labels"):
        assert (columns[name][:3] == np.load(reference / f"squad_dev_eval_2048_first3_{name}.npy")).all()
    assert len(read_squad(squad, "all")) == 10570


# ---- through the CLI ------------------------------------------------------------------------------------

def squad_cli(tmp_path, tokenizer, input_path, *extra, max_length="2048", output=None):
    return run(["preprocess", "squad", "--input", str(input_path), "--tokenizer", str(tokenizer),
                "--max-length", max_length, "--output", str(output or tmp_path / "out"), "--json", *extra])


def test_cli_all_questions_writes_every_gold_answer_beside_the_rows(tmp_path, tok512, tok, fixtures, squad_slice,
                                                                    capsys):
    assert squad_cli(tmp_path, tok512, fixtures / "squad_dev_slice.json", "--questions", "all") == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.splitlines()[-1])
    assert "tokenizing squad" in captured.err
    assert result["rows"] == 515 and result["row_length"]["input_ids"] == 2048 and result["questions"] == "all"
    manifest = verify(tmp_path / "out")
    assert ANSWERS_FILE in manifest["files"] and manifest["stats"]["mode"] == "eval"
    answers = read_answers(tmp_path / "out" / ANSWERS_FILE)
    qas = [qa for p in squad_slice["data"][0]["paragraphs"] for qa in p["qas"]]
    assert [a["row"] for a in answers] == list(range(515))
    assert [(a["id"], a["question"], a["answers"]) for a in answers] == \
        [(qa["id"], qa["question"], [x["text"] for x in qa["answers"]]) for qa in qas]
    written = read_columns(tmp_path / "out")
    expected, _ = squad_columns(read_squad(squad_slice, "all"), tok, 2048, "eval")
    assert (written["input_ids"] == expected["input_ids"]).all() and (written["labels"] == expected["labels"]).all()


def test_cli_train_mode(tmp_path, tok512, fixtures, capsys):
    assert squad_cli(tmp_path, tok512, fixtures / "squad_dev_slice.json", "--mode", "train", max_length="300") == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["rows"] == 30 and result["row_length"]["input_ids"] == 301 and result["truncated"] > 0
    assert verify(tmp_path / "out")["stats"]["mode"] == "train"
    assert len(read_answers(tmp_path / "out" / ANSWERS_FILE)) == 30


def test_cli_articles_are_recorded_with_the_rows(tmp_path, tok512, fixtures, capsys):
    source = fixtures / "squad_dev_first_questions.json"
    assert squad_cli(tmp_path, tok512, source, "--articles", "6:", "--mode", "train", max_length="255") == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["rows"] == 168 and verify(tmp_path / "out")["stats"]["articles"] == "6:"
    assert squad_cli(tmp_path, tok512, source, "--articles", "6", output=tmp_path / "bad") == 1
    assert_one_line_error(capsys, "articles must be START:STOP")
    assert not (tmp_path / "bad").exists()


def broken(squad_slice, edit):
    data = copy.deepcopy(squad_slice)
    edit(data)
    return json.dumps(data)


BAD_INPUTS = {
    "malformed": (lambda s: "{\"data\": [", "is not valid JSON"),
    "empty file": (lambda s: "", "is empty"),
    "not an object": (lambda s: "[]", "SQuAD input is not a JSON object"),
    "no data": (lambda s: json.dumps({"data": []}), "has no paragraphs"),
    "missing question": (lambda s: broken(s, lambda d: d["data"][0]["paragraphs"][2]["qas"][0].pop("question")),
                         "data[0].paragraphs[2].qas[0] has no field 'question'"),
    "missing context": (lambda s: broken(s, lambda d: d["data"][0]["paragraphs"][5].pop("context")),
                        "data[0].paragraphs[5] has no field 'context'"),
    "no answers": (lambda s: broken(s, lambda d: d["data"][0]["paragraphs"][1]["qas"][0].update(answers=[])),
                   "data[0].paragraphs[1].qas[0] has no answers"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_cli_refuses_bad_input_in_one_line(tmp_path, tok512, squad_slice, capsys, case):
    make, message = BAD_INPUTS[case]
    source = tmp_path / "squad.json"
    source.write_text(make(squad_slice))
    assert squad_cli(tmp_path, tok512, source) == 1
    assert_one_line_error(capsys, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["squad.json"]  # nothing partial


def test_cli_refuses_bad_arguments(tmp_path, tok512, fixtures, capsys):
    squad = fixtures / "squad_dev_slice.json"
    assert squad_cli(tmp_path, squad, squad) == 1
    assert_one_line_error(capsys, "is neither a sentencepiece model nor a tokenizer.json")
    assert squad_cli(tmp_path, tok512, squad, max_length="1") == 1
    assert_one_line_error(capsys, "--max-length must be at least 2, got 1")
    (tmp_path / "out").mkdir()
    assert squad_cli(tmp_path, tok512, squad) == 1
    assert_one_line_error(capsys, "already exists (use --overwrite")
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(PipelineError, match="already exists"):
        squad_cli(tmp_path, tok512, squad, "--debug")


def assert_one_line_error(capsys, message):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
