"""GGUF import against llama.cpp's `gguf` package and transformers' GGUF loader (the peers).

The always-run tests write small GGUF files with gguf.GGUFWriter, the way llama.cpp's convert_hf_to_gguf does
(q/k rows permuted to the interleaved rotary layout, tensors quantized), from the bundled tiny Hugging Face
model and tokenizers: tok512's sentencepiece vocabulary and a byte-level BPE trained on the WikiText slice.
"""

import gc
import json

import ml_dtypes
import numpy as np
import pytest
import mindspore as ms
from gguf import GGMLQuantizationType as Q, GGUFWriter, quants
from safetensors.numpy import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from llama.cli import run
from llama.weights.load import load_checkpoint
from llama.weights.names import hf_to_ms_name
from llama.weights.source import open_checkpoint

GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
# Quantization of each hf_tiny_llama tensor (rows of 64 values, except ffn_down's 172, which no block divides).
TINY_TYPES = {"token_embd": Q.Q8_0, "output": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q5_0,
              "attn_output": Q.Q8_0, "ffn_gate": Q.Q4_0, "ffn_up": Q.Q5_1, "ffn_down": Q.BF16}
K_QUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, module = hf_name.removesuffix(".weight").split(".", 3)
    return f"blk.{layer}.{GGUF_LAYER[module]}.weight"


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: rotate-half rows -> interleaved pairs."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def row_order(rows: int, heads: int) -> np.ndarray:
    """Which original row each stored row is, so the expected weights are undone without the library's code."""
    return llama_cpp_permute(np.arange(rows)[:, None], heads)[:, 0]


def spm_vocab(model_path) -> dict:
    """tokens, scores and llama.cpp token types of a sentencepiece model (the types share numbering)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    kinds = [(sp.is_unknown, 2), (sp.is_control, 3), (sp.is_unused, 5), (sp.is_byte, 6)]
    types = [next((kind for test, kind in kinds if test(i)), 1) for i in range(sp.get_piece_size())]
    return {"model": "llama", "tokens": [sp.id_to_piece(i) for i in range(sp.get_piece_size())],
            "scores": [sp.get_score(i) for i in range(sp.get_piece_size())], "types": types,
            "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "add_bos": True}


def byte_level_vocab(text_file, size: int) -> dict:
    """A byte-level BPE trained like SmolLM's (digits split before the GPT-2 regex), as a GGUF "gpt2" vocab."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train([str(text_file)], trainers.BpeTrainer(vocab_size=size, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    assert len(tokens) == size
    return {"model": "gpt2", "pre": "smollm", "tokens": tokens, "merges": [" ".join(m) for m in model["merges"]],
            "types": [3 if token in specials else 1 for token in tokens], "bos": 1, "eos": 2, "unk": 0,
            "pad": 2, "add_bos": True}


def write_gguf(path, weights: dict, config: dict, types: dict, vocab: dict, architecture: str = "llama"):
    """A GGUF as llama.cpp writes one: HF weights renamed, q/k permuted, each tensor stored as `types` says
    (by GGUF name; F32 otherwise), hyperparameters and vocabulary in the metadata. Returns what was stored."""
    writer = GGUFWriter(path, architecture)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_tokenizer_model(vocab["model"])
    if "pre" in vocab:
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    writer.add_unk_token_id(vocab["unk"])
    if "pad" in vocab:
        writer.add_pad_token_id(vocab["pad"])
    writer.add_add_bos_token(vocab["add_bos"])
    stored = {}
    for hf_name, array in weights.items():
        name = gguf_name(hf_name)
        if ".attn_q." in name or ".attn_k." in name:
            array = llama_cpp_permute(array, heads if ".attn_q." in name else kv_heads)
        qtype = types.get(name.removesuffix(".weight").split(".")[-1], Q.F32)
        data = array.astype(np.float32) if qtype == Q.F32 else quants.quantize(array.astype(np.float32), qtype)
        writer.add_tensor(name, data, raw_dtype=None if qtype == Q.F32 else qtype)
        stored[hf_name] = (data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def expected_weights(stored: dict, config: dict) -> dict:
    """MindFormers name -> the dequantized stored tensor in Hugging Face's row order."""
    out = {}
    for hf_name, (data, qtype) in stored.items():
        array = quants.dequantize(data, qtype).reshape(data.shape[0], -1) if qtype != Q.F32 else data
        if ".q_proj." in hf_name or ".k_proj." in hf_name:
            heads = config["num_attention_heads" if ".q_proj." in hf_name else "num_key_value_heads"]
            array = array[np.argsort(row_order(array.shape[0], heads))]
        out[hf_to_ms_name(hf_name)] = array
    return out


def converted(folder) -> dict:
    return {name: entry.read() for name, entry in open_checkpoint(folder).entries.items()}


@pytest.fixture(scope="module")
def tiny(fixtures):
    hf_dir = fixtures / "hf_tiny_llama"
    return load_file(hf_dir / "model.safetensors"), json.loads((hf_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory, tiny, tok512):
    """hf_tiny_llama quantized, with tok512's sentencepiece vocabulary."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-spm.gguf"
    stored = write_gguf(path, *tiny, TINY_TYPES, spm_vocab(tok512))
    return path, stored


@pytest.fixture(scope="module")
def bpe_gguf(tmp_path_factory, tiny, fixtures):
    """hf_tiny_llama with a byte-level BPE vocabulary of 512 tokens and the "smollm" pre-tokenizer."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-bpe.gguf"
    write_gguf(path, *tiny, TINY_TYPES, byte_level_vocab(fixtures / "wiki_slice.tokens", 512))
    return path


def test_weights_are_the_dequantized_tensors_in_rotate_half_layout(spm_gguf, tiny, tmp_path):
    path, stored = spm_gguf
    assert run(["convert", "--input", str(path), "--output", str(tmp_path / "out")]) == 0
    ours, expected = converted(tmp_path / "out"), expected_weights(stored, tiny[1])
    assert sorted(ours) == sorted(expected)
    for name, array in expected.items():
        assert ours[name].dtype == np.float32 and np.array_equal(ours[name], array), name
    # the layout is the model's: close to the original weights, which the interleaved rows are not
    weights = tiny[0]
    q = ours["model.layers.0.attention.wq.weight"]
    assert np.abs(q - weights["model.layers.0.self_attn.q_proj.weight"]).max() < 0.1 * np.abs(q).max()
    np.testing.assert_array_equal(ours["model.layers.1.attention_norm.weight"],
                                  weights["model.layers.1.input_layernorm.weight"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "gguf" and manifest["dtype"] == "float32"
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(manifest["files"])
    config = manifest["model_config"]
    assert (config["num_heads"], config["num_kv_heads"], config["intermediate_size"], config["vocab_size"],
            config["tie_word_embeddings"]) == (8, 4, 172, 512, False)


def test_logits_equal_transformers_on_the_same_gguf(spm_gguf, fixtures, tmp_path):
    import torch
    path, _ = spm_gguf
    assert run(["convert", "--input", str(path), "--output", str(tmp_path / "out"), "--to", "hf"]) == 0
    input_ids = np.load(fixtures / "hf_tiny_llama" / "input_ids.npy")
    model, _ = load_checkpoint(tmp_path / "out")
    ours = model(ms.Tensor(input_ids)).asnumpy()
    peer = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        theirs = peer(torch.tensor(input_ids, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
    assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))


def test_k_quants_bf16_output_and_tied_embeddings(tmp_path, tok512):
    """K-quant blocks (which gguf can read but not write) from random bytes whose f16 scales stay finite."""
    config = {"num_hidden_layers": 1, "max_position_embeddings": 64, "hidden_size": 256, "intermediate_size": 256,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}
    shapes = {"model.embed_tokens.weight": (512, 256), "model.norm.weight": (256,),
              "model.layers.0.input_layernorm.weight": (256,), "model.layers.0.post_attention_layernorm.weight": (256,),
              **{f"model.layers.0.{module}.weight": (128 if module.endswith(("k_proj", "v_proj")) else 256, 256)
                 for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}}
    rng = np.random.default_rng(0)
    stored = {}
    for i, (hf_name, shape) in enumerate(shapes.items()):
        if len(shape) == 1:
            stored[hf_name] = (rng.standard_normal(shape).astype(np.float32), Q.F32)
            continue
        qtype = K_QUANTS[i % len(K_QUANTS)]
        block, size = quants.GGML_QUANT_SIZES[qtype]
        stored[hf_name] = (rng.integers(0, 0x3C, (shape[0], shape[1] // block * size), dtype=np.uint8), qtype)
    assert {qtype for _, qtype in stored.values()} == {Q.F32, *K_QUANTS}
    path = tmp_path / "kquants.gguf"
    writer = GGUFWriter(path, "llama")
    for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", 256),
                       ("feed_forward_length", 256), ("head_count", 4), ("head_count_kv", 2)):
        getattr(writer, f"add_{key}")(value)
    writer.add_layer_norm_rms_eps(1e-6)
    vocab = spm_vocab(tok512)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    for hf_name, (data, qtype) in stored.items():
        writer.add_tensor(gguf_name(hf_name), data, raw_dtype=None if qtype == Q.F32 else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # stored q/k blocks are the interleaved layout already; expected_weights undoes it as for the tiny model
    assert run(["convert", "--input", str(path), "--output", str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    ours, expected = converted(tmp_path / "out"), expected_weights(stored, config)
    assert sorted(ours) == sorted(expected) and "lm_head.weight" not in ours
    for name, array in expected.items():
        assert np.isfinite(array).all() and np.abs(array).max() > 0, name
        assert ours[name].dtype == ml_dtypes.bfloat16, name
        assert np.array_equal(ours[name], array.astype(ml_dtypes.bfloat16)), name
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["model_config"]["tie_word_embeddings"] is True
    assert manifest["model_config"]["rope_theta"] == 10000.0 and manifest["model_config"]["rms_norm_eps"] == 1e-6


def tokenizer_texts(fixtures) -> list[str]:
    squad = json.loads((fixtures / "squad_dev_slice.json").read_text())
    paragraphs = [p for article in squad["data"] for p in article["paragraphs"]]
    lines = [line for line in (fixtures / "wiki_slice.tokens").read_text().splitlines() if line.strip()]
    return lines[:150] + [p["context"] for p in paragraphs[:10]] + [q["question"] for p in paragraphs for q in p["qas"]]


@pytest.mark.parametrize("kind", ["spm", "bpe"])
def test_tokenizer_ids_equal_transformers_gguf_tokenizer(kind, spm_gguf, bpe_gguf, fixtures, tmp_path):
    path = spm_gguf[0] if kind == "spm" else bpe_gguf
    assert run(["convert", "--input", str(path), "--output", str(tmp_path / "out")]) == 0
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = [Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json")),
            PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "out" / "tokenizer.json")),
            AutoTokenizer.from_pretrained(tmp_path / "out")]
    for text in tokenizer_texts(fixtures) + ["<|im_start|>user\n3 ½ apples<|im_end|>", "  two  spaces", "</s><s>"]:
        expected = theirs(text)["input_ids"]
        assert ours[0].encode(text).ids == expected, text
        assert ours[1](text)["input_ids"] == expected and ours[2](text)["input_ids"] == expected, text
        assert ours[2].decode(expected, clean_up_tokenization_spaces=False) == \
            theirs.decode(expected, clean_up_tokenization_spaces=False)
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == \
        (("<s>", "</s>", True) if kind == "spm" else ("<|im_start|>", "<|im_end|>", True))


def test_bad_gguf_files_fail_in_one_line_and_write_nothing(tmp_path, tiny, tok512, spm_gguf, capsys):
    weights, config = tiny
    vocab = spm_vocab(tok512)
    other = tmp_path / "qwen.gguf"
    write_gguf(other, weights, config, {}, vocab, architecture="qwen2")
    unsupported = tmp_path / "f32.gguf"
    write_gguf(unsupported, weights, config, {}, vocab)
    blob = bytearray(unsupported.read_bytes())
    raw = tmp_path / "raw.gguf"          # the same file with one tensor relabelled Q8_1, which gguf cannot read
    name = b"blk.0.ffn_gate.weight"
    at = blob.index(name) + len(name) + 4 + 2 * 8          # name, n_dims (u32), two dims (u64): then the type
    assert int.from_bytes(blob[at:at + 4], "little") == Q.F32
    blob[at:at + 4] = int(Q.Q8_1).to_bytes(4, "little")
    raw.write_bytes(bytes(blob))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(spm_gguf[0].read_bytes()[:-1000])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    for path, message in [(other, "architecture 'qwen2'"), (raw, "Q8_1"), (truncated, "truncated"),
                          (garbage, "not a readable GGUF")]:
        capsys.readouterr()
        assert run(["convert", "--input", str(path), "--output", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "out").exists()


def test_smollm2_gguf_logits_and_tokenizer_equal_transformers(smollm2_gguf, fixtures, tmp_path):
    """The real SmolLM2-135M-Instruct Q4_1 file, converted by the CLI and run by our model, against
    transformers' own GGUF loading of it (float32)."""
    import torch
    out = tmp_path / "smollm2"
    assert run(["convert", "--input", str(smollm2_gguf), "--output", str(out), "--dtype", "float32"]) == 0
    theirs_tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    ours_tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    wiki = (fixtures / "wiki_slice.tokens").read_text().split("\n")[3].strip()
    squad = json.loads((fixtures / "squad_dev_slice.json").read_text())
    question = squad["data"][0]["paragraphs"][0]["qas"][0]["question"]
    for text in (wiki, question):
        # transformers' GGUF loader always prepends BOS; the file says tokenizer.ggml.add_bos_token = false
        assert theirs_tok(text)["input_ids"] == [1] + ours_tok(text)["input_ids"]
        assert theirs_tok(text, add_special_tokens=False)["input_ids"] == ours_tok(text)["input_ids"]
    # llama.cpp's "smollm" pre-tokenizer isolates every \p{N} character; transformers' loader does not
    assert ours_tok.convert_ids_to_tokens(ours_tok("are ½ inch")["input_ids"]) == ["are", "Ġ", "Â½", "Ġinch"]
    ids = ours_tok(wiki)["input_ids"][:64]
    assert len(ids) == 64
    model, config = load_checkpoint(out)
    assert (config.num_layers, config.hidden_size, config.num_kv_heads, config.rope_theta,
            config.tie_word_embeddings, config.vocab_size) == (30, 576, 3, 100000.0, True, 49152)
    ours = model(ms.Tensor(np.array([ids], dtype=np.int32))).asnumpy()[0]
    del model
    gc.collect()
    peer = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32)
    with torch.no_grad():
        theirs = peer(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
    assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))
