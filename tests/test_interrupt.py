"""search/interrupt.py with real signals to this process: a stop is noted at once and reaches the
handler behind it (Tune's) only when no checkpoint is in flight, or when it has waited too long;
a second stop goes straight on."""

from __future__ import annotations

import os
import signal

import pytest

from search import interrupt


def test_a_stop_waits_for_the_checkpoints_in_flight_and_a_second_goes_straight_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    got: list[int] = []
    with interrupt.guard():
        signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))  # in Tune's place
        interrupt.watch()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert interrupt.stopped() and got == []  # noted, held
        interrupt.pass_on(saving=lambda: True)
        assert got == []  # a save in flight: still held
        interrupt.pass_on(saving=lambda: False)
        assert got == [signal.SIGUSR1]  # nothing in flight: handed on, once
        interrupt.pass_on(saving=lambda: False)
        assert got == [signal.SIGUSR1]

        interrupt.watch()  # the next search: a stop while saving, then a second stop
        os.kill(os.getpid(), signal.SIGUSR1)
        assert got == [signal.SIGUSR1]
        os.kill(os.getpid(), signal.SIGUSR1)
        assert got == [signal.SIGUSR1] * 2
        interrupt.pass_on(saving=lambda: False)
        assert got == [signal.SIGUSR1] * 2  # not handed on twice

        interrupt.watch()  # a save that never ends: handed on after HOLD_S
        monkeypatch.setattr(interrupt, "HOLD_S", 0.0)
        os.kill(os.getpid(), signal.SIGUSR1)
        interrupt.pass_on(saving=lambda: True)
        assert got == [signal.SIGUSR1] * 3
    assert signal.getsignal(signal.SIGUSR1) is not None and not getattr(
        signal.getsignal(signal.SIGUSR1), "esc50_watch", False
    )  # the handlers as they were before the block
