"""What every flow shares: reading and checking its config, and telling which tasks ran and which came from
cache."""

from __future__ import annotations

from pathlib import Path

from prefect.futures import PrefectFuture

from llama.config.loader import resolve_path
from llama.config.pipeline import check_input
from llama.download import load_sources
from tasks.data import download_source


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
        return check_input(value, self.sources, self.base)


    def outcomes(self) -> dict[str, str]:
        return {f"download-{name}": outcome(job) for name, job in self.downloads.items()}
