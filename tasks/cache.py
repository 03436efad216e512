"""Content cache keys for Prefect tasks.

A task's key is the sha256 of: its stage's code version (the source of the library modules the stage calls,
with every project module they import, and of the task's own body: not the rest of its tasks module, so a
change to MLflow logging or a plot reruns nothing), the task's name, the *content* of its input files and
folders, and the config values that matter. Paths never enter the key, so moving a file changes nothing
and replacing its bytes under the same name reruns exactly what depends on it.

Each task writes into `<work_dir>/<stage>/<key>`, a folder named by that same key, so a cache hit always
points at outputs made from the same inputs. Should those outputs have been deleted or damaged, the stored
result is forgotten and the task runs again, writing them back in place. Runs sharing a work folder build
each such folder once: a run that finds another building it waits, then takes its result (`exclusive`).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import llama
from llama.errors import PipelineError
from llama.fileio import (exclusive_lock, pipeline_manifest_files, read_json, remove_partials, sha256_file,
                          write_bytes_atomic)

ROOT = Path(__file__).resolve().parent.parent

# MindSpore's graph compiler is not thread-safe and Prefect runs tasks in threads: tasks that build and run a
# model hold this lock, so independent stages still overlap their other work (tokenizing, hashing, I/O).
MINDSPORE_LOCK = threading.Lock()
CODE_PACKAGES = ("llama", "tasks")


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in CODE_PACKAGES:
        return None
    for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path) -> set[str]:
    """Project modules named by the (absolute) import statements anywhere in a source file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if _module_file(name)}


_CODE_VERSION_LOCK = threading.Lock()


def code_version(*modules: str) -> str:
    """Digest of the source of `modules` and of every project module they import, transitively."""
    with _CODE_VERSION_LOCK:  # task threads ask at once; CPython 3.11's ast.parse is not safe across threads
        return _code_version(modules)


def code_modules(*modules: str) -> dict[str, Path]:
    """`modules` and every project module they import, transitively: what `code_version` digests."""
    seen: dict[str, Path] = {}
    pending = list(modules)
    while pending:
        name = pending.pop()
        path = _module_file(name)
        if path is None or name in seen:
            continue
        seen[name] = path
        pending.extend(_imported_modules(path))
    return seen


@functools.lru_cache(maxsize=None)
def _code_version(modules: tuple[str, ...]) -> str:
    """A change to the tokenizer reruns tokenization but not conversion; a change to the model does not
    rerun tokenization."""
    seen = code_modules(*modules)
    digest = hashlib.sha256(llama.__version__.encode())
    for name in sorted(seen):
        digest.update(f"{name}\0".encode() + seen[name].read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def content_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files (names relative to it and their contents).

    A folder this pipeline wrote lists the sha256 of its files in its manifest; those are used as they are,
    since every reader (and the producing stage's `outputs_valid`) checks the bytes against them, so a large
    checkpoint is not hashed a second time for the next stage's key. Files it does not list are hashed.
    Digests are remembered per (path, size, mtime) within a process, so a flow hashes each input once.
    """
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return _file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if path.is_dir():
        listed = pipeline_manifest_files(path) or {}
        digest = hashlib.sha256()
        for child in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            name = child.relative_to(path).as_posix()
            recorded = listed.get(name)
            digest.update(name.encode() + b"\0")
            digest.update(str(recorded["sha256"] if isinstance(recorded, dict) else content_digest(child)).encode())
        return digest.hexdigest()
    raise FileNotFoundError(f"cache input {path} does not exist")


def _paths(value: Any) -> Iterable[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return value
    if isinstance(value, dict):
        return [value[k] for k in sorted(value)]
    return [value]


def content_key(name: str, parameters: dict, file_params: Iterable[str], ignore: Iterable[str] = (),
                version: str = "") -> str:
    """The cache key of task `name` called with `parameters`.

    `file_params` name the parameters that hold input paths (a path, a list or a dict of paths): their
    content is hashed, not their names. `ignore` names parameters that do not change the result (the work
    folder, an MLflow run id). Every other parameter is a config value and is hashed as JSON. `version` is the
    stage's code version (`CachedStage.version`).
    """
    file_params, ignore = set(file_params), set(ignore)
    digest = hashlib.sha256(f"{version}\0{name}\0".encode())
    for param in sorted(file_params):
        for item in _paths(parameters.get(param)):
            digest.update(f"{param}\0{content_digest(item)}\0".encode())
    config = {k: v for k, v in parameters.items() if k not in file_params | ignore}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def verified_by(verify: Callable[[Path], Any]) -> Callable[[Path], bool]:
    """An `outputs_valid` check made of a function that raises PipelineError for a missing or damaged folder."""
    def intact(folder: Path) -> bool:
        try:
            verify(folder)
        except PipelineError:
            return False
        return True
    return intact


class CachedStage:
    """The cache rule of one stage: the library modules it calls (its code version), which parameters are input
    files, which do not matter, and how to tell that a previous run's outputs are intact.

    Use `cache_key_fn` as the task's Prefect `cache_key_fn`, `exclusive` (or `body`) on the task function, and
    `output_dir(locals())` first thing in the task body to get the key-named folder the task writes to.
    """

    def __init__(self, stage: str, calls: Iterable[str], file_params: Iterable[str] = (),
                 ignore: Iterable[str] = ("work_dir", "run_id"), outputs_valid: Callable[[Path], bool] | None = None):
        self.stage = stage
        self.calls = tuple(calls)
        self.file_params = tuple(file_params)
        self.ignore = tuple(ignore)
        self.outputs_valid = outputs_valid
        self.body_source = ""

    def body(self, fn: Callable) -> Callable:
        """Mark `fn` as the stage's task body: its own source joins the code version."""
        self.body_source = inspect.getsource(fn)
        return fn

    @property
    def version(self) -> str:
        """Digest of the called library modules (with their imports) and of the task body."""
        return hashlib.sha256(f"{code_version(*self.calls)}\0{self.body_source}".encode()).hexdigest()

    def key(self, parameters: dict) -> str:
        return content_key(self.stage, parameters, self.file_params, self.ignore, self.version)

    def output_dir(self, parameters: dict) -> Path:
        """`<work_dir>/<stage>/<key>`: where a run with these parameters keeps its outputs."""
        return Path(parameters["work_dir"]) / self.stage / self.key(parameters)[:16]

    def exclusive(self, fn: Callable[..., dict]) -> Callable[..., dict]:
        """Wrap a task body (under `@task`) so that one run at a time builds a folder of this stage.

        Prefect's cache cannot see a run in progress: two runs on one work folder started together both
        miss it and would write the same folder. The wrapper holds an flock on `.<key>.lock` beside the
        folder (released when its process dies) while the body runs and keeps the body's result beside the
        folder (`.<key>.result.json`); a run that finds the lock held waits, then returns that result if the
        folder verifies, and builds it itself if not (the other run failed: training resumes from its
        checkpoints). Leftovers of writes killed mid-way are removed before building.
        """
        signature = inspect.signature(self.body(fn))

        @functools.wraps(fn)
        def build_once(*args, **kwargs) -> dict:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            out = self.output_dir(bound.arguments)
            record = out.with_name(f".{out.name}.result.json")
            with exclusive_lock(out.with_name(f".{out.name}.lock"), f"{self.stage} folder {out}", wait=True):
                if record.is_file() and self.outputs_valid(out):
                    return read_json(record, f"{self.stage} result")
                record.unlink(missing_ok=True)
                remove_partials(out.parent, prefix=f".{out.name}.")
                remove_partials(out)
                result = fn(*args, **kwargs)
                write_bytes_atomic(record, json.dumps(result, sort_keys=True, default=str).encode())
                return result

        build_once.__prefect_task_source__ = fn  # Prefect names the task by this function's code, not ours
        return build_once

    def cache_key_fn(self, context, parameters: dict) -> str:
        key = self.key(parameters)
        if self.outputs_valid is not None and not self.outputs_valid(self.output_dir(parameters)):
            forget_cached_result(key)
        return key


def forget_cached_result(key: str) -> None:
    """Drop Prefect's stored result for `key`, so the task runs again and stores a fresh one under it.

    Called from a cache key function when the outputs a cached result points at are gone or damaged.
    Result storage is Prefect's local file system (the default), where a record is a file named by its key.
    """
    from prefect.results import get_result_store

    basepath = getattr(get_result_store().result_storage, "basepath", None)
    if basepath:
        (Path(basepath).expanduser() / key).unlink(missing_ok=True)
