"""Names, shapes and dtypes of Llama weights, free of MindSpore: the files of a checkpoint folder, the dtype
tables (numpy, safetensors, MindSpore), parameter names (Hugging Face <-> MindFormers, Meta -> MindFormers) and
the shape of every parameter a `ModelConfig` implies.
"""

from __future__ import annotations

import re

import ml_dtypes  # registers bfloat16 with numpy; must precede any bf16 read
import numpy as np

from llama.config.model import ModelConfig

FORMAT = "llama2-pipeline checkpoint 1"
MODEL_CONFIG = "model_config.json"

NP_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
             "bfloat16": np.dtype(ml_dtypes.bfloat16)}
ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
MS_TYPES = {"Float64": np.float64, "Float32": np.float32, "Float16": np.float16, "BFloat16": ml_dtypes.bfloat16,
            "Int64": np.int64, "Int32": np.int32, "Int16": np.int16, "Int8": np.int8, "UInt8": np.uint8,
            "Bool": np.bool_}
ST_NAMES = {np.dtype(v): k for k, v in ST_DTYPES.items()}
# A float is NaN or Inf when its exponent bits are all ones: (bits without the sign) >= this, per float dtype.
NONFINITE_BITS = {np.dtype(np.float64): (np.uint64, 0x7FF0000000000000), np.dtype(np.float32): (np.uint32, 0x7F800000),
                  np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80)}
MS_NAMES = {np.dtype(v): k for k, v in MS_TYPES.items()}

# Hugging Face <-> MindFormers names (MindFormers renames only; see docs/reference.md).
HF_GLOBAL = {"model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
             "model.norm.weight": "model.norm_out.weight", "lm_head.weight": "lm_head.weight"}
HF_LAYER = {"self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
            "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
            "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
            "mlp.up_proj.weight": "feed_forward.w3.weight", "input_layernorm.weight": "attention_norm.weight",
            "post_attention_layernorm.weight": "ffn_norm.weight"}
MS_TO_HF_GLOBAL = {v: k for k, v in HF_GLOBAL.items()}
MS_TO_HF_LAYER = {v: k for k, v in HF_LAYER.items()}
# Meta names are MindFormers' without the "model." prefix, apart from these three.
META_GLOBAL = {"tok_embeddings.weight": "model.tok_embeddings.embedding_weight",
               "norm.weight": "model.norm_out.weight", "output.weight": "lm_head.weight"}
# Tensors some checkpoints carry that are not weights: rotary tables, optimizer state, step counters.
IGNORED = re.compile(r"(.*rotary_emb\.inv_freq|rope\.freqs|adam_[mv]\..*|accu_grads\..*|global_step|"
                     r"scale_sense|epoch_num|step_num|loss_scale|current_iterator_step|last_overflow_iterator_step)$")
LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
# A LoRA adapter's matrices, as MindFormers' pet LoRA names them: `<module>.mindpet_delta_lora_a` [rank, in]
# and `<module>.mindpet_delta_lora_b` [out, rank], beside the module's `weight`.
LORA_A, LORA_B = "mindpet_delta_lora_a", "mindpet_delta_lora_b"


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of `LlamaForCausalLM(config)`, in the model's order, with its shape in MindFormers'
    checkpoint layout (see llama.model.checkpoint_layout)."""
    hidden, inter, kv = config.hidden_size, config.intermediate_size, config.num_kv_heads * config.head_dim
    shapes = {"model.tok_embeddings.embedding_weight": (config.vocab_size, hidden)}
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        shapes.update({
            prefix + "attention_norm.weight": (hidden,),
            prefix + "attention.wq.weight": (hidden, hidden),
            prefix + "attention.wk.weight": (kv, hidden),
            prefix + "attention.wv.weight": (kv, hidden),
            prefix + "attention.wo.weight": (hidden, hidden),
            prefix + "ffn_norm.weight": (hidden,),
            prefix + "feed_forward.w1.weight": (inter, hidden),
            prefix + "feed_forward.w2.weight": (hidden, inter),
            prefix + "feed_forward.w3.weight": (inter, hidden),
        })
    shapes["model.norm_out.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def _rename(name: str, global_names: dict[str, str], layer_names: dict[str, str]) -> str:
    """`name` through a table of whole names and one of per-layer suffixes (unchanged when in neither)."""
    if name in global_names:
        return global_names[name]
    match = LAYER_NAME.fullmatch(name)
    if match and match[2] in layer_names:
        return f"model.layers.{match[1]}.{layer_names[match[2]]}"
    return name


def hf_to_ms_name(name: str) -> str:
    """MindFormers name of a Hugging Face tensor name (unchanged when it is not a Llama weight)."""
    return _rename(name, HF_GLOBAL, HF_LAYER)


def ms_to_hf_name(name: str) -> str:
    return _rename(name, MS_TO_HF_GLOBAL, MS_TO_HF_LAYER)


def meta_to_ms_name(name: str) -> str:
    return META_GLOBAL.get(name, "model." + name if name.startswith("layers.") else name)

