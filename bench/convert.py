"""Benchmark: convert a Llama-2-7B-shaped Hugging Face checkpoint (two layers, bf16, ~1.3 GB) to MindSpore.

Prints the median wall time and peak memory (ru_maxrss of the converting process) of a few runs, beside a
plain copy of the same files in the same kind of process, and the ratios to the goals:
    peak memory < 2 x largest tensor + the interpreter's own baseline (python + numpy + our imports)
    time        < 2 x the plain copy
Usage: .venv/bin/python bench/convert.py [--runs 3] [--to ckpt|safetensors|hf] [--dir TMP]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes  # noqa: F401  (bf16 for numpy)
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llama.config.model import ModelConfig  # noqa: E402
from llama.weights.names import ms_to_hf_name, expected_shapes  # noqa: E402

CONVERT = "import sys; from llama.cli import run; sys.exit(run(sys.argv[1:]))"
COPY = ("import shutil, sys, pathlib; out = pathlib.Path(sys.argv[2]); out.mkdir()\n"
        "for f in pathlib.Path(sys.argv[1]).iterdir(): shutil.copyfile(f, out / f.name)")
BASELINE = "import llama.weights.source, llama.weights.writer, llama.cli"


def random_bf16(rng, shape) -> np.ndarray:
    """Positive finite bf16 bit patterns (no NaN/inf), so a copy is checkable value by value."""
    return rng.integers(0x3000, 0x3F80, size=shape, dtype=np.uint16).view(ml_dtypes.bfloat16)


def make_checkpoint(folder: Path, config: ModelConfig, tensor=random_bf16) -> None:
    """Random weights (`tensor(rng, shape)`) in the HF layout, as two shards with an index, laid out as
    Meta's release is (model-0000k-of-00002.safetensors + model.safetensors.index.json + config.json)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shapes = {ms_to_hf_name(name): shape for name, shape in expected_shapes(config).items()}
    names = list(shapes)
    halves = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, part in halves.items():
        save_file({name: tensor(rng, shapes[name]) for name in part}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config.to_hf_config()))


def measure(code: str, *args: str) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of `python -c code args` (its own rusage, via wait4)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status:
        raise SystemExit(f"benchmark step failed: {code[:40]}... {args}")
    return seconds, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--to", choices=("ckpt", "safetensors", "hf"), default="ckpt")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--make", help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = ModelConfig.named("llama2_7b").replace(num_layers=2)
    if args.make:
        make_checkpoint(Path(args.make), config)
        return
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-convert-") as scratch:
        scratch = Path(scratch)
        # made in a child process, so this one stays small and its children's peak memory is their own
        subprocess.run([sys.executable, __file__, "--make", str(scratch / "hf")], check=True)
        largest = max(int(np.prod(shape)) * 2 for shape in expected_shapes(config).values())
        size = sum(f.stat().st_size for f in (scratch / "hf").iterdir())
        print(f"checkpoint: {size / 1e9:.2f} GB bf16, largest tensor {largest / 1e6:.0f} MB")
        measure(COPY, str(scratch / "hf"), str(scratch / "warm"))        # page cache warm for both
        runs = {"copy": [], "convert": [], "baseline": []}
        for i in range(args.runs):
            runs["copy"].append(measure(COPY, str(scratch / "hf"), str(scratch / f"copy{i}")))
            runs["convert"].append(measure(CONVERT, "convert", "--input", str(scratch / "hf"), "--output",
                                           str(scratch / f"out{i}"), "--to", args.to))
            runs["baseline"].append(measure(BASELINE))
            for folder in (f"copy{i}", f"out{i}"):
                for f in (scratch / folder).iterdir():
                    f.unlink()
        median = {k: (statistics.median(s for s, _ in v), statistics.median(m for _, m in v)) for k, v in runs.items()}
    copy_s, copy_mem = median["copy"]
    conv_s, conv_mem = median["convert"]
    base_mem = median["baseline"][1]
    budget = 2 * largest + base_mem
    print(f"plain copy:  {copy_s:6.2f} s  peak {copy_mem / 1e6:7.0f} MB")
    print(f"convert:     {conv_s:6.2f} s  peak {conv_mem / 1e6:7.0f} MB  (to {args.to}, {args.runs} runs, medians)")
    print(f"baseline:    peak {base_mem / 1e6:.0f} MB (interpreter + imports)")
    print(f"time ratio   convert / copy = {conv_s / copy_s:.2f}  (goal < 2)")
    print(f"memory ratio (peak - baseline) / largest tensor = {(conv_mem - base_mem) / largest:.2f}  (goal < 2); "
          f"peak / budget = {conv_mem / budget:.2f}  (goal < 1)")


if __name__ == "__main__":
    main()
