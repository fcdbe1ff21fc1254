"""A one-line progress display on stderr (a rewritten line on a terminal, a few lines in a log)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from trainable.protocol import METRIC


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


# ---- a search's trial events -------------------------------------------------------------------
# What `esc50 search` prints by default instead of Tune's status table (which `-v` brings back):
# one line per trial event and, after each trial ends (and at least every `every_s` seconds), one
# line for the whole search. Ray-free, so it is tested without Tune; search/tune_progress.py feeds
# it from Tune's callback hooks.


def fmt_duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def epoch_stride(epochs: int) -> int:
    """Print every k-th epoch: about 5 lines per trial, however long it trains."""
    return max(1, round(epochs / 5))


class TrialEvents:
    """Formats a search's trial events; `emit` receives each finished line."""

    def __init__(
        self,
        name: str,
        trials: int,
        epochs: int,
        concurrency: int,
        metric: str = METRIC,
        every_s: float = 120.0,
        emit=None,
        clock=time.monotonic,
    ) -> None:
        self.name, self.trials, self.epochs, self.concurrency = name, trials, epochs, max(1, concurrency)
        self.metric, self.every_s = metric, every_s
        self.emit = emit or (lambda line: print(line, flush=True))
        self.clock = clock
        self.start = clock()
        self._last_overall = self.start
        self.planned: dict[str, int] = {}  # trial id -> epochs it is configured for
        self.done_epochs: dict[str, int] = {}  # trial id -> last epoch reported
        self.ended: dict[str, str] = {}  # trial id -> completed | pruned | failed
        self.best: tuple[float, str] | None = None
        self.epochs_seen = 0  # results received in this process (the throughput for the ETA)

    def _stamp(self) -> str:
        return f"[{fmt_duration(self.clock() - self.start):>6}]"

    def _line(self, text: str) -> None:
        self.emit(f"{self._stamp()} {text}")

    @staticmethod
    def _params(params: dict | None, limit: int = 6) -> str:
        items = list((params or {}).items())[:limit]
        out = " ".join(f"{k}={_short(v)}" for k, v in items)
        return f": {out}" if out else ""

    def started(
        self, tid: str, epochs: int | None, params: dict | None = None, resumed: bool = False
    ) -> None:
        self.planned[tid] = int(epochs or self.epochs)
        n = len(self.planned)
        what = "resumed" if resumed or tid in self.done_epochs else "started"
        self._line(f"trial {tid} {what} ({n}/{self.trials}){self._params(params)}")

    def result(self, tid: str, epoch: int, value: float | None) -> None:
        self.done_epochs[tid] = int(epoch)
        self.epochs_seen += 1
        if value is not None and (self.best is None or value > self.best[0]):
            self.best = (float(value), tid)
        planned = self.planned.get(tid, self.epochs)
        if epoch % epoch_stride(planned) == 0 or epoch == 1 or epoch >= planned:
            self._line(f"trial {tid} epoch {epoch}/{planned}: {self.metric} {_acc(value)}")
        if self.clock() - self._last_overall >= self.every_s:
            self.overall()

    def ended_as(self, tid: str, status: str, value: float | None = None, error: str | None = None) -> None:
        self.ended[tid] = status
        epoch = self.done_epochs.get(tid, 0)
        planned = self.planned.get(tid, self.epochs)
        if status == "pruned":
            text = f"pruned at epoch {epoch}/{planned} (ASHA): {self.metric} {_acc(value)}"
        elif status == "completed":
            text = f"completed {epoch} epochs: {self.metric} {_acc(value)}"
        else:
            text = f"failed after {epoch} epoch(s)" + (f": {error}" if error else "")
        self._line(f"trial {tid} {text}")
        self.overall()

    def retried(self, tid: str, attempt: int, retries: int, error: str | None = None) -> None:
        epoch = self.done_epochs.get(tid, 0)
        self._line(
            f"trial {tid} failed, retry {attempt} of {retries} from its checkpoint (epoch {epoch})"
            + (f": {error}" if error else "")
        )

    def eta_s(self) -> float | None:
        """Seconds left at the rate epochs arrived so far, if every trial ran all its epochs (ASHA
        stopping some only shortens it: an upper bound)."""
        elapsed = self.clock() - self.start
        if self.epochs_seen == 0 or elapsed <= 0:
            return None
        running = [t for t in self.planned if t not in self.ended]
        left = sum(max(0, self.planned[t] - self.done_epochs.get(t, 0)) for t in running)
        left += max(0, self.trials - len(self.planned)) * self.epochs
        return left / (self.epochs_seen / elapsed)

    def overall(self) -> None:
        self._last_overall = self.clock()
        counts = {s: list(self.ended.values()).count(s) for s in ("completed", "pruned", "failed")}
        detail = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        running = len([t for t in self.planned if t not in self.ended])
        best = f"best {self.best[0]:.4f} (trial {self.best[1]})" if self.best else "best -"
        eta = self.eta_s()
        left = len(self.ended) < self.trials
        eta_text = f", ETA <= {fmt_duration(eta)}" if eta is not None and left else ""
        self._line(
            f"search {self.name}: {len(self.ended)}/{self.trials} trials done"
            + (f" ({detail})" if detail else "")
            + f", {running} running, {best}, elapsed {fmt_duration(self.clock() - self.start)}{eta_text}"
        )


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _short(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
