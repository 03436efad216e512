"""`train` and `merge` subcommands; MindSpore is imported only when one of them runs."""

from __future__ import annotations

from pathlib import Path

from llama.cli import add_command
from llama.errors import PipelineError


def _train(args) -> dict:
    from llama.config.train import load_train_config
    from llama.train.trainer import train

    config = load_train_config(args.config, args.overrides)
    return train(config, args.output_dir, resume=args.resume)


def _plan(args) -> dict:
    from llama.config.train import load_train_config
    from llama.train.plan import (device_memory, logit_positions_of, model_config_of, parse_size, plan_memory,
                                  seq_length_of)

    config = load_train_config(args.config, args.overrides)
    model = model_config_of(config)
    if model is None:
        raise PipelineError("plan: the recipe names no model config and its checkpoint carries none; "
                            "set model.config")
    memory = parse_size(args.device_memory) if args.device_memory else device_memory()
    # the rows' scored positions hold for their own length, not for a --seq-length asked instead
    plan = plan_memory(config, args.seq_length or seq_length_of(config, model), model,
                       logit_positions=None if args.seq_length else logit_positions_of(config),
                       cpu_memory=None if args.device_memory else memory)
    fits = plan.fits(memory)
    result = {**plan.rows(), "device_memory_gib": round(memory / (1 << 30), 2), "fits": fits}
    if not fits:
        result["biggest_term"] = plan.biggest_term()
    return result


def _merge(args) -> dict:
    from llama.train.merge import merge

    return merge(args.run_dir, args.output, step=args.step, fmt=args.format, base=args.base,
                 strategy=args.strategy, model_config=args.model_config, tokenizer=args.tokenizer, dtype=args.dtype,
                 overwrite=args.overwrite)


def register(subparsers) -> None:
    parser = add_command(subparsers, "train", _train,
                         help="pretrain or finetune (full, LoRA, prefix tuning) from a YAML recipe")
    parser.add_argument("--config", required=True, type=Path,
                        help="a training recipe: a YAML file or a shipped name, e.g. tiny_pretrain "
                             "(`llama2-pipeline configs train` lists them)")
    parser.add_argument("--output-dir", required=True, type=Path, help="run folder: checkpoints, metrics, result")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. data.train=out/wiki training.max_steps=50")

    parser = add_command(subparsers, "plan", _plan,
                         help="per-device memory of a training recipe (weights, gradients, optimizer, activations) "
                              "and whether it fits")
    parser.add_argument("--config", required=True, type=Path,
                        help="a training recipe: a YAML file or a shipped name, e.g. lora_llama2_7b")
    parser.add_argument("--device-memory", help="memory of one device, e.g. 64GiB (default: this machine's RAM)")
    parser.add_argument("--seq-length", type=int,
                        help="tokens per row (default: the rows of data.train, else the model's context)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.batch_size=1")

    parser = add_command(subparsers, "merge", _merge,
                         help="merge a run's rank checkpoints (and LoRA adapters) into one full checkpoint")
    parser.add_argument("run_dir", type=Path, help="a training run folder (with rank_*/), or MindFormers rank folders "
                                                    "with --strategy")
    parser.add_argument("--output", required=True, type=Path, help="output checkpoint folder (written atomically)")
    parser.add_argument("--step", type=int, help="which checkpoint step (default: the newest all ranks have)")
    parser.add_argument("--format", choices=("ckpt", "safetensors", "hf"), default="ckpt",
                        help="MindSpore .ckpt or .safetensors, or a Hugging Face folder")
    parser.add_argument("--base", type=Path, help="base weights of a LoRA run (default: the path it recorded)")
    parser.add_argument("--strategy", type=Path,
                        help="strategy file of sliced (model-parallel) checkpoints, merged with transform_checkpoints")
    parser.add_argument("--model-config", help="model config of sliced checkpoints (a name in configs/model/ or a path)")
    parser.add_argument("--tokenizer", type=Path,
                        help="tokenizer.model, tokenizer.json or a folder holding one, to copy into the output")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="cast the weights (default: the dtype of the base checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
