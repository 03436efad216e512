"""The tokenizer must spell text exactly as MindFormers' LlamaTokenizer does, in batch as one by one."""

import hashlib
import json
import random

import pytest
import sentencepiece
from sentencepiece import sentencepiece_model_pb2

from llama.data.tokenizer import BLOCK, WORD_ENCODER_MIN_CHARS, Tokenizer, WordEncoder
from llama.data.wiki import mindformers_paragraphs, standard_text
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
    with pytest.raises(PipelineError, match="is neither a sentencepiece model nor a tokenizer.json"):
        Tokenizer(bad)


def test_missing_model_file(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        Tokenizer(tmp_path / "nope.model")


@pytest.fixture(scope="module")
def tok512_keeping_spaces(tok512, tmp_path_factory):
    """tok512 with Llama 2's normalizer setting (runs of spaces kept) and, like Llama 2, pieces for runs of
    spaces, so that `WordEncoder` applies to it and a word's leading spaces matter."""
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(tok512.read_bytes())
    model.normalizer_spec.remove_extra_whitespaces = False
    for run, score in (("\N{LOWER ONE EIGHTH BLOCK}" * 2, -1.5), ("\N{LOWER ONE EIGHTH BLOCK}" * 4, -7.5)):
        model.pieces.add(piece=run, score=score)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(model.SerializeToString())
    return path


def random_texts(seed: int, count: int) -> list[str]:
    """Words, runs of spaces at either end and inside, tabs, newlines, accents, CJK and emoji, at random."""
    alphabet = ["the", "a", "story", "Once", "upon", "0", "12", "x", ".", ",", "'s", " ", " ", " ", "  ", "\t", "\n",
                "\u00e9", "\u6226\u5834", "\U0001f600", "\xa0", "\u3000", "<", ">"]
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(count)]


def test_word_encoder_applies_only_where_it_is_exact(tok512, tok512_keeping_spaces):
    assert Tokenizer(tok512).words is None  # its normalizer collapses runs of spaces
    assert Tokenizer(tok512_keeping_spaces).words is not None
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(tok512_keeping_spaces.read_bytes())
    model.pieces.add(piece="a\N{LOWER ONE EIGHTH BLOCK}", score=-1.0)  # a piece that would join two words
    assert WordEncoder.for_model(model.SerializeToString()) is None


def test_word_encoder_equals_sentencepiece(tok512_keeping_spaces):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tok512_keeping_spaces))
    words = Tokenizer(tok512_keeping_spaces).words
    texts = [text for text in random_texts(0, 3000) if text]
    ids, offsets = words.encode(texts, workers=2)
    assert [ids[a:b].tolist() for a, b in zip(offsets, offsets[1:])] == sp.encode(texts)
    assert words.encode(["a \N{LOWER ONE EIGHTH BLOCK} b"], 1) is None and words.encode(["a\0b"], 1) is None


def test_large_inputs_take_the_word_encoder_and_spell_the_same(tok512_keeping_spaces):
    tok = Tokenizer(tok512_keeping_spaces)
    texts = [text + " <unk> " + other for text, other in zip(random_texts(1, 5000), random_texts(2, 5000))]
    assert sum(map(len, texts)) >= WORD_ENCODER_MIN_CHARS  # one call takes the word path, one text does not
    flat, offsets = tok.encode_flat(texts, bos=True, eos=True)
    assert [flat[a:b].tolist() for a, b in zip(offsets, offsets[1:])] == [tok.encode(t, True, True) for t in texts]
    with_marker = texts + ["\N{LOWER ONE EIGHTH BLOCK}"]  # a text the word encoder refuses: sentencepiece does all
    assert tok.encode_batch(with_marker) == [tok.encode(t) for t in with_marker]


def test_word_encoder_equals_sentencepiece_on_real_corpora(shared_data, llama2_tokenizer):
    """Llama 2's tokenizer on all of WikiText-2 train (as MindFormers splits it, and as the one text of the
    standard convention), SQuAD dev and Alpaca."""
    tok = Tokenizer(llama2_tokenizer)
    wiki = (shared_data / "wikitext2" / "wiki.train.tokens").read_text("utf-8")
    paragraphs, _ = mindformers_paragraphs(wiki)
    squad = json.loads((shared_data / "squad_v1.1" / "dev-v1.1.json").read_text("utf-8"))["data"]
    contexts = [p["context"] + " " + q["question"] for a in squad for p in a["paragraphs"] for q in p["qas"]]
    alpaca = [" ".join(r.values()) for r in json.loads((shared_data / "alpaca" / "alpaca_seed_tasks.json").read_text())]
    for texts in (paragraphs, [standard_text(wiki)], contexts, alpaca):
        ids, offsets = tok.words.encode(texts, workers=2)
        assert ids.tolist() == [i for ids in tok.sp.encode(texts, num_threads=2) for i in ids]
        assert len(offsets) == len(texts) + 1
