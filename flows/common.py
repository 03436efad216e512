"""What every flow shares: reading its config, and telling which tasks ran and which came from cache."""

from __future__ import annotations

from pathlib import Path

from prefect.futures import PrefectFuture

from llama.yamlconfig import apply_overrides, load_yaml

REPO = Path(__file__).resolve().parent.parent


def load_flow_config(config: str, overrides: list[str] | None = None) -> tuple[dict, Path]:
    """The config mapping with overrides applied, and the folder its relative paths are resolved against."""
    path = Path(config)
    if not path.is_absolute() and not path.exists() and (REPO / path).exists():
        path = REPO / path  # configs/... works from any working folder
    return apply_overrides(load_yaml(path), overrides or []), path.resolve().parent


def outcome(future: PrefectFuture) -> str:
    """"cached" when Prefect took the result from its cache, else "ran"."""
    return "cached" if future.state.name == "Cached" else "ran"
