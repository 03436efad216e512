"""`llama2-pipeline convert`: any supported checkpoint -> a verified MindSpore or Hugging Face folder.

Reads Hugging Face (safetensors, sharded or not; pytorch_model.bin where torch is installed), Meta
consolidated.*.pth, llama2.c v0 .bin, llama.cpp .gguf (llama architecture, dequantized; its vocabulary becomes
a Hugging Face tokenizer.json), and MindSpore/MindFormers .ckpt or .safetensors; writes MindSpore
(.ckpt or .safetensors, MindFormers names) or Hugging Face (safetensors + config.json). The folder holds the
weights, the model config, the tokenizer files (given, or found next to the input), and a manifest of
checksums, so later commands need only `--checkpoint DIR`. See llama/weights/__init__.py for the formats and the
folder layout.
"""

from __future__ import annotations

import time

from llama.cli import add_command
from llama.config.schema import DTYPES
from llama.data.tokenizer import TOKENIZER_FILES

FORMATS = {"ckpt": "MindSpore .ckpt", "safetensors": "MindSpore .safetensors", "hf": "Hugging Face safetensors"}


def run_convert(args) -> dict:
    # imported when the command runs, as in every stage module, so that --help stays fast (llama/cli.py)
    from llama.config.model import ModelConfig
    from llama.weights.source import open_checkpoint
    from llama.weights.writer import write_checkpoint

    start = time.monotonic()
    model_config = ModelConfig.load(args.model_config) if args.model_config else None
    source = open_checkpoint(args.input, model_config)
    manifest = write_checkpoint(source, args.output, args.to, args.dtype, args.tokenizer, args.overwrite,
                                shard_bytes=int(args.shard_gb * (1 << 30)), allow_nonfinite=args.allow_nonfinite)
    return {
        "output": str(args.output),
        "source_format": source.kind,
        "format": FORMATS[args.to],
        "dtype": manifest["dtype"],
        "parameters": manifest["parameters"],
        "weights": manifest["weights"],
        "tokenizer": sorted(set(TOKENIZER_FILES) & set(manifest["files"])),
        "seconds": round(time.monotonic() - start, 3),
    }


def register(subparsers) -> None:
    parser = add_command(subparsers, "convert", run_convert,
                         help="convert a checkpoint (HF, Meta, llama2.c, GGUF, MindSpore) to a verified MindSpore or "
                              "Hugging Face folder")
    parser.add_argument("--input", required=True, help="checkpoint folder or file (.safetensors, .ckpt, .bin, .gguf)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--to", choices=sorted(FORMATS), default="ckpt",
                        help="ckpt / safetensors: MindSpore with MindFormers names; hf: Hugging Face")
    parser.add_argument("--model-config", help="model config for weights that carry none (a bare .ckpt): a name in "
                                               "configs/model, our YAML, HF config.json or a MindFormers YAML")
    parser.add_argument("--dtype", choices=DTYPES,
                        help="cast weights (default: keep; GGUF: float32)")
    parser.add_argument("--tokenizer", help="tokenizer to store with the weights: tokenizer.model, tokenizer.json "
                                            "or a folder holding one (default: the tokenizer files next to the input)")
    parser.add_argument("--shard-gb", type=float, default=4.0, help="largest weight file, in GiB")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="convert weights holding NaN or Inf (refused by default), with a warning naming them")
