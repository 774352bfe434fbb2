"""A one-line text progress bar for long commands, redrawn with carriage returns."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar", "format_duration"]


class ProgressBar:
    """Rows done out of a total, the rate and the estimated time left, on one line.

    Redraws at most every min_interval seconds, so that small batches do not
    flood a slow terminal or a log file.
    """

    def __init__(
        self, label: str, stream: TextIO | None = None, min_interval: float = 0.2
    ) -> None:
        self._label = label
        self._stream = stream if stream is not None else sys.stderr
        self._min_interval = min_interval
        self._last_draw = float("-inf")
        self._width = 0
        self._drawn = False

    def update(
        self,
        done: int,
        total: int,
        done_now: int,
        elapsed: float,
        *,
        force: bool = False,
    ) -> None:
        """Redraw with done of total rows; done_now rows took elapsed seconds."""
        now = time.monotonic()
        if not force and now - self._last_draw < self._min_interval:
            return
        self._last_draw = now
        rate = done_now / elapsed if elapsed > 0 else 0.0
        # Rows inserted since the count can take done past the total.
        total = max(total, done)
        percent = 100.0 * done / total if total else 100.0
        left = "unknown" if rate <= 0 else format_duration((total - done) / rate)
        line = (
            f"{self._label}: {done}/{total} rows ({percent:.0f}%), "
            f"{rate:.0f} rows/s, {left} left"
        )
        self._write(line)

    def close(self) -> None:
        """End the line, so that later output starts on a new one."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False

    def _write(self, line: str) -> None:
        padding = " " * max(0, self._width - len(line))
        self._stream.write("\r" + line + padding)
        self._stream.flush()
        self._width = len(line)
        self._drawn = True


def format_duration(seconds: float) -> str:
    """Format seconds as 42s, 3m05s or 2h07m."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
