"""Conversion in every direction, checked bit for bit, with MindSpore's and safetensors' own readers."""

import json
import shutil

import ml_dtypes  # noqa: F401  (safetensors' numpy loader needs it for bf16)
import numpy as np
import pytest
import mindspore as ms
from safetensors.numpy import load_file, save_file

from llama.cli import run
from llama.config.model import ModelConfig
from llama.errors import PipelineError
from llama.model import checkpoint_layout
from llama.weights.load import load_checkpoint, save_checkpoint
from llama.weights.names import hf_to_ms_name
from llama.weights.source import open_checkpoint
from llama.weights.writer import write_checkpoint


def _bits(array: np.ndarray) -> np.ndarray:
    return array.view(np.uint16) if array.dtype.itemsize == 2 else array.view(np.uint32)


def _ms_arrays(path, fmt="ckpt") -> dict:
    """What MindSpore's own loader makes of a checkpoint file, as numpy (bf16 re-viewed as ml_dtypes)."""
    params = ms.load_checkpoint(str(path), format=fmt)
    out = {}
    for name, param in params.items():
        array = param.asnumpy()
        out[name] = array.view(np.uint16).view(ml_dtypes.bfloat16) if array.dtype.name == "bfloat16" else array
    return out


@pytest.fixture(scope="module")
def hf_dir(fixtures):
    return fixtures / "hf_tiny_llama"


def test_hf_to_mindspore_equals_mindformers_converter(hf_dir, fixtures, tmp_path):
    assert run(["convert", "--input", str(hf_dir), "--output", str(tmp_path / "ms"),
                "--tokenizer", str(fixtures / "tok512.model")]) == 0
    ours = _ms_arrays(tmp_path / "ms" / "model.ckpt")
    theirs = _ms_arrays(fixtures / "mindformers_tiny_llama" / "llama_tiny_mindformers.ckpt")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and np.array_equal(ours[name], theirs[name]), name
    manifest = json.loads((tmp_path / "ms" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.ckpt", "model_config.json", "tokenizer.model"}
    assert ModelConfig.from_dict(manifest["model_config"]) == ModelConfig.from_hf_config(hf_dir / "config.json")


@pytest.mark.parametrize("variant", ["", "bf16"])
@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_hf_to_mindspore_to_hf_is_bit_exact(hf_dir, tmp_path, variant, fmt):
    source = hf_dir / variant if variant else hf_dir
    assert run(["convert", "--input", str(source), "--output", str(tmp_path / "ms"), "--to", fmt]) == 0
    weights = tmp_path / "ms" / f"model.{fmt}"
    for name, array in _ms_arrays(weights, fmt).items():
        assert array.dtype == (ml_dtypes.bfloat16 if variant else np.float32), name
    assert run(["convert", "--input", str(tmp_path / "ms"), "--output", str(tmp_path / "hf"), "--to", "hf"]) == 0
    original, back = load_file(source / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(original) == sorted(back)
    for name in original:
        assert back[name].dtype == original[name].dtype and np.array_equal(_bits(back[name]), _bits(original[name]))
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert ModelConfig.from_hf_config(hf_config) == ModelConfig.from_hf_config(source / "config.json")


def test_sharded_output_round_trips(hf_dir, tmp_path):
    source = open_checkpoint(hf_dir)
    write_checkpoint(source, tmp_path / "hf", "hf", shard_bytes=200_000, progress=False)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 4 and files[0] == "model-00001-of-00004.safetensors"
    write_checkpoint(open_checkpoint(tmp_path / "hf"), tmp_path / "ms", "ckpt", shard_bytes=200_000, progress=False)
    original = load_file(hf_dir / "model.safetensors")
    ours = {}
    for file in sorted((tmp_path / "ms").glob("model-*.ckpt")):
        ours.update(_ms_arrays(file))
    assert {hf_to_ms_name(name): array for name, array in original.items()}.keys() == ours.keys()
    assert all(np.array_equal(ours[hf_to_ms_name(name)], array) for name, array in original.items())


def test_large_tensors_are_split_like_mindspore(hf_dir, tmp_path, monkeypatch):
    """MindSpore writes tensors over its slice size as several records; ours must read back with its loader."""
    import llama.weights.mindspore_ckpt

    monkeypatch.setattr(llama.weights.mindspore_ckpt, "CKPT_SLICE_BYTES", 1000)
    model, config = load_checkpoint(hf_dir)
    save_checkpoint(model, tmp_path / "out", config)
    theirs = _ms_arrays(tmp_path / "out" / "model.ckpt")
    ours = {name: entry.read() for name, entry in open_checkpoint(tmp_path / "out").entries.items()}
    assert all(np.array_equal(theirs[name], ours[name]) for name in theirs) and theirs.keys() == ours.keys()
    assert all(np.array_equal(checkpoint_layout(name, param.asnumpy()), ours[name])
               for name, param in model.parameters_and_names())


def test_damaged_folder_fails_its_checksum(hf_dir, tmp_path):
    write_checkpoint(open_checkpoint(hf_dir), tmp_path / "ms", "ckpt", progress=False)
    weights = tmp_path / "ms" / "model.ckpt"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="does not match the sha256"):
        load_checkpoint(tmp_path / "ms")


def _error_of(capsys, argv) -> str:
    assert run(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_verify_command_checks_a_checkpoint_folder(hf_dir, tmp_path, capsys):
    out = tmp_path / "ms"
    assert run(["convert", "--input", str(hf_dir), "--output", str(out)]) == 0
    capsys.readouterr()
    assert run(["verify", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["verified"] and result["format"] == "llama2-pipeline checkpoint 1" and result["files"] >= 2
    data = bytearray((out / "model.ckpt").read_bytes())
    data[100] ^= 0x01
    (out / "model.ckpt").write_bytes(bytes(data))
    assert "model.ckpt" in _error_of(capsys, ["verify", str(out)])
    assert "no manifest.json" in _error_of(capsys, ["verify", str(hf_dir)])


def test_truncated_safetensors_is_one_clear_error(hf_dir, tmp_path, capsys):
    shutil.copytree(hf_dir, tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    err = _error_of(capsys, ["convert", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "out")])
    assert "truncated" in err and not (tmp_path / "out").exists()


def test_wrong_shaped_tensor_is_named_with_the_expected_shape(hf_dir, tmp_path, capsys):
    shutil.copytree(hf_dir, tmp_path / "hf")
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:100]
    del tensors["model.norm.weight"]
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    err = _error_of(capsys, ["convert", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "out")])
    assert "model.layers.1.feed_forward.w3.weight is [100, 64], expected [172, 64]" in err
    assert "missing model.norm_out.weight [64]" in err
    assert "unexpected model.layers.0.self_attn.q_proj.bias [64]" in err


def test_config_that_does_not_match_the_weights(fixtures, tmp_path, capsys):
    ckpt = fixtures / "mindformers_tiny_llama" / "llama_tiny_mindformers.ckpt"
    err = _error_of(capsys, ["convert", "--input", str(ckpt), "--output", str(tmp_path / "out")])
    assert "--model-config" in err
    err = _error_of(capsys, ["convert", "--input", str(ckpt), "--output", str(tmp_path / "out"),
                             "--model-config", "tiny"])
    assert "expected [32000, 256]" in err and "does not match the model config" in err
    config = fixtures / "hf_tiny_llama" / "config.json"
    assert run(["convert", "--input", str(ckpt), "--output", str(tmp_path / "out"), "--model-config", str(config)]) == 0


def test_llama2c_weights_are_permuted_to_the_rotate_half_layout(fixtures):
    """Against an independent reading of the file: q rows of head 0 come as (even, odd) pairs in llama2.c."""
    source = open_checkpoint(fixtures / "stories260K.bin")
    config = source.config
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.tie_word_embeddings) == (5, 8, 4, True)
    raw = np.fromfile(fixtures / "stories260K.bin", dtype=np.float32, offset=28)
    dim, layers, vocab = 64, 5, 512
    wq0 = raw[vocab * dim + layers * dim:][:dim * dim].reshape(dim, dim)
    ours = source.entries["model.layers.0.attention.wq.weight"].read()
    head = dim // 8
    np.testing.assert_array_equal(ours[:head // 2], wq0[0:head:2])
    np.testing.assert_array_equal(ours[head // 2:head], wq0[1:head:2])


class _NotATensor:
    """Anything but tensors in a checkpoint pickle must be refused, never run."""


def test_pytorch_bin_converts_and_foreign_pickles_are_refused(hf_dir, tmp_path, capsys):
    import torch

    hf = load_file(hf_dir / "model.safetensors")
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(hf_dir / "config.json", folder)
    torch.save({name: torch.from_numpy(array) for name, array in hf.items()}, folder / "pytorch_model.bin")
    assert run(["convert", "--input", str(folder), "--output", str(tmp_path / "hf"), "--to", "hf"]) == 0
    back = load_file(tmp_path / "hf" / "model.safetensors")
    assert all(np.array_equal(back[name], array) for name, array in hf.items()) and set(back) == set(hf)
    capsys.readouterr()

    torch.save({"model.embed_tokens.weight": _NotATensor()}, folder / "pytorch_model.bin")
    err = _error_of(capsys, ["convert", "--input", str(folder), "--output", str(tmp_path / "bad"), "--to", "hf"])
    assert "refused" in err and "weights_only" in err and not (tmp_path / "bad").exists()


def test_meta_consolidated_shards_convert_to_the_hf_weights(hf_dir, tmp_path):
    """Meta's layout (interleaved rotary q/k, split over two model-parallel shards) converts back to HF's."""
    import torch

    hf = load_file(hf_dir / "model.safetensors")
    heads, kv_heads, dim = 8, 4, 64

    def interleave(w, n):  # the inverse of HF's convert_llama_weights_to_hf permute
        return w.reshape(n, 2, w.shape[0] // n // 2, dim).transpose(0, 2, 1, 3).reshape(w.shape)

    meta = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
            "output.weight": hf["lm_head.weight"]}
    for i in range(2):
        p = f"model.layers.{i}."
        meta.update({
            f"layers.{i}.attention.wq.weight": interleave(hf[p + "self_attn.q_proj.weight"], heads),
            f"layers.{i}.attention.wk.weight": interleave(hf[p + "self_attn.k_proj.weight"], kv_heads),
            f"layers.{i}.attention.wv.weight": hf[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": hf[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": hf[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": hf[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": hf[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": hf[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": hf[p + "post_attention_layernorm.weight"]})
    split_axis = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}
    folder = tmp_path / "meta"
    folder.mkdir()
    for shard in range(2):
        tensors = {}
        for name, array in meta.items():
            axis = split_axis.get(name.split(".")[-2] if name.startswith("layers") else name.split(".")[0])
            part = np.array_split(array, 2, axis=axis)[shard] if axis is not None else array
            tensors[name] = torch.from_numpy(np.ascontiguousarray(part))
        torch.save(tensors, folder / f"consolidated.{shard:02d}.pth")
    (folder / "params.json").write_text(json.dumps({"dim": dim, "n_layers": 2, "n_heads": heads, "n_kv_heads": kv_heads,
                                                    "vocab_size": 512, "multiple_of": 4, "norm_eps": 1e-5}))
    assert run(["convert", "--input", str(folder), "--output", str(tmp_path / "hf"), "--to", "hf"]) == 0
    back = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(back) == set(hf)
    for name, array in hf.items():
        np.testing.assert_array_equal(back[name], array, err_msg=name)
