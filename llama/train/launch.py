"""Data-parallel training: N workers started by MindSpore's msrun, one rank each, gradients all-reduced.

The launcher records the run (config, resume step) before msrun starts, so every worker begins from the same
step, then follows rank 0's metrics.jsonl to report progress and call `on_step` while the workers train.
msrun starts workers with the `python` first on PATH, so the launcher puts this interpreter's folder first.

    python -m llama.train.launch --output-dir RUN [--start-step N]     (what msrun runs on each worker)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from llama.config.train import TrainConfig
from llama.data.records import verify
from llama.errors import PipelineError
from llama.fileio import read_json
from llama.progress import Progress
from llama.train.batches import count_steps
from llama.train.run_folder import CONFIG_FILE, METRICS_FILE, RESULT_FILE, prepare_output
from llama.train.worker import run_worker

REPO_ROOT = Path(__file__).resolve().parents[2]
POLL_SECONDS = 0.5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_data_parallel(config: TrainConfig, output_dir, resume: bool, on_step=None) -> dict:
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    start_step = prepare_output(config, output_dir, resume)
    total_steps = count_steps(config, verify(config.data.train)["rows"])
    (output_dir / RESULT_FILE).unlink(missing_ok=True)
    workers = config.parallel.data_parallel
    log_dir = output_dir / "logs"
    command = ["msrun", f"--worker_num={workers}", f"--local_worker_num={workers}",
               f"--master_port={_free_port()}", f"--log_dir={log_dir}", "--join=True",
               str(Path(__file__).resolve()), "--output-dir", str(output_dir), "--start-step", str(start_step)]
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
               GLOG_v=os.environ.get("GLOG_v", "3"))
    metrics_path, reported = output_dir / METRICS_FILE, start_step
    with open(log_dir.parent / "msrun.log", "w") as log, \
            Progress("train", total=total_steps - start_step, unit="steps") as progress:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=output_dir)
        while True:
            finished = process.poll() is not None
            for step, metrics in _new_metrics(metrics_path, reported):
                progress.update(step - reported, extra=f"step {step}/{total_steps}  loss {metrics['loss']:.4f}  "
                                                        f"lr {metrics['lr']:.2e}  {metrics['tokens_per_s']:,.0f} tokens/s")
                reported = step
                if on_step:
                    on_step(step, metrics)
            if finished:
                break
            time.sleep(POLL_SECONDS)
    if process.returncode != 0 or not (output_dir / RESULT_FILE).is_file():
        raise PipelineError(f"data-parallel training failed: {_worker_error(log_dir)} (logs in {log_dir})")
    return read_json(output_dir / RESULT_FILE, "training result")


def _new_metrics(path: Path, after: int):
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    entries = [json.loads(line) for line in lines if line.endswith("}")]
    return [(entry.pop("step"), entry) for entry in entries if entry["step"] > after]


def _worker_error(log_dir: Path) -> str:
    """The first worker's one-line error, if a worker printed one."""
    for log in sorted(log_dir.glob("worker_*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("error: "):
                return line[len("error: "):]
    return "a worker exited with an error"


def main(argv=None) -> int:
    """A worker's entry point: the config and start step come from the launcher's records."""
    parser = argparse.ArgumentParser(description="one data-parallel training worker (started by msrun)")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--start-step", required=True, type=int)
    args = parser.parse_args(argv)
    try:
        config = TrainConfig.from_dict(read_json(args.output_dir / CONFIG_FILE, "train config"))
        run_worker(config, args.output_dir, start_step=args.start_step)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
