"""Perplexity and SQuAD evaluation: against transformers' logits, lm-eval's windows, and end to end."""

import json
import math
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from llama.cli import run
from llama.data.wiki import preprocess_wiki
from llama.eval.loading import load_model
from llama.eval.perplexity import (
    TokenNLL,
    evaluate_perplexity,
    forward_rows,
    mindformers_perplexity,
    rolling_windows,
    standard_perplexity,
    wikitext_documents,
)
from llama.eval.squad import evaluate_squad
from llama.weights.source import open_checkpoint
from llama.weights.writer import write_checkpoint


def _numpy_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Cross-entropy of ids[:, 1:] under logits[:, :-1], in float64 numpy."""
    logits = logits[:, :-1].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    return log_z - np.take_along_axis(logits, ids[:, 1:, None].astype(np.int64), -1)[..., 0]


@pytest.fixture(scope="module")
def hf_tiny(shared_fixtures):
    folder = shared_fixtures / "hf_tiny_llama"
    model, _ = load_model(folder)
    ids = np.load(folder / "input_ids.npy")
    return model, ids, _numpy_nll(np.load(folder / "logits.npy"), ids)


def test_token_perplexity_matches_transformers_logits(hf_tiny):
    model, ids, reference = hf_tiny
    result = standard_perplexity(TokenNLL(model, rows=2), ids)
    assert result["tokens_scored"] == reference.size
    assert result[f"ppl_standard_ctx{ids.shape[1]}"] == pytest.approx(math.exp(reference.mean()), rel=1e-5)


def test_token_nll_compiles_one_function_per_model_and_bounds_the_logits(hf_tiny):
    model = hf_tiny[0]
    assert TokenNLL(model, rows=1)._nll is TokenNLL(model, rows=2)._nll   # not "compiled again" per instance
    assert forward_rows(128, 32000) == 32 and forward_rows(512, 49152) == 5 and forward_rows(4096, 128256) == 1


def test_rows_split_into_equal_forwards_and_later_calls_reuse_that_graph(shared_fixtures):
    """A forward holds `rows`: fewer run alone and more split evenly (one row of a 7B-wide model padded to 8 cost
    8x its forward; 8 rows at 5 a forward as 5 + 5 a quarter more than 4 + 4). Later calls run in the graph
    compiled then, padded or in more forwards, rather than compile another (tens of forwards' worth)."""
    folder = shared_fixtures / "hf_tiny_llama"
    ids = np.load(folder / "input_ids.npy")
    reference = _numpy_nll(np.load(folder / "logits.npy"), ids)

    def rows(count: int) -> tuple[np.ndarray, np.ndarray]:
        return np.repeat(ids[:1, :-1], count, 0), np.repeat(ids[:1, 1:], count, 0)

    def counting(nll: TokenNLL, seen: list):
        compiled = nll._nll
        nll._nll = lambda inputs, targets: seen.append(inputs.shape[0]) or compiled(inputs, targets)
        return nll

    forwards = {}
    for first in (1, 8):
        forwards[first] = []
        nll = counting(TokenNLL(load_model(folder)[0], rows=5), forwards[first])   # a model of its own
        results = [nll(*rows(count)) for count in (first, 3, 10)]
        for count, result in zip((first, 3, 10), results):
            np.testing.assert_allclose(result, np.repeat(reference[:1], count, 0), rtol=1e-5)
    assert forwards[1] == [1] + [1] * 3 + [1] * 10      # one row alone, then that graph
    assert forwards[8] == [4, 4] + [4] + [4, 4, 4]      # 4 + 4, then 3 padded to 4, then 10 as 4 + 4 + 4


def test_mindformers_perplexity_masks_pads_and_averages_batch_means(hf_tiny):
    model, ids, reference = hf_tiny
    pad_id = int(ids[0, 3])  # pretend one real token is the pad id, so some targets are masked
    mask = ids[:, 1:] != pad_id
    assert 0 < (~mask).sum() < mask.size
    result = mindformers_perplexity(TokenNLL(model, rows=1), ids, batch_size=1, pad_id=pad_id)
    batch_means = [(reference[i] * mask[i]).sum() / mask[i].sum() for i in range(len(ids))]
    assert result["ppl_mindformers"] == pytest.approx(math.exp(np.mean(batch_means)), rel=1e-5)
    token_mean = (reference * mask).sum() / mask.sum()
    assert result["ppl_mindformers_token_weighted"] == pytest.approx(math.exp(token_mean), rel=1e-5)
    assert result["tokens_masked"] == (~mask).sum()


def test_rolling_windows_match_lm_eval():
    # lm-eval's own test of get_rolling_token_windows(range(34), prefix -100, max_seq_len 10, context_len 1)
    gold = [([-100, *range(0, 9)], list(range(0, 10))), (list(range(9, 19)), list(range(10, 20))),
            (list(range(19, 29)), list(range(20, 30))), (list(range(23, 33)), list(range(30, 34)))]
    windows = list(rolling_windows(list(range(34)), -100, 10))
    assert [(inputs, targets[len(targets) - scored:]) for inputs, targets, scored in windows] == gold
    for inputs, targets, _ in windows:  # each target is the token after its input position
        assert targets[:-1] == inputs[1:]
    assert list(rolling_windows([5, 6], 1, 10)) == [([1, 5], [5, 6], 2)]


def test_wikitext_documents_split_at_top_level_headings(fixtures):
    text = (fixtures / "wiki_slice.tokens").read_text(encoding="utf-8")
    pages = wikitext_documents(text)
    headings = [line for line in text.split("\n") if re.fullmatch(r" = [^=].* = ", line)]
    assert len(pages) == len(headings) > 1
    assert all(page.split("\n")[0] in headings for page in pages)
    joined = "\n".join(pages)  # every line kept, apart from blank ones before the first heading
    assert text.endswith(joined) and not text[:len(text) - len(joined)].strip()


# ---------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def stories(tmp_path_factory, fixtures):
    """stories260K converted with its tokenizer, and small WikiText inputs in both conventions."""
    root = tmp_path_factory.mktemp("eval")
    write_checkpoint(open_checkpoint(fixtures / "stories260K.bin"), root / "ckpt",
                     tokenizer=fixtures / "tok512.model", progress=False)
    lines = (fixtures / "wiki_slice.tokens").read_text(encoding="utf-8").split("\n")
    (root / "wiki.tokens").write_text("\n".join(lines[:120]), encoding="utf-8")
    preprocess_wiki(root / "wiki.tokens", fixtures / "tok512.model", 127, root / "wiki_mf", show_progress=False)
    return root


@pytest.mark.slow
def test_perplexity_end_to_end_is_finite_and_reproducible(stories):
    ckpt, records = stories / "ckpt", stories / "wiki_mf"
    first = evaluate_perplexity(ckpt, records, "mindformers", batch_size=4, show_progress=False)
    again = evaluate_perplexity(ckpt, records, "mindformers", batch_size=4, show_progress=False)
    assert first == again and math.isfinite(first["ppl_mindformers"]) and first["ppl_mindformers"] > 1
    by_row = evaluate_perplexity(ckpt, records, "mindformers", batch_size=1, show_progress=False)
    assert by_row["ppl_mindformers_token_weighted"] == pytest.approx(first["ppl_mindformers_token_weighted"])
    assert by_row["ppl_mindformers"] != first["ppl_mindformers"]  # the batch size is part of MindFormers' number

    standard = evaluate_perplexity(ckpt, stories / "wiki.tokens", "standard", window=128, rolling_window=128,
                                   show_progress=False)
    assert standard == evaluate_perplexity(ckpt, stories / "wiki.tokens", "standard", window=128,
                                           rolling_window=128, show_progress=False)
    assert 1 < standard["ppl_standard_ctx128"] < 512
    # word and byte perplexity share one summed log-likelihood
    assert math.log(standard["word_perplexity"]) * standard["words"] == pytest.approx(
        math.log(standard["byte_perplexity"]) * standard["bytes"])
    assert standard["bits_per_byte"] == pytest.approx(math.log2(standard["byte_perplexity"]))


@pytest.mark.slow
def test_a_warm_model_takes_the_next_checkpoints_weights_and_keeps_its_graphs(stories, fixtures, tmp_path,
                                                                              compiles):
    """As the pipeline's evaluation tasks run (tasks.runtime.one_model): base, other, base again; the second
    and third evaluations give the fresh model's results and compile no graph."""
    from llama.weights.load import load_checkpoint, save_checkpoint
    from llama.eval import loading
    from tasks.runtime import one_model

    ckpt, records = stories / "ckpt", stories / "wiki_mf"
    other, config = load_checkpoint(ckpt)
    for name, param in other.parameters_and_names():
        if "norm" in name:
            param.set_data(param.value() * 1.5)
    save_checkpoint(other, tmp_path / "other", config, tokenizer=fixtures / "tok512.model")

    def evaluate(checkpoint, name: str) -> dict:
        compiles.clear()
        with one_model(warm=True):
            result = evaluate_perplexity(checkpoint, records, "mindformers", show_progress=False)
            result.update(evaluate_squad(checkpoint, fixtures / "squad_dev_slice.json", tmp_path / name,
                                         limit=3, max_new_tokens=4, show_progress=False))
        return {k: v for k, v in result.items() if k.startswith(("ppl_", "loss_", "squad_"))}

    fresh = evaluate(tmp_path / "other", "fresh")
    loading.release_warm_model()
    try:
        first = evaluate(ckpt, "first")
        assert compiles
        warm = loading._Warm.model
        second = evaluate(tmp_path / "other", "second")
        assert not compiles
        third = evaluate(ckpt, "third")
        assert not compiles
        assert loading._Warm.model is warm
        assert second == fresh and third == first != second
    finally:
        loading.release_warm_model()


@pytest.mark.slow
def test_squad_end_to_end_writes_scored_predictions(stories, fixtures, tmp_path):
    args = dict(questions="all", limit=6, batch_size=3, worst=2, show_progress=False)
    result = evaluate_squad(stories / "ckpt", fixtures / "squad_dev_slice.json", tmp_path / "a", **args)
    assert result["questions"] == 6 and result["generated_tokens"] > 0
    for name in ("squad_em_official", "squad_f1_official", "squad_em_mindformers", "squad_f1_mindformers"):
        assert 0.0 <= result[name] <= 100.0
    rows = pq.read_table(tmp_path / "a" / "predictions.parquet").to_pylist()
    assert [json.loads(line) for line in open(tmp_path / "a" / "predictions.jsonl")] == rows
    assert {"id", "question", "prediction", "answers", "f1_official", "f1_mindformers"} <= set(rows[0])
    assert all("\n" not in row["prediction"] for row in rows)  # an answer is one line
    assert result["squad_f1_official"] == pytest.approx(100 * np.mean([r["f1_official"] for r in rows]))
    assert (tmp_path / "a" / "worst_answers.md").read_text().count("\n|") == 2 + 2
    again = evaluate_squad(stories / "ckpt", fixtures / "squad_dev_slice.json", tmp_path / "b", **args)
    assert pq.read_table(tmp_path / "b" / "predictions.parquet").to_pylist() == rows
    assert {k: v for k, v in again.items() if k.startswith("squad_")} == \
        {k: v for k, v in result.items() if k.startswith("squad_")}


# ------------------------------------------------------------------------------------ CLI errors

def _cli(argv, capsys):
    code = run(argv, command_modules=("llama.eval.cli",))
    return code, capsys.readouterr().err


def test_cli_missing_checkpoint(tmp_path, fixtures, capsys):
    code, err = _cli(["eval", "ppl", "--checkpoint", str(tmp_path / "none"), "--convention", "standard",
                      "--data", str(fixtures / "wiki_slice.tokens")], capsys)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and "does not exist" in err


def test_cli_refuses_unverified_and_damaged_records(stories, tmp_path, capsys):
    damaged = tmp_path / "wiki"
    damaged.mkdir()
    for path in (stories / "wiki_mf").iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    mindrecord = next(damaged.glob("*.mindrecord"))
    data = bytearray(mindrecord.read_bytes())
    data[len(data) // 2] ^= 0xFF
    mindrecord.write_bytes(bytes(data))
    code, err = _cli(["eval", "ppl", "--checkpoint", str(stories / "ckpt"), "--data", str(damaged)], capsys)
    assert code == 1 and "sha256" in err and err.count("\n") == 1
    (damaged / "manifest.json").unlink()
    code, err = _cli(["eval", "ppl", "--checkpoint", str(stories / "ckpt"), "--data", str(damaged)], capsys)
    assert code == 1 and "manifest" in err and err.count("\n") == 1


def test_cli_squad_rejects_bad_json(stories, tmp_path, capsys):
    bad = tmp_path / "dev.json"
    bad.write_text('{"data": [{"paragraphs": [{"context": "x"}]}]}', encoding="utf-8")
    code, err = _cli(["eval", "squad", "--checkpoint", str(stories / "ckpt"), "--data", str(bad),
                      "--output", str(tmp_path / "out")], capsys)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
