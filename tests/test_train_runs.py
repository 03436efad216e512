"""Whole runs against one uninterrupted reference: SIGKILL + --resume, and two msrun workers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama.train.trainer import train
from llama.weights.mindspore_ckpt import read_ckpt_index
from train_support import tiny_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
STEPS = 8


@pytest.fixture(scope="module")
def reference(wiki_records, tmp_path_factory):
    """The uninterrupted single-process run: 8 steps of 4 rows."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(tiny_config(data={"train": str(wiki_records)}), out)
    return out


def _cli(*args) -> list[str]:
    return [sys.executable, "-c", "from llama.cli import main; main()", *map(str, args)]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_ends_bit_identical(reference, wiki_records, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--config", REPO / "configs/train/tiny_pretrain.yaml", "--output-dir", run,
            f"data.train={wiki_records}", f"training.max_steps={STEPS}", "lr_schedule.warmup_steps=2",
            "checkpoint.save_steps=2", "checkpoint.keep_last=3"]
    process = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + 300
    while not (run / "rank_0" / "step_00000004").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before step 4"
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    saved = sorted(p.name for p in (run / "rank_0").iterdir())
    assert saved[-1] != f"step_{STEPS:08d}", "killed too late to test resuming"
    # The newest checkpoint is damaged: resume must verify it, skip it, and start one checkpoint earlier.
    newest = run / "rank_0" / saved[-1] / "weights.ckpt"
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF
    newest.write_bytes(bytes(data))
    finished = subprocess.run(_cli(*args, "--resume", "--json"), capture_output=True, text=True, cwd=REPO)
    assert finished.returncode == 0, finished.stderr[-2000:]
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    assert result["resumed_from"] == int(saved[-2].split("_")[1])
    final = f"rank_0/step_{STEPS:08d}/weights.ckpt"
    assert (run / final).read_bytes() == (reference / final).read_bytes()
    assert _losses(run) == _losses(reference)
    # on disk the output projection and its moments have MindFormers' [vocab, hidden], as the embedding does
    weights, moments = (read_ckpt_index(run / final), read_ckpt_index((run / final).with_name("optimizer.ckpt")))
    vocab_by_hidden = weights["model.tok_embeddings.embedding_weight"].shape
    assert vocab_by_hidden[0] > vocab_by_hidden[1]
    assert weights["lm_head.weight"].shape == moments["adam_m.lm_head.weight"].shape == vocab_by_hidden


def test_two_msrun_workers_match_one_process_with_the_same_global_batch(reference, wiki_records, tmp_path):
    from llama.train.merge import merge

    run = tmp_path / "dp"
    seen = []
    result = train(tiny_config(data={"train": str(wiki_records), "batch_size": 2},
                               parallel={"data_parallel": 2}), run, on_step=lambda step, m: seen.append(step))
    assert result["world_size"] == 2 and result["global_batch"] == 4
    assert seen == list(range(1, STEPS + 1))
    final = f"step_{STEPS:08d}/weights.ckpt"
    assert (run / "rank_0" / final).read_bytes() == (run / "rank_1" / final).read_bytes()
    assert _losses(run) == pytest.approx(_losses(reference), rel=1e-3)
    merged = merge(run, tmp_path / "merged")
    assert merged["ranks"] == 2 and merged["kind"] == "full"
