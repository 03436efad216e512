"""Benchmark: training tokens/s on the tiny config (hidden 256, 2 layers, 4 heads, vocab 32000, fp32).

    .venv/bin/python bench/train.py [--repeats 7] [--steps 10] [--batch 4] [--seq-length 128]

Times our compiled training step (`llama.train.step.Stepper`: masked loss, loss scaling, clipping, AdamW) on
random rows of seq 128 + 1, batch 4: `--steps` steps per run, after untimed warm-up runs (the first compiles).
Where torch and transformers are installed it trains transformers' LlamaForCausalLM of the same shapes with
torch.optim.AdamW, interleaved run by run with ours (bench/sidebyside.py), and quotes the median of the
per-round ratios; otherwise it times ours alone and says so.
Reference on this machine: MindFormers' own train step ~855 tokens/s; a plain MindSpore jit step ~1600.
"""

from __future__ import annotations

import argparse

import numpy as np

from sidebyside import Work, compare, peer_installed, report

LORA_RANK = 8


def steps_work(step, rows: np.ndarray, steps: int) -> dict[str, Work]:
    """`steps` training steps as one timed run."""
    def run():
        for _ in range(steps):
            step()

    return {"train step": (run, rows[:, 1:].size * steps)}


def ours(rows: np.ndarray, steps: int, config=None, lora_targets: str | None = None,
         layers_only: bool = False, recompute: bool = False) -> dict[str, Work]:
    """Our step on `config` (default: the tiny one); with `lora_targets` (e.g. "wq|wk|wv|wo") a rank-8 LoRA
    step on a frozen base; with `layers_only`, the embeddings and output projection frozen; with `recompute`,
    the decoder layers recomputed in the backward pass (`training.recompute`)."""
    import mindspore as ms
    from llama.config.model import ModelConfig
    from llama.config.train import OptimizerSection
    from llama.model import LlamaForCausalLM
    from llama.train.lora import apply_lora
    from llama.train.network import recompute_layers
    from llama.train.step import Stepper

    ms.set_seed(0)
    model = LlamaForCausalLM(config or ModelConfig.named("tiny"))
    if lora_targets:
        apply_lora(model, LORA_RANK, LORA_RANK, 0.0, lora_targets)
    if recompute:
        recompute_layers(model)
    for name, param in model.parameters_and_names():
        if layers_only and "layers." not in name:
            param.requires_grad = False
    model.set_train(True)
    stepper = Stepper(model, 0, OptimizerSection(learning_rate=1e-4), 1.0, 1, 1)
    return steps_work(lambda: stepper.step([(rows, rows)], 1e-4, 1.0), rows, steps)


def transformers_peer(rows: np.ndarray, steps: int, config=None, lora_targets: str | None = None,
                      layers_only: bool = False, recompute: bool = False) -> dict[str, Work]:
    """The same step in transformers + torch.optim.AdamW; with `lora_targets`, through peft (the same rank,
    on the matching q/k/v/o projections); with `recompute`, transformers' gradient checkpointing of each
    decoder layer."""
    import torch
    import transformers
    from llama.config.model import ModelConfig

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(**(config or ModelConfig.named("tiny")).to_hf_config())
    model = transformers.LlamaForCausalLM(hf_config).train()
    if recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora_targets:
        import peft

        names = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0,
            target_modules=[names[name] for name in lora_targets.split("|")]))
    for name, param in model.named_parameters():
        if layers_only and ".layers." not in name:
            param.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
    data = torch.from_numpy(rows.astype(np.int64))

    def step():
        loss = model(input_ids=data[:, :-1], labels=data[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return steps_work(step, rows, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=128)
    args = parser.parse_args()
    rows = np.random.default_rng(0).integers(3, 32000, size=(args.batch, args.seq_length + 1)).astype(np.int32)

    print(f"training, tiny config, batch {args.batch} x seq {args.seq_length}, fp32, "
          f"{args.repeats} rounds of {args.steps} steps")
    sides = {"ours (MindSpore jit step)": ours(rows, args.steps)}
    if peer_installed():
        sides["transformers + torch.optim.AdamW"] = transformers_peer(rows, args.steps)
    else:
        print("  transformers/torch: not installed here, so no PyTorch run (install torch and transformers to compare)")
    report(compare(sides, args.repeats))
    print("  reference on this machine: MindFormers' train step ~855 tokens/s, a plain MindSpore jit step ~1,600")


if __name__ == "__main__":
    main()
