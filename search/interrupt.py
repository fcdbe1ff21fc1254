"""Whether the user stopped the search (Ctrl-C: SIGINT, or SIGUSR1) while Tune ran it, and a stop
that waits for the checkpoints in flight.

    RunConfig(callbacks=[interrupt.StopWatch(), ...])   # watch() in setup, pass_on() each step
    with interrupt.guard():      # around Tuner.fit(): the handlers as they were afterwards
        tuner.fit()
    interrupt.stopped()          # True: the search was stopped by a signal, to be resumed

Tune catches the first SIGINT/SIGUSR1 itself: it saves its state and returns from fit() as if the
search had ended, then stops the running trials the way it stops finished ones (TERMINATED, no
completion hook). Nothing it returns says it was stopped, so the records would call a trial that
was running "pruned" and the search "finished". `watch`, called once Tune's handlers are in place
(a callback's setup), puts a handler in front of Tune's that notes the signal.

It also holds the signal back from Tune for a moment. A trial's checkpoint is written with its
result, but Tune takes it into its saved state only after a second round trip to the trial (a
"save"); stopped in between, Tune drops it and the resumed trial trains that epoch again. So the
held signal reaches Tune at the first step with no save in flight (`pass_on`, at most `HOLD_S`
later); a second Ctrl-C goes straight on.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ray import tune

_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGUSR1", None)) if s)
HOLD_S = 30.0  # the longest a stop waits for checkpoints in flight

_stopped = threading.Event()
_held: list[tuple[float, Callable[[], None]]] = []  # (when, hand the signal to Tune)


def watch() -> None:
    """Note a stop signal from now on, and hold it for `pass_on` to hand to the handler in place
    (Tune's). Signal handlers can be set only in the main thread: elsewhere (a search run from a
    thread) nothing."""
    _stopped.clear()
    _held.clear()
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _SIGNALS:
        current = signal.getsignal(sig)
        if getattr(current, "esc50_watch", False) or not callable(current):
            continue  # ours already, or the default / ignored (then Tune did not install its own)

        def noted(signum: int, frame: Any, _then: Any = current) -> None:
            if _stopped.is_set():  # the second: no more waiting
                _held.clear()
                _then(signum, frame)
                return
            _stopped.set()
            _held.append((time.monotonic(), lambda: _then(signum, frame)))
            print(
                "\nstopping the search once the checkpoints in flight are saved (again to stop at once)",
                file=sys.stderr,
                flush=True,
            )

        noted.esc50_watch = True  # type: ignore[attr-defined]
        signal.signal(sig, noted)


def pass_on(saving: Callable[[], bool]) -> None:
    """Hand a held stop signal to Tune when `saving()` says no checkpoint is in flight, or when it
    has waited `HOLD_S`. Called between Tune's steps (a callback's on_step_end), in the main thread."""
    if not _held:
        return
    since, then = _held[0]
    if saving() and time.monotonic() - since < HOLD_S:
        return
    _held.clear()
    then()


class StopWatch(tune.Callback):
    """`watch` once Tune's handlers are in place (Ray installs them before the callbacks' setup),
    `pass_on` after each of Tune's steps. No state: picklable into tuner.pkl."""

    def setup(self, **info: Any) -> None:
        watch()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        pass_on(lambda: any(_saving(t) for t in trials))


def _saving(trial: Any) -> bool:
    """A save of this trial is in flight (Tune's own field; absent in another layout: not saving)."""
    return getattr(getattr(trial, "temporary_state", None), "saving_to", None) is not None


def stopped() -> bool:
    """A stop signal came since the last `watch`."""
    return _stopped.is_set()


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """The signal handlers as they were before the block, again after it: Tune leaves its own
    installed when no signal came, and a Ctrl-C after the search (while the results are written, or
    during `esc50 main`'s promotion) would then be swallowed instead of stopping the command."""
    main = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.getsignal(sig) for sig in _SIGNALS} if main else {}
    _stopped.clear()
    _held.clear()
    try:
        yield
    finally:
        _held.clear()
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)
