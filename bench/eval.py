"""Benchmark: perplexity evaluation and generation throughput on the tiny config (random weights).

    .venv/bin/python bench/eval.py [--repeats 7] [--rows 64] [--seq-length 128] [--new-tokens 64]

Times our compiled perplexity forward (`llama.eval.perplexity`, MindFormers convention, rows of seq 128 + 1)
and KV-cache greedy generation (`llama.generate.generate`, batch 1 and batch 8, 32-token prompts, EOS
ignored). Where torch and transformers are installed it does the same work with transformers'
LlamaForCausalLM, interleaved round by round with ours (bench/sidebyside.py), and quotes the median of the
per-round ratios; otherwise it times ours alone and says so.
Reference on this machine: MindFormers' own evaluation runs about 3,300 tokens/s at seq 128.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from sidebyside import Work, compare, peer_installed, report

REPO = Path(__file__).resolve().parent.parent
PROMPT_TOKENS = 32


def ours(config, rows: np.ndarray, prompts: dict[int, list[list[int]]], new_tokens: int) -> dict[str, Work]:
    from llama.eval.perplexity import TokenNLL, forward_rows, mindformers_perplexity
    from llama.generate import generate
    from llama.model import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    nll = TokenNLL(model, forward_rows(rows.shape[1] - 1, config.vocab_size))
    works = {"perplexity": (lambda: mindformers_perplexity(nll, rows), rows[:, 1:].size)}
    for batch, ids in prompts.items():
        works[f"generate batch {batch}"] = (lambda ids=ids: generate(model, ids, new_tokens, eos_id=None),
                                            batch * new_tokens)
    return works


def transformers_peer(config, rows: np.ndarray, prompts: dict[int, list[list[int]]],
                      new_tokens: int) -> dict[str, Work]:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_config())).eval()
    model = model.to(getattr(torch, config.compute_dtype))
    data = torch.from_numpy(rows.astype(np.int64))

    def perplexity():
        with torch.no_grad():
            for batch in data.split(max(1, 4096 // (rows.shape[1] - 1))):
                logits = model(batch[:, :-1]).logits
                torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    works = {"perplexity": (perplexity, rows[:, 1:].size)}
    for batch, ids in prompts.items():
        def run(tensor=torch.tensor(ids)):
            with torch.no_grad():
                model.generate(tensor, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

        works[f"generate batch {batch}"] = (run, batch * new_tokens)
    return works


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from llama.config.model import ModelConfig

    config = ModelConfig.named("tiny")
    rng = np.random.default_rng(0)
    rows = rng.integers(3, config.vocab_size, (args.rows, args.seq_length + 1), dtype=np.int32)
    prompts = {batch: [[config.bos_token_id] + rng.integers(3, config.vocab_size, PROMPT_TOKENS - 1).tolist()
                       for _ in range(batch)] for batch in (1, 8)}
    print(f"tiny config (hidden {config.hidden_size}, {config.num_layers} layers, {config.num_heads} heads, "
          f"vocab {config.vocab_size}), random weights; perplexity: {args.rows} rows of {args.seq_length}; "
          f"generation: {PROMPT_TOKENS}-token prompts, {args.new_tokens} new tokens; {args.repeats} rounds")
    sides = {"ours (MindSpore)": ours(config, rows, prompts, args.new_tokens)}
    if peer_installed():
        sides["transformers (PyTorch)"] = transformers_peer(config, rows, prompts, args.new_tokens)
    else:
        print("note: torch/transformers are not installed here, so no side-by-side peer; "
              "reference: MindFormers' evaluation ~3,300 tokens/s at seq 128 on this machine")
    report(compare(sides, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
