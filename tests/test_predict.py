"""Batch prediction: prompt files, the published stories260K greedy text, JSONL output and the CLI."""

import json

import pytest

from llama.cli import run
from llama.errors import PipelineError
from llama.eval.predict import predict, read_prompts
from llama.weights.source import open_checkpoint
from llama.weights.writer import write_checkpoint

# llama2.c's doc/stories260K.md: greedy decoding from BOS with tok512.
PUBLISHED = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
             "One day, she saw a big, red ball.")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, fixtures):
    out = tmp_path_factory.mktemp("predict") / "ckpt"
    write_checkpoint(open_checkpoint(fixtures / "stories260K.bin"), out, tokenizer=fixtures / "tok512.model",
                     progress=False)
    return out


def test_read_prompts(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("first\n\n  \nsecond line\n", encoding="utf-8")
    assert read_prompts(text) == ["first", "second line"]
    lines = tmp_path / "prompts.jsonl"
    lines.write_text('{"prompt": "a"}\n"b"\n', encoding="utf-8")
    assert read_prompts(lines) == ["a", "b"]
    lines.write_text('{"text": "a"}\n', encoding="utf-8")
    with pytest.raises(PipelineError, match="line 1"):
        read_prompts(lines)
    with pytest.raises(PipelineError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


@pytest.mark.slow
def test_greedy_prediction_reproduces_published_story(checkpoint):
    prompt = "Once upon a time"
    result = predict(checkpoint, [prompt, "Lily"], max_new_tokens=40, batch_size=2)
    story, other = result["completions"]
    assert story["text"] == prompt + story["completion"]
    assert PUBLISHED.startswith(story["text"]) or story["text"].startswith(PUBLISHED)
    assert other["text"].startswith("Lily ")  # the space before the first new word survives decoding
    assert result["new_tokens"] == story["new_tokens"] + other["new_tokens"]


@pytest.mark.slow
def test_sampling_is_seeded(checkpoint):
    options = dict(max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.9)
    first = predict(checkpoint, ["Once upon a time"] * 3, seed=7, **options)["completions"]
    assert first == predict(checkpoint, ["Once upon a time"] * 3, seed=7, **options)["completions"]
    assert len({c["completion"] for c in first}) > 1  # rows draw different samples


def test_cli_writes_jsonl_and_refuses_to_overwrite(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\nThe dog\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    argv = ["predict", "--checkpoint", str(checkpoint), "--prompts-file", str(prompts), "--output", str(out),
            "--max-new-tokens", "8", "--json"]
    assert run(argv, command_modules=("llama.eval.cli",)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["Once upon a time", "The dog"]
    assert summary["prompts"] == 2 and summary["new_tokens"] == sum(r["new_tokens"] for r in rows)
    assert run(argv, command_modules=("llama.eval.cli",)) == 1
    assert "already exists" in capsys.readouterr().err


def test_cli_prints_completions(checkpoint, capsys):
    argv = ["predict", "--checkpoint", str(checkpoint), "--prompt", "Once upon a time", "--max-new-tokens", "6"]
    assert run(argv, command_modules=("llama.eval.cli",)) == 0
    assert "completion_1: Once upon a time, there was" in capsys.readouterr().out
