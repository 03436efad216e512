"""GGUF, llama.cpp's format, for the llama architecture: weights, model config and tokenizer in one file, read
with llama.cpp's own `gguf` package.

    entries, config, tokenizer_files = read_gguf(path)

- Tensors stay memory-mapped until written; each is then dequantized alone (`gguf.quants.dequantize`) to
  float32, so converting needs memory for about one tensor. llama.cpp's convert_hf_to_gguf stores q/k rows in
  Meta's interleaved rotary layout; they are permuted back to the rotate-half layout as Meta's are. A file
  without output.weight has tied embeddings.
- The vocabulary becomes a Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json,
  special_tokens_map.json), built with `tokenizers` to give the ids of transformers' GGUF loader
  (`AutoTokenizer.from_pretrained(folder, gguf_file=...)`): "llama" (sentencepiece) vocabularies as a
  byte-fallback BPE whose merges are derived from the scores, "gpt2" ones as byte-level BPE. Two deliberate
  differences, where transformers departs from llama.cpp and from the model's own tokenizer: the byte-level
  pre-tokenizer is the one the file names (SmolLM's "smollm" splits off every \\p{N} character first, so
  text such as "½" or "²" tokenizes as llama.cpp does), and BOS/EOS are added as tokenizer.ggml.add_bos_token
  and add_eos_token say (transformers always adds BOS, and takes it for EOS too).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from llama.config.model import ModelConfig
from llama.errors import PipelineError
from llama.weights.entry import Entry, permute_qk

GLOBAL_NAMES = {"token_embd.weight": "model.tok_embeddings.embedding_weight",
                "output_norm.weight": "model.norm_out.weight", "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_norm.weight": "attention_norm.weight", "attn_q.weight": "attention.wq.weight",
               "attn_k.weight": "attention.wk.weight", "attn_v.weight": "attention.wv.weight",
               "attn_output.weight": "attention.wo.weight", "ffn_norm.weight": "ffn_norm.weight",
               "ffn_gate.weight": "feed_forward.w1.weight", "ffn_down.weight": "feed_forward.w2.weight",
               "ffn_up.weight": "feed_forward.w3.weight"}
GGUF_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
CONTROL_TOKEN = 3                      # llama.cpp's token type of special (control) tokens
SPIECE_SPACE = "\u2581"                # sentencepiece's visible space
# llama.cpp's pre-tokenizers (tokenizer.ggml.pre) of byte-level vocabularies that `tokenizers` can express.
BYTE_LEVEL_PRE = ("gpt-2", "smollm")


def read_gguf(path: Path) -> tuple[dict[str, Entry], ModelConfig, dict[str, bytes]]:
    """A llama GGUF's tensors (MindFormers names, float32, read lazily), model config and tokenizer files."""
    import gguf  # imported on use: only GGUF input needs llama.cpp's package

    try:        # the reader memory-maps the file and checks it as it parses: a short tensor fails its reshape
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, AssertionError) as err:
        raise PipelineError(f"{path} is not a readable GGUF file (truncated or corrupt: {err})") from None
    meta = {name: field.contents() for name, field in reader.fields.items()}
    architecture = meta.get("general.architecture")
    if architecture != "llama":
        raise PipelineError(f"{path} is a GGUF of architecture {architecture!r}; only 'llama' is supported")
    unsupported = sorted({t.tensor_type.name for t in reader.tensors} - set(SUPPORTED_TYPES))
    if unsupported:
        raise PipelineError(f"{path} has tensors of type {', '.join(unsupported)}, which cannot be read "
                            f"(supported: {', '.join(SUPPORTED_TYPES)})")
    config = _model_config(meta, {tensor.name for tensor in reader.tensors}, path)
    entries = {}
    for tensor in reader.tensors:
        name = _ms_name(tensor.name)
        if name is None:
            raise PipelineError(f"{path}: tensor {tensor.name} is not part of a Llama model this pipeline runs")
        entries[name] = _entry(tensor)
    return permute_qk(entries, config), config, tokenizer_files(meta, config.max_position_embeddings, path)


def _ms_name(name: str) -> str | None:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    match = GGUF_LAYER_NAME.fullmatch(name)
    return f"model.layers.{match[1]}.{LAYER_NAMES[match[2]]}" if match and match[2] in LAYER_NAMES else None


def _entry(tensor) -> Entry:
    shape = tuple(int(n) for n in reversed(tensor.shape))       # GGUF lists dimensions fastest-varying first

    def read() -> np.ndarray:
        import gguf  # imported on use: only GGUF input needs llama.cpp's package
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False).reshape(shape)
    return Entry(shape, np.dtype(np.float32), read)


def _model_config(meta: dict, tensor_names: set[str], path: Path) -> ModelConfig:
    def get(key: str, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise PipelineError(f"{path} lacks the metadata llama.{key}")
        return value

    if meta.get("llama.rope.scaling.type", "none") != "none" or "rope_freqs.weight" in tensor_names:
        raise PipelineError(f"{path} uses rotary scaling ({meta.get('llama.rope.scaling.type')}), "
                            "which this pipeline's model does not implement")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise PipelineError(f"{path} has no vocabulary (tokenizer.ggml.tokens)")
    defaults = ModelConfig()
    token_ids = {field: meta.get(f"tokenizer.ggml.{key}_token_id", getattr(defaults, field))
                 for field, key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding"))}
    config = ModelConfig(
        vocab_size=len(tokens), hidden_size=get("embedding_length"), intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"), num_heads=get("attention.head_count"),
        num_kv_heads=get("attention.head_count_kv", get("attention.head_count")),
        max_position_embeddings=get("context_length"), rms_norm_eps=_decimal(get("attention.layer_norm_rms_epsilon")),
        rope_theta=_decimal(get("rope.freq_base", 10000.0)), tie_word_embeddings="output.weight" not in tensor_names,
        **token_ids)
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if meta.get(f"llama.{key}", config.head_dim) != config.head_dim:
            raise PipelineError(f"{path}: llama.{key} is {meta[f'llama.{key}']}, but this pipeline's model needs "
                                f"hidden size / heads = {config.head_dim}")
    return config


def _decimal(value: float) -> float:
    """A float32 metadata value as the shortest decimal it rounds from (1e-05, not 9.999999747e-06): the value
    the model was configured with before GGUF narrowed it."""
    return float(str(np.float32(value)))


# ---------------------------------------------------------------------------------------------- tokenizer

def tokenizer_files(meta: dict, max_length: int, path: Path) -> dict[str, bytes]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json of a GGUF's vocabulary."""
    # imported on use: only GGUF input builds a tokenizer from metadata
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    kind, tokens = meta.get("tokenizer.ggml.model"), meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]
    special = {role: tokens[meta[f"tokenizer.ggml.{key}_token_id"]]
               for role, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                                 ("pad_token", "padding")) if f"tokenizer.ggml.{key}_token_id" in meta}
    vocab = {token: i for i, token in enumerate(tokens)}
    if kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre")
        if pre not in BYTE_LEVEL_PRE:
            raise PipelineError(f"{path}: the byte-level pre-tokenizer {pre!r} is not supported "
                                f"({', '.join(BYTE_LEVEL_PRE)})")
        tokenizer = Tokenizer(BPE(vocab, merges, unk_token=special.get("unk_token"), fuse_unk=True))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.pre_tokenizer = byte_level if pre == "gpt-2" else pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])        # llama.cpp's "\p{N}" split first
        tokenizer.decoder = decoders.ByteLevel()
        add_bos_default = False
    elif kind == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if not merges and not scores:
            raise PipelineError(f"{path}: a sentencepiece vocabulary needs tokenizer.ggml.scores or merges")
        tokenizer = Tokenizer(BPE(vocab, merges or merges_from_scores(tokens, scores),
                                  unk_token=special.get("unk_token"), fuse_unk=True, byte_fallback=True))
        prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE)] * prefix
                                                    + [normalizers.Replace(" ", SPIECE_SPACE)])
        tokenizer.decoder = decoders.Sequence([decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(),
                                               decoders.Fuse()] + [decoders.Strip(" ", 1, 0)] * prefix)
        add_bos_default = True
    else:
        raise PipelineError(f"{path}: tokenizer model {kind!r} is not supported (gpt2 or llama)")
    # control tokens and the named special tokens are matched whole in text, never split (as transformers does)
    types = meta.get("tokenizer.ggml.token_type") or []
    controls = [tokens[i] for i, kind in enumerate(types) if kind == CONTROL_TOKEN]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token in dict.fromkeys(controls + list(special.values()))])
    add_bos = meta.get("tokenizer.ggml.add_bos_token", add_bos_default) and "bos_token" in special
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False) and "eos_token" in special
    if add_bos or add_eos:
        ends = [special["bos_token"]] * add_bos, [special["eos_token"]] * add_eos

        def template(sequence: str, type_id: int) -> str:
            return " ".join(f"{piece}:{type_id}" for piece in ends[0] + [sequence] + ends[1])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=template("$A", 0), pair=f"{template('$A', 0)} {template('$B', 1)}",
            special_tokens=[(token, vocab[token]) for token in dict.fromkeys(ends[0] + ends[1])])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": bool(add_bos),
              "add_eos_token": bool(add_eos), "clean_up_tokenization_spaces": False,
              "model_max_length": max_length, **special}
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return {"tokenizer.json": tokenizer.to_str().encode(), "tokenizer_config.json": _json(config),
            "special_tokens_map.json": _json(special)}


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges of a sentencepiece vocabulary, as transformers derives them from a GGUF: every split of a
    token into two tokens, the merged token's score first, then the parts' scores (highest first)."""
    score = dict(zip(tokens, scores))
    merges = []
    for token, merged_score in score.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in score and token[i:] in score]
        pairs.sort(key=lambda pair: (score[pair[0]], score[pair[1]]), reverse=True)
        merges += [(merged_score, pair) for pair in pairs]
    merges.sort(key=lambda merge: merge[0], reverse=True)
    return [pair for _, pair in merges]


def _json(value: dict) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()
