"""Merging: LoRA folded into its base gives the adapter model's logits; replicas and bases are checked."""

import json
import shutil

import numpy as np
import pytest

from llama.config.train import TrainConfig
from llama.errors import PipelineError
from llama.train import checkpointing
from llama.train.merge import merge
from llama.train.trainer import train
from train_support import sample_ids, tiny_config

pytestmark = pytest.mark.slow
LORA = {"type": "lora", "lora_rank": 4, "lora_alpha": 8, "target_modules": "wq|wk|wv|wo"}


def _finetune(records, base, out, pet):
    config = tiny_config(run_mode="finetune", model={"checkpoint": str(base)}, pet=pet,
                         data={"train": str(records), "batch_size": 2}, training={"max_steps": 3},
                         checkpoint={"save_steps": 3})
    train(config, out)
    return config


@pytest.fixture(scope="module")
def lora_run(alpaca_records, base_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    return out, _finetune(alpaca_records, base_checkpoint, out, LORA)


def test_lora_merge_gives_the_logits_of_base_plus_adapter(lora_run, tmp_path):
    import mindspore as ms
    from llama.train.network import build_network
    from llama.weights.load import load_checkpoint

    run, config = lora_run
    adapter = checkpointing.load_tensors(run / "rank_0/step_00000003/weights.ckpt")
    assert adapter and all("mindpet_delta_lora" in name for name in adapter)
    assert any(np.abs(adapter[name].asnumpy()).max() > 0 for name in adapter if name.endswith("lora_b"))

    summary = merge(run, tmp_path / "merged")
    assert summary["kind"] == "lora" and summary["merged_weights"] == 2 * 4

    network = build_network(TrainConfig.from_dict(config))
    checkpointing.restore(list(network.net.trainable_params()), adapter, "adapter")
    network.net.set_train(False)
    ids = ms.Tensor(sample_ids())
    expected = network.net(ids).asnumpy()
    merged, _ = load_checkpoint(tmp_path / "merged")
    np.testing.assert_allclose(merged(ids).asnumpy(), expected, atol=2e-4, rtol=1e-4)

    base, _ = load_checkpoint(config["model"]["checkpoint"])
    assert np.abs(base(ids).asnumpy() - expected).max() > 1e-3, "the adapter should change the logits"

    hf = merge(run, tmp_path / "hf", fmt="hf")
    assert hf["format"] == "hf" and (tmp_path / "hf" / "config.json").is_file()


def test_lora_merge_refuses_a_different_base(lora_run, tmp_path):
    run, _ = lora_run
    other = tmp_path / "other"
    shutil.copytree(json.loads((run / "rank_0/step_00000003/state.json").read_text())["base"]["path"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["files"]["model.ckpt"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PipelineError, match="is not the base checkpoint the adapter in .* was trained on"):
        merge(run, tmp_path / "merged", base=other)


def test_replicas_must_be_identical(lora_run, tmp_path):
    import mindspore as ms

    run = tmp_path / "run"
    shutil.copytree(lora_run[0] / "rank_0", run / "rank_0")
    folder = run / "rank_0/step_00000003"
    state = checkpointing.verify(folder)
    weights = checkpointing.load_tensors(folder / checkpointing.WEIGHTS)
    optimizer = list(checkpointing.load_tensors(folder / checkpointing.OPTIMIZER).values())
    checkpointing.save(run, 1, 3, list(weights.values()), optimizer, state, keep_last=1)
    assert merge(run, tmp_path / "same")["ranks"] == 2

    name = sorted(weights)[0]
    weights[name].set_data(weights[name] + ms.Tensor(1e-3, weights[name].dtype))
    checkpointing.save(run, 1, 3, list(weights.values()), optimizer, state, keep_last=1)
    with pytest.raises(PipelineError, match=f"replicas differ: {name}"):
        merge(run, tmp_path / "different")


def test_prefix_adapters_are_not_merged(alpaca_records, base_checkpoint, tmp_path):
    _finetune(alpaca_records, base_checkpoint, tmp_path / "run", {"type": "prefix", "prefix_token_num": 4,
                                                                 "mid_dim": 32})
    saved = checkpointing.load_tensors(tmp_path / "run/rank_0/step_00000003/weights.ckpt")
    assert saved and all(name.startswith("prefix_layers.") for name in saved)
    with pytest.raises(PipelineError, match="prefix-tuning adapter"):
        merge(tmp_path / "run", tmp_path / "merged")


# MindFormers' model-parallel layout for 2 devices: column-parallel projections and the vocabulary are split
# along their output rows, row-parallel ones (wo, w2) along their input columns, norms are replicated.
ROWS, COLUMNS = r"(.*\.)?(wq|wk|wv|w1|w3|lm_head)\.weight|.*\.embedding_weight", r".*\.(wo|w2)\.weight"


def test_sliced_checkpoints_merge_through_transform_checkpoints(base_checkpoint, tmp_path, capsys):
    """Two model-parallel slices per tensor, described by a strategy file in MindSpore's own JSON layout
    format (CPU cannot train model-parallel to write one), merge back to the original weights bit for bit."""
    import re

    import mindspore as ms

    from llama.cli import run as cli
    from llama.weights.source import open_checkpoint

    original = {name: entry.read() for name, entry in open_checkpoint(base_checkpoint).entries.items()}
    layouts, slices = {}, {0: [], 1: []}
    for name, value in original.items():
        axis = 0 if re.fullmatch(ROWS, name) else 1 if re.fullmatch(COLUMNS, name) else None
        tensor_map = [-1] * value.ndim
        if axis is not None:
            tensor_map[axis] = 0  # split by the (only) device-matrix dimension
        layouts[name] = {"dev_matrix": [2], "tensor_map": tensor_map, "field": 0,
                         "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}
        for rank in (0, 1):
            part = value if axis is None else np.split(value, 2, axis=axis)[rank]
            slices[rank].append({"name": name, "data": ms.Tensor(np.ascontiguousarray(part))})
    assert sum(layout["tensor_map"] != [-1] * len(layout["tensor_map"]) for layout in layouts.values()) >= 8
    strategy = tmp_path / "strategy.json"
    strategy.write_text(json.dumps({"parallel_layout_item": layouts}))
    for rank, tensors in slices.items():
        (tmp_path / "sliced" / f"rank_{rank}").mkdir(parents=True)
        ms.save_checkpoint(tensors, str(tmp_path / "sliced" / f"rank_{rank}" / "llama2_rank.ckpt"))

    assert cli(["merge", str(tmp_path / "sliced"), "--strategy", str(strategy), "--model-config", "tiny",
                "--output", str(tmp_path / "merged"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kind"] == "sliced"
    merged = {name: entry.read() for name, entry in open_checkpoint(tmp_path / "merged").entries.items()}
    assert merged.keys() == original.keys()
    for name, value in original.items():
        np.testing.assert_array_equal(merged[name], value, err_msg=name)
