"""`esc50 search --resume NAME` after the driver was killed: Tune's saved state (searcher included) takes
the search to exactly the requested number of trials, and MLflow gets no duplicate runs or metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from search.cli import main
from search.store import client
from tests.fixtures.records import create_store, mlflow_runs, trial_statuses
from tests.test_tracking import assert_agree

TRIALS = 3


@pytest.mark.ray
def test_resume_after_the_driver_is_killed(
    ray_session: None, tiny_shards: str, mlflow_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    storage = tmp_path / "runs"
    common = ["--storage", str(storage), "-q"]
    argv = [
        sys.executable, "-m", "search", "search", "--smoke", "--name", "res", "--trials", str(TRIALS),
        "--concurrency", "1", "--no-asha", "--shards", tiny_shards, "--tracking-uri", mlflow_uri,
        "--address", ray.get_runtime_context().gcs_address, *common,
    ]  # fmt: skip
    log = tmp_path / "driver.log"
    create_store(mlflow_uri)  # not at once by the driver and the polling below
    with open(log, "w") as out:
        driver = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=dict(os.environ)
        )
    try:
        # Kill the driver (SIGKILL: no chance to save anything) once its first trial has finished.
        deadline = time.monotonic() + 180
        while "completed" not in trial_statuses(mlflow_uri, "res").values():
            assert driver.poll() is None, f"the search ended before it was killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no trial finished in time:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)
        driver.kill()
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    before = trial_statuses(mlflow_uri, "res")
    assert 1 <= list(before.values()).count("completed") < TRIALS, before
    parent, _ = mlflow_runs(mlflow_uri, "res")
    assert parent.info.status == "RUNNING"  # it never ended: the driver died

    # Resume in this process (same Ray cluster); the saved options say everything else.
    assert main(["search", "--resume", "res", *common]) == 0, capsys.readouterr().err
    parent, runs = mlflow_runs(mlflow_uri, "res")  # asserts one parent and one run per trial
    assert parent.info.status == "FINISHED" and parent.data.tags["esc50.resumed"] == "1"
    assert len(runs) == TRIALS
    for tid, status in before.items():
        if status == "completed":  # finished before the kill: kept, not run again
            assert runs[tid].data.tags["esc50.status"] == "completed"
    statuses = assert_agree(mlflow_uri, "res", storage / "res", (1, 2), set(runs))
    assert list(statuses.values()) == ["completed"] * TRIALS
    c = client(mlflow_uri)
    deleted = c.search_runs([parent.info.experiment_id], "tags.`esc50.search` = 'res'", run_view_type=2)
    assert len(deleted) <= 1  # at most the run of a trial Tune never saved, deleted (not a duplicate)

    # The resumed search went on in the same stored Optuna study (search/study.py): every Tune trial
    # is there, complete, with MLflow's value. At most one more, still RUNNING: a trial the killed
    # driver had asked Optuna for and Tune never saved (as with MLflow's deleted run above).
    import optuna

    study = optuna.load_study(study_name="res", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    done = {t.user_attrs["tune_trial_id"]: t for t in study.trials if t.state.name == "COMPLETE"}
    assert set(done) == set(runs), (set(done), set(runs))
    for tid, run in runs.items():
        assert done[tid].value == pytest.approx(run.data.metrics["cv_acc_mean"])
    assert len(study.trials) - len(done) <= 1 and all(
        t.state.name == "RUNNING" for t in study.trials if t.state.name != "COMPLETE"
    )

    # Resuming a finished search changes nothing.
    assert main(["search", "--resume", "res", *common]) == 0
    parent2, runs2 = mlflow_runs(mlflow_uri, "res")
    assert set(runs2) == set(runs) and parent2.data.metrics == parent.data.metrics
    for rid in (r.info.run_id for r in runs2.values()):
        steps = [m.step for m in c.get_metric_history(rid, "cv_acc_mean")]
        assert steps == [1, 2], steps
