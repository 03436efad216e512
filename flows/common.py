"""What every flow shares: reading its config, and telling which tasks ran and which came from cache."""

from __future__ import annotations

from pathlib import Path

from prefect.futures import PrefectFuture

from llama.download import load_sources
from llama.errors import PipelineError
from llama.yamlconfig import apply_overrides, load_yaml, resolve_path
from tasks.data import download_source

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


class Inputs:
    """Config values that name input files: a source from the sources file (downloaded once per flow run,
    checksummed, cached) or a path relative to the config file."""

    def __init__(self, settings: dict, base: Path, work_dir: str, mirror: str | None):
        self.sources = load_sources(resolve_path(settings["sources"], base)) if settings.get("sources") else {}
        self.base, self.mirror = base, mirror
        self.cache_dir = str(Path(work_dir) / "cache")
        self.downloads: dict[str, PrefectFuture] = {}

    def __call__(self, value: str) -> PrefectFuture | str:
        """A future of the downloaded file for a source name, else the existing file's path."""
        if value in self.sources:
            if value not in self.downloads:
                self.downloads[value] = download_source.submit(self.sources[value], self.cache_dir, self.mirror)
            return self.downloads[value]
        path = resolve_path(value, self.base)
        if not path.exists():
            raise PipelineError(f"input {value!r} is neither a source in the sources file nor an existing path")
        return str(path)

    def outcomes(self) -> dict[str, str]:
        return {f"download-{name}": outcome(job) for name, job in self.downloads.items()}
