"""A memory plan for a training recipe: the bytes each device holds, by term, before anything is compiled.

    plan = plan_memory(load_train_config("configs/train/lora_llama2_7b.yaml"), seq_length=4096)
    plan.total, plan.fits(64 * GiB), plan.rows()

Per device, for the recipe's data x model x pipeline parallel layout (the worst pipeline stage):

- weights: frozen parameters in the checkpoint's dtype, trainable ones as float32 masters;
- weight casts: a compute-dtype copy of every weight stored in another dtype (the backward pass keeps it);
- gradients and optimizer states: float32 for each trainable parameter (AdamW: two moments);
- activations: what the backward pass keeps of one micro-batch through every layer (counted from the tensors
  llama/model.py saves: the norms, q/k/v before and after the rotary embedding, the attention
  probabilities, the SwiGLU's three intermediates), with and without recomputation (`training.recompute`:
  then only each layer's input plus one layer's full set; the total counts the recipe's choice); 1F1B
  pipelining keeps min(pipeline_stage, micro_batch_num) micro-batches in flight on the first stage, so
  pipelining does not shrink this term;
- logits: float32 [tokens, vocab] tensors of the loss: the logits and log-probabilities of the forward (which
  the training step runs for the loss value and again inside the gradient pass) and their gradients; five are
  alive at the peak, as measured here;
- runtime: the framework's own resident memory (interpreter, MindSpore, compiled graphs), measured here;
- planning for this machine's CPU backend when the step runs compiled (llama.device), two more terms: the
  graph's copy of the frozen weights (LoRA and prefix tuning; llama.device.GRAPH_EXTRA_PER_WEIGHT_BYTE, while
  trained weights are updated in place), and the dropout hashes: each LoRA dropout site's graph keeps the
  integer hash of every element it draws for (llama.train.dropout), measured here at about
  DROPOUT_BYTES_PER_ELEMENT bytes per element; an eager step holds neither.

Model parallelism divides the matmul weights, their activations and the vocabulary by `model_parallel`;
data parallelism replicates everything (no optimizer sharding is configured in these recipes).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from llama.config.model import ModelConfig
from llama.config.train import TrainConfig
from llama.data.records import PARQUET
from llama.device import GRAPH_EXTRA_PER_WEIGHT_BYTE, graph_copy_fits
from llama.errors import PipelineError
from llama.fileio import MANIFEST, read_json
from llama.train.batches import scored_positions
from llama.weights.names import MODEL_CONFIG, expected_shapes

GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Resident memory of a MindSpore CPU training process before its model counts: interpreter, MindSpore's
# libraries and runtime, the compiled graphs of a tiny model, measured here from `train` of tiny_pretrain.
RUNTIME_BYTES = int(0.50 * GiB)
LOGIT_TENSORS = 5
# tiny_lora (8 sites of [1536, 256], 4 rows of 384 tokens): peak 1.28 GB without dropout, 1.51 GB with it
DROPOUT_BYTES_PER_ELEMENT = 72
MATMUL = re.compile(r"\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight$")


@dataclass
class MemoryPlan:
    """Bytes per device by term; `recompute` (the recipe's `training.recompute`) says which activation term the
    total uses."""
    terms: dict[str, int]
    activations_recomputed: int
    devices: dict[str, int]
    recompute: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def counted(self) -> dict[str, int]:
        """The terms the total adds: activations as the recipe computes them."""
        if not self.recompute:
            return self.terms
        return {**self.terms, "activations": self.activations_recomputed}

    @property
    def total(self) -> int:
        return sum(self.counted.values())

    def fits(self, device_memory: int) -> bool:
        return self.total <= device_memory

    def biggest_term(self) -> str:
        return max(self.counted, key=self.counted.get)

    def rows(self) -> dict:
        """Flat `key: value` results for the CLI, sizes in GiB to two decimals."""
        out = {f"{name}_gib": round(size / GiB, 2) for name, size in self.terms.items()}
        out["activations_recomputed_gib"] = round(self.activations_recomputed / GiB, 2)
        out["total_gib"] = round(self.total / GiB, 2)
        out.update(self.devices)
        return out


def trainable_names(config: TrainConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Trainable parameters (name -> element count) the recipe adds or unfreezes."""
    pet = config.pet
    if pet.type == "none":
        return {name: _size(shape) for name, shape in shapes.items()}
    if pet.type == "lora":
        pattern = re.compile(pet.target_modules)
        out = {}
        for name, (rows, cols) in ((n, s) for n, s in shapes.items() if MATMUL.search(n)):
            if pattern.search(name.removesuffix(".weight")):
                out[name + ".lora"] = pet.lora_rank * (rows + cols)
        return out
    # llama/train/prefix.py: an embedding of the prefix positions and a two-layer MLP back to its width
    layers = sum(1 for name in shapes if name.endswith(".attention.wk.weight"))
    width = 2 * layers * shapes["model.layers.0.attention.wk.weight"][0]
    return {"prefix_layers": pet.prefix_token_num * width + (width + 1) * pet.mid_dim + (pet.mid_dim + 1) * width}


def layer_activation_bytes(model: ModelConfig, rows: int, seq: int, compute_bytes: int, model_parallel: int,
                           lora_inputs: int = 0) -> int:
    """What one decoder layer keeps for its backward pass over `rows` x `seq` tokens (see module docstring).
    `lora_inputs`: summed input widths of the layer's LoRA-wrapped projections (their dropout outputs)."""
    tokens, hidden, ffn = rows * seq, model.hidden_size, model.intermediate_size
    kv_width = model.num_kv_heads * model.head_dim
    replicated = tokens * compute_bytes * 6 * hidden         # norm inputs/outputs (2 norms), residual, input
    sharded = tokens * compute_bytes * (2 * hidden + 3 * kv_width + hidden + 4 * ffn + lora_inputs)
    # the probabilities in float32 (softmax's and probs @ v's gradients read them), and their cast to a 16-bit
    # compute dtype; nothing else of the scores' size (measured: at equal tokens, 4 x 256 and 8 x 128 rows of
    # SmolLM2-135M's width cost a layer the same)
    scores = rows * model.num_heads * seq * seq * (4 + (compute_bytes if compute_bytes != 4 else 0))
    return replicated + (sharded + scores) // model_parallel


def plan_memory(config: TrainConfig, seq_length: int, model: ModelConfig, runtime_bytes: int = RUNTIME_BYTES,
                logit_positions: int | None = None, cpu_memory: int | None = None) -> MemoryPlan:
    """The per-device memory plan of `config` over rows of `seq_length` tokens, of which the loss computes
    logits at `logit_positions` per row (default: all; `logit_positions_of` reads them from the rows).
    `cpu_memory`: plan for MindSpore's CPU backend on a machine of that much memory (this one), with the terms
    of its compiled graphs where they fit."""
    if seq_length < 1:
        raise PipelineError(f"plan: seq_length must be positive, not {seq_length}")
    dp, mp, pp = config.parallel.data_parallel, config.parallel.model_parallel, config.parallel.pipeline_stage
    if model.num_layers % pp:
        raise PipelineError(f"plan: {model.num_layers} layers do not split into pipeline_stage={pp} stages")
    compute = config.model.compute_dtype or model.compute_dtype
    stored, compute_bytes = DTYPE_BYTES[model.param_dtype], DTYPE_BYTES[compute]
    shapes = expected_shapes(model)
    trainable = trainable_names(config, shapes)
    full = config.pet.type == "none"

    def on_device(name: str, count: int) -> float:
        """Share of one parameter on the worst stage's device: layers split over stages, matmuls over mp."""
        share = 1 / mp if (MATMUL.search(name) or "embedding" in name or "lm_head" in name) else 1.0
        return count * share / (pp if ".layers." in name else 1)

    base_elements = sum(on_device(n, _size(s)) for n, s in shapes.items())
    adapter_elements = 0.0 if full else sum(on_device(n, c) for n, c in trainable.items())
    trainable_elements = base_elements if full else adapter_elements
    weights = (base_elements * 4) if full else (base_elements * stored + adapter_elements * 4)
    cast_copies = base_elements * compute_bytes if (4 if full else stored) != compute_bytes else 0
    if not full and compute_bytes != 4:
        cast_copies += adapter_elements * compute_bytes

    rows, layers = config.data.batch_size, model.num_layers
    lora_inputs = 0
    if config.pet.type == "lora":
        lora_inputs = sum(shapes[n.removesuffix(".lora")][1] for n in trainable
                          if n.startswith("model.layers.0."))
    per_layer = layer_activation_bytes(model, rows, seq_length, compute_bytes, mp, lora_inputs)
    in_flight = min(pp, config.parallel.micro_batch_num)        # 1F1B: micro-batches alive on the first stage
    activations = per_layer * layers // pp * in_flight
    layer_inputs = rows * seq_length * model.hidden_size * compute_bytes
    recomputed = (layer_inputs * layers // pp) * in_flight + per_layer
    logits = LOGIT_TENSORS * rows * (logit_positions or seq_length) * model.vocab_size * 4 // mp
    compiled_on_cpu = cpu_memory is not None and graph_copy_fits(weights, cpu_memory)
    dropout_sites = config.pet.type == "lora" and config.pet.lora_dropout > 0 and compiled_on_cpu
    dropout_hashes = DROPOUT_BYTES_PER_ELEMENT * rows * seq_length * lora_inputs * layers if dropout_sites else 0
    frozen_graph_copy = base_elements * stored * GRAPH_EXTRA_PER_WEIGHT_BYTE if compiled_on_cpu and not full else 0
    terms = {
        "weights": int(weights), "weight_casts": int(cast_copies),
        "gradients": int(trainable_elements * 4), "optimizer_states": int(trainable_elements * 8),
        "activations": int(activations), "logits": int(logits), "frozen_graph_copy": int(frozen_graph_copy),
        "dropout_hashes": int(dropout_hashes),
        "runtime": int(runtime_bytes),
    }
    devices = {"data_parallel": dp, "model_parallel": mp, "pipeline_stage": pp, "devices": dp * mp * pp,
               "seq_length": seq_length, "logit_positions": logit_positions or seq_length, "micro_batch_rows": rows,
               "compute_dtype": compute,
               "param_dtype": model.param_dtype, "trainable_parameters": int(sum(trainable.values())),
               "parameters": int(sum(_size(s) for s in shapes.values()))}
    return MemoryPlan(terms, int(recomputed), devices, config.training.recompute)


def refuse_if_too_big(plan: MemoryPlan, device_memory: int, where: str) -> None:
    """A one-line error naming the biggest term and what to change, when the plan exceeds the device."""
    if plan.fits(device_memory):
        return
    term = plan.biggest_term()
    advice = {
        "weights": "use LoRA or prefix tuning, float16 weights, or more model_parallel/pipeline_stage",
        "weight_casts": "store the weights in the compute dtype",
        "gradients": "train fewer parameters (LoRA, prefix) or split the model (model_parallel)",
        "optimizer_states": "train fewer parameters (LoRA, prefix) or split the model (model_parallel)",
        "activations": ("lower data.batch_size or the sequence length, or add model_parallel" if plan.recompute else
                        "set training.recompute=true, lower data.batch_size or the sequence length, or add "
                        "model_parallel"),
        "logits": "lower data.batch_size or the sequence length",
        "frozen_graph_copy": "store the frozen weights in float16",
        "dropout_hashes": "lower pet.lora_dropout to 0, data.batch_size or the sequence length",
        "runtime": "free memory on the device",
    }[term]
    raise PipelineError(f"{where}: needs {plan.total / GiB:.1f} GiB per device but the device has "
                        f"{device_memory / GiB:.1f} GiB; the biggest term is {term} "
                        f"({plan.counted[term] / GiB:.1f} GiB): {advice}")


def model_config_of(config: TrainConfig) -> ModelConfig | None:
    """The recipe's model shapes without reading weights: model.config, else the config file beside the
    checkpoint (ours or Hugging Face's); None when neither says."""
    if config.model.config:
        config_of_model = ModelConfig.load(config.model.config)
    else:
        folder = Path(config.model.checkpoint or "")
        if (folder / MODEL_CONFIG).is_file():
            config_of_model = ModelConfig.from_dict(read_json(folder / MODEL_CONFIG, "model config"))
        elif (folder / "config.json").is_file():
            config_of_model = ModelConfig.from_hf_config(folder / "config.json")
        else:
            return None
    if config.model.compute_dtype:
        config_of_model = config_of_model.replace(compute_dtype=config.model.compute_dtype)
    return config_of_model


def seq_length_of(config: TrainConfig, model: ModelConfig) -> int:
    """Tokens per training row: what data.train's manifest says when set (read, not verified: the plan is
    an estimate and training verifies the records), else the model's context."""
    if config.data.train:
        manifest = read_json(Path(config.data.train) / MANIFEST, "records manifest")
        if "seq_length" not in manifest:
            raise PipelineError(f"{config.data.train}: its manifest does not say the records' seq_length")
        return int(manifest["seq_length"])
    return model.max_position_embeddings


def logit_positions_of(config: TrainConfig) -> int | None:
    """Positions per row the loss computes logits at, when fewer than the row (finetuning rows of a prompt and a
    short answer: llama.train.batches.scored_positions), read from data.train's rows.parquet; None otherwise."""
    if config.run_mode != "finetune" or not config.data.train:
        return None
    folder = Path(config.data.train)
    if not (folder / PARQUET).is_file():
        return None
    import pyarrow.parquet as pq   # only here: `plan --help` and pretraining recipes do without it

    if "labels" not in pq.read_schema(folder / PARQUET).names:
        return None      # train refuses such rows for finetuning, with its own error
    table = pq.read_table(folder / PARQUET, columns=["input_ids", "labels"])
    rows = {name: table.column(name).combine_chunks() for name in ("input_ids", "labels")}
    arrays = {name: column.flatten().to_numpy().reshape(len(column), -1) for name, column in rows.items()}
    pad_id = read_json(folder / MANIFEST, "records manifest")["tokenizer"]["pad_id"]
    return scored_positions(arrays["input_ids"], arrays["labels"], pad_id)


def check_fits(config: TrainConfig) -> None:
    """`train`'s check before it loads or compiles anything: refuse a recipe whose plan exceeds this machine's
    memory, shared by the data-parallel workers msrun starts on it."""
    model = model_config_of(config)
    if model is None:
        return
    plan = plan_memory(config, seq_length_of(config, model), model, logit_positions=logit_positions_of(config),
                       cpu_memory=device_memory())
    refuse_if_too_big(plan, device_memory() // config.parallel.data_parallel, "train")


def device_memory() -> int:
    """This machine's RAM: the device of MindSpore's CPU backend."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_size(text: str) -> int:
    """'64GiB' (binary), '24GB' (decimal), '512MiB' or a byte count -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([KMGT])(i?)B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise PipelineError(f"memory size {text!r} is not like 64GiB, 24GB or a byte count")
    power = " KMGT".index(match[2].upper()) if match[2] else 0
    return int(float(match[1]) * (1024 if match[3] else 1000) ** power)


def _size(shape: tuple[int, ...]) -> int:
    out = 1
    for dim in shape:
        out *= dim
    return out
