"""A one-line progress bar on stderr with rate and ETA; drawn only on a terminal, and with
--quiet not even its notes are printed."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressBar:
    """`update(done)` as work finishes; `note(text)` for a message above the bar; `close()` once.

    The rate counts only work done in this run (`start` is what was already done before), so a
    resumed run shows its own speed and an honest ETA."""

    def __init__(self, total: int, *, start: int = 0, unit: str = "pairs", enabled: bool | None = None,
                 quiet: bool = False, stream: TextIO | None = None, width: int = 28) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.enabled = not quiet and (self.stream.isatty() if enabled is None else enabled)
        self.total, self.start, self.done, self.unit, self.width = total, start, start, unit, width
        self.started = time.monotonic()
        self._last_draw = 0.0
        self.suffix = ""

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.done - self.start) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        rate = self.rate()
        eta = duration((self.total - self.done) / rate) if rate > 0 and self.done < self.total else "--"
        text = f"[{bar}] {self.done}/{self.total} {self.unit} {frac:6.1%}  {rate:,.1f}/s  ETA {eta}"
        return f"{text}  {self.suffix}" if self.suffix else text

    def update(self, done: int, *, force: bool = False) -> None:
        self.done = min(done, self.total)
        now = time.monotonic()
        if self.enabled and (force or now - self._last_draw >= 0.1):
            self._last_draw = now
            self.stream.write("\r\x1b[2K" + self.line())
            self.stream.flush()

    def note(self, text: str) -> None:
        """A message on its own line (the bar is redrawn under it); nothing when quiet."""
        if self.quiet:
            return
        if self.enabled:
            self.stream.write("\r\x1b[2K")
        self.stream.write(text + "\n")
        self.update(self.done, force=True)

    def close(self) -> None:
        if self.enabled:
            self.update(self.done, force=True)
            self.stream.write("\n")
            self.stream.flush()
