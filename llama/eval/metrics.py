"""SQuAD answer scoring under two conventions, which disagree on purpose and are always labelled apart.

- official: the SQuAD v1.1 scorer. Normalize (lowercase, drop `string.punctuation`, drop the articles
  a/an/the, collapse whitespace); EM is equality, F1 the bag-of-words overlap; each question takes its best
  score over all gold answers; ×100, averaged over all questions.
- mindformers: MindFormers' `EmF1Metric` (mindformers/core/metric/metric.py). The prediction keeps only its
  first line; both sides are lowercased and lose only MindFormers' short punctuation list; EM compares the
  strings (spaces included), F1 comes from the longest common *contiguous* run of jieba segments (spaces are
  segments too). MindFormers scores against one gold answer: the first.

"The Denver Broncos" vs "Denver Broncos": official EM 1, F1 1.0; MindFormers EM 0, F1 0.75.

MindFormers segments with jieba. On text without Chinese characters (MindFormers cuts those out itself
before calling jieba) jieba's dictionary and HMM reduce to a few regular expressions, implemented in
`jieba_cut`, so jieba is not a dependency; tests check the two agree on SQuAD.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Callable, Iterable, Sequence

# --- official SQuAD v1.1 -------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def official_exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def official_f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


# --- MindFormers EmF1Metric ----------------------------------------------------------------------------

# MindFormers' `sp_char`. Its entry "……" is two characters and never equals the single character it is
# compared with, so it removes nothing; it is left out here.
MINDFORMERS_PUNCTUATION = frozenset("-:_*^/\\~`+=，。：？！“”；’《》·、「」（）－～『』")
_CJK = re.compile(r"[\u4e00-\u9fa5]")  # the characters MindFormers splits off itself, one segment each

# jieba 0.42.1 `cut(text)` (accurate mode, HMM on) for text without U+4E00–U+9FA5:
_JIEBA_BLOCK = re.compile(r"([\u4E00-\u9FD5a-zA-Z0-9+#&._%\-]+)")  # runs the dictionary sees (re_han_default)
_JIEBA_SPACE = re.compile(r"(\r\n|\s)")  # outside those runs, whitespace is kept as segments (re_skip_default)
# The only entries of jieba's dictionary made of run characters that lowercase text can contain. A run is
# otherwise cut into single characters, whose leftover stretches go to jieba's HMM (finalseg.cut):
_JIEBA_WORDS = re.compile(r"(c\+\+|c#)")
_JIEBA_HMM_HAN = re.compile(r"([\u4E00-\u9FD5])")  # only U+9FA6–U+9FD5 reach it here; alone, each is a segment
_JIEBA_HMM_SKIP = re.compile(r"([a-zA-Z0-9]+(?:\.\d+)?%?)")  # finalseg's re_skip


def jieba_cut(text: str) -> list[str]:
    """jieba.cut(text) for lowercase text without U+4E00–U+9FA5, as MindFormers calls it.

    Exact except for two or more adjacent characters U+9FA6–U+9FD5 (rare CJK additions; none in SQuAD),
    which jieba's HMM might join and this keeps apart.
    """
    segments = []
    for block in _JIEBA_BLOCK.split(text):
        if not block:
            continue
        if not _JIEBA_BLOCK.match(block):
            for part in _JIEBA_SPACE.split(block):
                segments.extend([part] if _JIEBA_SPACE.match(part) else part)
            continue
        for index, piece in enumerate(_JIEBA_WORDS.split(block)):
            if index % 2:
                segments.append(piece)
                continue
            for han_index, part in enumerate(_JIEBA_HMM_HAN.split(piece)):
                segments.extend([part] if han_index % 2 else filter(None, _JIEBA_HMM_SKIP.split(part)))
    return segments


def mindformers_first_line(prediction: str) -> str:
    """What `EmF1Metric.update` keeps of a generated answer."""
    return prediction.strip().split("\n")[0]


def mindformers_strip(text: str) -> str:
    """`EmF1Metric.remove_punctuation`: lowercase, strip, then drop MindFormers' punctuation characters."""
    return "".join(ch for ch in str(text).lower().strip() if ch not in MINDFORMERS_PUNCTUATION)


def mindformers_segments(text: str, cut: Callable[[str], Iterable[str]] = jieba_cut) -> list[str]:
    """`EmF1Metric.mixed_segmentation(text, rm_punc=True)`: Chinese characters alone, the rest through `cut`."""
    segments, pending = [], ""
    for ch in mindformers_strip(text):
        if _CJK.match(ch):
            if pending:
                segments.extend(cut(pending))
                pending = ""
            segments.append(ch)
        else:
            pending += ch
    if pending:
        segments.extend(cut(pending))
    return segments


def longest_common_run(first: Sequence, second: Sequence) -> int:
    """Length of the longest contiguous run shared by two sequences (`EmF1Metric.find_lcs`)."""
    best, previous = 0, [0] * (len(second) + 1)
    for item in first:
        current = [0] * (len(second) + 1)
        for j, other in enumerate(second):
            if item == other:
                current[j + 1] = previous[j] + 1
                best = max(best, current[j + 1])
        previous = current
    return best


def mindformers_exact_match(prediction: str, gold: str) -> float:
    """`EmF1Metric.calc_em_score` on a prediction already cut to its first line."""
    return float(mindformers_strip(prediction) == mindformers_strip(gold))


def mindformers_f1(prediction: str, gold: str, cut: Callable[[str], Iterable[str]] = jieba_cut) -> float:
    """`EmF1Metric.calc_f1_score` on a prediction already cut to its first line."""
    predicted, expected = mindformers_segments(prediction, cut), mindformers_segments(gold, cut)
    run = longest_common_run(expected, predicted)
    if run == 0:
        return 0.0
    precision, recall = run / len(predicted), run / len(expected)
    return 2 * precision * recall / (precision + recall)


# --- per question and totals ---------------------------------------------------------------------------

def official_scores(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """One question, official scorer: best EM and F1 (0..1) over all gold answers."""
    return {"em_official": max(official_exact_match(prediction, gold) for gold in golds),
            "f1_official": max(official_f1(prediction, gold) for gold in golds)}


def mindformers_scores(prediction: str, gold: str) -> dict[str, float]:
    """One question, MindFormers' way: the prediction's first line against one gold answer (0..1)."""
    line = mindformers_first_line(prediction)
    return {"em_mindformers": mindformers_exact_match(line, gold), "f1_mindformers": mindformers_f1(line, gold)}


def score_answer(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """Both conventions for one question; MindFormers' uses the first gold answer."""
    if not golds:
        raise ValueError("a question needs at least one gold answer")
    return {**official_scores(prediction, golds), **mindformers_scores(prediction, golds[0])}


def squad_totals(per_question: Sequence[dict[str, float]]) -> dict[str, float]:
    """`squad_<metric>` (0..100): each per-question score averaged over all questions, ×100."""
    if not per_question:
        raise ValueError("no questions to score")
    return {f"squad_{key}": 100.0 * sum(s[key] for s in per_question) / len(per_question)
            for key in per_question[0]}


def squad_official_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """`squad_em_official` and `squad_f1_official`, as the official SQuAD v1.1 evaluate script."""
    return squad_totals([official_scores(p, g) for p, g in zip(predictions, golds, strict=True)])


def mindformers_em_f1(predictions: Sequence[str], golds: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """`squad_em_mindformers` and `squad_f1_mindformers`, as `EmF1Metric.eval`; a list of golds uses its first."""
    return squad_totals([mindformers_scores(p, g if isinstance(g, str) else g[0])
                         for p, g in zip(predictions, golds, strict=True)])
