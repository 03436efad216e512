"""Benchmark: Llama-2-7B at full size on this machine, every stage through the CLI, time and peak memory.

Writes a random Llama-2-7B-shaped float16 Hugging Face checkpoint (32 layers, hidden 4096, FFN 11008, 32 heads,
vocab 32000: 6.74B parameters, 13.5 GB, two shards + index as Meta's release) into FOLDER, then runs and
measures (wall time; peak RSS of the command's process tree, from wait4):
    convert   HF -> MindSpore float16, beside a plain copy of the same bytes
    generate  a 32-token prompt, 8 greedy tokens, float16
    eval ppl  2 rows of 512 tokens (MindFormers convention)
    train     LoRA (the 7B recipe's adapters at rank 8 on wq/wk/wv/wo), batch 1 x seq 256, 3 steps, float16 base
    merge     that run into the base, exported as a Hugging Face folder (streaming), then `verify`
and prints each goal as a ratio: convert <= 2x the copy's time and (peak - interpreter) <= 2x the largest tensor;
inference peak <= 1.15x the float16 weights; LoRA training peak <= 1.4x; merge (peak - interpreter) <= 2x the
largest tensor. Needs ~45 GB of disk in FOLDER and the machine to itself.

    .venv/bin/python bench/scale_7b.py /data/scale7b [--layers 32] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import BASELINE, COPY, REPO, make_checkpoint, measure  # noqa: E402

from llama.config.model import ModelConfig  # noqa: E402
from llama.weights.names import expected_shapes  # noqa: E402

CLI = "import sys; from llama.cli import run; sys.exit(run(sys.argv[1:]))"
TOKENIZER = REPO.parent / "shared" / "data" / "llama2_tokenizer" / "tokenizer.model"   # Llama 2's own, vocab 32000
TEXT = REPO / "tests" / "fixtures" / "wiki_slice.tokens"


def random_float16(rng, shape) -> np.ndarray:
    """N(0, 0.02) weights, as a freshly initialised Llama: activations stay finite through 32 layers."""
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)


def make_model(folder: Path, config: ModelConfig) -> None:
    make_checkpoint(folder, config, random_float16)
    shutil.copyfile(TOKENIZER, folder / "tokenizer.model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="scratch folder for the checkpoints (~45 GB)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (fewer for a quick look)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not TOKENIZER.is_file():
        raise SystemExit(f"needs the Llama 2 tokenizer at {TOKENIZER} (../shared/data)")
    config = ModelConfig.named("llama2_7b").replace(num_layers=args.layers, param_dtype="float16")
    shapes = expected_shapes(config)
    weights = sum(int(np.prod(s)) for s in shapes.values()) * 2
    largest = max(int(np.prod(s)) for s in shapes.values()) * 2
    work = args.folder
    work.mkdir(parents=True, exist_ok=True)
    hf, ms_dir = work / "hf", work / "ms"
    if args.make_only:
        make_model(hf, config)
        return
    if not hf.is_dir():   # in a child process, so this one stays small: a child's peak RSS counts its parent's
        subprocess.run([sys.executable, __file__, str(work), "--layers", str(args.layers), "--make-only"], check=True)
    print(f"model: {args.layers} layers, {weights / 2 / 1e9:.2f}B parameters, {weights / 1e9:.2f} GB float16, "
          f"largest tensor {largest / 1e6:.0f} MB", flush=True)
    rows = []

    def stage(name: str, code: str, *argv: str) -> tuple[float, int]:
        seconds, peak = measure(code, *argv)
        rows.append((name, seconds, peak))
        print(f"{name:10s} {seconds:8.1f} s  peak {peak / 1e9:6.2f} GB", flush=True)
        return seconds, peak

    _, interpreter = stage("baseline", BASELINE)
    copy_s, _ = stage("copy", COPY, str(hf), str(work / "copy"))
    shutil.rmtree(work / "copy")
    shutil.rmtree(ms_dir, ignore_errors=True)
    convert_s, convert_peak = stage("convert", CLI, "convert", "--input", str(hf), "--output", str(ms_dir),
                                    "--dtype", "float16")
    prompt = " ".join(TEXT.read_text().split()[:26])       # 32 tokens of Llama 2's tokenizer
    _, generate_peak = stage("generate", CLI, "predict", "--checkpoint", str(ms_dir), "--prompt", prompt,
                             "--max-new-tokens", "8")
    records = work / "wiki512"
    shutil.rmtree(records, ignore_errors=True)
    measure(CLI, "preprocess", "wiki", "--input", str(_first_tokens(TEXT, work / "wiki2rows.tokens")),
            "--tokenizer", str(TOKENIZER), "--seq-length", "512", "--output", str(records))
    _, ppl_peak = stage("eval ppl", CLI, "eval", "ppl", "--checkpoint", str(ms_dir), "--data", str(records))
    alpaca = work / "alpaca256"
    shutil.rmtree(alpaca, ignore_errors=True)
    measure(CLI, "preprocess", "alpaca", "--input", str(REPO / "tests" / "fixtures" / "alpaca_seed_tasks.json"),
            "--tokenizer", str(TOKENIZER), "--seq-length", "256", "--output", str(alpaca))
    run_dir = work / "lora"
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = str(REPO / "configs" / "train" / "lora_llama2_7b.yaml")
    settings = [f"data.train={alpaca}", f"model.checkpoint={ms_dir}", "model.config=null", "model.compute_dtype=float16",
                "pet.lora_rank=8", "data.batch_size=1", "training.max_steps=3", "parallel.data_parallel=1",
                "checkpoint.save_steps=3"]
    _, train_peak = stage("train", CLI, "train", "--config", recipe, "--output-dir", str(run_dir), *settings)
    plan = subprocess.run([sys.executable, "-c", CLI, "plan", "--config", recipe, "--json", *settings],
                          capture_output=True, text=True, check=True, cwd=REPO)
    planned = json.loads(plan.stdout.splitlines()[-1])["total_gib"] * 2 ** 30
    merged = work / "merged_hf"
    shutil.rmtree(merged, ignore_errors=True)
    _, merge_peak = stage("merge", CLI, "merge", str(run_dir), "--output", str(merged), "--format", "hf")
    stage("verify", CLI, "verify", str(merged))
    print(f"convert time / copy time        = {convert_s / copy_s:5.2f}  (goal <= 2)")
    print(f"convert (peak - interpreter) / largest tensor = {(convert_peak - interpreter) / largest:5.2f}  (goal <= 2)")
    print(f"generate peak / weights         = {generate_peak / weights:5.2f}  (goal <= 1.15)")
    print(f"eval ppl peak / weights         = {ppl_peak / weights:5.2f}  (goal <= 1.15)")
    print(f"LoRA train peak / weights       = {train_peak / weights:5.2f}  (goal <= 1.4)")
    print(f"LoRA train plan / measured peak = {planned / train_peak:5.2f}  (goal within 0.85..1.15)")
    print(f"merge (peak - interpreter) / largest tensor = {(merge_peak - interpreter) / largest:5.2f}  (goal <= 2)")
    if not args.keep:
        shutil.rmtree(work)


def _first_tokens(source: Path, out: Path) -> Path:
    """Enough WikiText for two rows of 513 tokens (about 2.3 KB of text per row), and not much more."""
    out.write_text(source.read_text()[:6000])
    return out


if __name__ == "__main__":
    main()
