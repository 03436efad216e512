"""`preprocess {wiki,alpaca,squad}` and `verify`: each dataset module registers its own subcommand."""

import importlib
from pathlib import Path

from llama.cli import add_command

DATASET_MODULES = ("llama.data.wiki", "llama.data.alpaca", "llama.data.squad")


def register(subparsers) -> None:
    preprocess = subparsers.add_parser(
        "preprocess", help="tokenize a dataset and write verified MindRecord files",
        description="Tokenize a dataset and write MindRecord files with a manifest of checksums.")
    datasets = preprocess.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    for module in DATASET_MODULES:
        importlib.import_module(module).register(datasets)
    verify = add_command(subparsers, "verify", _verify,
                         help="check a preprocess output folder's files against its manifest.json")
    verify.add_argument("output", metavar="OUTPUT_DIR", type=Path, help="a folder written by `preprocess`")


def _verify(args) -> dict:
    from llama.data.records import summarize, verify

    return {"verified": True, **summarize(args.output, verify(args.output))}
