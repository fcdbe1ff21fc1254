"""The default progress of `esc50 search`: a Tune callback that prints one line per trial event
and a line for the whole search (search/progress.py TrialEvents), in place of Tune's status table.

    tune.RunConfig(callbacks=[TrialProgress(name, trials, epochs, concurrency, sampled)], verbose=0)

`-v` shows Tune's own table instead (RunConfig(verbose=1) with report.progress_reporter), `-q`
neither. Picklable with plain state (Tune keeps callbacks in tuner.pkl; a resumed search uses it).
"""

from __future__ import annotations

import os
import re
from typing import Any

from ray import tune

from search.progress import TrialEvents
from search.store import trial_status
from trainable.protocol import METRIC


class TrialProgress(tune.Callback):
    def __init__(
        self,
        name: str,
        trials: int,
        epochs: int,
        concurrency: int,
        sampled: tuple[str, ...] | list[str] = (),
        max_failures: int = 0,
    ) -> None:
        self.name, self.trials, self.epochs, self.concurrency = name, trials, epochs, concurrency
        self.sampled = tuple(sampled)
        self.max_failures = max_failures
        self.enabled = True  # a resumed search under -q / -v switches the saved copy off
        self._events: TrialEvents | None = None
        self._emit = None  # where lines go (default: stdout); not saved

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._events, self._emit = None, None

    @property
    def events(self) -> TrialEvents:
        if self._events is None:
            self._events = TrialEvents(
                self.name, self.trials, self.epochs, self.concurrency, METRIC, emit=self._emit
            )
        return self._events

    def _params(self, trial: Any) -> dict[str, Any]:
        config = trial.config or {}
        return {k: config[k] for k in self.sampled if k in config}

    # ---- Tune hooks -------------------------------------------------------------------------
    def setup(self, **info: Any) -> None:
        self._events = None  # the clock starts with the run
        self._seeded = False

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        """Once: trials a resumed search had already ended count as done (printed by the first run)."""
        if not self.enabled or getattr(self, "_seeded", False):
            return
        self._seeded = True
        ev = self.events
        for t in trials:
            if t.status in ("TERMINATED", "ERROR"):
                last = t.last_result or {}
                ev.planned[t.trial_id] = int((t.config or {}).get("epochs", self.epochs))
                ev.done_epochs[t.trial_id] = int(last.get("epoch") or 0)
                value = last.get(METRIC)
                if value is not None and (ev.best is None or value > ev.best[0]):
                    ev.best = (float(value), t.trial_id)
                ev.ended[t.trial_id] = trial_status(t.config, last, errored=t.status == "ERROR")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        ev = self._events
        if self.enabled and ev is not None and ev.planned and ev.clock() - ev._last_overall >= ev.every_s:
            ev.overall()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.enabled:
            epochs = (trial.config or {}).get("epochs", self.epochs)
            self.events.started(trial.trial_id, epochs, self._params(trial))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.enabled:
            epoch = int(result.get("epoch") or result.get("training_iteration") or 0)
            self.events.result(trial.trial_id, epoch, result.get(METRIC))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.enabled:
            last = trial.last_result or {}
            status = trial_status(trial.config, last, errored=False)
            self.events.ended_as(trial.trial_id, status, last.get(METRIC))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.enabled:
            attempt = int(getattr(trial, "num_failures", 0) or 0)
            self.events.retried(trial.trial_id, attempt, self.max_failures, _error_line(trial))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.enabled:
            self.events.ended_as(trial.trial_id, "failed", error=_error_line(trial))


_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Died)\b")


def _error_line(trial: Any) -> str | None:
    """The last line of the trial's error file (the exception), if Tune wrote one."""
    try:
        path = trial.error_file
        if path and os.path.exists(path):
            with open(path) as f:
                lines = [x.strip() for x in f.read().strip().splitlines() if x.strip()]
            # the exception's own line (`SomeError: ...`), not advice Ray appends after it
            named = [x for x in lines if _EXCEPTION.match(x)]
            return (named or lines or [""])[-1][:200] or None
    except (OSError, AttributeError):
        pass
    return None
