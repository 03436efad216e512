"""Reading configs: YAML files (numbers as YAML 1.2 reads them), `key.path=value` overrides from the command
line, paths relative to their file, and the configs shipped in configs/KIND/, found by name (`--config
tiny_lora`).
"""

from __future__ import annotations

import copy
import json
import os
import re
import sysconfig
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
    """Read a YAML mapping, with a one-line error for a missing, empty, binary or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"config {path} does not exist")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise PipelineError(f"config {path} is not a text file (not UTF-8)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise PipelineError(f"config {path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"config {path} must be a mapping of settings")
    return data


def _shipped_root() -> Path:
    """configs/ of the source tree (a checkout, or an editable install of one), else the copy a wheel installs
    as data (pyproject.toml's data-files: <prefix>/share/llama2-pipeline/configs, the prefix found from where
    this package is installed, as pip lays out a venv, `--user` or `--prefix` install)."""
    site = Path(__file__).resolve().parents[2]          # the folder holding the `llama` package
    if (site / "configs").is_dir():
        return site / "configs"
    to_prefix = os.path.relpath(sysconfig.get_path("data"), sysconfig.get_path("purelib"))
    return (site / to_prefix / "share" / "llama2-pipeline" / "configs").resolve()


CONFIG_ROOT = _shipped_root()
CONFIG_KINDS = ("pipeline", "data", "train", "model")


def config_file(spec: str | os.PathLike, kind: str) -> Path:
    """The YAML a `--config` means: a file (relative to the working folder, else to the repository, so that
    `configs/...` works from any folder), or the name of one shipped in configs/KIND/, as torchtune's recipes
    take theirs (`--config tiny_lora`). A name that is not shipped is a one-line error listing those that are."""
    path = Path(os.path.expanduser(str(spec)))
    named = CONFIG_ROOT / kind / f"{path.name}.yaml"
    looks_like_name = not path.suffix and len(path.parts) == 1
    for candidate in (path, CONFIG_ROOT.parent / path, *([named] if looks_like_name else [])):
        if candidate.is_file():
            return candidate
    if not looks_like_name:
        return path   # load_yaml says it does not exist
    shipped = ", ".join(name for _, name, _ in shipped_configs(kind))
    raise PipelineError(f"no {kind} config named {str(spec)!r} (shipped: {shipped}; `llama2-pipeline configs` "
                        f"lists them)")


def shipped_configs(kind: str | None = None) -> list[tuple[str, str, str]]:
    """(kind, name, what it is: its first comment line) of every config in configs/ (of one kind), sorted."""
    found = []
    for each in ([kind] if kind else CONFIG_KINDS):
        for path in sorted((CONFIG_ROOT / each).glob("*.yaml")):
            first = path.read_text(encoding="utf-8").lstrip().splitlines()[:1]
            about = first[0].lstrip("#").strip() if first and first[0].startswith("#") else ""
            found.append((each, path.stem, about))
    return found


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
