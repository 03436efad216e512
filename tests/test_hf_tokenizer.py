"""The tokenizer.json backend must give the ids transformers' AutoTokenizer (fast) gives on the same files,
and every stage must take it: the bundled byte-level BPE fixture always, the real SmolLM2 tokenizer when its
GGUF is here."""

import json
import shutil

import numpy as np
import pytest

from llama.cli import run as cli
from llama.data.alpaca import alpaca_prompt, conversation, read_alpaca
from llama.data.hf_tokenizer import HFTokenizer
from llama.data.records import read_columns
from llama.data.squad import read_squad
from llama.data.tokenizer import SentencePieceTokenizer, Tokenizer
from llama.data.wiki import mindformers_paragraphs, standard_text, wikitext_detokenize
from llama.errors import PipelineError

transformers = pytest.importorskip("transformers")


def auto(folder, **kwargs):
    return transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=True, **kwargs)


@pytest.fixture(scope="module")
def bpe768(fixtures):
    return fixtures / "bpe768"


def corpus_texts(wiki: str, squad: dict, alpaca: list) -> dict[str, list[str]]:
    """The strings the preprocessors encode: wiki paragraphs (MindFormers' split) and the standard text,
    SQuAD contexts, questions and answers, Alpaca records rendered as conversations and their fields."""
    examples = read_squad(squad, "all")
    records = read_alpaca(alpaca)
    return {
        "wiki paragraphs": mindformers_paragraphs(wiki)[0],
        "wiki standard": [standard_text(wiki)],
        "squad": sorted({e.context for e in examples}) + [e.question for e in examples] +
                 [a for e in examples for a in e.answers],
        "alpaca": [t for r in records for t in conversation(alpaca_prompt(r), r["output"])] +
                  [r[k] for r in records for k in ("instruction", "input", "output")],
    }


def assert_same_ids(ours: Tokenizer, theirs, texts: list[str]) -> None:
    """Without special tokens (how records are built) and with them (what AutoTokenizer(text) adds)."""
    assert ours.encode_batch(texts) == theirs(texts, add_special_tokens=False)["input_ids"]
    assert ours.encode_batch(texts, bos=ours.add_bos, eos=ours.add_eos) == theirs(texts)["input_ids"]


@pytest.fixture(scope="module")
def bundled_texts(fixtures):
    return corpus_texts((fixtures / "wiki_slice.tokens").read_text("utf-8"),
                        json.loads((fixtures / "squad_dev_slice.json").read_text("utf-8")),
                        json.loads((fixtures / "alpaca_seed_tasks.json").read_text("utf-8")))


@pytest.mark.parametrize("corpus", ["wiki paragraphs", "wiki standard", "squad", "alpaca"])
def test_bundled_bpe_equals_auto_tokenizer(bpe768, bundled_texts, corpus):
    assert_same_ids(HFTokenizer(bpe768), auto(bpe768), bundled_texts[corpus])


def test_special_ids_flags_and_identity(bpe768):
    tok = Tokenizer(bpe768 / "tokenizer.json")
    theirs = auto(bpe768)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id) == (theirs.bos_token_id, theirs.eos_token_id) == (1, 0)
    assert theirs.pad_token_id is None and tok.pad_id == tok.eos_id  # no pad and no unk token: EOS pads
    assert (tok.add_bos, tok.add_eos, tok.vocab_size) == (True, False, len(theirs))
    assert set(tok.files) == {"tokenizer.json", "tokenizer_config.json"}
    assert Tokenizer(bpe768).sha256 == tok.sha256


def test_special_token_text_and_decode(bpe768):
    tok, theirs = HFTokenizer(bpe768), auto(bpe768)
    text = "The game <|end_of_text|> began<|begin_of_text|>again  in 1997 ."
    assert tok.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    assert tok.eos_id in tok.encode(text)
    plain = auto(bpe768, split_special_tokens=True)(text, add_special_tokens=False)["input_ids"]
    assert tok.encode(text, split_special=False) == plain and tok.eos_id not in plain
    assert tok.encode(text, bos=True, eos=True) == [tok.bos_id] + tok.encode(text) + [tok.eos_id]
    ids = tok.encode(text)
    assert tok.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == text.replace(
        "<|end_of_text|>", "").replace("<|begin_of_text|>", "")
    flat, offsets = tok.encode_flat([text, "", text], bos=True)
    assert [flat[a:b].tolist() for a, b in zip(offsets, offsets[1:])] == [[1] + ids, [1], [1] + ids]


def _variant(bpe768, tmp_path, config_changes: dict, drop_post_processor: bool = False):
    folder = tmp_path / "variant"
    shutil.copytree(bpe768, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(config_changes)
    (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    if drop_post_processor:
        data = json.loads((folder / "tokenizer.json").read_text())
        data["post_processor"] = None
        (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


def test_no_bos_token_starts_texts_with_eos(bpe768, tmp_path):
    folder = _variant(bpe768, tmp_path, {"bos_token": None}, drop_post_processor=True)
    tok, theirs = HFTokenizer(folder), auto(folder)
    assert theirs.bos_token_id is None and (tok.bos_id, tok.add_bos) == (tok.eos_id, False)
    assert tok.encode("a b", bos=True) == [tok.eos_id] + theirs("a b")["input_ids"]


def test_config_tokens_missing_from_tokenizer_json_are_added_as_transformers_adds_them(bpe768, tmp_path, fixtures):
    unk = {"__type": "AddedToken", "content": "<unk>", "rstrip": True, "special": True}
    folder = _variant(bpe768, tmp_path, {"pad_token": "<|pad|>", "unk_token": unk,
                                          "additional_special_tokens": ["<|sep|>"], "add_prefix_space": True})
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))  # overrides the config
    tok, theirs = HFTokenizer(folder), auto(folder)
    text = "x<pad>y <|sep|>z<unk> <|pad|> " + (fixtures / "wiki_slice.tokens").read_text("utf-8")[:2000]
    assert tok.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    # added in transformers' order: <unk> 768, <pad> 769 (special_tokens_map.json wins), <|sep|> 770
    assert (tok.pad_id, tok.vocab_size) == (theirs.pad_token_id, len(theirs)) == (769, 771)


def test_special_tokens_map_is_ignored_beside_a_config_with_added_tokens_decoder(bpe768, tmp_path):
    declared = {str(i): {"content": content, "lstrip": False, "rstrip": False, "normalized": False,
                         "single_word": False, "special": True}
                for i, content in enumerate(["<|end_of_text|>", "<|begin_of_text|>"])}
    folder = _variant(bpe768, tmp_path, {"added_tokens_decoder": declared})
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    tok, theirs = HFTokenizer(folder), auto(folder)
    assert theirs.pad_token_id is None and (tok.pad_id, tok.vocab_size) == (tok.eos_id, len(theirs)) == (0, 768)
    assert tok.encode("a<pad>b") == theirs("a<pad>b", add_special_tokens=False)["input_ids"]
    assert "special_tokens_map.json" in tok.files  # still part of its identity, and copied with it


def test_backend_follows_the_path(bpe768, tok512, tmp_path):
    only_model = tmp_path / "sp"
    only_model.mkdir()
    shutil.copyfile(tok512, only_model / "tokenizer.model")
    assert isinstance(Tokenizer(tok512), SentencePieceTokenizer)
    assert isinstance(Tokenizer(only_model), SentencePieceTokenizer)
    both = tmp_path / "both"
    shutil.copytree(bpe768, both)
    shutil.copyfile(tok512, both / "tokenizer.model")
    assert isinstance(Tokenizer(both), HFTokenizer)
    assert Tokenizer(only_model).sha256 == Tokenizer(tok512).sha256


@pytest.mark.parametrize("name,content", [("tokenizer.json", b"{not json"), ("tokenizer.json", b"\xff\xfe"),
                                          ("tokenizer.json", b'{"model": {"type": "BPE"}}'),
                                          ("tok.bin", b"garbage" * 10), ("tokenizer.model", b"")])
def test_bad_tokenizer_files_are_one_line_errors(tmp_path, name, content):
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(PipelineError, match="is neither a sentencepiece model nor a tokenizer.json") as err:
        Tokenizer(bad)
    assert "\n" not in str(err.value)


def test_a_folder_without_a_tokenizer_is_an_error(tmp_path):
    with pytest.raises(PipelineError, match="holds neither tokenizer.json nor tokenizer.model"):
        Tokenizer(tmp_path)


def test_preprocess_cli_with_a_tokenizer_json(bpe768, fixtures, tmp_path, capsys):
    """`preprocess wiki` through the CLI: rows are AutoTokenizer's BOS + paragraph + EOS stream; a bad
    tokenizer file is a one-line error and writes nothing."""
    out = tmp_path / "wiki"
    wiki = fixtures / "wiki_slice.tokens"
    assert cli(["preprocess", "wiki", "--input", str(wiki), "--tokenizer", str(bpe768 / "tokenizer.json"),
                "--seq-length", "64", "--output", str(out)]) == 0
    theirs = auto(bpe768)
    paragraphs, _ = mindformers_paragraphs(wiki.read_text("utf-8"))
    stream = [i for ids in theirs(paragraphs, add_special_tokens=False)["input_ids"]
              for i in [theirs.bos_token_id] + ids + [theirs.eos_token_id]]
    rows = read_columns(out)["input_ids"]
    assert rows.shape[1] == 65 and rows.ravel().tolist() == stream[:rows.size]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"] == {"sha256": HFTokenizer(bpe768).sha256, "vocab_size": 768, "bos_id": 1,
                                     "eos_id": 0, "pad_id": 0}

    capsys.readouterr()
    bad = tmp_path / "bad" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text("[1, 2]")
    assert cli(["preprocess", "squad", "--input", str(fixtures / "squad_dev_slice.json"), "--tokenizer", str(bad),
                "--max-length", "64", "--output", str(tmp_path / "squad")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tokenizer ") and "neither a sentencepiece model nor a tokenizer.json" in err
    assert "\n" not in err and not (tmp_path / "squad").exists()


def test_squad_and_alpaca_records_use_the_tokenizers_ids(bpe768, fixtures, tmp_path):
    theirs = auto(bpe768)
    squad_out, alpaca_out = tmp_path / "squad", tmp_path / "alpaca"
    assert cli(["preprocess", "squad", "--input", str(fixtures / "squad_dev_slice.json"), "--tokenizer",
                str(bpe768), "--max-length", "512", "--mode", "train", "--output", str(squad_out)]) == 0
    example = read_squad(json.loads((fixtures / "squad_dev_slice.json").read_text("utf-8")))[0]
    # the answer is the ids that follow the prompt in prompt + " " + answer (byte-level BPE: " Denver" is one)
    prompt, full = theirs([example.prompt(), example.prompt() + " " + example.answers[0]],
                          add_special_tokens=False)["input_ids"]
    assert full[:len(prompt)] == prompt
    row = read_columns(squad_out)["input_ids"][0].tolist()
    expected = [1] + full + [0]
    assert row == expected + [0] * (513 - len(expected))
    assert cli(["preprocess", "alpaca", "--input", str(fixtures / "alpaca_seed_tasks.json"), "--tokenizer",
                str(bpe768), "--seq-length", "256", "--output", str(alpaca_out)]) == 0
    columns = read_columns(alpaca_out)
    record = read_alpaca(json.loads((fixtures / "alpaca_seed_tasks.json").read_text("utf-8")))[0]
    text, _ = conversation(alpaca_prompt(record), record["output"])
    rounds = [r for r in text.split("</s>") if r]
    ids = [1] + [i for r in theirs(rounds, add_special_tokens=False)["input_ids"] for i in r + [0]]
    assert columns["input_ids"][0][:len(ids)].tolist() == ids[:257]
    assert (columns["labels"][0] != -100).any()


# ------------------------------------------------------------------------- checkpoints, predict and eval

@pytest.fixture(scope="module")
def bpe_checkpoint(tmp_path_factory, bpe768):
    """A random stories260K-shaped model over bpe768's vocabulary, saved with the tokenizer folder."""
    import mindspore as ms
    from llama.config.model import ModelConfig
    from llama.model import LlamaForCausalLM
    from llama.weights.load import save_checkpoint

    ms.set_seed(3)
    config = ModelConfig.named("stories260K").replace(vocab_size=768)
    out = tmp_path_factory.mktemp("bpe") / "ckpt"
    save_checkpoint(LlamaForCausalLM(config), out, config, tokenizer=bpe768)
    return out


def test_convert_carries_the_tokenizer_files(bpe_checkpoint, bpe768, tmp_path, capsys):
    files = json.loads((bpe_checkpoint / "manifest.json").read_text())["files"]
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files) and "tokenizer.model" not in files
    capsys.readouterr()
    assert cli(["convert", "--input", str(bpe_checkpoint), "--to", "hf", "--output", str(tmp_path / "hf"),
                "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["tokenizer"] == ["tokenizer.json", "tokenizer_config.json"]
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (bpe768 / "tokenizer.json").read_bytes()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert cli(["convert", "--input", str(bpe_checkpoint), "--output", str(tmp_path / "out"),
                "--tokenizer", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert "neither a sentencepiece model nor a tokenizer.json" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_predict_and_eval_take_the_checkpoints_tokenizer_json(bpe_checkpoint, fixtures, tmp_path):
    from llama.eval.perplexity import evaluate_perplexity
    from llama.eval.predict import predict
    from llama.eval.squad import evaluate_squad

    result = predict(bpe_checkpoint, ["The game began in 1997 ."], max_new_tokens=4, ignore_eos=True)
    assert result["new_tokens"] == 4 and isinstance(result["completions"][0]["completion"], str)
    squad = evaluate_squad(bpe_checkpoint, fixtures / "squad_dev_slice.json", tmp_path / "squad", limit=1,
                           max_new_tokens=2, show_progress=False)
    assert squad["questions"] == 1
    wiki = tmp_path / "wiki.tokens"
    wiki.write_text("".join((fixtures / "wiki_slice.tokens").read_text("utf-8").splitlines(True)[:40]), "utf-8")
    ppl = evaluate_perplexity(bpe_checkpoint, wiki, "standard", window=256, rolling_window=256, show_progress=False)
    assert ppl["ppl_standard_ctx256"] > 1 and ppl["word_perplexity"] > 1


def test_training_leaves_out_the_pad_id_of_its_records(bpe768, fixtures, tmp_path):
    """Rows padded by a tokenizer with its own pad token (id 768): the loss mask takes the records' pad id."""
    from llama.config.train import TrainConfig
    from llama.train.batches import load_batches
    from train_support import tiny_config

    folder = _variant(bpe768, tmp_path, {"pad_token": "<|pad|>"})
    out = tmp_path / "squad"
    assert cli(["preprocess", "squad", "--input", str(fixtures / "squad_dev_slice.json"), "--tokenizer",
                str(folder), "--max-length", "600", "--mode", "train", "--output", str(out)]) == 0
    batches = load_batches(TrainConfig.from_dict(tiny_config(run_mode="finetune", data={"train": str(out)})), 1)
    assert batches.pad_id == 768 and (batches.input_ids == 768).any()


# ---------------------------------------------------------------------------------------- real SmolLM2

@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf, tmp_path_factory):
    """transformers' tokenizer of the SmolLM2 GGUF, saved as tokenizer.json + configs (the copy of the
    GGUF it also saves as tokenizer.model is removed)."""
    folder = tmp_path_factory.mktemp("smollm2")
    auto(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).save_pretrained(folder)
    (folder / "tokenizer.model").unlink(missing_ok=True)
    return folder


def test_smollm2_tokenizer_on_bundled_corpora(smollm2_tokenizer, bundled_texts):
    tok, theirs = HFTokenizer(smollm2_tokenizer), auto(smollm2_tokenizer)
    assert tok.vocab_size == 49152 and (tok.bos_id, tok.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    for texts in bundled_texts.values():
        assert_same_ids(tok, theirs, texts)
    context = bundled_texts["squad"][0]
    assert tok.decode(tok.encode(context)) == context


@pytest.mark.slow
def test_smollm2_tokenizer_on_real_corpora(smollm2_tokenizer, shared_data):
    """All of WikiText-2 train (MindFormers' paragraphs, the standard text, lm-eval's documents), all SQuAD
    dev contexts, questions and answers, and the Alpaca seed records."""
    wiki = shared_data / "wikitext2" / "wiki.train.tokens"
    squad = shared_data / "squad_v1.1" / "dev-v1.1.json"
    alpaca = shared_data / "alpaca" / "alpaca_seed_tasks.json"
    if not (wiki.is_file() and squad.is_file() and alpaca.is_file()):
        pytest.skip("WikiText-2, SQuAD dev or the Alpaca seed is not in ../shared/data")
    text = wiki.read_text("utf-8")
    texts = corpus_texts(text, json.loads(squad.read_text("utf-8")), json.loads(alpaca.read_text("utf-8")))
    texts["wiki detokenized"] = [wikitext_detokenize(text)]
    tok, theirs = HFTokenizer(smollm2_tokenizer), auto(smollm2_tokenizer)
    for name, all_texts in texts.items():
        for first in range(0, len(all_texts), 2048):  # in slices, to keep transformers' lists small
            batch = all_texts[first:first + 2048]
            ids, offsets = tok.encode_flat(batch)
            expected = theirs(batch, add_special_tokens=False)["input_ids"]
            assert np.array_equal(np.diff(offsets), [len(e) for e in expected]), (name, first)
            assert ids.tolist() == [i for e in expected for i in e], (name, first)
