"""Whether the user stopped the search (Ctrl-C: SIGINT, or SIGUSR1) while Tune ran it.

    with interrupt.guard():      # around Tuner.fit(): the handlers as they were afterwards
        tuner.fit()              # a tune.Callback's setup() calls interrupt.watch()
    interrupt.stopped()          # True: the search was stopped by a signal, to be resumed

Tune catches the first SIGINT/SIGUSR1 itself: it saves its state and returns from fit() as if the
search had ended, then stops the running trials the way it stops finished ones (TERMINATED, no
completion hook). Nothing it returns says it was stopped, so the records would call a trial that
was running "pruned" and the search "finished". `watch`, called once Tune's handlers are in place
(a callback's setup), puts a handler in front of Tune's that notes the signal and hands it on.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGUSR1", None)) if s)
_stopped = threading.Event()


def watch() -> None:
    """Note a stop signal from now on, then hand it to the handler in place (Tune's). Signal
    handlers can be set only in the main thread: elsewhere (a search run from a thread) nothing."""
    _stopped.clear()
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _SIGNALS:
        current = signal.getsignal(sig)
        if getattr(current, "esc50_watch", False) or not callable(current):
            continue  # ours already, or the default / ignored (then Tune did not install its own)

        def noted(signum: int, frame: Any, _then: Any = current) -> None:
            _stopped.set()
            _then(signum, frame)

        noted.esc50_watch = True  # type: ignore[attr-defined]
        signal.signal(sig, noted)


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
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)
