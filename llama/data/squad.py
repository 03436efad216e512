"""Placeholder: this dataset's preprocessing is being written."""


def register(subparsers) -> None:
    """Adds `preprocess` for this dataset (not yet)."""
