"""The tokenizer must spell text exactly as MindFormers' LlamaTokenizer does, in batch as one by one."""

import hashlib

import pytest
import sentencepiece

from llama.data.tokenizer import BLOCK, Tokenizer
from llama.errors import PipelineError


@pytest.fixture(scope="module")
def tok(tok512):
    return Tokenizer(tok512)


@pytest.fixture(scope="module")
def sp(tok512):
    return sentencepiece.SentencePieceProcessor(model_file=str(tok512))


def test_identity_and_special_ids(tok, tok512):
    assert tok.sha256 == hashlib.sha256(tok512.read_bytes()).hexdigest()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (512, 1, 2, 0)


def test_special_strings_split_text_and_keep_surrounding_whitespace(tok, sp):
    assert tok.encode("a </s> b<s>c<unk>") == sp.encode("a ") + [2] + sp.encode(" b") + [1] + sp.encode("c") + [0]
    assert tok.encode("<unk><unk>") == [0, 0]  # empty pieces between special tokens encode to nothing
    assert tok.encode("a <unk> b", split_special=False) == sp.encode("a <unk> b")
    assert 0 not in sp.encode("a <unk> b")


def test_bos_eos_and_decode(tok, sp):
    ids = tok.encode("Once upon a time", bos=True, eos=True)
    assert ids == [1] + sp.encode("Once upon a time") + [2]
    assert tok.decode(ids) == "Once upon a time"
    assert tok.encode("", bos=True, eos=True) == [1, 2]


def test_batch_equals_one_by_one_across_blocks_and_threads(tok):
    texts = [f"line {i} <unk> with </s> specials {i * 7}" if i % 3 else f" plain {i}" for i in range(BLOCK + 50)]
    expected = [tok.encode(text, bos=True) for text in texts]
    assert tok.encode_batch(texts, bos=True, workers=1) == expected
    assert tok.encode_batch(texts, bos=True, workers=2) == expected
    flat, offsets = tok.encode_flat(texts, bos=True)
    assert flat.dtype.name == "int32" and len(offsets) == len(texts) + 1
    assert [flat[a:b].tolist() for a, b in zip(offsets, offsets[1:])] == expected


def test_mindformers_unk_example_with_llama2(llama2_tokenizer):
    """reference.md: `" 000 <unk> x"` → ▁▁ 0 0 0 ▁ <unk>(0) ▁ ▁x, where plain sentencepiece spells < unk >."""
    tok = Tokenizer(llama2_tokenizer)
    ids = tok.encode(" 000 <unk> x")
    assert [tok.sp.id_to_piece(i) for i in ids] == ["▁▁", "0", "0", "0", "▁", "<unk>", "▁", "▁x"]
    assert ids[5] == 0
    plain = [tok.sp.id_to_piece(i) for i in tok.encode(" 000 <unk> x", split_special=False)]
    assert "unk" in plain and "<unk>" not in plain


@pytest.mark.parametrize("content", [b"", b"not a model at all\n" * 10])
def test_bad_model_file_is_a_one_line_error(tmp_path, content):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(content)
    with pytest.raises(PipelineError, match="is not a sentencepiece model"):
        Tokenizer(bad)


def test_missing_model_file(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        Tokenizer(tmp_path / "nope.model")
