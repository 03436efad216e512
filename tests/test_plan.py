"""The memory plan: its arithmetic, its agreement with measured peaks of real training runs, and `train`
refusing a recipe that does not fit before it loads anything."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llama.cli import run as cli
from llama.config.model import ModelConfig
from llama.config.train import load_train_config
from llama.train.plan import GiB, parse_size, plan_memory

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "configs" / "train"


def test_llama2_7b_counts_and_lora_terms():
    """Meta's 6.74B parameters; LoRA keeps the base in its dtype and trains float32 adapters."""
    model = ModelConfig.named("llama2_7b").replace(param_dtype="float16", compute_dtype="float16")
    config = load_train_config(RECIPES / "lora_llama2_7b.yaml", ["pet.lora_rank=8", "data.batch_size=1"])
    plan = plan_memory(config, 256, model)
    assert plan.devices["parameters"] == 6_738_415_616
    adapters = 32 * 4 * 8 * (4096 + 4096)          # rank 8 on wq/wk/wv/wo, [r, in] + [out, r]
    assert plan.devices["trainable_parameters"] == adapters
    assert plan.terms["weights"] == 6_738_415_616 * 2 + adapters * 4
    assert plan.terms["gradients"] == adapters * 4 and plan.terms["optimizer_states"] == adapters * 8
    assert plan.terms["weight_casts"] == adapters * 2      # float32 adapters used in float16
    assert plan.terms["logits"] == 5 * 256 * 32000 * 4


def test_parallelism_divides_what_it_should():
    model = ModelConfig.named("llama2_13b")
    base = load_train_config(RECIPES / "finetune_llama2_13b.yaml", ["parallel.model_parallel=1",
                                                                      "parallel.pipeline_stage=1"])
    split = load_train_config(RECIPES / "finetune_llama2_13b.yaml", ["parallel.model_parallel=4",
                                                                       "parallel.pipeline_stage=2"])
    whole, parted = plan_memory(base, 1024, model), plan_memory(split, 1024, model)
    # matmuls over 4 and layers over 2; embeddings/lm_head only over 4, norms not at all
    assert whole.terms["weights"] / 8 < parted.terms["weights"] < whole.terms["weights"] / 4
    assert parted.terms["logits"] == whole.terms["logits"] // 4
    assert parted.total < whole.total
    recomputed = load_train_config(RECIPES / "finetune_llama2_13b.yaml", ["parallel.model_parallel=1",
                                                                            "parallel.pipeline_stage=1",
                                                                            "training.recompute=true"])
    assert plan_memory(recomputed, 1024, model).total < whole.total


def test_sizes_parse_binary_and_decimal_units():
    assert parse_size("64GiB") == 64 * GiB and parse_size("24GB") == 24 * 10 ** 9 and parse_size("512") == 512


# Runs a command and prints its peak RSS in KiB (wait4). Through this small process, because Linux starts a
# child's high-water mark at its parent's, kept across exec: a command started by pytest itself, whose earlier
# tests held MindSpore models, would report pytest's peak.
_MEASURE_PEAK = ("import os, subprocess, sys; child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
                 "_, status, usage = os.wait4(child.pid, 0); print(usage.ru_maxrss); "
                 "sys.exit(os.waitstatus_to_exitcode(status))")


def _peak_rss(args: list[str], cwd: Path) -> int:
    """Peak RSS in bytes of the process running `args`."""
    measured = subprocess.run([sys.executable, "-c", _MEASURE_PEAK, *args], cwd=cwd, capture_output=True, text=True)
    assert measured.returncode == 0, measured.stderr
    return int(measured.stdout) * 1024


@pytest.mark.slow
@pytest.mark.parametrize("recipe, records", [("tiny_pretrain", "wiki_records"), ("tiny_lora", "alpaca_records")])
def test_plan_is_within_15_percent_of_the_measured_peak(recipe, records, request, base_checkpoint, tmp_path):
    data = request.getfixturevalue(records)
    overrides = [f"data.train={data}", f"model.checkpoint={base_checkpoint}", "training.max_steps=3"]
    exe = Path(sys.executable).parent / "llama2-pipeline"
    measured = _peak_rss([str(exe), "train", "--config", str(RECIPES / f"{recipe}.yaml"),
                          "--output-dir", str(tmp_path / "run"), *overrides], tmp_path)
    planned = subprocess.run([str(exe), "plan", "--config", str(RECIPES / f"{recipe}.yaml"), "--json", *overrides],
                             capture_output=True, text=True, check=True)
    total = json.loads(planned.stdout.splitlines()[-1])["total_gib"] * GiB
    assert abs(total - measured) / measured < 0.15, (total / GiB, measured / GiB)


def test_train_refuses_a_recipe_that_does_not_fit_before_loading(wiki_records, tmp_path, capsys):
    out = tmp_path / "run"
    status = cli(["train", "--config", str(RECIPES / "tiny_pretrain.yaml"), "--output-dir", str(out),
                  f"data.train={wiki_records}", "data.batch_size=100000"])
    err = capsys.readouterr().err.strip()
    assert status == 1 and len(err.splitlines()) == 1
    assert err.startswith("error: train: needs") and "biggest term is logits" in err
    assert not out.exists()


def test_plan_command_reports_the_seed_recipe_on_64gib_devices(capsys):
    assert cli(["plan", "--config", str(RECIPES / "prefix_llama2_7b.yaml"), "--device-memory", "64GiB",
                "--seq-length", "512", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["devices"] == 8 and result["seq_length"] == 512 and result["device_memory_gib"] == 64.0
    assert result["fits"] is (result["total_gib"] <= 64.0)
    assert result["weights_gib"] == pytest.approx((6_738_415_616 * 2 + result["trainable_parameters"] * 4) / GiB,
                                                  abs=0.01)


@pytest.mark.slow
def test_recompute_lowers_the_measured_peak_by_what_the_plan_says(alpaca_records, tmp_path):
    """Eight tiny layers over batches of 8 rows of 384 tokens, where activations outweigh the weights:
    `training.recompute` must save at least half the activation memory the plan says it saves."""
    model = tmp_path / "tiny8.yaml"
    model.write_text((REPO / "configs/model/tiny.yaml").read_text().replace("num_layers: 2", "num_layers: 8"))
    exe = Path(sys.executable).parent / "llama2-pipeline"
    peaks, plans = {}, {}
    for recompute in ("false", "true"):
        overrides = [f"data.train={alpaca_records}", f"model.config={model}", "training.max_steps=2",
                     "data.batch_size=8", f"training.recompute={recompute}"]
        peaks[recompute] = _peak_rss([str(exe), "train", "--config", str(RECIPES / "tiny_pretrain.yaml"),
                                      "--output-dir", str(tmp_path / recompute), *overrides], tmp_path)
        planned = subprocess.run([str(exe), "plan", "--config", str(RECIPES / "tiny_pretrain.yaml"), "--json",
                                  *overrides], capture_output=True, text=True, check=True)
        plans[recompute] = json.loads(planned.stdout.splitlines()[-1])["total_gib"] * GiB
    planned_saving, measured_saving = plans["false"] - plans["true"], peaks["false"] - peaks["true"]
    print(f"plan {plans['false'] / GiB:.2f} -> {plans['true'] / GiB:.2f} GiB, "
          f"measured {peaks['false'] / GiB:.2f} -> {peaks['true'] / GiB:.2f} GiB")
    assert planned_saving > 0.15 * plans["false"]
    assert measured_saving > planned_saving / 2, (planned_saving / GiB, measured_saving / GiB)
