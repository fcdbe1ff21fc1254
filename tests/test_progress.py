"""The progress a person reads during a search: one line per trial event and a line for the whole
search (search/progress.py), fed by Tune's callback hooks (search/tune_progress.py); `-v` shows
Tune's own status table instead. The default output of a real search is checked in
tests/test_search.py (completed, pruned, failed), a retry's line in tests/test_cv.py; here: the
lines' content and `-v`."""

from __future__ import annotations

from pathlib import Path

import pytest

from search.progress import TrialEvents, epoch_stride, fmt_duration


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_trial_events_lines_best_and_eta() -> None:
    clock, lines = Clock(), []
    ev = TrialEvents("s", trials=3, epochs=10, concurrency=1, emit=lines.append, clock=clock, every_s=1e9)
    ev.started("a", 10, {"lr": 0.00312345, "width": 16})
    assert lines[-1] == "[    0s] trial a started (1/3): lr=0.00312 width=16"
    for epoch in range(1, 11):
        clock.t += 10
        ev.result("a", epoch, epoch / 20)
    # every 2nd epoch of 10 (about 5 lines a trial), plus the first
    shown = [int(x.split("epoch ")[1].split("/")[0]) for x in lines if " epoch " in x]
    assert shown == [1, 2, 4, 6, 8, 10]
    assert lines[-1] == "[ 1m40s] trial a epoch 10/10: cv_acc_mean 0.5000"
    ev.ended_as("a", "completed", 0.5)
    assert lines[-2] == "[ 1m40s] trial a completed 10 epochs: cv_acc_mean 0.5000"
    # 10 epochs in 100 s; 2 trials x 10 epochs left: 200 s at most
    assert lines[-1] == (
        "[ 1m40s] search s: 1/3 trials done (1 completed), 0 running, best 0.5000 (trial a), "
        "elapsed 1m40s, ETA <= 3m20s"
    )
    ev.started("b", 10)
    clock.t += 10
    ev.result("b", 1, 0.7)
    ev.ended_as("b", "pruned", 0.7)
    assert lines[-2] == "[ 1m50s] trial b pruned at epoch 1/10 (ASHA): cv_acc_mean 0.7000"
    assert "best 0.7000 (trial b)" in lines[-1] and "(1 completed, 1 pruned), 0 running" in lines[-1]
    ev.started("c", 10)
    ev.retried("c", 1, 2, "OSError: disk")
    assert lines[-1] == "[ 1m50s] trial c failed, retry 1 of 2 from its checkpoint (epoch 0): OSError: disk"
    ev.ended_as("c", "failed", error="OSError: disk")
    assert lines[-2] == "[ 1m50s] trial c failed after 0 epoch(s): OSError: disk"
    assert "3/3 trials done" in lines[-1] and "ETA" not in lines[-1]  # nothing left to estimate


def test_overall_line_at_least_every_so_often() -> None:
    clock, lines = Clock(), []
    ev = TrialEvents("s", trials=1, epochs=100, concurrency=1, emit=lines.append, clock=clock, every_s=60)
    ev.started("a", 100)
    for epoch in range(1, 8):
        clock.t += 20
        ev.result("a", epoch, 0.1)
    overall = [x for x in lines if "search s:" in x]
    assert len(overall) == 2 and "0/1 trials done, 1 running" in overall[0]


def test_helpers() -> None:
    assert [fmt_duration(s) for s in (0, 59.4, 61, 3600 * 2 + 61)] == ["0s", "59s", "1m01s", "2h01m"]
    assert [epoch_stride(e) for e in (1, 5, 12, 60)] == [1, 1, 2, 12]


@pytest.mark.ray
def test_verbose_brings_back_tunes_table(
    ray_session: None, tiny_shards: str, mlflow_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from search.cli import main

    argv = ["search", "--smoke", "--shards", tiny_shards, "--tracking-uri", mlflow_uri,
            "--storage", str(tmp_path / "runs"), "--trials", "1", "--name", "loud", "-v"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "== Status ==" in out and "Number of trials: 1/1" in out, out  # Tune's CLIReporter
    assert " started (1/1)" not in out  # and not the event lines


# A retried trial's progress line ("failed, retry 1 of 1 from its checkpoint (epoch N)") is checked
# on the retried trial of tests/test_cv.py::test_killed_fold_worker_fails_the_trial_and_retry_resumes_
# from_checkpoint: the same fault injected and Tune run once, not twice.
