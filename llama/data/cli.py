"""`preprocess {wiki,alpaca,squad}` and `verify`: each dataset module registers its own subcommand."""

import importlib
from pathlib import Path

from llama.cli import add_command
from llama.data.records import FORMAT as RECORDS, summarize, verify
from llama.errors import PipelineError
from llama.fileio import MANIFEST, pipeline_manifest_files, read_json, verify_files

DATASET_MODULES = ("llama.data.wiki", "llama.data.alpaca", "llama.data.squad")


def register(subparsers) -> None:
    preprocess = subparsers.add_parser(
        "preprocess", help="tokenize a dataset and write verified MindRecord files",
        description="Tokenize a dataset and write MindRecord files with a manifest of checksums.")
    datasets = preprocess.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    for module in DATASET_MODULES:
        importlib.import_module(module).register(datasets)
    verify = add_command(subparsers, "verify", _verify,
                         help="check a folder this pipeline wrote (records, checkpoint, run step, evaluation) "
                              "against its manifest.json")
    verify.add_argument("output", metavar="OUTPUT_DIR", type=Path,
                        help="a folder written by `preprocess`, `convert`, `merge`, `train` or `eval`")


def _verify(args) -> dict:
    files = pipeline_manifest_files(args.output)
    if files is None:
        raise PipelineError(f"{args.output} has no {MANIFEST} written by this pipeline")
    fmt = read_json(args.output / MANIFEST)["format"]
    if fmt == RECORDS:
        return {"verified": True, **summarize(args.output, verify(args.output))}
    verify_files(args.output, files)
    return {"verified": True, "output": str(args.output), "format": fmt, "files": len(files),
            "bytes": sum(entry["size"] for entry in files.values())}
