"""The MindSpore Llama against transformers' and MindFormers' own outputs (bundled reference fixtures)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms

from llama.config.model import ModelConfig
from llama.errors import PipelineError
from llama.model import (LlamaForCausalLM, apply_rotary, rotary_tables, softmax_last_axis, swap_axes_1_2,
                         swap_halves)
from llama.weights.load import load_checkpoint, params_source


@pytest.fixture(scope="module")
def hf_dir(fixtures):
    return fixtures / "hf_tiny_llama"


@pytest.fixture(scope="module")
def input_ids(hf_dir):
    return ms.Tensor(np.load(hf_dir / "input_ids.npy"))


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return load_checkpoint(hf_dir)


def test_logits_match_transformers(hf_model, hf_dir, input_ids):
    model, _ = hf_model
    logits = model(input_ids).asnumpy()
    assert logits.shape == (2, 24, 512)
    np.testing.assert_allclose(logits, np.load(hf_dir / "logits.npy"), atol=1e-4, rtol=0)


def test_rotary_is_hugging_faces_rotate_half_formula():
    """apply_rotary's swap-and-signed-sin form equals x*cos + rotate_half(x)*sin, rotate_half(x) = (-x2, x1)."""
    rng = np.random.default_rng(0)
    head_dim, positions = 8, np.array([[0, 3, 7, 2, 11]])
    x = rng.standard_normal((2, 3, 5, head_dim)).astype(np.float32)
    angles = positions[0][:, None] / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))
    expected = x * cos + np.concatenate([-x[..., head_dim // 2:], x[..., :head_dim // 2]], -1) * sin
    cos_table, signed_sin_table = rotary_tables(head_dim, 16, 10000.0)
    got = ms.jit(apply_rotary)(ms.Tensor(x), ms.Tensor(cos_table[positions][:, None]),
                               ms.Tensor(signed_sin_table[positions][:, None]))
    np.testing.assert_allclose(got.asnumpy(), expected, atol=1e-6)


def test_swap_axes_1_2_and_its_gradient_are_the_transposes_they_replace():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)
    weight = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    np.testing.assert_array_equal(ms.jit(swap_axes_1_2)(ms.Tensor(x)).asnumpy(), x.transpose(0, 2, 1, 3))

    def weighted_sum(t):
        return (swap_axes_1_2(t) * ms.Tensor(weight)).sum()

    np.testing.assert_allclose(ms.jit(ms.grad(weighted_sum))(ms.Tensor(x)).asnumpy(), weight.transpose(0, 2, 1, 3))


def test_swap_halves_gradient_swaps_the_halves_back():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
    weight = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
    swapped = np.concatenate([x[..., 4:], x[..., :4]], -1)
    np.testing.assert_array_equal(ms.jit(swap_halves)(ms.Tensor(x)).asnumpy(), swapped)

    def weighted_sum(t):
        return (swap_halves(t) * ms.Tensor(weight)).sum()

    expected = np.concatenate([weight[..., 4:], weight[..., :4]], -1)
    np.testing.assert_array_equal(ms.jit(ms.grad(weighted_sum))(ms.Tensor(x)).asnumpy(), expected)


ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "RealDiv", "Maximum", "Minimum", "SigmoidGrad", "SiLUGrad", "RsqrtGrad"}
SCALAR_OPERAND_KEEPS_NO_TABLE = {"Mul", "RealDiv"}   # measured here (Div's keeps one)
LARGE = 100_000   # elements: the step below has hidden states of 131,072 and attention scores of 262,144
# Builds a tiny model's training step at 4 x 128 tokens and lets MindSpore write the kernels it compiled.
_COMPILE_TRAINING_STEP = """
import numpy as np
from llama.config.model import ModelConfig
from llama.config.train import OptimizerSection
from llama.model import LlamaForCausalLM
from llama.train.step import Stepper
model = LlamaForCausalLM(ModelConfig.named("tiny").replace(num_kv_heads=2))
model.set_train(True)
rows = np.random.default_rng(0).integers(3, 32000, (4, 129), dtype=np.int32)
Stepper(model, 0, OptimizerSection(learning_rate=1e-4), 1.0, 1, 1).step([(rows, rows)], 1e-4, 1.0)
"""


def test_training_graph_runs_no_kernel_that_keeps_an_index_table(tmp_path):
    """MindSpore's CPU Transpose keeps 8 bytes per element, and an elementwise kernel whose operands differ in
    shape 16, for the life of the graph (llama/model.py: broadcast_for, SwapAxes12, SwapHalves, probs_matmul):
    at SmolLM2-135M's shape the last transposes' tables took 1.3 GB of a full-finetune step (6.94 -> 5.62 GB
    without them). Read from the kernels MindSpore compiled for a training step."""
    env = dict(os.environ, MS_DEV_SAVE_GRAPHS="2", MS_DEV_SAVE_GRAPHS_PATH=str(tmp_path / "ir"))
    subprocess.run([sys.executable, "-c", _COMPILE_TRAINING_STEP], env=env, check=True, capture_output=True)
    [kernels] = (tmp_path / "ir" / "actor_set").glob("final_actor_set_*.ir")
    launched, mixed_shapes = [], []
    kernel = None
    for line in kernels.read_text().splitlines():
        if match := re.match(r"%\d+ = kernel_graph[\d-]*:(\w+)-op\d+", line):
            kernel = match.group(1)
            launched.append(kernel)
        elif kernel and line.strip().startswith("# shape"):
            inputs = line.split("->")[0]
            shapes = [tuple(int(d) for d in s.split(",") if d.strip()) for s in re.findall(r"<\(([\d, ]*)\)>", inputs)]
            size = max((int(np.prod(s)) for s in shapes), default=0)
            scalar_ok = kernel in SCALAR_OPERAND_KEEPS_NO_TABLE and () in shapes
            if kernel in ELEMENTWISE and len(set(shapes)) > 1 and size >= LARGE and not scalar_ok:
                mixed_shapes.append((kernel, shapes))
            kernel = None
    assert "MatMul" in launched and "Softmax" in launched and "AdamWeightDecay" in launched
    assert "Transpose" not in launched
    assert not mixed_shapes


def test_softmax_and_its_explicitly_broadcast_gradient_equal_mindspores_own():
    """Both at a large shape (the gradient's sum is broadcast explicitly there) and at a small one (implicitly)."""
    rng = np.random.default_rng(0)
    for shape in ((2, 3, 96, 256), (1, 3, 1, 8)):
        x = ms.Tensor(rng.standard_normal(shape).astype(np.float32) * 4)
        weight = ms.Tensor(rng.standard_normal(shape).astype(np.float32))

        def ours_weighted(t):
            return (softmax_last_axis(t) * weight).sum()

        def theirs_weighted(t):
            return (ms.ops.softmax(t, -1) * weight).sum()

        ours, theirs = (ms.jit(ms.grad(weighted))(x).asnumpy() for weighted in (ours_weighted, theirs_weighted))
        np.testing.assert_array_equal(ms.jit(softmax_last_axis)(x).asnumpy(), ms.ops.softmax(x, -1).asnumpy())
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
        assert np.abs(ours).max() > 0.1


def test_compiled_forward_matches_pynative(hf_model, input_ids):
    model, _ = hf_model
    np.testing.assert_allclose(ms.jit(model.construct)(input_ids).asnumpy(), model(input_ids).asnumpy(), atol=1e-5)


def test_mindformers_checkpoint_loads_as_it_is(fixtures, hf_dir, input_ids):
    mf = fixtures / "mindformers_tiny_llama"
    config = ModelConfig.from_hf_config(hf_dir / "config.json")
    model, _ = load_checkpoint(mf / "llama_tiny_mindformers.ckpt", model_config=config)
    listed = [line.split("\t")[0] for line in (mf / "param_names.txt").read_text().splitlines()]
    assert sorted(name for name, _ in model.parameters_and_names()) == sorted(listed)
    np.testing.assert_allclose(model(input_ids).asnumpy(), np.load(mf / "logits_mindformers.npy"), atol=1e-4, rtol=0)


def test_parameter_names_and_shapes_are_mindformers(fixtures, hf_dir):
    """What a checkpoint holds has MindFormers' names and shapes; in memory only the output projection is
    transposed."""
    config = ModelConfig.from_hf_config(hf_dir / "config.json")
    model = LlamaForCausalLM(config)
    theirs = {}
    for line in (fixtures / "mindformers_tiny_llama" / "param_names.txt").read_text().splitlines():
        name, shape, _ = line.split("\t")
        theirs[name] = tuple(int(d) for d in shape.strip("(,)").split(",") if d.strip())
    assert {name: entry.shape for name, entry in params_source(model, config).entries.items()} == theirs
    in_memory = {name: tuple(p.shape) for name, p in model.parameters_and_names()}
    assert in_memory == {name: shape[::-1] if name == "lm_head.weight" else shape for name, shape in theirs.items()}


def test_float16_compute_and_bf16_storage(hf_dir, input_ids):
    reference = np.load(hf_dir / "logits.npy")
    fp16, config = load_checkpoint(hf_dir, dtype="float16")
    assert config.compute_dtype == "float16"
    assert np.abs(fp16(input_ids).asnumpy() - reference).max() < 0.05
    bf16, config = load_checkpoint(hf_dir / "bf16")
    assert (config.param_dtype, config.compute_dtype) == ("bfloat16", "float32")
    assert fp16.lm_head.weight.dtype == ms.float16 and bf16.lm_head.weight.dtype == ms.bfloat16
    # bf16 weights are the fp32 ones rounded, so logits agree only to bf16 precision
    assert np.abs(bf16(input_ids).asnumpy() - reference).max() < 0.1


def test_prefix_key_values_are_attended(hf_model, input_ids):
    model, config = hf_model
    shape = (2, config.num_kv_heads, 3, config.head_dim)
    zeros = tuple((ms.ops.zeros(shape, ms.float32), ms.ops.zeros(shape, ms.float32)) for _ in range(config.num_layers))
    rng = np.random.default_rng(0)
    random = tuple((ms.Tensor(rng.normal(size=shape).astype(np.float32)),
                    ms.Tensor(rng.normal(size=shape).astype(np.float32))) for _ in range(config.num_layers))
    plain = model(input_ids).asnumpy()
    with_zeros, with_random = model(input_ids, zeros).asnumpy(), model(input_ids, random).asnumpy()
    assert with_zeros.shape == plain.shape
    assert np.abs(with_random - plain).max() > 1e-2
    assert np.abs(with_zeros - plain).max() > 1e-4   # zero keys still take softmax mass


def test_shipped_configs_have_the_published_shapes():
    seven, seventy = ModelConfig.named("llama2_7b"), ModelConfig.named("llama2_70b")
    assert (seven.hidden_size, seven.intermediate_size, seven.num_layers, seven.num_kv_heads) == (4096, 11008, 32, 32)
    assert (seventy.hidden_size, seventy.intermediate_size, seventy.num_layers, seventy.num_heads,
            seventy.num_kv_heads) == (8192, 28672, 80, 64, 8)
    assert ModelConfig.named("llama2_13b").intermediate_size == 13824
    tiny = ModelConfig.named("tiny")
    assert (tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.vocab_size) == (256, 2, 4, 32000)
    with pytest.raises(PipelineError, match="no model config named"):
        ModelConfig.named("llama2_8b")


def test_mindformers_yaml_and_hf_config_round_trip(tmp_path):
    yaml_text = """
model:
  model_config:
    type: LlamaConfig
    seq_length: 4096
    hidden_size: 8192
    num_layers: 80
    num_heads: 64
    vocab_size: 32000
    multiple_of: 4096
    n_kv_heads: 8
    ffn_dim_multiplier: 1.3
    rms_norm_eps: 1.0e-5
    compute_dtype: "float16"
    param_init_type: "float16"
"""
    (tmp_path / "run_llama2_70b.yaml").write_text(yaml_text)
    config = ModelConfig.load(tmp_path / "run_llama2_70b.yaml")
    expected = ModelConfig.named("llama2_70b").replace(param_dtype="float16", compute_dtype="float16")
    assert config == expected      # intermediate size from Meta's rule: multiple_of and ffn_dim_multiplier
    assert ModelConfig.from_hf_config(config.to_hf_config()) == config.replace(compute_dtype="float32")
    assert ModelConfig.from_dict(config.to_dict()) == config
