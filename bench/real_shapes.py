"""Benchmark: speed at real model shapes beside PyTorch (random weights, so nothing is downloaded).

    .venv/bin/python bench/real_shapes.py [--part 135m|7b-float32|7b-float16|7b-train|compile|memory|profile|all]
                                          [--repeats 3]

135m      SmolLM2-135M's shape (30 layers, hidden 576, FFN 1536, 9 query / 3 kv heads, vocab 49,152, tied
          embeddings): a perplexity forward over 8 rows of 512 tokens, a full-finetune training step (batch
          4 x 256, AdamW), a LoRA step (rank 8 on q/k/v/o; the peer is transformers + peft), both again with
          every decoder layer recomputed in the backward pass (`training.recompute`; the peer: transformers'
          gradient checkpointing), and generation at batch 1 and 8 (64 new tokens after a 128-token prompt).
7b-*      two decoder layers at Llama-2-7B's width (hidden 4096, FFN 11008, 32 heads, vocab 32000): a forward
          over 512 tokens in float32 and in float16; a training step (batch 1 x 512, float32) of one such layer
          (embeddings and output projection frozen, so both sides fit in memory at once).
memory    the peak RSS of each 135M-shape workload per side, each run alone in a fresh process.
profile   ours under MindSpore's profiler: per workload the kernel types that take most time, launches a run,
          and kernel time against wall time (the rest is launch overhead and host work).
compile   the first call of a perplexity forward (8 x 256) at hidden 576 with 2, 30 and 80 layers beside its
          steady time: the difference is what compiling costs (PyTorch's eager first call is there for scale).

Workloads run side by side, round by round (bench/sidebyside.py), and each ratio is the median of the
per-round ratios, ours over PyTorch's; above 1 we are faster. Without torch and transformers only ours runs.
`all` runs each part in a process of its own.
"""

from __future__ import annotations

import argparse
import csv
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import eval as eval_bench
import train as train_bench
from sidebyside import WARM_UP_RUNS, compare, peer_installed, report

REPO = Path(__file__).resolve().parent.parent
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                     num_kv_heads=3, rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=2048)
LLAMA2_7B_WIDTH = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=2, num_heads=32,
                       max_position_embeddings=4096)
LORA_TARGETS = "wq|wk|wv|wo"


def random_rows(vocab: int, rows: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, (rows, length), dtype=np.int32)


def run_sides(title: str, ours: dict, peer, repeats: int) -> None:
    """Time `ours` beside `peer()` (built only where PyTorch is installed) and print the report."""
    print(title, flush=True)
    sides = {"ours": ours}
    if peer_installed():
        sides["pytorch"] = peer()
    report(compare(sides, repeats))


# workload -> (LoRA targets, recompute: ours `training.recompute`, PyTorch's gradient checkpointing)
TRAINING_135M = {"full finetune step": (None, False), "LoRA step": (LORA_TARGETS, False),
                 "full, recompute": (None, True), "LoRA, recompute": (LORA_TARGETS, True)}
WORKLOADS_135M = ("perplexity", "generate batch 1", "generate batch 8", *TRAINING_135M)


def evaluation_works(side: str, config, prompt_batches) -> dict:
    """Perplexity over 8 rows of 512 and generation (128-token prompts, 64 new tokens) at each batch size."""
    rows = random_rows(config.vocab_size, 8, 513)
    prompts = {batch: random_rows(config.vocab_size, batch, 128, seed=batch).tolist() for batch in prompt_batches}
    return (eval_bench.ours if side == "ours" else eval_bench.transformers_peer)(config, rows, prompts, 64)


def training_works(side: str, config, workload: str) -> dict:
    """One training step, batch 4 x 256, as {"train step": work}."""
    batch = random_rows(config.vocab_size, 4, 257)
    build = train_bench.ours if side == "ours" else train_bench.transformers_peer
    lora_targets, recompute = TRAINING_135M[workload]
    return build(batch, 1, config, lora_targets, recompute=recompute)


def part_135m(repeats: int) -> None:
    from llama.config.model import ModelConfig

    config = ModelConfig(**SMOLLM2_SHAPE)
    run_sides("135M shape: perplexity 8 x 512, generation batch 1 and 8 (128-token prompts, 64 new tokens)",
              evaluation_works("ours", config, (1, 8)), lambda: evaluation_works("pytorch", config, (1, 8)), repeats)
    for workload in TRAINING_135M:
        lora_targets, recompute = TRAINING_135M[workload]
        run_sides(f"135M shape: {workload}, batch 4 x 256" + (", rank 8 on q/k/v/o" if lora_targets else "")
                  + (" (layers recomputed in the backward pass; PyTorch: gradient checkpointing)" if recompute else ""),
                  training_works("ours", config, workload),
                  lambda workload=workload: training_works("pytorch", config, workload), repeats)


def peak_rss(side: str, workload: str) -> int:
    """Bytes: the peak RSS of this process after building one 135M-shape workload of one side and running it
    as the timed benchmark does (compile or first run, warm-up runs, a timed run)."""
    from llama.config.model import ModelConfig

    config = ModelConfig(**SMOLLM2_SHAPE)
    if workload in TRAINING_135M:
        run, _ = training_works(side, config, workload)["train step"]
    else:
        batches = (int(workload.split()[-1]),) if workload.startswith("generate") else ()
        run, _ = evaluation_works(side, config, batches)[workload]
    for _ in range(1 + WARM_UP_RUNS):
        run()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def part_memory() -> None:
    """Each 135M-shape workload of each side alone in a fresh process (imports, model, graphs, runs)."""
    print("135M shape: peak RSS of a process running one workload (GiB; ours / PyTorch below 1 uses less)", flush=True)
    sides = ("ours", "pytorch") if peer_installed() else ("ours",)
    for workload in WORKLOADS_135M:
        peaks = {}
        for side in sides:
            child = subprocess.run([sys.executable, __file__, "--peak-rss", side, workload],
                                   capture_output=True, text=True)
            if child.returncode:
                raise SystemExit(f"{side} {workload}: {child.stderr.strip().splitlines()[-1]}")
            peaks[side] = int(child.stdout.split()[-1]) / 2 ** 30
        line = f"  {workload:<20} " + "   ".join(f"{side} {peak:5.2f}" for side, peak in peaks.items())
        if len(peaks) == 2:
            line += f"   ratio {peaks['ours'] / peaks['pytorch']:.2f}"
        print(line, flush=True)


def part_7b_forward(dtype: str, repeats: int) -> None:
    from llama.config.model import ModelConfig

    config = ModelConfig(**LLAMA2_7B_WIDTH, param_dtype=dtype, compute_dtype=dtype)
    rows = random_rows(config.vocab_size, 1, 513)
    run_sides(f"two Llama-2-7B-width layers, {dtype}: forward over 512 tokens", eval_bench.ours(config, rows, {}, 0),
              lambda: eval_bench.transformers_peer(config, rows, {}, 0), repeats)


def part_7b_train(repeats: int) -> None:
    """One layer trained (embeddings and head frozen), so both sides' weights, gradients and AdamW states fit."""
    from llama.config.model import ModelConfig

    config = ModelConfig(**{**LLAMA2_7B_WIDTH, "num_layers": 1})
    batch = random_rows(config.vocab_size, 1, 513)
    run_sides("one Llama-2-7B-width layer, float32: training step of the layer, batch 1 x 512",
              train_bench.ours(batch, 1, config, layers_only=True),
              lambda: train_bench.transformers_peer(batch, 1, config, layers_only=True), repeats)


def kernel_profile(run, runs: int = 2) -> tuple[list[tuple[str, float, float]], float]:
    """MindSpore's profiler over `runs` runs of `run`: ([(kernel type, launches a run, ms a run)], most time
    first; the kernels' ms a run in all)."""
    import mindspore as ms

    with tempfile.TemporaryDirectory() as folder:
        profiler = ms.Profiler(output_path=folder)
        for _ in range(runs):
            run()
        profiler.analyse()
        (table,) = Path(folder).glob("*/FRAMEWORK/cpu_op_type_info_0.csv")
        with table.open() as handle:
            kernels = [(row["op_type"], int(row["type_occurrences"]) / runs, float(row["total_compute_time"]) / runs)
                       for row in csv.DictReader(handle)]
    kernels.sort(key=lambda kernel: -kernel[2])
    return kernels, sum(ms_a_run for _, _, ms_a_run in kernels)


def part_profile() -> None:
    """Where our time goes, per workload: the kernel types that take most of it, and how much of a run's wall
    time is kernels at all (the rest is launching them and the host's work between calls)."""
    from llama.config.model import ModelConfig

    config = ModelConfig(**SMOLLM2_SHAPE)
    works = {**evaluation_works("ours", config, (1, 8)),
             **{workload: training_works("ours", config, workload)["train step"] for workload in TRAINING_135M}}
    width = ModelConfig(**LLAMA2_7B_WIDTH, param_dtype="float32", compute_dtype="float32")
    works["7B-width forward"] = eval_bench.ours(width, random_rows(width.vocab_size, 1, 513), {}, 0)["perplexity"]
    print("profile of ours (MindSpore's profiler): kernels a run, kernel time / wall time, top kernel types "
          "(share of kernel time, launches a run)", flush=True)
    for name, (run, _) in works.items():
        for _ in range(1 + WARM_UP_RUNS):
            run()
        start = time.perf_counter()
        run()
        wall = (time.perf_counter() - start) * 1000
        kernels, kernel_ms = kernel_profile(run)
        top = ", ".join(f"{kind} {share / kernel_ms:.0%} ({launches:,.0f})" for kind, launches, share in kernels[:5])
        print(f"  {name:<20} {sum(k[1] for k in kernels):7,.0f} kernels, {kernel_ms:8,.0f} / {wall:8,.0f} ms: {top}",
              flush=True)


def part_compile() -> None:
    """Seconds of the first and of a later forward, per depth; their difference is the compile."""
    from llama.config.model import ModelConfig

    print("compile: perplexity forward 8 x 256 at hidden 576 (first call, steady call, difference)", flush=True)
    for depth in (2, 30, 80):
        config = ModelConfig(**{**SMOLLM2_SHAPE, "num_layers": depth})
        rows = random_rows(config.vocab_size, 8, 257)
        works = {"ours": eval_bench.ours(config, rows, {}, 0)["perplexity"][0]}
        if peer_installed():
            works["pytorch"] = eval_bench.transformers_peer(config, rows, {}, 0)["perplexity"][0]
        cells = []
        for side, work in works.items():
            seconds = []
            for _ in range(3):
                start = time.perf_counter()
                work()
                seconds.append(time.perf_counter() - start)
            cells.append(f"{side} first {seconds[0]:6.1f} s, steady {seconds[-1]:5.1f} s, "
                         f"first - steady {seconds[0] - seconds[-1]:5.1f} s")
        print(f"  {depth:>2} layers: " + "   ".join(cells), flush=True)


PARTS = {
    "135m": part_135m,
    "7b-float32": lambda repeats: part_7b_forward("float32", repeats),
    "7b-float16": lambda repeats: part_7b_forward("float16", repeats),
    "7b-train": part_7b_train,
    "compile": lambda repeats: part_compile(),
    "memory": lambda repeats: part_memory(),
    "profile": lambda repeats: part_profile(),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=(*PARTS, "all"), default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-rss", nargs=2, metavar=("SIDE", "WORKLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_rss:
        sys.path.insert(0, str(REPO))
        print(peak_rss(*args.peak_rss))
        return 0
    if args.part == "all":
        # one process per part: MindSpore keeps its memory pool for the life of a process, and the 7B-width
        # parts do not fit beside each other's
        failed = [part for part in PARTS if subprocess.run(
            [sys.executable, __file__, "--part", part, "--repeats", str(args.repeats)]).returncode]
        return 1 if failed else 0
    sys.path.insert(0, str(REPO))
    if not peer_installed():
        print("note: torch/transformers are not installed here: our side only")
    PARTS[args.part](args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
