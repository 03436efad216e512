"""Console entry point: the library's stage commands plus the flow commands (run, serve)."""

import sys

from llama.cli import LIBRARY_COMMANDS, run

FLOW_COMMANDS = ("flows.commands",)


def main() -> None:
    sys.exit(run(command_modules=LIBRARY_COMMANDS + FLOW_COMMANDS))
