"""Bad input through the real CLI: exit status 1, one `error: ...` line on stderr naming the problem, and
nothing partial written (issue 17's fault-and-bad-input cases)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flows.cli import FLOW_COMMANDS
from llama.cli import LIBRARY_COMMANDS, run as cli
from llama.config.model import ModelConfig

REPO = Path(__file__).resolve().parent.parent
TINY_PRETRAIN = REPO / "configs" / "train" / "tiny_pretrain.yaml"
ALL_COMMANDS = LIBRARY_COMMANDS + FLOW_COMMANDS
SMALL = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
             max_position_embeddings=512)


def fails(capfd, argv, *named, modules=ALL_COMMANDS) -> str:
    """Run the CLI, expect exit status 1 and exactly one stderr line, `error: ...`, containing each of `named`."""
    capfd.readouterr()
    assert cli([str(a) for a in argv], command_modules=modules) == 1
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in named:
        assert text in lines[0], lines[0]
    return lines[0]


def cli_process(tmp_path, *argv, report_prefect: bool = False) -> subprocess.CompletedProcess:
    """`llama2-pipeline ARGV` in a fresh interpreter; with `report_prefect`, its last stdout line says whether
    Prefect was imported (a temporary Prefect server needs it)."""
    code = "import sys\nfrom flows.cli import main\ntry:\n    main()\nfinally:\n" + \
        ("    print('prefect imported:', 'prefect' in sys.modules)\n" if report_prefect else "    pass\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)


def write_model_config(path: Path, **changes) -> Path:
    path.write_text("".join(f"{key}: {value}\n" for key, value in {**SMALL, **changes}.items()))
    return path


@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory, tok512):
    """Two converted folders with tok512: `vocab256`, a vocabulary smaller than the tokenizer's, and `ctx64`,
    a context shorter than the wiki rows."""
    import mindspore as ms
    from llama.model import LlamaForCausalLM
    from llama.weights.load import save_checkpoint

    ms.set_seed(3)
    folders = {}
    for name, changes in {"vocab256": {"vocab_size": 256}, "ctx64": {"max_position_embeddings": 64}}.items():
        config = ModelConfig(**{**SMALL, **changes})
        folders[name] = tmp_path_factory.mktemp("checkpoints") / name
        save_checkpoint(LlamaForCausalLM(config), folders[name], config, tokenizer=tok512)
    return folders


def train_argv(out: Path, *overrides) -> list:
    return ["train", "--config", TINY_PRETRAIN, "--output-dir", out, *overrides]


# ----------------------------------------------------------------------------- 5, 13, 16: settings

@pytest.mark.parametrize("override, named", [
    ("optimizer.learning_rate=-0.001", "optimizer.learning_rate: input should be greater than 0"),
    ("optimizer.learning_rate=nan", "optimizer.learning_rate: input should be a valid number (got 'nan')"),
    ("optimizer.learning_rate=.nan", "optimizer.learning_rate: input should be a finite number"),
    ("optimizer.learning_rate=.inf", "optimizer.learning_rate: input should be a finite number"),
    ("training.max_grad_norm=-1", "training.max_grad_norm: input should be greater than 0"),
    ("optimizer.beta1=5", "optimizer.beta1: input should be less than 1"),
    ("optimizer.beta2=-0.1", "optimizer.beta2: input should be greater than or equal to 0"),
    ("training.max_steps=abc", "training.max_steps: input should be a valid integer (got 'abc')"),
    ("training.max_steps=0", "training.max_steps: input should be greater than or equal to 1"),
    ("data.batch_size=2.5", "data.batch_size: input should be a valid integer"),
    ("pet.lora_dropout=1.5", "pet.lora_dropout: input should be less than 1"),
    ("pet.target_modules=(wq", "pet.target_modules: value error, not a regular expression"),
    ("model.compute_dtype=int8", "model.compute_dtype: input should be 'float32', 'float16' or 'bfloat16'"),
    ("lr_schedule.warmup_ratio=2", "lr_schedule.warmup_ratio: input should be less than 1"),
    ("loss_scale.factor=0.5", "loss_scale.factor: input should be greater than 1"),
    ("optimizer.lr=0.1", "unknown setting lr in optimizer"),
])
def test_train_settings_are_checked_before_anything_runs(capfd, tmp_path, wiki_records, override, named):
    fails(capfd, train_argv(tmp_path / "run", f"data.train={wiki_records}", override), "train config: ", named)
    assert not (tmp_path / "run").exists()


def test_model_config_values_are_typed_and_checked(capfd, tmp_path, wiki_records):
    fails(capfd, train_argv(tmp_path / "run", f"data.train={wiki_records}",
                            f"model.config={write_model_config(tmp_path / 'bad.yaml', rms_norm_eps=-1)}"),
          "rms_norm_eps: input should be greater than 0")
    fails(capfd, train_argv(tmp_path / "run", f"data.train={wiki_records}",
                            f"model.config={write_model_config(tmp_path / 'bad2.yaml', num_heads='two')}"),
          "num_heads: input should be a valid integer")
    assert not (tmp_path / "run").exists()
    # YAML 1.1 reads `1e-5` as a string; every config goes through the one loader, which reads it as a float.
    assert ModelConfig.load(write_model_config(tmp_path / "eps.yaml", rms_norm_eps="1e-5")).rms_norm_eps == 1e-5


def test_a_binary_config_is_refused(capfd, tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    fails(capfd, ["train", "--config", binary, "--output-dir", tmp_path / "run"], f"config {binary}",
          "not a text file")
    assert not (tmp_path / "run").exists()


def test_overrides_may_follow_options(capfd, tmp_path, wiki_records):
    """`train --config C data.train=X --output-dir R training.max_steps=...`: the last override is read (its
    bad value is reported), not refused as an unrecognized argument."""
    fails(capfd, ["train", "--config", TINY_PRETRAIN, f"data.train={wiki_records}", "--output-dir", tmp_path / "run",
                  "training.max_steps=abc"], "training.max_steps")
    fails(capfd, ["train", "--config", TINY_PRETRAIN, "--output-dir", tmp_path / "run", "--bogus"],
          "unrecognized arguments: --bogus")


# ----------------------------------------------------------------------------- 6: vocabulary and context

def test_vocabulary_and_context_are_checked_before_compiling(capfd, tmp_path, small_checkpoints, wiki_records,
                                                             fixtures):
    vocab256, ctx64 = small_checkpoints["vocab256"], small_checkpoints["ctx64"]
    too_small = "do not fit the model's vocabulary of 256"
    fails(capfd, ["predict", "--checkpoint", vocab256, "--prompt", "Once upon a time"], "tokenizer", too_small)
    fails(capfd, ["eval", "squad", "--checkpoint", vocab256, "--data", fixtures / "squad_dev_slice.json",
                  "--output", tmp_path / "squad"], "tokenizer", too_small)
    fails(capfd, ["eval", "ppl", "--checkpoint", vocab256, "--data", wiki_records], "data", too_small)
    fails(capfd, ["eval", "ppl", "--checkpoint", ctx64, "--data", wiki_records],
          "128 tokens per row exceed the model's context of 64")
    assert not (tmp_path / "squad").exists()


@pytest.mark.parametrize("changes, named", [
    ({"vocab_size": 256}, "do not fit the model's vocabulary of 256"),
    ({"max_position_embeddings": 64}, "128 tokens per row exceed the model's context of 64"),
])
def test_training_checks_vocabulary_and_context_before_compiling(capfd, tmp_path, wiki_records, changes, named):
    config = write_model_config(tmp_path / "model.yaml", **changes)
    fails(capfd, train_argv(tmp_path / "run", f"data.train={wiki_records}", f"model.config={config}"),
          f"records {wiki_records}", named)
    assert not (tmp_path / "run" / "rank_0").exists() and not (tmp_path / "run" / "result.json").exists()


# ----------------------------------------------------------------------------- 7: the operating system

@pytest.fixture
def mounted(tmp_path):
    """`mounted(options)`: a fresh tmpfs with mount options (root only; skipped elsewhere), unmounted after."""
    points = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                                               capture_output=True).returncode:
            pytest.skip("mounting a tmpfs needs root")
        points.append(point)
        return point

    yield mount
    for point in points:
        subprocess.run(["umount", str(point)], check=False)


def preprocess_argv(fixtures, output) -> list:
    return ["preprocess", "wiki", "--input", fixtures / "wiki_slice.tokens", "--tokenizer", fixtures / "tok512.model",
            "--seq-length", "128", "--output", output]


def test_read_only_output_folder(capfd, mounted, fixtures):
    folder = mounted("ro,size=64k")
    fails(capfd, preprocess_argv(fixtures, folder / "wiki"), f"{folder}: Read-only file system")


def test_output_whose_parent_is_a_file(capfd, tmp_path, fixtures):
    parent = tmp_path / "a_file"
    parent.write_text("not a folder")
    fails(capfd, preprocess_argv(fixtures, parent / "wiki" / "out"), f"{parent}: Not a directory")


def assert_error_last(stderr: str, *named) -> str:
    """For work that reports progress first (and MindSpore's own log lines): the error is the last line, the
    only `error:` line, and no traceback is shown."""
    lines = stderr.splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in stderr, stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, stderr
    for text in named:
        assert text in lines[-1], lines[-1]
    return lines[-1]


def test_disk_full_during_preprocess(capfd, mounted, fixtures):
    full = mounted("size=64k")  # the records are about 240 kB
    capfd.readouterr()
    assert cli([str(a) for a in preprocess_argv(fixtures, full / "wiki")]) == 1
    assert_error_last(capfd.readouterr().err, str(full), "No space left on device")
    assert not any(full.iterdir())


def test_disk_full_during_training(tmp_path, mounted, wiki_records):
    full = mounted("size=64k")  # the run's config and metrics fit, its first checkpoint does not
    model = write_model_config(tmp_path / "model.yaml")
    done = cli_process(tmp_path, *train_argv(full / "run", f"data.train={wiki_records}", f"model.config={model}",
                                             "training.max_steps=2", "checkpoint.save_steps=1"))
    assert done.returncode == 1
    assert_error_last(done.stderr, f"{full}/run/rank_0/step_00000001/weights.ckpt: No space left on device")
    assert not list((full / "run" / "rank_0").iterdir())  # no partial checkpoint folder


# ----------------------------------------------------------------------------- 8, 9, 14: command options

@pytest.mark.parametrize("argv, named", [
    (["eval", "squad", "--limit", "-5"], "limit must be at least 1 question, got -5"),
    (["eval", "squad", "--limit", "0"], "limit must be at least 1 question, got 0"),
    (["eval", "squad", "--limit", "x"], "argument --limit: invalid int value: 'x'"),
    (["eval", "ppl", "--window", "0"], "window must hold at least 2 tokens, got 0"),
    (["eval", "ppl", "--rolling-window", "1"], "rolling window must hold at least 2 tokens, got 1"),
    (["predict", "--prompt", "a", "--top-p", "0"], "top-p must be in (0, 1], got 0.0"),
    (["predict", "--prompt", "a", "--top-p", "1.5"], "top-p must be in (0, 1], got 1.5"),
    (["predict", "--prompt", "a", "--max-new-tokens", "-3"], "max new tokens must be at least 1, got -3"),
    (["predict", "--prompt", "a", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["predict", "--prompt", "a", "--temperature", "nan"], "temperature must be a finite number >= 0"),
    (["predict", "--prompt", "a", "--top-k", "-2"], "top-k must be >= 0 (0: all tokens), got -2"),
])
def test_meaningless_options_are_refused(capfd, tmp_path, base_checkpoint, argv, named):
    output = ["--output", tmp_path / "out"] if argv[:2] == ["eval", "squad"] else []
    data = ["--data", tmp_path / "data.json"] if argv[0] == "eval" else []
    fails(capfd, [*argv, "--checkpoint", base_checkpoint, *data, *output], named)
    assert not (tmp_path / "out").exists()


def test_a_converted_folders_model_config_loads(capfd, tmp_path, fixtures, tok512):
    converted = tmp_path / "stories260K"
    assert cli(["convert", "--input", str(fixtures / "stories260K.bin"), "--output", str(converted),
                "--tokenizer", str(tok512)]) == 0
    own = converted / "model_config.json"
    assert ModelConfig.load(own) == ModelConfig.from_dict(json.loads(own.read_text()))
    capfd.readouterr()
    assert cli(["predict", "--checkpoint", str(converted), "--model-config", str(own), "--prompt", "Once",
                "--max-new-tokens", "2", "--ignore-eos", "--json"]) == 0
    assert json.loads(capfd.readouterr().out.splitlines()[-1])["new_tokens"] == 2


def _hf_with_nonfinite(fixtures, folder: Path) -> Path:
    from safetensors.numpy import load_file, save_file

    folder.mkdir()
    (folder / "config.json").write_bytes((fixtures / "hf_tiny_llama" / "config.json").read_bytes())
    tensors = load_file(fixtures / "hf_tiny_llama" / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    tensors["model.norm.weight"][0] = -np.inf
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_nonfinite_weights_are_refused_unless_allowed(capfd, tmp_path, fixtures):
    source = _hf_with_nonfinite(fixtures, tmp_path / "hf")
    out = tmp_path / "out"
    fails(capfd, ["convert", "--input", source, "--output", out], "2 tensors hold NaN or Inf",
          "model.layers.1.feed_forward.w3.weight", "model.norm_out.weight", "--allow-nonfinite")
    assert not out.exists()
    assert cli(["convert", "--input", str(source), "--output", str(out), "--allow-nonfinite"]) == 0
    assert "warning: 2 tensors hold NaN or Inf" in capfd.readouterr().err and (out / "manifest.json").is_file()


def test_an_edited_training_result_is_noticed(capfd, tmp_path, wiki_records):
    from tasks.train import training_intact

    run = tmp_path / "run"
    assert cli([str(a) for a in train_argv(run, f"data.train={wiki_records}", "training.max_steps=1",
                                           f"model.config={write_model_config(tmp_path / 'model.yaml')}")]) == 0
    assert training_intact(run)
    result = json.loads((run / "result.json").read_text())
    (run / "result.json").write_text(json.dumps({**result, "final_loss": 0.01}))
    assert not training_intact(run)


# ----------------------------------------------------------------------------- 11: the pipeline

@pytest.mark.parametrize("argv, named", [
    (["--config", "no/such/pipeline.yaml"], "config no/such/pipeline.yaml does not exist"),
    (["evaluate.squad.limitt=3"], "unknown setting limitt in evaluate.squad"),
    (["evaluate.squad.limit=0"], "evaluate.squad.limit: input should be greater than or equal to 1"),
    (["model.format=gguf"], "model.format: input should be 'ckpt', 'safetensors' or 'hf'"),
    (["evaluate.samples.top_p=0"], "evaluate.samples.top_p: input should be greater than 0"),
    (["train.set.optimizer.learning_rate=-1"], "optimizer.learning_rate: input should be greater than 0"),
    (["train.set.training.max_steps=abc"], "training.max_steps: input should be a valid integer"),
    (["train.dataset=nope"], "train.dataset 'nope' is not a dataset"),
    (["model.weights=no/such/weights"], "input 'no/such/weights' is neither a source"),
])
def test_pipeline_config_is_checked_before_a_flow_starts(capfd, tmp_path, argv, named):
    fails(capfd, ["run", "--work-dir", tmp_path / "work", *argv], named)
    assert not (tmp_path / "work").exists()


def test_a_missing_pipeline_config_is_reported_before_prefect_is_imported(tmp_path):
    done = cli_process(tmp_path, "run", "--config", "nope.yaml", report_prefect=True)
    assert done.returncode == 1 and done.stderr == "error: config nope.yaml does not exist\n", done.stderr
    assert done.stdout.splitlines()[-1] == "prefect imported: False"


def test_data_config_is_checked_before_a_prefect_server_starts(capfd, tmp_path):
    fails(capfd, ["prepare-data", "--work-dir", tmp_path / "work", "datasets.wiki_train.seq_length=0"],
          "datasets.wiki_train.wiki.seq_length: input should be greater than or equal to 1")
    assert not (tmp_path / "work").exists()


def test_a_failed_stage_ends_with_one_error_line_and_no_traceback(tmp_path):
    """The error inside a Prefect task reaches the user as the last line, without Prefect's traceback."""
    weights = tmp_path / "weights.bin"
    weights.write_text("not weights")
    done = cli_process(tmp_path, "run", "--work-dir", tmp_path / "work", f"model.weights={weights}")
    lines = done.stderr.splitlines()
    assert done.returncode == 1, done.stderr
    assert lines[-1] == f"error: {weights} is too short for a llama2.c checkpoint", done.stderr
    assert "Traceback" not in done.stderr and sum(line.startswith("error: ") for line in lines) == 1
