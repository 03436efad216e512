"""Download stage: fetch the declared data files into a cache where only checksum-verified bytes land.

A source names a URL and the digest of the file we want: its sha256, or its git blob id (`git hash-object`)
where that is what upstream publishes. It may name a member of a zip or tar(.gz) archive; the digest is then
the member's. Downloads go to a `.partial` file that is resumed with an HTTP Range request after a dropped
connection and retried with exponential backoff; the verified file is renamed into
`<cache>/<sha256|git_blob>/<digest>/<filename>`, so a cache hit needs no network and a bad download leaves
nothing behind.

Mirror rule, for offline and air-gapped use: with a mirror M, an http(s) URL `scheme://host/a/b/file` is
fetched from `M/host/a/b/file` instead (query and fragment dropped), with no fallback to the original.
M is a folder path, a file:// URL or an http(s) URL; file:// sources are never mirrored. `--mirror` (the
`mirror` argument) wins over the LLAMA2_PIPELINE_MIRROR variable, which wins over the sources file's
`mirror:` key. An empty variable counts as unset; an empty `--mirror ''` turns mirroring off.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import http.client
import os
import posixpath
import re
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import unquote, urlsplit

import yaml

from llama.cli import add_command
from llama.config.loader import CONFIG_ROOT
from llama.errors import PipelineError
from llama.fileio import CHUNK, atomic_path, sha256_file
from llama.progress import Progress

DEFAULT_SOURCES = CONFIG_ROOT / "sources.yaml"
DEFAULT_CACHE = Path("work") / "cache"
MIRROR_ENV = "LLAMA2_PIPELINE_MIRROR"
USER_AGENT = "llama2-pipeline"
DIGEST_LENGTHS = {"sha256": 64, "git_blob": 40}
SOURCE_KEYS = {"url", "sha256", "git_blob", "member"}
URL_SCHEMES = ("http", "https", "file")
TRANSIENT_HTTP = {408, 416, 429}  # plus every 5xx; 416 means our partial file is stale, so start over
MAX_LINK_HOPS = 8


@dataclass(frozen=True)
class Source:
    """One file to fetch: where it lives and the digest that proves we got the right bytes.

    `mirror` is the sources file's mirror setting, carried along so a caller holding only a Source
    (a Prefect task, a notebook) fetches the way the CLI does.
    """

    name: str
    url: str
    sha256: str | None = None
    git_blob: str | None = None
    member: str | None = None
    mirror: str | None = None

    def __post_init__(self) -> None:
        given = [algo for algo in DIGEST_LENGTHS if getattr(self, algo) is not None]
        if len(given) != 1:
            raise PipelineError(f"source {self.name!r} needs exactly one of sha256 or git_blob")
        value = getattr(self, given[0])
        if not (isinstance(value, str) and re.fullmatch(f"[0-9a-f]{{{DIGEST_LENGTHS[given[0]]}}}", value)):
            raise PipelineError(f"source {self.name!r}: {given[0]} must be {DIGEST_LENGTHS[given[0]]} lowercase "
                                f"hex digits in quotes, got {value!r}")
        if urlsplit(self.url).scheme not in URL_SCHEMES:
            raise PipelineError(f"source {self.name!r}: URL {self.url!r} is not http(s), file:// or a path")
        if self.member is not None:
            parts = re.split(r"[\\/]", self.member)
            if not self.member or self.member.startswith(("/", "\\")) or ".." in parts:
                raise PipelineError(f"source {self.name!r}: archive member {self.member!r} must be a relative "
                                    f"path without '..'")
        if not self.filename:
            raise PipelineError(f"source {self.name!r}: URL {self.url!r} does not end in a file name")

    @property
    def algo(self) -> str:
        return "sha256" if self.sha256 is not None else "git_blob"

    @property
    def digest(self) -> str:
        return self.sha256 if self.sha256 is not None else self.git_blob

    @property
    def filename(self) -> str:
        """The name the file keeps in the cache: the member's, else the URL's last path component."""
        return posixpath.basename(self.member or unquote(urlsplit(self.url).path))


def _location(value: str, base: Path) -> str:
    """A URL as given, or a path (relative to `base`, the sources file's folder) as a file:// URL."""
    if urlsplit(value).scheme in URL_SCHEMES:
        return value
    return (base / value).resolve().as_uri()


def load_sources(path: str | os.PathLike) -> dict[str, Source]:
    """Read a sources YAML file: `sources: {name: {url, sha256 | git_blob, member}}` and optional `mirror:`.

    Relative paths (in `url` and `mirror`) are resolved against the file's folder, so bundled data
    travels with its sources file.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"sources file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", err)
        raise PipelineError(f"sources file {path} is not valid YAML: {problem}{where}") from None
    if not (isinstance(data, dict) and isinstance(data.get("sources"), dict)) or set(data) - {"sources", "mirror"}:
        raise PipelineError(f"sources file {path} must hold a 'sources:' mapping and optionally 'mirror:'")
    mirror = _location(str(data["mirror"]), path.parent) if data.get("mirror") else None
    sources = {}
    for name, entry in data["sources"].items():
        if not isinstance(entry, dict) or not entry.get("url"):
            raise PipelineError(f"source {name!r} in {path} needs a url")
        unknown = set(entry) - SOURCE_KEYS
        if unknown:
            raise PipelineError(f"source {name!r} in {path} has unknown keys {sorted(unknown)} "
                                f"(allowed: {sorted(SOURCE_KEYS)})")
        sources[str(name)] = Source(
            name=str(name), url=_location(str(entry["url"]), path.parent), sha256=entry.get("sha256"),
            git_blob=entry.get("git_blob"), member=entry.get("member"), mirror=mirror)
    return sources


def resolve_mirror(explicit: str | None, configured: str | None) -> str | None:
    """The mirror in force: `explicit` ('' = none), else a non-empty LLAMA2_PIPELINE_MIRROR, else `configured`."""
    if explicit is not None:
        return explicit or None
    return os.environ.get(MIRROR_ENV) or configured


def mirror_url(url: str, mirror: str) -> str:
    """Map an http(s) URL into the mirror: `https://host/a/b/file` -> `<mirror>/host/a/b/file`."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return url
    root = mirror if urlsplit(mirror).scheme in URL_SCHEMES else Path(mirror).resolve().as_uri()
    host = parts.netloc.rpartition("@")[2]  # without any user:password@
    return f"{root.rstrip('/')}/{host}{parts.path}"


def git_blob_id(path: str | os.PathLike) -> str:
    """`git hash-object` of a file (sha1 of "blob <size>\\0" + bytes): the id GitHub trees publish."""
    digest = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, source: Source, url: str) -> None:
    actual = sha256_file(path) if source.algo == "sha256" else git_blob_id(path)
    if actual != source.digest:
        what = f"{url} member {source.member}" if source.member else url
        raise PipelineError(f"source {source.name!r}: {source.algo} mismatch for {what}: "
                            f"expected {source.digest}, got {actual}")


def cached_path(source: Source, cache_dir: str | os.PathLike) -> Path:
    """Where `fetch` keeps the verified file for `source` (whether or not it is there yet)."""
    return Path(cache_dir) / source.algo / source.digest / source.filename


def fetch(source: Source, cache_dir: str | os.PathLike, mirror: str | None = None, retries: int = 3,
          backoff: float = 1.0, timeout: float = 60.0, progress: bool = True) -> Path:
    """Return the verified file for `source` in `cache_dir`, downloading it only when the cache lacks it.

    `mirror` None defers to the environment and then to `source.mirror` (see `resolve_mirror`). A failed
    attempt is retried `retries` times, waiting `backoff`, 2*`backoff`, ... seconds; a partial download is
    kept for the next run to resume, but bytes that fail verification are deleted.
    """
    if retries < 0:
        raise PipelineError(f"retries must be 0 or more, got {retries}")
    cache = Path(cache_dir)
    final = cached_path(source, cache)
    mirror = resolve_mirror(mirror, source.mirror)
    url = mirror_url(source.url, mirror) if mirror else source.url
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache):
        if final.is_file():
            try:
                _verify(final, source, str(final))
                return final
            except PipelineError:
                final.unlink()  # changed since it was verified: fetch it again
        # Keyed by URL so sources sharing an archive download it once.
        fetched = cache / "downloads" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{_url_name(url)}"
        if not fetched.is_file():
            _download(url, fetched, f"download {source.name}", retries, backoff, timeout, progress)
        try:
            with atomic_path(final) as tmp:
                if source.member:
                    _extract(fetched, source.member, tmp, source.name)
                else:
                    os.replace(fetched, tmp)
                _verify(tmp, source, url)
        except PipelineError:
            fetched.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                final.parent.rmdir()
            raise
    return final


def _url_name(url: str) -> str:
    return posixpath.basename(unquote(urlsplit(url).path)) or "download"


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache, so parallel fetches (say, Prefect tasks reading members of
    one archive) never write the same partial file at once."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _download(url: str, target: Path, label: str, retries: int, backoff: float, timeout: float,
              progress: bool) -> None:
    """Fetch `url` into `target` by way of `target.partial`, resuming and retrying when transfers fail."""
    partial = target.with_name(target.name + ".partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            _download_once(url, partial, label, timeout, progress)
            break
        except urllib.error.HTTPError as err:
            if err.code == 416:
                partial.unlink(missing_ok=True)
            if attempt == retries or not (err.code in TRANSIENT_HTTP or err.code >= 500):
                raise PipelineError(f"{label}: {url} answered HTTP {err.code} {err.reason}") from None
        except (OSError, http.client.HTTPException) as err:
            if attempt == retries or urlsplit(url).scheme == "file":
                reason = str(getattr(err, "reason", None) or err) or type(err).__name__
                raise PipelineError(f"{label}: could not fetch {url}: {reason}") from None
        time.sleep(backoff * 2 ** attempt)
    os.replace(partial, target)


def _download_once(url: str, partial: Path, label: str, timeout: float, progress: bool) -> None:
    """One request: append to the partial file if the server honours our Range, else rewrite it."""
    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
        if offset and response.status == 206:
            if not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                partial.unlink()
                raise ConnectionError(f"server resumed at the wrong offset: {response.headers['Content-Range']}")
        else:
            offset = 0  # a full body: the server ignored Range (or this is a file:// URL)
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        total = offset + expected if expected is not None else None
        received = 0
        with open(partial, "ab" if offset else "wb") as out, \
                Progress(label, total=total, unit="bytes", enabled=progress) as bar:
            bar.update(offset)
            while chunk := response.read(CHUNK):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if expected is not None and received < expected:
        raise ConnectionError(f"connection closed after {offset + received:,} of {total:,} bytes")


def _extract(archive: Path, member: str, dest: Path, name: str) -> None:
    """Copy one member of a zip or tar(.gz) archive to `dest`, following links only inside the archive."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                def zip_link(entry: str):
                    info = zf.getinfo(entry)
                    return (zf.read(info).decode(), True) if stat.S_ISLNK(info.external_attr >> 16) else None
                with zf.open(_follow_links(member, zip_link, name)) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                def tar_link(entry: str):
                    info = tf.getmember(entry)
                    return (info.linkname, info.issym()) if info.issym() or info.islnk() else None
                info = tf.getmember(_follow_links(member, tar_link, name))
                if not info.isfile():
                    raise PipelineError(f"source {name!r}: archive member {info.name!r} is not a regular file")
                with tf.extractfile(info) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
        else:
            raise PipelineError(f"source {name!r}: {archive.name} is neither a zip nor a tar archive")
    except KeyError:
        raise PipelineError(f"source {name!r}: archive {archive.name} has no member {member!r}") from None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as err:
        raise PipelineError(f"source {name!r}: archive {archive.name} is damaged: {err}") from None


def _follow_links(member: str, link_of: Callable[[str], tuple[str, bool] | None], name: str) -> str:
    """Resolve `member` through links to a plain member, refusing any link that leaves the archive.

    `link_of(entry)` gives (target, is_symlink) for a link and None otherwise; a symlink's target is
    relative to its own folder, a hard link's to the archive root.
    """
    for _ in range(MAX_LINK_HOPS):
        link = link_of(member)
        if link is None:
            return member
        target, symlink = link
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(member) if symlink else "", target))
        if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
            raise PipelineError(f"source {name!r}: archive member {member!r} links outside the archive "
                                f"(to {target!r})")
        member = resolved
    raise PipelineError(f"source {name!r}: archive member links go more than {MAX_LINK_HOPS} deep")


def _download_command(args: argparse.Namespace) -> dict:
    sources = load_sources(args.sources)
    unknown = [name for name in args.names if name not in sources]
    if unknown:
        raise PipelineError(f"unknown source {', '.join(unknown)} in {args.sources} "
                            f"(known: {', '.join(sources)})")
    return {name: str(fetch(sources[name], args.cache, mirror=args.mirror, retries=args.retries))
            for name in args.names or sources}


def register(subparsers) -> None:
    """Adds `download`."""
    parser = add_command(
        subparsers, "download", _download_command,
        help="Fetch data files and the tokenizer into a cache, verified by checksum; prints name: path.",
        epilog=f"Mirror rule: https://host/a/b/file is fetched from MIRROR/host/a/b/file, where MIRROR is a "
               f"folder, file:// URL or http(s) URL. --mirror wins over ${MIRROR_ENV}, which wins over the "
               f"sources file's 'mirror:'.")
    parser.add_argument("names", nargs="*", metavar="NAME", help="sources to fetch (default: all in the file)")
    parser.add_argument("--sources", type=Path, default=DEFAULT_SOURCES,
                        help="YAML file declaring the sources (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache folder (default: %(default)s)")
    parser.add_argument("--mirror", help="folder or server to fetch http(s) URLs from instead ('' for none)")
    parser.add_argument("--retries", type=int, default=3, help="retries per file after a failed attempt "
                                                               "(default: %(default)s)")
