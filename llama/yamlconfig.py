"""Declarative YAML configs with `key.path=value` overrides from the command line."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Iterable

import yaml

from llama.errors import PipelineError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` as a string; learning rates are written that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping, with a one-line error for a missing, empty or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"config {path} does not exist")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise PipelineError(f"config {path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"config {path} must be a mapping of settings")
    return data


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of `config` with each `a.b.c=value` set; values are parsed as YAML (numbers, lists...)."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise PipelineError(f"override {item!r} is not of the form key.path=value")
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise PipelineError(f"override {item!r}: {part} is not a section")
            node = child
        node[leaf] = parse_yaml(raw)
    return config


def resolve_path(value: str | os.PathLike, base: str | os.PathLike) -> Path:
    """A path from a config file, relative to that file's folder unless absolute."""
    path = Path(os.path.expanduser(str(value)))
    return path if path.is_absolute() else Path(base) / path


def flatten(config: dict, prefix: str = "") -> dict:
    """`{"train": {"lr": 1e-4}}` → `{"train.lr": 1e-4}`: nested sections as dotted keys."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def as_overrides(config: dict) -> list[str]:
    """A nested mapping as `key.path=value` overrides (values in JSON, which YAML reads back unchanged)."""
    return [f"{key}={json.dumps(value)}" for key, value in flatten(config).items()]
