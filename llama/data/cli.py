"""`preprocess {wiki,alpaca,squad}` and `verify`: each dataset module registers its own subcommand."""

import importlib

DATASET_MODULES = ("llama.data.wiki", "llama.data.alpaca", "llama.data.squad")


def register(subparsers) -> None:
    preprocess = subparsers.add_parser(
        "preprocess", help="tokenize a dataset and write verified MindRecord files",
        description="Tokenize a dataset and write MindRecord files with a manifest of checksums.")
    datasets = preprocess.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    for module in DATASET_MODULES:
        importlib.import_module(module).register(datasets)
