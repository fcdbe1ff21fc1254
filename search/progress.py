"""A one-line progress display on stderr (a rewritten line on a terminal, a few lines in a log)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(
        self, label: str, total: float, unit: str = "", enabled: bool = True, stream: TextIO | None = None
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.done = 0.0
        self.start = time.perf_counter()
        self._shown = -1.0  # last time (tty) or quarter (log) shown

    def _fmt(self, v: float) -> str:
        if self.unit == "B":
            return f"{v / 1e6:.1f} MB"
        return f"{int(v)}{self.unit}"

    def line(self) -> str:
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        total = f"/{self._fmt(self.total)}" if self.total else ""
        return f"{self.label}: {self._fmt(self.done)}{total}{pct} {time.perf_counter() - self.start:.1f} s"

    def update(self, n: float) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.tty:
            now = time.perf_counter()
            if now - self._shown >= 0.1 or (self.total and self.done >= self.total):
                self._shown = now
                self.stream.write("\r" + self.line() + "\033[K")
                self.stream.flush()
        elif self.total:
            quarter = int(4 * self.done / self.total)
            if quarter > self._shown and quarter > 0:
                self._shown = quarter
                print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + self.line() + "\033[K\n")
            self.stream.flush()
