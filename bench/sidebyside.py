"""Side-by-side timing of our code and a peer, interleaved round by round.

The machine's speed drifts (several-fold within minutes on a shared host), so timing all of ours and then all
of the peer's compares two different machines. Here every round times each workload once per side, in
alternating order, and the ratio is taken within the round; the report quotes the median of those ratios.
Each timed run starts after a short pause, so that worker threads a previous run left spinning (OpenMP's
and MindSpore's both busy-wait for a while after work) do not slow down the next one.

Both sides first run every workload WARM_UP_RUNS times untimed: the first compiles, and MindSpore's next four
executions of a compiled graph are slower than its steady state, which starts with the sixth (a training step
at SmolLM2-135M's shape: 5.3 s on executions 2-5, 4.2 s from the sixth on; a perplexity forward of the tiny
model: 955 ms on its third, about 750 ms from its sixth), while PyTorch's is steady after one run. A real
evaluation runs hundreds of forwards and training hundreds of steps, so the steady state is what they see.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from typing import Callable

Work = tuple[Callable[[], object], int]   # (run it once, tokens it processes)
SETTLE_SECONDS = 0.5
WARM_UP_RUNS = 5


def peer_installed() -> bool:
    """Whether the PyTorch peer (torch and transformers) can run in this environment."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def rate(work: Work) -> float:
    """Tokens/s of one run, started after the pause."""
    run, tokens = work
    time.sleep(SETTLE_SECONDS)
    start = time.perf_counter()
    run()
    return tokens / (time.perf_counter() - start)


def compare(sides: dict[str, dict[str, Work]], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Rates per workload and side: {workload: {side: [tokens/s per round]}}, after WARM_UP_RUNS untimed runs
    of each. Every side must offer the same workloads; round r runs the sides in order when r is even and in
    reverse when odd, so neither side always runs first."""
    names = list(sides)
    workloads = list(sides[names[0]])
    for side in names:
        for work in workloads:
            for _ in range(WARM_UP_RUNS):
                sides[side][work][0]()
    rates = {work: {side: [] for side in names} for work in workloads}
    for round_index in range(repeats):
        for work in workloads:
            for side in names if round_index % 2 == 0 else reversed(names):
                rates[work][side].append(rate(sides[side][work]))
    return rates


def report(rates: dict[str, dict[str, list[float]]]) -> None:
    """Median tokens/s per side and, with two sides, the median of the per-round ratios first/second."""
    for work, by_side in rates.items():
        cells = "   ".join(f"{side} {statistics.median(values):>9,.0f}" for side, values in by_side.items())
        line = f"  {work:<20} tokens/s: {cells}"
        if len(by_side) == 2:
            ours, peer = by_side.values()
            ratios = [a / b for a, b in zip(ours, peer)]
            line += (f"   ratio {statistics.median(ratios):.2f}x (rounds: "
                     + " ".join(f"{r:.2f}" for r in ratios) + ")")
        print(line)
