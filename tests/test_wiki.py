"""WikiText-2 preprocessing: record-for-record MindFormers output, the GPTQ windows, and clean failures."""

import hashlib
import json
import random
import re

import numpy as np
import pytest
import sentencepiece

from llama.cli import run
from llama.data.records import read_columns
from llama.data.wiki import _replace, mindformers_paragraphs, preprocess_wiki, standard_text, wikitext_detokenize
from llama.errors import PipelineError


def cli(*argv):
    return run(list(map(str, argv)), command_modules=("llama.data.cli",))


@pytest.fixture(scope="module")
def wiki_slice(fixtures):
    return fixtures / "wiki_slice.tokens"


def test_detokenizer_examples():
    text = " = = Reception = = \n The 3 @.@ 5 @-@ inch gun ( the \" main \" one ) , N 's \n"
    assert wikitext_detokenize(text) == " == Reception ==\nThe 3.5-inch gun (the \"main\" one), 1's\n"


def lm_eval_wikitext_detokenizer(string):
    """lm-eval's `wikitext_detokenizer`, step for step as published (the reference ours must equal)."""
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    for old, new in [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                     (" ! ", "! "), (" ? ", "? "), (" , ", ", ")]:
        string = string.replace(old, new)
    for pattern, replacement in [(r"\(\s*([^\)]*?)\s*\)", r"(\1)"), (r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
                                 (r"{\s*([^}]*?)\s*}", r"{\1}"), (r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
                                 (r"'\s*([^']*?)\s*'", r"'\1'")]:
        string = re.sub(pattern, replacement, string)
    for old, new in [("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" " + chr(176) + " ", chr(176)),
                     (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")]:
        string = string.replace(old, new)
    return string


def test_detokenizer_equals_lm_eval_on_random_soup():
    """Every step's pattern pieces, brackets, ASCII and Unicode whitespace and multi-byte text, mixed at random."""
    alphabet = ["(", ")", "[", "]", "{", "}", '"', "'", " ", "\n", "\t", "\x1c", "\xa0", "\u3000", "\u2009", "@",
                "-", ",", ".", ":", ";", "!", "?", "=", "s", "N", "/", "7", chr(176), "a", "\u00e9", "\u6226", "\U0001f600"]
    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert wikitext_detokenize(text) == lm_eval_wikitext_detokenizer(text), repr(text)


def test_replace_step_equals_bytes_replace_on_long_texts():
    """Long texts with few matches take the numpy path: the same bytes as bytes.replace, overlapping runs
    such as `" . . . "` and `"= = = = ="` included; with many matches it hands over to bytes.replace."""
    steps = [(" . ", ". "), ("= = =", "==="), ("= =", "=="), (" @-@ ", "-"), ("s '", "s'"), (" \n", "\n"),
             ("\n ", "\n"), (" N ", " 1 "), (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}")]
    filler = ["word", "Word", "N", "s", "12", " ", " ", "\n", "\N{DEGREE SIGN}", "\u6226"]
    fragments = [" . ", " . . . ", "= ", "= = = = =", " @-@ ", " @-@ @-@ ", "s '", " \n", "\n ", " N ", " N N ",
                 " \N{DEGREE SIGN} "]
    rng = random.Random(2)
    for density in (0.002, 0.02, 0.5):
        text = "".join(rng.choice(fragments) if rng.random() < density else rng.choice(filler) for _ in range(60000))
        data = text.encode()
        for old, new in steps:
            assert _replace(old, new)(data) == data.replace(old.encode(), new.encode()), (density, old)


def test_detokenizer_equals_lm_eval_on_wikitext(shared_data):
    text = (shared_data / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")
    assert wikitext_detokenize(text) == lm_eval_wikitext_detokenizer(text)


def test_paragraphs_drop_headings_and_keep_text_as_is():
    paragraphs, headings = mindformers_paragraphs(" = A = \n \n x <unk> y \n \n = = B = = \n \n z \n \n \n")
    assert (paragraphs, headings) == (["x <unk> y", "z", "\n"], 2)


def test_standard_text_joins_dataset_rows():
    assert standard_text(" a \n \n b \n") == " a \n" + "\n\n" + "" + "\n\n" + " b \n"


def test_mindformers_mode_on_slice(tmp_path, wiki_slice, tok512):
    manifest = preprocess_wiki(wiki_slice, tok512, 64, tmp_path / "out", show_progress=False)
    rows = read_columns(tmp_path / "out")["input_ids"]
    assert rows.shape == (manifest["rows"], 65) and manifest["rows"] > 100
    stats = manifest["stats"]
    assert stats["tokens"] == rows.size + stats["dropped"] and stats["dropped"] < 65

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tok512))
    paragraphs, _ = mindformers_paragraphs(wiki_slice.read_text(encoding="utf-8"))
    pieces = paragraphs[0].split("<unk>")  # MindFormers: each piece on its own, <unk> → 0, empty pieces skipped
    first = [1] + sp.encode(pieces[0]) + [i for piece in pieces[1:] for i in [0] + sp.encode(piece)] + [2]
    assert len(pieces) > 2 and rows.reshape(-1)[:len(first)].tolist() == first
    # Every paragraph brings one BOS and one EOS; every literal <unk> becomes id 0 (plain sentencepiece: never).
    kept = rows.reshape(-1)
    bos, eos = np.flatnonzero(kept == 1), np.flatnonzero(kept == 2)
    assert abs(len(bos) - len(eos)) <= 1 and (kept[eos[eos < len(kept) - 1] + 1] == 1).all()
    unks = sum(p.count("<unk>") for p in paragraphs)
    assert unks > 10 and 0 < (kept == 0).sum() <= unks


def test_standard_mode_on_slice(tmp_path, wiki_slice, tok512):
    manifest = preprocess_wiki(wiki_slice, tok512, 128, tmp_path / "out", mode="standard", show_progress=False)
    rows = read_columns(tmp_path / "out")["input_ids"]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tok512))
    stream = [1] + sp.encode(standard_text(wiki_slice.read_text(encoding="utf-8")))
    count = len(stream) // 128
    assert rows.shape == (count, 128) and manifest["stats"]["dropped"] == len(stream) - count * 128
    assert rows.reshape(-1).tolist() == stream[:count * 128]


def test_cli_writes_and_verifies(tmp_path, wiki_slice, tok512, capsys):
    out = tmp_path / "wiki"
    assert cli("preprocess", "wiki", "--input", wiki_slice, "--tokenizer", tok512, "--seq-length", 32,
               "--output", out, "--json") == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["rows"] > 0 and summary["row_length"] == {"input_ids": 33} and summary["mode"] == "mindformers"
    assert cli("verify", out, "--json") == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["verified"] is True

    record = out / "wiki32.mindrecord"
    data = bytearray(record.read_bytes())
    data[len(data) // 2] ^= 0x01
    record.write_bytes(bytes(data))
    assert cli("verify", out) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "wiki32.mindrecord" in err and "\n" not in err


def _bad_inputs(tmp_path, wiki_slice, tok512):
    empty = tmp_path / "empty.tokens"
    empty.write_text(" \n \n")
    not_model = tmp_path / "tokenizer.model"
    not_model.write_bytes(b"\x00garbage" * 100)
    latin1 = tmp_path / "latin1.tokens"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    return {
        "is empty": (empty, tok512, 16, tmp_path / "o1"),
        "is not UTF-8": (latin1, tok512, 16, tmp_path / "o5"),
        "does not exist": (tmp_path / "missing.tokens", tok512, 16, tmp_path / "o6"),
        "is neither a sentencepiece model nor a tokenizer.json": (wiki_slice, not_model, 16, tmp_path / "o2"),
        "at least 2": (wiki_slice, tok512, 1, tmp_path / "o3"),
        "already exists": (wiki_slice, tok512, 16, existing),
        "fewer than one row": (wiki_slice, tok512, 10 ** 7, tmp_path / "o4"),
    }


def test_bad_input_is_one_line_error_and_writes_nothing(tmp_path, wiki_slice, tok512, capsys):
    cases = _bad_inputs(tmp_path, wiki_slice, tok512)
    before = sorted(p.name for p in tmp_path.iterdir())
    for message, (input, tokenizer, seq_length, output) in cases.items():
        argv = ["preprocess", "wiki", "--input", input, "--tokenizer", tokenizer, "--seq-length", seq_length,
                "--output", output]
        assert cli(*argv) == 1, message
        err = capsys.readouterr().err.splitlines()  # progress lines may come first
        assert err[-1].startswith("error: ") and message in err[-1], err
        assert not any(line.startswith(("error", "Traceback")) for line in err[:-1]), err
        with pytest.raises(PipelineError, match=message):
            cli(*argv, "--debug")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no outputs, no leftover partial folders
    assert [p.name for p in (tmp_path / "existing").iterdir()] == ["keep.txt"]


def test_valid_split_matches_mindformers_record_for_record(tmp_path, shared_data, shared_fixtures, llama2_tokenizer):
    """MindFormers' llama_preprocess.py on wiki.valid.tokens at seq_length 4095: 66 rows of 4096."""
    reference = shared_fixtures / "mindformers_records"
    expected = json.loads((reference / "mf_wiki_valid_4095.json").read_text())
    manifest = preprocess_wiki(shared_data / "wikitext2" / "wiki.valid.tokens", llama2_tokenizer, 4095,
                               tmp_path / "valid", show_progress=False)
    rows = read_columns(tmp_path / "valid")["input_ids"]
    assert manifest["rows"] == len(expected) == 66 and rows.shape == (66, 4096)
    digests = [hashlib.sha256(row.astype(np.int32).tobytes()).hexdigest()[:16] for row in rows]
    assert digests == [entry["input_ids"] for entry in expected]
    assert [entry["len"] for entry in expected] == [4096] * 66
    np.testing.assert_array_equal(rows[:2], np.load(reference / "wiki_valid_4095_first2_input_ids.npy"))
