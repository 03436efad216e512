"""Benchmark: perplexity evaluation and generation throughput on the tiny config (random weights).

    .venv/bin/python bench/eval.py [--repeats 5] [--rows 64] [--seq-length 128] [--new-tokens 64]

Times our compiled perplexity forward (`llama.eval.perplexity`, MindFormers convention, rows of seq 128 + 1)
and KV-cache greedy generation (`llama.generate.generate`, batch 1 and batch 8, 32-token prompts, EOS
ignored), medians of several runs after one untimed warm-up that compiles. Where torch and transformers are
installed it does the same work with transformers' LlamaForCausalLM in the same run; otherwise it says so.
Reference on this machine: MindFormers' own evaluation runs about 3,300 tokens/s at seq 128.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PROMPT_TOKENS = 32


def median_rate(work, tokens: int, repeats: int) -> float:
    """Median tokens/s of `work()` over `repeats` runs after one untimed warm-up."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return tokens / statistics.median(times)


def ours(config, rows: np.ndarray, prompts: dict[int, list[list[int]]], new_tokens: int, repeats: int) -> dict:
    from llama.eval.perplexity import TokenNLL, forward_rows, mindformers_perplexity
    from llama.generate import generate
    from llama.model import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    nll = TokenNLL(model, forward_rows(rows.shape[1] - 1))
    rates = {"perplexity": median_rate(lambda: mindformers_perplexity(nll, rows), rows[:, 1:].size, repeats)}
    for batch, ids in prompts.items():
        rates[f"generate batch {batch}"] = median_rate(
            lambda ids=ids: generate(model, ids, new_tokens, eos_id=None), batch * new_tokens, repeats)
    return rates


def transformers_peer(config, rows: np.ndarray, prompts: dict[int, list[list[int]]], new_tokens: int,
                      repeats: int) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_config())).eval()
    data = torch.from_numpy(rows.astype(np.int64))

    def perplexity():
        with torch.no_grad():
            for batch in data.split(max(1, 4096 // (rows.shape[1] - 1))):
                logits = model(batch[:, :-1]).logits
                torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    rates = {"perplexity": median_rate(perplexity, rows[:, 1:].size, repeats)}
    for batch, ids in prompts.items():
        tensor = torch.tensor(ids)

        def run(tensor=tensor):
            with torch.no_grad():
                model.generate(tensor, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

        rates[f"generate batch {batch}"] = median_rate(run, batch * new_tokens, repeats)
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from llama.config import ModelConfig

    config = ModelConfig.named("tiny")
    rng = np.random.default_rng(0)
    rows = rng.integers(3, config.vocab_size, (args.rows, args.seq_length + 1), dtype=np.int32)
    prompts = {batch: [[config.bos_token_id] + rng.integers(3, config.vocab_size, PROMPT_TOKENS - 1).tolist()
                       for _ in range(batch)] for batch in (1, 8)}
    print(f"tiny config (hidden {config.hidden_size}, {config.num_layers} layers, {config.num_heads} heads, "
          f"vocab {config.vocab_size}), random weights; perplexity: {args.rows} rows of {args.seq_length}; "
          f"generation: {PROMPT_TOKENS}-token prompts, {args.new_tokens} new tokens; median of {args.repeats}")
    results = {"ours (MindSpore)": ours(config, rows, prompts, args.new_tokens, args.repeats)}
    if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
        results["transformers (PyTorch)"] = transformers_peer(config, rows, prompts, args.new_tokens, args.repeats)
    else:
        print("note: torch/transformers are not installed here, so no side-by-side peer; "
              "reference: MindFormers' evaluation ~3,300 tokens/s at seq 128 on this machine")
    for name, rates in results.items():
        print(f"{name}:")
        for work, rate in rates.items():
            print(f"  {work:>18}: {rate:>10,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
