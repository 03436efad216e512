"""Placeholder: this stage's subcommands are being written."""


def register(subparsers) -> None:
    """Adds this stage's subcommands (none yet)."""
