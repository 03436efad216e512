"""Faults and bad input, through the real CLI and the Prefect tasks: resume after a kill or a lost checkpoint
is bit-identical in every run mode, one run at a time builds a folder, datasets with nothing to learn are
refused, merge merges what was asked, failed or killed runs leave nothing in the way, MindSpore's noise is
hidden."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llama.cli import run as cli
from train_support import tiny_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
STEPS = 4
LAST = f"step_{STEPS:08d}"


def _subprocess_cli(*args) -> list[str]:
    return [sys.executable, "-c", "from llama.cli import main; main()", *map(str, args)]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), **extra)
    env.pop("GLOG_v", None)  # what a user's shell has: MindSpore's default log level
    return env


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _one_line_error(err: str, message: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    return lines[0]


# ---- 1. resume is bit-identical in every run mode ---------------------------------------------------------

MODES = {  # recipe, records fixture, whether it starts from the base checkpoint
    "pretrain": ("tiny_pretrain", "wiki_records", False),
    "finetune": ("tiny_finetune", "alpaca_records", True),
    "lora": ("tiny_lora", "alpaca_records", True),          # pet.lora_dropout 0.05
    "prefix": ("tiny_prefix", "alpaca_records", True),      # pet.dropout_rate 0.01
}


def _train_args(mode: str, request, out: Path) -> list:
    recipe, records, from_base = MODES[mode]
    args = ["train", "--config", REPO / "configs/train" / f"{recipe}.yaml", "--output-dir", out,
            f"data.train={request.getfixturevalue(records)}", "data.batch_size=2", f"training.max_steps={STEPS}",
            "checkpoint.save_steps=2", "checkpoint.keep_last=3"]
    if from_base:
        args.append(f"model.checkpoint={request.getfixturevalue('base_checkpoint')}")
    return [str(a) for a in args]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """mode -> its uninterrupted run (made on first use)."""
    made = {}

    def reference(mode: str, request) -> Path:
        if mode not in made:
            out = tmp_path_factory.mktemp("reference") / mode
            assert cli(_train_args(mode, request, out)) == 0
            made[mode] = out
        return made[mode]
    return reference


def _assert_same_run(run: Path, reference: Path) -> None:
    for name in ("weights.ckpt", "optimizer.ckpt"):
        assert (run / "rank_0" / LAST / name).read_bytes() == (reference / "rank_0" / LAST / name).read_bytes(), name
    assert _losses(run) == _losses(reference)
    result, expected = (json.loads((r / "result.json").read_text()) for r in (run, reference))
    assert result["first_loss"] == expected["first_loss"] == _losses(reference)[0]


def test_keyed_dropout_draws_new_masks_inside_a_compiled_graph():
    """The training step is compiled: a new key must reach the graph (Parameter.set_data did not)."""
    import mindspore as ms
    from mindspore import nn
    from llama.train.dropout import KeyedDropout, set_dropout_key

    class Compiled(nn.Cell):
        def __init__(self):
            super().__init__()
            self.dropout = KeyedDropout(0.5, site=3)

        @ms.jit
        def construct(self, x):
            return self.dropout(x)

    cell = Compiled()
    cell.set_train(True)
    x = ms.Tensor(np.ones((8, 64), np.float32))
    masks = []
    for key in (2, 1, 2):
        set_dropout_key(cell, key)
        masks.append(cell(x).asnumpy())
    assert not np.array_equal(masks[0], masks[1]) and np.array_equal(masks[0], masks[2])


@pytest.mark.parametrize("mode", sorted(MODES))
def test_resume_after_losing_the_last_checkpoint_is_bit_identical(mode, references, request, tmp_path):
    reference = references(mode, request)
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "rank_0" / LAST)
    assert cli(_train_args(mode, request, run) + ["--resume"]) == 0
    assert json.loads((run / "result.json").read_text())["resumed_from"] == STEPS - 2
    _assert_same_run(run, reference)


def test_sigkilled_lora_run_resumes_bit_identical_and_its_partial_writes_are_cleaned(references, request,
                                                                                     tmp_path):
    reference = references("lora", request)
    run = tmp_path / "run"
    args = _train_args("lora", request, run)
    process = subprocess.Popen(_subprocess_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=_env())
    deadline = time.monotonic() + 600
    while not (run / "rank_0" / "step_00000002").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before step 2"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run / "rank_0" / LAST).exists(), "killed too late to test resuming"
    # A writer killed inside atomic_dir leaves its temporary folder, as a kill during a checkpoint save does.
    writer = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\nfrom llama.fileio import atomic_dir\n"
        "with atomic_dir(sys.argv[1], overwrite=True) as tmp:\n"
        "    (tmp / 'weights.ckpt').write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"), str(run / "rank_0" / LAST)], env=_env())
    assert writer.returncode == -signal.SIGKILL
    assert list((run / "rank_0").glob(f".{LAST}.*.partial"))
    assert cli(args + ["--resume"]) == 0
    assert not list(run.rglob("*.partial"))
    _assert_same_run(run, reference)


# ---- 2. one run at a time per folder ----------------------------------------------------------------------

def test_a_second_train_on_the_same_output_dir_is_refused_naming_the_first(wiki_records, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--config", REPO / "configs/train/tiny_pretrain.yaml", "--output-dir", run,
            f"data.train={wiki_records}", "training.max_steps=12", "checkpoint.save_steps=4"]
    first = subprocess.Popen(_subprocess_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=_env())
    lock = run / ".train.lock"
    deadline = time.monotonic() + 300
    while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
        assert first.poll() is None and time.monotonic() < deadline, "the first run ended before taking its lock"
        time.sleep(0.05)
    for extra in ([], ["--resume"]):
        second = subprocess.run(_subprocess_cli(*args, *extra), capture_output=True, text=True, env=_env())
        assert second.returncode == 1
        line = _one_line_error(second.stderr, f"is in use by another run (pid {first.pid})")
        assert second.stderr.strip().splitlines()[-1] == line
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, 13))


PIPELINE_STAGE = """
import json, sys
from prefect import flow
from tasks.train import train

@flow
def train_once(config, data, work_dir):
    return train(recipe_name="tiny", config=config, data=data, base=None, work_dir=work_dir)

print(json.dumps(train_once(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]), sort_keys=True))
"""


def test_two_pipelines_on_one_work_folder_train_its_stage_once(wiki_records, tmp_path):
    """Two processes (each with its own Prefect) run the train stage on one work folder at the same time:
    one trains, the other waits for it and takes its result; no step is trained twice."""
    script = tmp_path / "stage.py"
    script.write_text(PIPELINE_STAGE)
    config = json.dumps(tiny_config(training={"max_steps": 12}))
    work = tmp_path / "work"
    processes = []
    for name in ("a", "b"):
        home = tmp_path / f"prefect_{name}"
        env = _env(PREFECT_HOME=str(home), PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/db.sqlite",
                   PREFECT_LOCAL_STORAGE_PATH=str(home / "results"),
                   PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600")  # two servers start on a busy machine
        processes.append(subprocess.Popen([sys.executable, str(script), config, str(wiki_records), str(work)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outputs = [process.communicate(timeout=900) for process in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results[0] == results[1]
    waited = [f"waiting for the run with pid {other.pid}" in err
              for (_, err), other in zip(outputs, reversed(processes))]
    assert sorted(waited) == [False, True], "one run should have waited for the other"
    run = Path(results[0]["output_dir"])
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, 13))


# ---- 3. nothing to learn from -----------------------------------------------------------------------------

def _preprocess_alpaca(fixtures, out: Path, seq_length: int) -> list[str]:
    return ["preprocess", "alpaca", "--input", str(fixtures / "alpaca_seed_tasks.json"), "--tokenizer",
            str(fixtures / "tok512.model"), "--seq-length", str(seq_length), "--output", str(out)]


def test_preprocess_refuses_rows_without_answers_and_warns_when_most_have_none(fixtures, tmp_path, capsys):
    assert cli(_preprocess_alpaca(fixtures, tmp_path / "short", 32)) == 1
    _one_line_error(capsys.readouterr().err, "none of the 175 rows has a labelled token")
    assert not list(tmp_path.iterdir())  # nothing written
    assert cli(_preprocess_alpaca(fixtures, tmp_path / "most", 256)) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "136 of 175 rows (78%) have no labelled token" in err


@pytest.mark.parametrize("kind", ["alpaca", "squad"])
def test_train_refuses_records_without_a_labelled_token(kind, alpaca_records, base_checkpoint, tok512, tmp_path,
                                                        capsys):
    from llama.data.records import IGNORE_ID, read_columns, write_records
    from llama.data.tokenizer import Tokenizer

    ids = read_columns(alpaca_records)["input_ids"]
    records = tmp_path / "records"
    write_records(records, {"input_ids": ids, "labels": np.full_like(ids, IGNORE_ID)}, kind=kind,
                  seq_length=ids.shape[1] - 1, tokenizer=Tokenizer(tok512), sources={}, stats={},
                  show_progress=False)
    run = tmp_path / "run"
    assert cli(["train", "--config", str(REPO / "configs/train/tiny_finetune.yaml"), "--output-dir", str(run),
                f"data.train={records}", f"model.checkpoint={base_checkpoint}", "training.max_steps=1"]) == 1
    _one_line_error(capsys.readouterr().err, f"none of the {len(ids)} rows has a labelled token")
    assert not (run / "train_config.json").exists()


# ---- 4. merge merges what was asked -----------------------------------------------------------------------

def test_merge_names_a_damaged_newest_step_instead_of_merging_an_older_one(references, request, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(references("lora", request), run)
    weights = run / "rank_0" / LAST / "weights.ckpt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    assert cli(["merge", str(run), "--output", str(tmp_path / "merged")]) == 1
    line = _one_line_error(capsys.readouterr().err, f"step {STEPS} is damaged")
    assert f"{LAST}/weights.ckpt" in line and f"--step {STEPS - 2}" in line
    assert not (tmp_path / "merged").exists()
    assert cli(["merge", str(run), "--output", str(tmp_path / "older"), "--step", str(STEPS - 2), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == STEPS - 2


# ---- 12. a failed run leaves nothing in the way -----------------------------------------------------------

def test_a_train_that_fails_validation_does_not_block_the_corrected_rerun(wiki_records, alpaca_records,
                                                                          base_checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--config", str(REPO / "configs/train/tiny_finetune.yaml"), "--output-dir", str(run),
            f"model.checkpoint={base_checkpoint}", "training.max_steps=1", "data.batch_size=1"]
    assert cli(args + [f"data.train={wiki_records}"]) == 1  # pretraining rows: no labels column
    _one_line_error(capsys.readouterr().err, "has no labels column")
    assert [p.name for p in run.iterdir() if not p.name.startswith(".")] == []
    assert cli(args + [f"data.train={alpaca_records}"]) == 0


# ---- 15. MindSpore's warnings are not the user's business -------------------------------------------------

def test_mindspore_warnings_are_shown_only_with_debug(fixtures):
    """Compiling a decoding step makes MindSpore warn ("Some side effect nodes were eliminated by mistake", about
    the KV cache that the step writes in place)."""
    stderr = {}
    for flags in ((), ("--debug",)):
        done = subprocess.run(_subprocess_cli(
            "generate", "--checkpoint", fixtures / "hf_tiny_llama", "--tokenizer", fixtures / "tok512.model",
            "--prompt", "Once upon a time", "--max-new-tokens", "3", *flags), capture_output=True, text=True,
            env=_env())
        assert done.returncode == 0, done.stderr[-2000:]
        stderr[flags] = done.stderr
    assert "[WARNING]" in stderr[("--debug",)]
    assert "[WARNING]" not in stderr[()] and "WARN" not in stderr[()]
