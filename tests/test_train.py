"""Training on real records with the real model: configs, schedule, loss, LoRA/prefix freezing, NaN stop."""

import json
from pathlib import Path

import numpy as np
import pytest

from llama.config.train import TrainConfig, load_train_config
from llama.errors import PipelineError
from llama.train.schedule import learning_rate
from llama.train.trainer import train
from train_support import assert_recompute_changes_only_rounding, tiny_config

REPO = Path(__file__).resolve().parent.parent


def test_every_recipe_loads_and_the_seed_values_are_kept():
    recipes = sorted((REPO / "configs" / "train").glob("*.yaml"))
    assert len(recipes) >= 16
    configs = {path.stem: load_train_config(path) for path in recipes}
    lora7 = configs["lora_llama2_7b"]
    assert (lora7.pet.type, lora7.pet.lora_rank, lora7.pet.lora_alpha, lora7.pet.lora_dropout,
            lora7.pet.target_modules) == ("lora", 16, 16.0, 0.05, "wq|wk|wv|wo")
    prefix7 = configs["prefix_llama2_7b"]
    assert (prefix7.pet.prefix_token_num, prefix7.pet.mid_dim, prefix7.pet.dropout_rate) == (16, 512, 0.01)
    assert configs["pretrain_llama2_7b"].optimizer.learning_rate == 5e-5
    assert configs["pretrain_llama2_7b"].training.gradient_accumulation_steps == 8
    assert configs["pretrain_llama2_70b"].parallel.pipeline_stage == 8


def test_overrides_and_unknown_settings(tmp_path):
    config = load_train_config(REPO / "configs/train/tiny_pretrain.yaml", ["data.batch_size=2", "data.train=rel/dir"])
    assert config.data.batch_size == 2 and config.data.train == str(Path.cwd() / "rel/dir")
    with pytest.raises(PipelineError, match="unknown setting lr in optimizer"):
        TrainConfig.from_dict({"optimizer": {"lr": 1}})
    with pytest.raises(PipelineError, match="data.batch_size: input should be greater than or equal to 1"):
        TrainConfig.from_dict({"data": {"batch_size": 0}})


def test_cpu_refuses_model_and_pipeline_parallel(wiki_records, tmp_path):
    config = tiny_config(data={"train": str(wiki_records)}, parallel={"model_parallel": 4, "pipeline_stage": 8})
    with pytest.raises(PipelineError, match="runs data parallelism only"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cosine_schedule_with_warmup():
    config = TrainConfig.from_dict(tiny_config(optimizer={"learning_rate": 1.0},
                                               lr_schedule={"warmup_steps": 4, "lr_end": 0.1}))
    lrs = [learning_rate(config, step, 20) for step in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 15 / 16)))


def test_keyed_dropout_is_reproducible_and_unbiased():
    import mindspore as ms
    from llama.train.dropout import KeyedDropout, set_dropout_key

    cell = KeyedDropout(0.25, site=3)
    cell.set_train(True)
    x = ms.Tensor(np.ones((64, 256), np.float32))
    set_dropout_key(cell, 11)
    first, again = cell(x).asnumpy(), cell(x).asnumpy()
    set_dropout_key(cell, 12)
    other = cell(x).asnumpy()
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert abs((first == 0).mean() - 0.25) < 0.02 and set(np.unique(first)) == {0.0, np.float32(1 / 0.75)}
    cell.set_train(False)
    assert np.array_equal(cell(x).asnumpy(), x.asnumpy())


@pytest.mark.slow
def test_pretraining_loss_falls_and_checkpoints_rotate(wiki_records, tmp_path):
    seen = []
    result = train(tiny_config(data={"train": str(wiki_records)}), tmp_path / "run",
                   on_step=lambda step, metrics: seen.append((step, metrics)))
    assert [step for step, _ in seen] == list(range(1, 9))
    assert set(seen[0][1]) == {"loss", "lr", "grad_norm", "tokens_per_s", "loss_scale", "skipped"}
    assert result["first_loss"] > 10.0 and result["final_loss"] < result["first_loss"] - 3.0
    steps = sorted(p.name for p in (tmp_path / "run" / "rank_0").iterdir())
    assert steps == ["step_00000004", "step_00000008"]
    state = json.loads((tmp_path / "run/rank_0/step_00000008/state.json").read_text())
    assert state["step"] == 8 and state["next_row_in_epoch"] == 32 and state["loss_scale"]["scale"] == 65536
    with pytest.raises(PipelineError, match="already holds a training run"):
        train(tiny_config(data={"train": str(wiki_records)}), tmp_path / "run")


@pytest.mark.slow
def test_finetuning_reads_labels(alpaca_records, wiki_records, base_checkpoint, tmp_path):
    config = tiny_config(run_mode="finetune", model={"checkpoint": str(base_checkpoint)},
                         data={"train": str(alpaca_records), "batch_size": 2}, training={"max_steps": 3})
    result = train(config, tmp_path / "run")
    assert result["kind"] == "full" and result["seq_length"] == 384 and np.isfinite(result["final_loss"])
    with pytest.raises(PipelineError, match="has no labels column"):
        train(dict(config, data={"train": str(wiki_records)}), tmp_path / "x")


def test_scored_positions_only_when_the_loss_counts_at_most_half_of_a_row():
    from llama.data.records import IGNORE_ID
    from llama.train.batches import scored_positions

    ids = np.ones((3, 65), np.int32)
    labels = np.full((3, 65), IGNORE_ID, np.int32)
    labels[0, 50:60] = 7                      # 10 counted positions in the longest row -> 16
    labels[1, 60:63] = 7
    assert scored_positions(ids, None, 0) is None
    assert scored_positions(ids, labels, 0) == 16
    ids[0, 55:] = 0                          # padding is not counted: 5 left
    assert scored_positions(ids, labels, 0) == 8
    labels[2, 10:50] = 7                     # 40 of 64: more than half
    assert scored_positions(ids, labels, 0) is None


@pytest.mark.parametrize("kind", ["full", "prefix"])
def test_a_loss_over_scored_positions_only_equals_the_full_loss_and_its_gradients(kind):
    import mindspore as ms
    from mindspore import ParameterTuple, Tensor

    from llama.config.model import ModelConfig
    from llama.data.records import IGNORE_ID
    from llama.model import LlamaForCausalLM
    from llama.train.batches import scored_positions
    from llama.train.prefix import PrefixTunedLM
    from llama.train.step import CausalLMLoss, _Gradients

    ms.set_seed(0)
    config = ModelConfig.named("tiny")
    net = LlamaForCausalLM(config)
    if kind == "prefix":
        net = PrefixTunedLM(net, 4, 16, 0.0)
    params = ParameterTuple(net.trainable_params())
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, (3, 97)).astype(np.int32)
    ids[1, 80:] = 0                                               # padding
    labels = np.full_like(ids, IGNORE_ID)
    for row, (start, stop) in enumerate([(40, 52), (70, 85), (90, 97)]):
        labels[row, start:stop] = ids[row, start:stop]
    scored = scored_positions(ids, labels, 0)
    assert scored == 16
    args = (Tensor(ids), Tensor(labels), Tensor(1.0, ms.float32))
    full_loss, full_grads = _Gradients(CausalLMLoss(net, 0), params)(*args)
    loss, grads = _Gradients(CausalLMLoss(net, 0, scored), params)(*args)
    assert float(loss.asnumpy()) == pytest.approx(float(full_loss.asnumpy()), rel=1e-6)
    for name, g, full in zip((p.name for p in params), grads, full_grads):
        np.testing.assert_allclose(g.asnumpy(), full.asnumpy(), rtol=1e-4, atol=1e-7, err_msg=name)


def _changed_params(config: dict, records) -> tuple[set, set]:
    """Run two optimizer steps directly; return (names that changed, names that train)."""
    from llama.train.batches import load_batches
    from llama.train.dropout import set_dropout_key
    from llama.train.network import build_network
    from llama.train.step import Stepper

    config = TrainConfig.from_dict(config)
    network = build_network(config)
    net = network.net
    net.set_train(True)
    before = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    stepper = Stepper(net, 0, config.optimizer, 1.0, 1, 1)
    batches = load_batches(config, 1)
    for step in range(2):
        set_dropout_key(net, step + 1)
        stepper.step(batches.micro_batches(step, 0), 1e-3, 1.0)
    changed = {p.name for p in net.get_parameters()   # dropout keys are per-step inputs, not weights
               if not p.name.endswith("dropout.key") and not np.array_equal(before[p.name], p.asnumpy())}
    return changed, {p.name for p in net.trainable_params()}


@pytest.mark.slow
def test_lora_changes_only_adapter_weights(alpaca_records, base_checkpoint):
    changed, trainable = _changed_params(tiny_config(
        run_mode="finetune", model={"checkpoint": str(base_checkpoint)}, data={"train": str(alpaca_records),
                                                                            "batch_size": 2},
        pet={"type": "lora", "lora_rank": 4, "lora_alpha": 8, "target_modules": "wq|wv"}), alpaca_records)
    assert changed == trainable and len(trainable) == 2 * 2 * 2
    assert all(name.split(".")[-2] in ("wq", "wv") and "mindpet_delta_lora" in name for name in changed)


@pytest.mark.slow
def test_prefix_tuning_changes_only_prefix_weights(alpaca_records, base_checkpoint):
    changed, trainable = _changed_params(tiny_config(
        run_mode="finetune", model={"checkpoint": str(base_checkpoint)}, data={"train": str(alpaca_records),
                                                                            "batch_size": 2},
        pet={"type": "prefix", "prefix_token_num": 4, "mid_dim": 32}), alpaca_records)
    assert changed == trainable and len(trainable) == 5
    assert all(name.startswith("prefix_layers.mindpet_delta_prefixtuning") for name in changed)


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(wiki_records, tmp_path):
    config = tiny_config(data={"train": str(wiki_records)}, model={"compute_dtype": "float16"},
                         optimizer={"learning_rate": 1e4}, lr_schedule={"type": "constant", "warmup_steps": 0},
                         loss_scale={"type": "none"}, training={"max_steps": 8, "max_grad_norm": None},
                         checkpoint={"save_steps": 1, "keep_last": 8})
    with pytest.raises(PipelineError, match=r"loss became (nan|inf) at step (\d+); training stopped") as error:
        train(config, tmp_path / "run")
    failed = int(str(error.value).split(" at step ")[1].split(";")[0])
    assert failed > 1 and f"step_{failed - 1:08d}" in str(error.value)
    assert sorted(p.name for p in (tmp_path / "run/rank_0").iterdir())[-1] == f"step_{failed - 1:08d}"


@pytest.mark.slow
def test_a_full_finetune_of_a_30_layer_model_compiles_and_trains():
    """A per-parameter update loop inside `if finite` compiled to calls nested past MindSpore's default call
    depth at 30 layers (SmolLM2-135M's depth): "Exceed function call depth limit 1000". At the default limit."""
    import types

    import mindspore as ms
    from llama.config.model import ModelConfig
    from llama.model import LlamaForCausalLM
    from llama.train.step import Stepper

    ms.set_seed(0)
    assert ms.get_context("max_call_depth") == 1000
    config = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=30, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    model.set_train(True)
    optimizer = types.SimpleNamespace(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    stepper = Stepper(model, 0, optimizer, 1.0, 1, 1)
    rows = np.random.default_rng(0).integers(1, 512, (2, 65)).astype(np.int32)
    first, _, finite = stepper.step([(rows, rows)], 1e-3, 1.0)
    second, _, _ = stepper.step([(rows, rows)], 1e-3, 1.0)
    assert finite and np.isfinite(first) and second < first


ADAPTERS = {"full": {"type": "none"},
            "lora": {"type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.1},
            "prefix": {"type": "prefix", "prefix_token_num": 4, "mid_dim": 32, "dropout_rate": 0.1}}


@pytest.mark.slow
@pytest.mark.parametrize("kind, eager", [("full", False), ("lora", False), ("prefix", False), ("lora", True)],
                         ids=["full", "lora", "prefix", "lora-eager"])
def test_recomputed_layers_train_to_the_same_weights(kind, eager, alpaca_records, base_checkpoint, tmp_path,
                                                     graphs_never_fit):
    """training.recompute changes where the backward pass gets activations, not the step, dropout masks
    included; eagerly too, as a model runs where its compiled graphs would not fit (llama.device)."""
    if eager:
        graphs_never_fit()
    assert_recompute_changes_only_rounding(tiny_config(
        run_mode="finetune", model={"checkpoint": str(base_checkpoint)}, pet=ADAPTERS[kind],
        data={"train": str(alpaca_records), "batch_size": 2}, checkpoint={"save_steps": 3}), tmp_path)


def test_resume_takes_a_setting_newer_than_the_run_as_its_default(tmp_path):
    """A run saved before `training.recompute` existed resumes with it off, and refuses it on, by name."""
    from llama.config.train import TrainConfig
    from llama.train.run_folder import CONFIG_FILE, prepare_output

    saved = TrainConfig.from_dict(tiny_config()).to_dict()
    del saved["training"]["recompute"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(saved))
    assert prepare_output(TrainConfig.from_dict(tiny_config()), tmp_path, resume=True) == 0
    with pytest.raises(PipelineError, match=r"different settings .*: training\.recompute \(start a new"):
        prepare_output(TrainConfig.from_dict(tiny_config(training={"recompute": True})), tmp_path, resume=True)
