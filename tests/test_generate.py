"""Generation with the KV cache: transformers' greedy ids, padding invariance, sampling, and the published
stories260K sample from its llama2.c file."""

import json

import numpy as np
import pytest

from llama.cli import run
from llama.data.tokenizer import Tokenizer
from llama.generate import generate
from llama.weights.load import load_checkpoint


@pytest.fixture(scope="module")
def hf_dir(fixtures):
    return fixtures / "hf_tiny_llama"


@pytest.fixture(scope="module")
def model(hf_dir):
    return load_checkpoint(hf_dir)[0]


@pytest.fixture(scope="module")
def prompts(hf_dir):
    ids = np.load(hf_dir / "input_ids.npy")
    return [ids[0, :8].tolist(), ids[1, :5].tolist(), ids[1, :12].tolist()]


def test_greedy_ids_match_transformers(model, hf_dir, prompts):
    expected = np.load(hf_dir / "greedy_ids.npy")[0]
    out = generate(model, [prompts[0]], max_new_tokens=16, eos_id=None)
    assert prompts[0] + out[0] == expected.tolist()


def fresh(hf_dir):
    """A model that has compiled no generation graph yet, so that a call runs at its own shape."""
    return load_checkpoint(hf_dir)[0]


def test_left_padded_batch_decodes_each_prompt_as_alone(hf_dir, prompts):
    batch = generate(fresh(hf_dir), prompts, max_new_tokens=10, eos_id=None)
    alone = [generate(fresh(hf_dir), [p], max_new_tokens=10, eos_id=None)[0] for p in prompts]
    assert batch == alone


def test_chunked_prefill_and_a_reserved_cache_decode_as_one_prefill(hf_dir, prompts, monkeypatch):
    import llama.generate

    whole = generate(fresh(hf_dir), prompts, max_new_tokens=10, eos_id=None)
    reserved = generate(fresh(hf_dir), prompts, max_new_tokens=10, eos_id=None, longest_prompt=40)
    monkeypatch.setattr(llama.generate, "PREFILL_CHUNK", 4)   # the 5..12-token prompts in chunks of 4
    chunked = generate(fresh(hf_dir), prompts, max_new_tokens=10, eos_id=None)
    assert chunked == whole and reserved == whole


def test_a_call_that_fits_graphs_already_compiled_runs_in_them_with_the_same_results(hf_dir, prompts, compiles):
    model = fresh(hf_dir)
    generate(model, prompts, max_new_tokens=12, eos_id=None)
    generate(model, prompts, max_new_tokens=12, temperature=1.0, eos_id=None)
    assert compiles
    compiles.clear()
    short = [prompts[1][:3]]
    greedy = generate(model, short, max_new_tokens=6, eos_id=None)
    sampled = generate(model, short, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3, eos_id=None)
    assert not compiles   # one row of 3 tokens ran in the 3-row graphs, its extra rows discarded
    assert greedy == generate(fresh(hf_dir), short, max_new_tokens=6, eos_id=None)
    assert sampled == generate(fresh(hf_dir), short, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3,
                               eos_id=None)


def test_stops_at_eos(model, prompts):
    greedy = generate(model, [prompts[0]], max_new_tokens=16, eos_id=None)[0]
    eos = greedy[3]
    assert generate(model, [prompts[0]], max_new_tokens=16, eos_id=eos)[0] == greedy[:greedy.index(eos) + 1]


def test_stop_ids_end_a_row_after_its_first_token(model, prompts):
    greedy = generate(model, [prompts[0]], max_new_tokens=16, eos_id=None)[0]
    for stop in (greedy[0], greedy[3]):  # as the first new token it does not stop the row
        end = next((i for i in range(1, len(greedy)) if greedy[i] == stop), len(greedy) - 1)
        assert generate(model, [prompts[0]], max_new_tokens=16, eos_id=None, stop_ids=[stop])[0] == greedy[:end + 1]


def test_greedy_argmax_in_the_graph_equals_sampling_with_top_k_1(model, prompts):
    """Greedy takes the argmax in the graph; sampling with top_k=1 in numpy: the same ids at every length, up to
    the model's last position."""
    for new_tokens in (1, 2, 9):
        assert generate(model, prompts, new_tokens, eos_id=None) == \
            generate(model, prompts, new_tokens, temperature=1.0, top_k=1, eos_id=None)
    new_tokens = model.config.max_position_embeddings - max(map(len, prompts))
    greedy = generate(model, prompts, new_tokens, eos_id=None)
    assert list(map(len, greedy)) == [new_tokens] * len(prompts)
    assert greedy == generate(model, prompts, new_tokens, temperature=1.0, top_k=1, eos_id=None)


def test_sampling_is_seeded_and_top_k_1_is_greedy(model, prompts):
    greedy = generate(model, prompts, 12, eos_id=None)
    assert generate(model, prompts, 12, temperature=1.0, top_k=1, seed=5, eos_id=None) == greedy
    first = generate(model, prompts, 12, temperature=1.0, top_p=0.9, seed=7, eos_id=None)
    assert generate(model, prompts, 12, temperature=1.0, top_p=0.9, seed=7, eos_id=None) == first
    assert generate(model, prompts, 12, temperature=1.0, seed=8, eos_id=None) != first
    assert all(0 <= t < 512 for row in first for t in row)


def test_cli_prompts_file_and_json(hf_dir, fixtures, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("Once upon a time\n\nLily\n")
    argv = ["generate", "--checkpoint", str(hf_dir), "--tokenizer", str(fixtures / "tok512.model"),
            "--prompts-file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "5", "--batch-size", "2"]
    assert run(argv + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [c["prompt"] for c in result["completions"]] == ["Once upon a time", "Lily"]
    assert all(1 <= c["new_tokens"] <= 5 for c in result["completions"])
    assert run(argv) == 0
    assert f"completion_1: Once upon a time{result['completions'][0]['completion']}" in capsys.readouterr().out


@pytest.mark.slow
def test_stories260K_reproduces_the_published_greedy_sample(fixtures, tok512):
    """llama2.c doc/stories260K.md: `run -t 0.0` (256 steps from BOS) prints this story."""
    model, config = load_checkpoint(fixtures / "stories260K.bin")
    tokenizer = Tokenizer(tok512)
    ids = generate(model, [[tokenizer.bos_id]], max_new_tokens=256, eos_id=tokenizer.bos_id)[0]
    assert len(ids) == 256
    assert tokenizer.decode(ids) == (fixtures / "stories260K_greedy.txt").read_text().rstrip("\n")


def test_a_model_whose_graphs_would_not_fit_runs_eagerly_with_the_same_results(hf_dir, prompts, graphs_never_fit,
                                                                               capsys):
    from llama.eval.perplexity import TokenNLL

    ids = np.load(hf_dir / "input_ids.npy").astype(np.int32)
    compiled = load_checkpoint(hf_dir)[0]
    expected_ids = generate(compiled, prompts, max_new_tokens=6, eos_id=None)
    expected_nll = TokenNLL(compiled, rows=2)(ids[:, :-1], ids[:, 1:])
    assert "running eagerly" not in capsys.readouterr().err

    graphs_never_fit()
    eager = load_checkpoint(hf_dir)[0]
    assert generate(eager, prompts, max_new_tokens=6, eos_id=None) == expected_ids
    np.testing.assert_allclose(TokenNLL(eager, rows=2)(ids[:, :-1], ids[:, 1:]), expected_nll, rtol=1e-5, atol=1e-6)
    assert "warning: running eagerly" in capsys.readouterr().err


def test_float16_decoding_agrees_with_a_float16_forward_and_with_transformers(hf_dir, prompts):
    """Float16 compute keeps a float16 KV cache: each greedy token is the argmax of a float16 forward over the
    prompt and the tokens chosen before it, and on this model the ids are still transformers' float32 ones."""
    import mindspore as ms

    model = load_checkpoint(hf_dir, dtype="float16")[0]
    assert model.config.compute_dtype == "float16"
    out = generate(model, [prompts[0]], max_new_tokens=16, eos_id=None)[0]
    ids = prompts[0] + out
    logits = model(ms.Tensor([ids[:-1]], ms.int32)).asnumpy()[0]          # [S, V]
    assert out == logits[len(prompts[0]) - 1:].argmax(-1).tolist()
    assert ids == np.load(hf_dir / "greedy_ids.npy")[0].tolist()
