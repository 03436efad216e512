"""Progress lines for long work, on stderr so stdout stays machine-readable.

On a terminal the line redraws in place; elsewhere (CI, logs) a line is printed at most every few seconds.
"""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """Counts units of work toward an optional total and reports rate and time left."""

    def __init__(self, label: str, total: int | None = None, unit: str = "items",
                 stream=None, interval: float | None = None, enabled: bool = True):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval if interval is not None else (0.2 if self.tty else 5.0)
        self.enabled = enabled
        self.done = 0
        self.start = time.monotonic()
        self._last = self.start  # the first line waits one interval: short work prints only its final line
        self.extra = ""

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        if extra:
            self.extra = extra
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._write(self._line(now))

    def _line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        parts = [f"{self.label}: {self.done:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts.append(f"{100.0 * self.done / self.total:5.1f}%")
        parts.append(f"{rate:,.0f} {self.unit}/s" if rate >= 10 else f"{rate:.2f} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f"left {_duration((self.total - self.done) / rate)}")
        parts.append(f"elapsed {_duration(elapsed)}")
        if self.extra:
            parts.append(self.extra)
        return "  ".join(parts)

    def _write(self, line: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._write(self._line(time.monotonic()))
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        elif self.enabled and self.tty and self.done:
            self.stream.write("\n")  # end the progress line; the error says the rest, on a line of its own
