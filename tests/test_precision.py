"""Precision: float32 master weights from bf16/fp16 checkpoints, adapter bases kept as stored, exports in the
base's dtype, and bf16 compute refused only where the device lacks it."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest

from llama.config.train import TrainConfig
from llama.device import compute_dtype_here
from llama.errors import PipelineError
from llama.train.merge import merge
from llama.train.network import build_network
from llama.train.trainer import train
from llama.weights.mindspore_ckpt import read_ckpt_index
from llama.weights.source import open_checkpoint
from llama.weights.writer import write_checkpoint
from train_support import assert_recompute_changes_only_rounding, tiny_config

NP = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}
LORA = {"type": "lora", "lora_rank": 4, "lora_alpha": 8, "target_modules": "wq|wv"}
PREFIX = {"type": "prefix", "prefix_token_num": 4, "mid_dim": 32}


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def half_base(request, fixtures, tmp_path_factory):
    """The bundled tiny Hugging Face Llama (vocab 512, as tok512) stored as bf16 or fp16, as HF ships weights."""
    out = tmp_path_factory.mktemp("base") / request.param
    write_checkpoint(open_checkpoint(fixtures / "hf_tiny_llama"), out, dtype=request.param, progress=False)
    return out, request.param


def _config(base, records, pet=None, **sections) -> dict:
    return tiny_config(model={"config": None, "checkpoint": str(base), "compute_dtype": "float32"},
                       data={"train": str(records)}, pet=pet or {"type": "none"}, **sections)


def _dtypes(path) -> dict:
    return {name: entry.dtype for name, entry in read_ckpt_index(path).items()}


def test_bf16_compute_is_refused_only_where_the_device_lacks_it(wiki_records, tmp_path):
    import mindspore as ms

    if ms.get_context("device_target") != "CPU":
        pytest.skip("the refusal is for devices without bf16 arithmetic")
    assert compute_dtype_here("float16", "model.compute_dtype") == "float16"
    assert compute_dtype_here("bfloat16") == "float32"      # only followed the stored dtype: falls back
    with pytest.raises(PipelineError, match="model.compute_dtype=bfloat16 needs a device that computes in bf16"):
        train(tiny_config(data={"train": str(wiki_records)}, model={"compute_dtype": "bfloat16"}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("pet", [None, LORA, PREFIX], ids=["full", "lora", "prefix"])
def test_trained_weights_are_float32_masters_and_frozen_bases_stay_as_stored(half_base, wiki_records, pet):
    base, dtype = half_base
    network = build_network(TrainConfig.from_dict(_config(base, wiki_records, pet)))
    trainable = {p.name for p in network.net.trainable_params()}
    assert trainable and all(str(p.dtype) == "Float32" for p in network.net.trainable_params())
    frozen = [p for p in network.net.get_parameters() if p.name not in trainable and not p.name.endswith(".key")]
    if pet is None:
        assert not frozen
    else:
        assert frozen and all(str(p.dtype).lower() == dtype for p in frozen)
    assert network.model_config.param_dtype == dtype       # what exports write


@pytest.mark.slow
def test_full_training_from_a_half_checkpoint_resumes_bit_identical_and_exports_its_dtype(half_base, wiki_records,
                                                                                         tmp_path):
    base, dtype = half_base
    config = _config(base, wiki_records, training={"max_steps": 4}, checkpoint={"save_steps": 2, "keep_last": 2})
    result = train(config, tmp_path / "run")
    assert np.isfinite(result["first_loss"]) and np.isfinite(result["final_loss"])
    last = tmp_path / "run/rank_0/step_00000004"
    assert set(_dtypes(last / "weights.ckpt").values()) == {NP["float32"]}
    assert json.loads((last / "state.json").read_text())["model_config"]["param_dtype"] == dtype

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed)
    shutil.rmtree(resumed / "rank_0/step_00000004")
    train(config, resumed, resume=True)
    for name in ("weights.ckpt", "optimizer.ckpt"):
        expected, got = read_ckpt_index(last / name), read_ckpt_index(resumed / "rank_0/step_00000004" / name)
        assert expected.keys() == got.keys()
        for tensor, entry in expected.items():
            np.testing.assert_array_equal(got[tensor].read(), entry.read(), err_msg=tensor)

    merged = merge(tmp_path / "run", tmp_path / "merged")
    assert {e.dtype for e in open_checkpoint(tmp_path / "merged").entries.values()} == {NP[dtype]}
    assert json.loads((tmp_path / "merged/manifest.json").read_text())["dtype"] == dtype and merged["kind"] == "full"
    merge(tmp_path / "run", tmp_path / "hf", fmt="hf")
    assert json.loads((tmp_path / "hf/config.json").read_text())["torch_dtype"] == dtype
    merge(tmp_path / "run", tmp_path / "hf32", fmt="hf", dtype="float32")
    assert json.loads((tmp_path / "hf32/config.json").read_text())["torch_dtype"] == "float32"
    assert {e.dtype for e in open_checkpoint(tmp_path / "hf32").entries.values()} == {NP["float32"]}


@pytest.mark.slow
def test_lora_from_a_half_checkpoint_trains_float32_adapters_and_merges_into_its_dtype(half_base, wiki_records,
                                                                                      tmp_path):
    base, dtype = half_base
    result = train(_config(base, wiki_records, LORA, training={"max_steps": 2}), tmp_path / "run")
    assert np.isfinite(result["final_loss"])
    adapter = _dtypes(tmp_path / "run/rank_0/step_00000002/weights.ckpt")
    assert adapter and set(adapter.values()) == {NP["float32"]}

    merge(tmp_path / "run", tmp_path / "merged")
    original = open_checkpoint(base).entries
    merged = open_checkpoint(tmp_path / "merged").entries
    assert {e.dtype for e in merged.values()} == {NP[dtype]}
    changed = {name for name, entry in merged.items() if not np.array_equal(entry.read(), original[name].read())}
    assert changed and all(name.split(".")[-2] in ("wq", "wv") for name in changed)


@pytest.mark.slow
def test_recompute_on_a_half_base_changes_only_rounding(half_base, wiki_records, tmp_path):
    """LoRA with dropout on a bf16 or fp16 base, as HF ships weights, with and without training.recompute."""
    base, _ = half_base
    assert_recompute_changes_only_rounding(
        _config(base, wiki_records, {**LORA, "lora_dropout": 0.1}, checkpoint={"save_steps": 3}), tmp_path)
