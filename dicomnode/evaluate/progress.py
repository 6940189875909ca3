"""A one-line progress bar on stderr for ``dicomnode evaluate`` over many cases."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Show ``[i/N] pct% elapsed`` on one line, rewritten in place.

    Parameters
    ----------
    total : int
        Steps expected.
    enabled : bool
        Whether to write anything at all.
    stream : TextIO, optional
        Where to write; stderr by default, so that stdout stays clean for tables and
        JSON.
    """

    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None) -> None:
        self.total = total
        self.enabled = enabled and total > 0
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.started = time.monotonic()
        self._width = 0

    def line(self) -> str:
        """Return the current line, e.g. ``[3/10]  30% 00:04 elapsed``."""
        percent = 100 * self.done // self.total if self.total else 100
        elapsed = int(time.monotonic() - self.started)
        filled = 20 * self.done // self.total if self.total else 20
        bar = "#" * filled + "-" * (20 - filled)
        return (
            f"[{self.done}/{self.total}] {bar} {percent:3d}% "
            f"{elapsed // 60:02d}:{elapsed % 60:02d} elapsed"
        )

    def advance(self) -> None:
        """Count one step done and redraw; end the line after the last."""
        self.done += 1
        if not self.enabled:
            return
        text = self.line()
        # Pad over what a longer previous line left behind.
        self.stream.write("\r" + text.ljust(self._width))
        self._width = len(text)
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()
