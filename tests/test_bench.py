"""The benchmarks' side-by-side harness: what it runs, in which order, and what it reports (no timing asserted);
the real-shapes benchmark's kernel profile."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import sidebyside  # noqa: E402


@pytest.fixture
def calls(monkeypatch):
    monkeypatch.setattr(sidebyside, "SETTLE_SECONDS", 0.0)
    return []


def recording(calls, side, work, tokens=10):
    return (lambda: calls.append((side, work)), tokens)


def test_compare_warms_up_each_run_then_alternates_sides_round_by_round(calls, monkeypatch):
    monkeypatch.setattr(sidebyside, "WARM_UP_RUNS", 2)
    sides = {side: {work: recording(calls, side, work) for work in ("ppl", "gen")} for side in ("ours", "peer")}
    rates = sidebyside.compare(sides, repeats=3)
    warm_up, rounds = calls[:8], calls[8:]
    assert warm_up == [("ours", "ppl"), ("ours", "ppl"), ("ours", "gen"), ("ours", "gen"),
                       ("peer", "ppl"), ("peer", "ppl"), ("peer", "gen"), ("peer", "gen")]
    assert rounds == [("ours", "ppl"), ("peer", "ppl"), ("ours", "gen"), ("peer", "gen"),     # round 0: in order
                      ("peer", "ppl"), ("ours", "ppl"), ("peer", "gen"), ("ours", "gen"),     # round 1: reversed
                      ("ours", "ppl"), ("peer", "ppl"), ("ours", "gen"), ("peer", "gen")]
    assert list(rates) == ["ppl", "gen"]
    assert all(len(values) == 3 and min(values) > 0 for by_side in rates.values() for values in by_side.values())


def test_report_quotes_the_median_of_per_round_ratios(capsys):
    sidebyside.report({"gen": {"ours": [100.0, 300.0, 90.0], "peer": [50.0, 100.0, 100.0]}})
    line = capsys.readouterr().out
    # per-round ratios 2.00, 3.00, 0.90 have the median 2.00; the median rates (100 and 100) would say 1.00
    assert "ratio 2.00x (rounds: 2.00 3.00 0.90)" in line
    assert "ours       100" in line and "peer       100" in line


def test_report_without_a_peer_prints_our_rates_only(capsys):
    sidebyside.report({"ppl": {"ours": [5000.0, 7000.0, 6000.0]}})
    line = capsys.readouterr().out
    assert "6,000" in line and "ratio" not in line


def test_kernel_profile_counts_what_a_run_launches_and_sorts_by_time():
    import mindspore as ms
    from mindspore import ops

    import real_shapes

    weight = ms.Tensor(np.ones((256, 256), np.float32))

    @ms.jit
    def three_matmuls_and_an_add(x):
        return ops.matmul(ops.matmul(ops.matmul(x, weight), weight), weight) + x

    x = ms.Tensor(np.ones((64, 256), np.float32))
    three_matmuls_and_an_add(x).asnumpy()
    kernels, total_ms = real_shapes.kernel_profile(lambda: three_matmuls_and_an_add(x).asnumpy(), runs=2)
    launches = {kind: count for kind, count, _ in kernels}
    assert launches["MatMul"] == 3 and launches["Add"] == 1
    times = [ms_a_run for _, _, ms_a_run in kernels]
    assert times == sorted(times, reverse=True) and total_ms == pytest.approx(sum(times)) and total_ms > 0

