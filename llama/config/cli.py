"""`llama2-pipeline configs [KIND]`: the configs shipped in configs/, by name (as torchtune's `tune ls`)."""

from __future__ import annotations

from llama.cli import add_command
from llama.config.loader import CONFIG_KINDS, shipped_configs


def register(subparsers) -> None:
    parser = add_command(subparsers, "configs", lambda args: {
        f"{kind}/{name}": about for kind, name, about in shipped_configs(args.kind)},
        help="list the configs shipped in configs/; every --config also takes one by name (--config tiny_lora)")
    parser.add_argument("kind", nargs="?", choices=CONFIG_KINDS, help="list only this kind")
