"""`llama2-pipeline`: one console command, a subcommand per stage.

Each stage module exposes `register(subparsers)`, which adds its subcommand with `parents=[COMMON]` and
sets `func` to a function taking the parsed arguments and returning a dict of results. Stage modules keep
heavy imports (MindSpore) inside those functions so `--help` stays instant.

Results print as `key: value` lines, or with `--json` as one JSON object on the last line of stdout.
A `PipelineError`, an OS error (permissions, a full disk) or a usage error prints as a one-line
`error: ...` with exit status 1; `--debug` shows the traceback. `KEY=VALUE` overrides may stand anywhere among
the options, as in torchtune.
MindSpore's own warnings (glog and its Python logger) are hidden unless `--debug` or GLOG_v says otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Callable, Iterable, Sequence

from llama.errors import PipelineError

LIBRARY_COMMANDS = (
    "llama.config.cli",
    "llama.download",
    "llama.data.cli",
    "llama.weights.cli",
    "llama.train.cli",
    "llama.eval.cli",
)

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line `PipelineError`s like every other bad input (subcommands
    inherit the class)."""

    def error(self, message: str):
        raise PipelineError(f"{self.prog}: {message} (see --help)")


COMMON = argparse.ArgumentParser(add_help=False)
COMMON.add_argument("--json", action="store_true", help="print the results as one JSON object (last line)")
COMMON.add_argument("--debug", action="store_true",
                    help="show tracebacks instead of one-line errors, and MindSpore's warnings")
MINDSPORE_ERRORS_ONLY = "3"  # GLOG_v level: MindSpore's warnings (about its own graph passes, memory) are noise


def add_command(subparsers, name: str, func: Callable[[argparse.Namespace], dict], help: str, **kwargs):
    """Add a subcommand that shares --json/--debug and runs `func`."""
    parser = subparsers.add_parser(name, parents=[COMMON], help=help, description=help, **kwargs)
    parser.set_defaults(func=func)
    return parser


def build_parser(command_modules: Iterable[str] = LIBRARY_COMMANDS) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="llama2-pipeline",
        description="Prepare data for, convert, train, merge and evaluate Llama 2 models on MindSpore.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in command_modules:
        importlib.import_module(module).register(subparsers)
    return parser


def _print_human(result: dict) -> None:
    for key, value in result.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, sort_keys=True)
        print(f"{key}: {value}")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse, taking arguments argparse leaves over as KEY=VALUE overrides of commands that have them
    (`train --config C data.train=X --output-dir R training.max_steps=3`)."""
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *overrides]
        extra = [item for item in extra if item not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def describe_os_error(err: OSError) -> str:
    """`path: cause` ("/out/x: Permission denied", "No space left on device"), the way the shell says it."""
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    return ": ".join([*paths, err.strerror or str(err)])


def run(argv: Sequence[str] | None = None, command_modules: Iterable[str] = LIBRARY_COMMANDS) -> int:
    parser = build_parser(command_modules)
    try:
        args = parse_args(parser, argv)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not args.debug:
        os.environ.setdefault("GLOG_v", MINDSPORE_ERRORS_ONLY)  # read when MindSpore is first imported
    try:
        result = args.func(args) or {}
    except (PipelineError, OSError) as err:
        if args.debug:
            raise
        print(f"error: {describe_os_error(err) if isinstance(err, OSError) else err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, sort_keys=True, default=str))
    else:
        _print_human(result)
    return 0


def main() -> None:
    sys.exit(run())
