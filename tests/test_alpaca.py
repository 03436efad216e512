"""Alpaca preprocessing: MindFormers' rows exactly, its label bookkeeping faults reported, bad input refused."""

import hashlib
import json

import numpy as np
import pytest

from llama.cli import run
from llama.data.alpaca import (
    PROMPT_INPUT, PROMPT_NO_INPUT, alpaca_columns, alpaca_prompt, conversation, read_alpaca)
from llama.data.records import read_columns, verify
from llama.data.tokenizer import Tokenizer
from llama.errors import PipelineError

IGNORE = -100


@pytest.fixture(scope="module")
def tok(tok512):
    return Tokenizer(tok512)


@pytest.fixture(scope="module")
def seed_records(fixtures):
    return read_alpaca(json.loads((fixtures / "alpaca_seed_tasks.json").read_text()))


def answer_ids(labels):
    return [int(t) for t in labels if t != IGNORE]


def test_prompt_picks_the_form_by_input():
    with_input = alpaca_prompt({"instruction": "Add.", "input": "1 and 2", "output": "3"})
    assert with_input == PROMPT_INPUT.format(instruction="Add.", input="1 and 2")
    assert "### Input:\n1 and 2\n\n### Response:" in with_input
    for record in ({"instruction": "Add.", "input": "", "output": "3"}, {"instruction": "Add.", "output": "3"}):
        assert alpaca_prompt(record) == PROMPT_NO_INPUT.format(instruction="Add.")


def test_conversation_is_vicuna_v1_1():
    text, before_answer = conversation("Hi?", "Hello.")
    assert text.startswith("A chat between a curious user and an artificial intelligence assistant.")
    assert text.endswith(" USER: Hi? ASSISTANT: Hello.</s>")
    assert before_answer == text[:-len("Hello.</s>")] and before_answer.endswith("ASSISTANT: ")


def test_rows_hold_bos_conversation_eos_and_mask_the_prompt(tok, seed_records):
    columns, stats = alpaca_columns(seed_records, tok, 4096)
    ids, labels = columns["input_ids"], columns["labels"]
    assert ids.shape == labels.shape == (175, 4097) and ids.dtype == np.int32
    assert stats["mismatched"] == 0 and stats["no_answer_records"] == []
    for row, record in zip(range(0, 175, 17), seed_records[::17]):
        text, before_answer = conversation(alpaca_prompt(record), record["output"])
        expected = [tok.bos_id] + tok.encode(text[:-len("</s>")]) + [tok.eos_id]
        assert ids[row, :len(expected)].tolist() == expected
        assert not ids[row, len(expected):].any()
        # Labels: -100 on BOS, the prompt and padding. The prompt ends where MindFormers puts it: its tokens
        # less the last, the "▁" of "ASSISTANT: " that Llama 2 merges into the answer (tok512 does not).
        start = len(tok.encode(before_answer))
        assert (labels[row, :start] == IGNORE).all() and (labels[row, len(expected):] == IGNORE).all()
        assert labels[row, start:len(expected)].tolist() == expected[start:]
        assert tok.decode(answer_ids(labels[row])[:-1]).endswith(tok.decode(tok.encode(record["output"])))


def test_long_rows_are_truncated_like_mindformers_and_answerless_rows_listed(tok, seed_records):
    columns, stats = alpaca_columns(seed_records, tok, 64)
    assert columns["input_ids"].shape == (175, 65)
    assert stats["truncated"] == 175  # tok512 spends more than 64 tokens on the system prompt alone
    assert stats["mismatched"] == 0
    assert stats["no_answer_records"] == list(range(175))
    assert (columns["labels"] == IGNORE).all()


SPECIAL_TEXT = [
    {"instruction": "Name the end-of-sequence token.", "output": "It is </s> in Llama."},
    {"instruction": "What does <unk> mean?", "output": "The unknown token <unk>."},
    {"instruction": "Complete: USER: hi ASSISTANT: hello", "output": "Done."},
    {"instruction": "Say hi.", "output": "Hi."},
]


def test_bookkeeping_faults_are_reported_and_kept_with_real_labels(tok):
    columns, stats = alpaca_columns(SPECIAL_TEXT, tok, 256, on_mismatch="keep")
    assert stats["mismatched"] == 3 and stats["mismatched_records"] == [0, 1, 2] and stats["dropped"] == 0
    ids, labels = columns["input_ids"], columns["labels"]
    assert len(ids) == 4
    # The <unk> answer keeps its id-0 token as a label; the </s> answer keeps its inner EOS.
    assert tok.pad_id in answer_ids(labels[1]) and answer_ids(labels[0]).count(tok.eos_id) == 2
    for row, record in enumerate(SPECIAL_TEXT):
        text, before_answer = conversation(alpaca_prompt(record), record["output"])
        answer = answer_ids(labels[row])
        assert answer[-1] == tok.eos_id and len(answer) >= len(tok.encode(record["output"]))
        end = int(np.flatnonzero(labels[row] != IGNORE)[-1]) + 1
        assert ids[row, end - len(answer):end].tolist() == answer and not ids[row, end:].any()


def test_bookkeeping_faults_can_be_skipped(tok):
    kept, _ = alpaca_columns(SPECIAL_TEXT, tok, 256, on_mismatch="keep")
    columns, stats = alpaca_columns(SPECIAL_TEXT, tok, 256, on_mismatch="skip")
    assert stats["mismatched"] == 3 and stats["dropped"] == 3
    assert columns["input_ids"].tolist() == kept["input_ids"][3:].tolist()
    assert columns["labels"].tolist() == kept["labels"][3:].tolist()


def test_matches_mindformers_on_the_seed_tasks(llama2_tokenizer, shared_fixtures, seed_records):
    """alpaca_converter.py + llama_preprocess.py --dataset_type qa --seq_length 512, row for row."""
    reference = shared_fixtures / "mindformers_records"
    rows = json.loads((reference / "mf_alpaca_seed_512.json").read_text())
    columns, stats = alpaca_columns(seed_records, Tokenizer(llama2_tokenizer), 512)
    assert columns["input_ids"].shape == (len(rows), 513) == (175, 513)

    def digest(row):
        return hashlib.sha256(np.ascontiguousarray(row, dtype=np.int32).tobytes()).hexdigest()[:16]

    for index, row in enumerate(rows):
        assert digest(columns["input_ids"][index]) == row["input_ids"], index
        assert digest(columns["labels"][index]) == row["labels"], index
    assert (columns["input_ids"] == np.load(reference / "alpaca_seed_512_input_ids.npy")).all()
    assert (columns["labels"] == np.load(reference / "alpaca_seed_512_labels.npy")).all()
    # The one row MindFormers left without labels is a prompt longer than the row, not a bookkeeping fault:
    # it is reported as answerless (and truncated), and no row of the seed tasks is a mismatch.
    masked = [index for index, row in enumerate(rows) if row["all_masked"]]
    assert masked == [62] and stats["no_answer_records"] == masked
    assert stats["mismatched"] == 0 and stats["truncated"] == 5


# ---- through the CLI ------------------------------------------------------------------------------------

def alpaca_cli(tmp_path, tokenizer, input_path, *extra, seq_length="64", output=None):
    return run(["preprocess", "alpaca", "--input", str(input_path), "--tokenizer", str(tokenizer),
                "--seq-length", seq_length, "--output", str(output or tmp_path / "out"), "--json", *extra])


def test_cli_writes_verified_records_with_the_statistics(tmp_path, tok512, tok, capsys):
    source = tmp_path / "alpaca.json"
    source.write_text(json.dumps(SPECIAL_TEXT))
    assert alpaca_cli(tmp_path, tok512, source, "--on-mismatch", "skip", seq_length="256") == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.splitlines()[-1])
    assert "tokenizing alpaca" in captured.err
    assert result["rows"] == 1 and result["row_length"]["input_ids"] == 257
    assert result["mismatched_records"] == 3 and result["dropped"] == 3
    manifest = verify(tmp_path / "out")
    assert manifest["stats"]["mismatched_records"] == [0, 1, 2]
    assert manifest["kind"] == "alpaca" and manifest["seq_length"] == 256
    assert manifest["stats"]["mismatched"] == 3 and manifest["stats"]["on_mismatch"] == "skip"
    assert manifest["sources"] == {"alpaca.json": hashlib.sha256(source.read_bytes()).hexdigest()}
    expected, _ = alpaca_columns(SPECIAL_TEXT, tok, 256, on_mismatch="skip")
    written = read_columns(tmp_path / "out")
    assert (written["input_ids"] == expected["input_ids"]).all() and (written["labels"] == expected["labels"]).all()


BAD_INPUTS = {
    "malformed": ("[{\"instruction\": ", "is not valid JSON"),
    "empty file": ("", "is empty"),
    "no records": ("[]", "has no records"),
    "not a list": ("{\"instruction\": \"x\"}", "must be a JSON list"),
    "missing field": (json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]),
                      "record 1 has no field 'output'"),
    "not a string": (json.dumps([{"instruction": "a", "output": 3}]), "record 0 field 'output' is not a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_cli_refuses_bad_input_in_one_line(tmp_path, tok512, capsys, case):
    text, message = BAD_INPUTS[case]
    source = tmp_path / "alpaca.json"
    source.write_text(text)
    assert alpaca_cli(tmp_path, tok512, source) == 1
    assert_one_line_error(capsys, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpaca.json"]  # nothing partial


def test_cli_refuses_bad_arguments(tmp_path, tok512, fixtures, capsys):
    seed = fixtures / "alpaca_seed_tasks.json"
    assert alpaca_cli(tmp_path, seed, seed) == 1
    assert_one_line_error(capsys, "is neither a sentencepiece model nor a tokenizer.json")
    assert alpaca_cli(tmp_path, tok512, seed, seq_length="1") == 1
    assert_one_line_error(capsys, "--seq-length must be at least 2, got 1")
    assert alpaca_cli(tmp_path, tok512, tmp_path / "missing.json") == 1
    assert_one_line_error(capsys, "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_cli_keeps_an_existing_output_unless_told(tmp_path, tok512, fixtures, capsys):
    seed = fixtures / "alpaca_seed_tasks.json"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    assert alpaca_cli(tmp_path, tok512, seed) == 1
    assert_one_line_error(capsys, "already exists (use --overwrite")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]
    assert alpaca_cli(tmp_path, tok512, seed, "--overwrite", seq_length="384") == 0
    assert verify(tmp_path / "out")["rows"] == 175 and not (tmp_path / "out" / "mine.txt").exists()


def test_debug_shows_the_exception(tmp_path, tok512):
    source = tmp_path / "alpaca.json"
    source.write_text("[]")
    with pytest.raises(PipelineError, match="has no records"):
        alpaca_cli(tmp_path, tok512, source, "--debug")


def assert_one_line_error(capsys, message):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
