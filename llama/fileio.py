"""Checksums and atomic writes: a reader never sees a half-written file or folder."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Iterator

from llama.errors import PipelineError

CHUNK = 1 << 20
MANIFEST = "manifest.json"
FORMAT_PREFIX = "llama2-pipeline "  # every manifest format this project writes starts so


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks so large checkpoints do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths) -> list[str]:
    """`sha256_file` of each path, on every core: hashlib and file reads let other threads run."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(sha256_file, paths))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_output_free(path: str | os.PathLike, overwrite: bool) -> None:
    """Before any work: refuse to replace an existing output unless the user asked for it, and an output that
    cannot be written (an OSError naming the folder and the cause: a file where a folder should be, a read-only
    file system, no permission)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise PipelineError(f"output {path} already exists (use --overwrite to replace it)")
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".probe", dir=folder))
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(folder)) from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it into place, else delete it."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` in one rename.

    Whatever fails inside the block, `path` is left as it was and the temporary folder is removed.
    """
    final = Path(path)
    check_output_free(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the usual permissions
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, trash / final.name)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_partials(folder: str | os.PathLike, prefix: str = ".") -> list[Path]:
    """Delete what `atomic_path`/`atomic_dir` leave beside an output when a process is killed mid-write
    (`.<name>.*.partial`, `.<name>.*.old`) directly in `folder`, for names starting with `prefix`; return them.

    Call it only while holding the folder's `exclusive_lock`: another writer's temporaries look the same.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    leftovers = [path for path in folder.iterdir()
                 if path.name.startswith(prefix) and path.name.endswith((".partial", ".old"))]
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return leftovers


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str, wait: bool) -> Iterator[None]:
    """Hold an exclusive `flock` on the file `path` (created if need be) for the block: one writer at a time.

    The lock dies with its process, so a killed run never leaves it behind. When another process holds it,
    `wait=True` waits (saying so on stderr) and `wait=False` raises a one-line error naming the holder's pid.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            if not wait:
                raise PipelineError(f"{what} is in use by another run (pid {holder}); wait for it to finish "
                                    "or use another folder") from None
            print(f"waiting for the run with pid {holder}, which holds {what}", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_manifest(folder: str | os.PathLike, fmt: str, hashed: dict | None = None, **fields) -> dict:
    """Write `folder/manifest.json`: `fields` and the size and sha256 of every other file in the folder and
    its subfolders (`hashed`: entries already computed while writing, by relative name). Write it last: its
    presence then means the folder is complete."""
    folder = Path(folder)
    hashed = hashed or {}
    names = [path.relative_to(folder).as_posix() for path in sorted(folder.rglob("*"))
             if path.is_file() and path != folder / MANIFEST]
    unhashed = [name for name in names if name not in hashed]
    computed = {name: {"size": os.path.getsize(folder / name), "sha256": digest}
                for name, digest in zip(unhashed, sha256_files([folder / name for name in unhashed]))}
    manifest = {"format": fmt, **fields, "files": {name: hashed.get(name) or computed[name] for name in names}}
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def pipeline_manifest_files(folder: str | os.PathLike) -> dict | None:
    """The `files` of the folder's manifest (name -> size and sha256) when this pipeline wrote it, else None.
    Unverified: for naming a folder by its recorded content, not for trusting its bytes."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not str(manifest.get("format")).startswith(FORMAT_PREFIX) \
            or not isinstance(manifest.get("files"), dict):
        return None
    return manifest["files"]


def checkpoint_identity(path: str | os.PathLike) -> str:
    """sha256 naming a checkpoint: of its manifest's file list for our folders, else of its file(s)."""
    path = Path(path)
    files = pipeline_manifest_files(path)
    if files is not None:
        return sha256_bytes(json.dumps(files, sort_keys=True).encode())
    if path.is_file():
        return sha256_file(path)
    return sha256_bytes("".join(f"{p.name}:{sha256_file(p)}\n" for p in sorted(path.iterdir()) if p.is_file()).encode())


def verify_manifest(folder: str | os.PathLike, fmt: str, what: str) -> dict:
    """The manifest of `folder`, after checking that it is a `what` manifest in format `fmt` and that every
    file it lists is intact; a one-line error otherwise."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST, f"{what} manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != fmt or not isinstance(manifest.get("files"), dict):
        raise PipelineError(f"{folder / MANIFEST} is not a {what} manifest of this pipeline")
    verify_files(folder, manifest["files"])
    return manifest


def verify_files(folder: str | os.PathLike, files: dict) -> None:
    """Check the files a manifest lists (sizes first, which is cheap, then sha256s) before anything reads them.

    A one-line error names the first file that is missing, of the wrong size, or changed.
    """
    folder = Path(folder)
    for name, info in files.items():
        path = folder / name
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or "\\" in name:
            raise PipelineError(f"{folder / MANIFEST} lists a file outside its folder: {name}")
        if not path.is_file():
            raise PipelineError(f"{path} is missing")
        if path.stat().st_size != info["size"]:
            raise PipelineError(f"{path} has {path.stat().st_size} bytes, the manifest says {info['size']}")
    digests = sha256_files([folder / name for name in files])
    for (name, info), digest in zip(files.items(), digests):
        if digest != info["sha256"]:
            raise PipelineError(f"{folder / name} does not match the sha256 in its manifest (damaged or changed)")


def read_text(path: str | os.PathLike, what: str = "input") -> str:
    """A UTF-8 text file's content, or a one-line error for a missing, undecodable or empty file."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PipelineError(f"{what} {path} is not UTF-8 text (bad byte at offset {err.start})") from None
    if not text.strip():
        raise PipelineError(f"{what} {path} is empty")
    return text


def read_json(path: str | os.PathLike, what: str = "JSON file"):
    """Load JSON, turning a missing, empty or malformed file into a one-line error."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise PipelineError(f"{what} {path} is not valid JSON: {err.msg} at line {err.lineno}") from None
