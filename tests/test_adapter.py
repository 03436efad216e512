"""`--adapter RUN_DIR`: prefix-tuning and LoRA runs evaluated and decoded beside their base, the base checked."""

import numpy as np
import pytest

from llama.cli import run as cli
from llama.config.train import TrainConfig
from llama.eval.loading import load_model
from llama.eval.perplexity import TokenNLL, evaluate_perplexity, mindformers_perplexity
from llama.train import checkpointing
from llama.train.network import build_network
from llama.train.trainer import train
from train_support import tiny_config

pytestmark = pytest.mark.slow
PREFIX = {"type": "prefix", "prefix_token_num": 4, "mid_dim": 32}
LORA = {"type": "lora", "lora_rank": 4, "lora_alpha": 8, "target_modules": "wq|wk|wv|wo"}


def _adapter_run(records, base, out, pet) -> dict:
    config = tiny_config(model={"checkpoint": str(base)}, pet=pet, data={"train": str(records)},
                         training={"max_steps": 3}, checkpoint={"save_steps": 3})
    train(config, out)
    return config


@pytest.fixture(scope="module")
def prefix_run(wiki_records, base_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("prefix") / "run"
    return out, _adapter_run(wiki_records, base_checkpoint, out, PREFIX)


def _trained_network(run, config):
    """The training network with the run's adapter weights, as the trainer held it."""
    network = build_network(TrainConfig.from_dict(config))
    checkpointing.restore(list(network.net.trainable_params()),
                          checkpointing.load_tensors(run / "rank_0/step_00000003/weights.ckpt"), "adapter")
    network.net.set_train(False)
    return network.net


def test_prefix_adapter_perplexity_is_the_trained_networks(prefix_run, base_checkpoint, wiki_records):
    from llama.data.records import read_columns

    run, config = prefix_run
    base = evaluate_perplexity(base_checkpoint, wiki_records, show_progress=False)["ppl_mindformers"]
    adapted = evaluate_perplexity(base_checkpoint, wiki_records, adapter=run, show_progress=False)["ppl_mindformers"]
    assert np.isfinite(adapted) and abs(adapted - base) > 1e-3 * base

    rows = read_columns(wiki_records)["input_ids"]
    expected = mindformers_perplexity(TokenNLL(_trained_network(run, config), 8), rows)["ppl_mindformers"]
    assert adapted == pytest.approx(expected, rel=1e-5)


def test_prefix_adapter_decodes_as_the_trained_network_forward(prefix_run, base_checkpoint):
    """The KV-cache decode with prefixes (left-padded batch) picks the full forward pass's greedy tokens."""
    import mindspore as ms
    from llama.generate import generate

    run, config = prefix_run
    prompts = [[1, 45, 200, 17, 99, 3], [1, 300]]
    model, _ = load_model(base_checkpoint, adapter=run)
    decoded = generate(model, prompts, 6, eos_id=None)
    net = _trained_network(run, config)
    for prompt, got in zip(prompts, decoded):
        ids = list(prompt)
        for _ in range(6):
            ids.append(int(net(ms.Tensor(np.array([ids], np.int32))).asnumpy()[0, -1].argmax()))
        assert got == ids[len(prompt):]


def test_lora_adapter_gives_the_merged_models_perplexity(wiki_records, base_checkpoint, tmp_path):
    from llama.train.merge import merge

    _adapter_run(wiki_records, base_checkpoint, tmp_path / "run", LORA)
    merge(tmp_path / "run", tmp_path / "merged")
    adapted = evaluate_perplexity(base_checkpoint, wiki_records, adapter=tmp_path / "run", show_progress=False)
    merged = evaluate_perplexity(tmp_path / "merged", wiki_records, show_progress=False)
    assert adapted["ppl_mindformers"] == pytest.approx(merged["ppl_mindformers"], rel=1e-4)


def test_an_adapter_on_another_base_is_refused_and_nothing_is_written(prefix_run, fixtures, tmp_path, capsys):
    run, _ = prefix_run
    other = fixtures / "hf_tiny_llama"     # same shapes and vocabulary, other weights
    assert cli(["eval", "squad", "--checkpoint", str(other), "--tokenizer", str(fixtures / "tok512.model"),
                "--data", str(fixtures / "squad_dev_slice.json"), "--output", str(tmp_path / "squad"),
                "--adapter", str(run), "--limit", "2"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: {other} is not the base checkpoint the adapter in {run}")
    assert not (tmp_path / "squad").exists()
    assert cli(["predict", "--checkpoint", str(other), "--tokenizer", str(fixtures / "tok512.model"),
                "--prompt", "a", "--output", str(tmp_path / "out.jsonl"), "--adapter", str(run)]) == 1
    assert "is not the base checkpoint" in capsys.readouterr().err and not (tmp_path / "out.jsonl").exists()


def test_a_full_run_is_not_an_adapter(wiki_records, base_checkpoint, tmp_path, capsys):
    train(tiny_config(model={"checkpoint": str(base_checkpoint)}, data={"train": str(wiki_records)},
                      training={"max_steps": 1}), tmp_path / "run")
    assert cli(["eval", "ppl", "--checkpoint", str(base_checkpoint), "--data", str(wiki_records),
                "--adapter", str(tmp_path / "run")]) == 1
    assert "trained the whole model, not an adapter" in capsys.readouterr().err
