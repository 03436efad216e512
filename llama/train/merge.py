"""One full checkpoint from a training run: replicas checked, LoRA folded in, written in any output format.

- Data-parallel runs hold one replica per rank (rank_k/step_N/weights.ckpt): they must be bit-identical
  (they are when the all-reduce worked), and one of them is written.
- LoRA runs hold only the adapter; it is merged into the base checkpoint it names (whose sha256 must still
  match): W += (B @ A) * alpha / rank.
- The output keeps the dtype the base checkpoint was stored in (runs train float32 masters), unless `dtype`
  says otherwise.
- Sliced checkpoints of model/pipeline-parallel runs (MindFormers' rank_k/*.ckpt plus a strategy file) go
  through `mindspore.transform_checkpoints` into one slice-free checkpoint first.
Prefix-tuning adapters are not weights of the base model and cannot be merged into it; evaluations load
them beside their base instead (`--adapter`, llama/train/adapter.py).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from llama.config.model import ModelConfig
from llama.errors import PipelineError
from llama.fileio import MANIFEST, check_output_free, read_json
from llama.train import checkpointing
from llama.train.adapter import check_base
from llama.weights.entry import Entry
from llama.weights.mindspore_ckpt import read_ckpt_index
from llama.weights.names import LORA_A, LORA_B
from llama.weights.source import entries_source, open_checkpoint
from llama.weights.writer import write_checkpoint


def merge(run_dir: str | os.PathLike, output: str | os.PathLike, step: int | None = None, fmt: str = "ckpt",
          base: str | os.PathLike | None = None, strategy: str | os.PathLike | None = None,
          model_config=None, tokenizer: str | os.PathLike | None = None, dtype: str | None = None,
          overwrite: bool = False) -> dict:
    """Merge `run_dir` into the checkpoint folder `output` (fmt "ckpt", "safetensors" or "hf"); return a summary.

    `model_config` (a ModelConfig or what `ModelConfig.load` takes) is needed only for sliced checkpoints,
    which carry none.
    """
    check_output_free(output, overwrite)
    run_dir = Path(run_dir)
    if strategy is not None:
        if model_config is None:
            raise PipelineError("merging sliced checkpoints needs the model config (--model-config)")
        config = model_config if isinstance(model_config, ModelConfig) else ModelConfig.load(model_config)
        with tempfile.TemporaryDirectory(dir=Path(output).resolve().parent) as tmp:
            merged = _transform_sliced(run_dir, Path(strategy), Path(tmp))
            manifest = write_checkpoint(open_checkpoint(merged, config), output, fmt, dtype, tokenizer=tokenizer,
                                        overwrite=overwrite, progress=False)
        return {"output": str(output), "kind": "sliced", "format": fmt, "tensors": manifest["tensors"]}

    world = _rank_count(run_dir)
    steps = checkpointing.common_steps(run_dir, world)
    if step is None:
        if not steps:
            raise PipelineError(f"{run_dir} has no step that every one of its {world} ranks checkpointed")
        step = steps[-1]
    folders = [checkpointing.step_dir(run_dir, rank, step) for rank in range(world)]
    for folder in folders:
        if not folder.is_dir():
            raise PipelineError(f"{folder} does not exist")
    states = [_verified_step(folder, step, steps) for folder in folders]
    weights = [read_ckpt_index(folder / checkpointing.WEIGHTS) for folder in folders]
    _check_replicas(folders, weights)
    state = states[0]
    config = ModelConfig.from_dict(state["model_config"], f"{folders[0]}/state.json")
    tensors = weights[0]     # read one at a time as the output is written
    summary = {"output": str(output), "kind": state["kind"], "format": fmt, "step": step, "ranks": world}

    if state["kind"] == "prefix":
        raise PipelineError(f"{run_dir} trained a prefix-tuning adapter; it feeds the model extra keys and values "
                            "and has no weights to merge into the base model (evaluate it with --adapter instead)")
    if state["kind"] == "lora":
        recorded = state["base"]
        base = Path(base) if base is not None else Path(recorded["path"])
        if not base.exists():
            raise PipelineError(f"base checkpoint {base} of this LoRA run does not exist (pass --base)")
        check_base(base, recorded, run_dir)
        source = open_checkpoint(base, config)
        adapter, pet = {name: entry.read() for name, entry in tensors.items()}, state["pet"]
        tensors, merged = merge_lora_entries(source.entries, adapter, pet["lora_alpha"], pet["lora_rank"])
        summary["merged_weights"] = len(merged)
        summary["base"] = str(base)
        if tokenizer is None and source.tokenizer is not None:
            tokenizer = source.tokenizer      # the merged model reads text as its base did
    # non-finite weights (a diverged run being merged) are written as they are, with a warning naming them
    manifest = write_checkpoint(entries_source(tensors, config), output, fmt, dtype or config.param_dtype,
                                tokenizer, overwrite, progress=False, allow_nonfinite=True)
    summary["tensors"] = manifest["tensors"]
    return summary


def merge_lora_entries(weights: dict[str, Entry], adapter: dict, alpha: float, rank: int
                       ) -> tuple[dict[str, Entry], list[str]]:
    """`weights` (a checkpoint's tensors, read when asked) with W + (B @ A) * alpha / rank, in float32 and then
    W's dtype, for every adapter pair; and the merged weight names. Nothing is read here: a merge written
    tensor by tensor holds one base weight at a time, not the whole base model.

    `adapter` maps `<module>.mindpet_delta_lora_a/_b` to numpy arrays.
    """
    merged, names = dict(weights), []
    for name in sorted(adapter):
        if not name.endswith("." + LORA_A):
            continue
        module = name[: -len(LORA_A) - 1]
        b_name, w_name = f"{module}.{LORA_B}", f"{module}.weight"
        if b_name not in adapter or w_name not in weights:
            raise PipelineError(f"adapter pair {module} has no {'B matrix' if b_name not in adapter else 'base weight'}")
        base, delta_shape = weights[w_name], (adapter[b_name].shape[0], adapter[name].shape[1])
        if delta_shape != base.shape:
            raise PipelineError(f"adapter {module}: B@A is {delta_shape}, the base weight is {base.shape}")

        def read(base=base, a=adapter[name], b=adapter[b_name]) -> np.ndarray:
            weight = base.read()
            delta = b.astype(np.float32) @ a.astype(np.float32) * (alpha / rank)
            return (weight.astype(np.float32) + delta).astype(weight.dtype)

        merged[w_name] = Entry(base.shape, base.dtype, read)
        names.append(w_name)
    if not names:
        raise PipelineError("the adapter holds no LoRA pairs")
    return merged, names


def _verified_step(folder: Path, step: int, steps: list[int]) -> dict:
    """The state of the checkpoint asked for, or an error naming it when damaged: merging an older step
    instead would quietly hand back another model than the one asked for."""
    try:
        return checkpointing.verify(folder)
    except PipelineError as err:
        older = [s for s in steps if s < step]
        hint = f"; pass --step {older[-1]} to merge an older checkpoint" if older else ""
        raise PipelineError(f"step {step} is damaged: {err}{hint}") from None


def _rank_count(run_dir: Path) -> int:
    ranks = sorted(int(p.name[5:]) for p in run_dir.glob("rank_*") if p.name[5:].isdigit())
    if not ranks:
        raise PipelineError(f"{run_dir} holds no rank_*/ checkpoint folders (is it a training run folder?)")
    if ranks != list(range(len(ranks))):
        raise PipelineError(f"{run_dir} has rank folders {ranks}; expected rank_0 to rank_{len(ranks) - 1}")
    return len(ranks)


def _check_replicas(folders: list[Path], weights: list[dict]) -> None:
    """Data-parallel replicas must agree bit for bit; name the first tensor where one does not."""
    digests = [read_json(folder / MANIFEST, "manifest")["files"][checkpointing.WEIGHTS]["sha256"]
               for folder in folders]
    for folder, digest, entries in zip(folders[1:], digests[1:], weights[1:]):
        if digest == digests[0]:
            continue
        if set(entries) != set(weights[0]):
            raise PipelineError(f"{folder} holds other tensors than {folders[0]}")
        for name, entry in weights[0].items():
            if not np.array_equal(entry.read(), entries[name].read()):
                raise PipelineError(f"data-parallel replicas differ: {name} in {folder} is not the same as in "
                                    f"{folders[0]} (the gradient all-reduce did not keep them in step)")


def _transform_sliced(src: Path, strategy: Path, tmp: Path) -> Path:
    """MindSpore's transform_checkpoints with no destination strategy: all slices into rank_0/merged0.ckpt."""
    import mindspore as ms

    if not strategy.is_file():
        raise PipelineError(f"strategy file {strategy} does not exist")
    ms.transform_checkpoints(str(src), str(tmp), "merged", str(strategy), None)
    merged = tmp / "rank_0" / "merged0.ckpt"
    if not merged.is_file():
        raise PipelineError(f"transform_checkpoints wrote no {merged.relative_to(tmp)} from {src}")
    return merged
