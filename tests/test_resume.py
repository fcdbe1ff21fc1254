"""`esc50 search --resume NAME` after the driver was killed: Tune's saved state (searcher included) takes
the search to exactly the requested number of trials, and MLflow gets no duplicate runs or metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from search.cli import main
from search.store import client
from search.study import LOST_ATTR
from tests.fixtures.records import create_store, mlflow_runs, trial_statuses
from tests.test_tracking import assert_agree

TRIALS = 2  # one finished before the kill, one cut off by it


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
    # is there, complete, with MLflow's value. At most one more, told FAIL by the resume: a trial
    # the killed driver had asked Optuna for and Tune never saved (as with MLflow's deleted run above).
    import optuna

    study = optuna.load_study(study_name="res", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    done = {t.user_attrs["tune_trial_id"]: t for t in study.trials if t.state.name == "COMPLETE"}
    assert set(done) == set(runs), (set(done), set(runs))
    for tid, run in runs.items():
        assert done[tid].value == pytest.approx(run.data.metrics["cv_acc_mean"])
    assert len(study.trials) - len(done) <= 1 and all(
        t.state.name == "FAIL" and LOST_ATTR in t.user_attrs
        for t in study.trials
        if t.state.name != "COMPLETE"
    )

    # Resuming a finished search changes nothing.
    assert main(["search", "--resume", "res", *common]) == 0
    parent2, runs2 = mlflow_runs(mlflow_uri, "res")
    assert set(runs2) == set(runs) and parent2.data.metrics == parent.data.metrics
    for rid in (r.info.run_id for r in runs2.values()):
        steps = [m.step for m in c.get_metric_history(rid, "cv_acc_mean")]
        assert steps == [1, 2], steps


@pytest.mark.ray
def test_ctrl_c_in_main_stops_before_promotion_and_the_search_resumes(
    ray_session: None, esc50_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during `esc50 main` (SIGINT to its process group, as a terminal sends it) after the
    first epoch: the running trial is recorded interrupted (not pruned), the search run is not
    finished, main stops before promoting, says how to go on and exits 130; the resume finishes it."""
    import signal

    monkeypatch.chdir(tmp_path)  # main's defaults: ./data, ./runs, ./mlflow.db
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # esc50 main, its driver held after the first epoch until the signal: tests/fixtures/held_driver.py
    argv = [sys.executable, "-m", "tests.fixtures.held_driver", "main", "--smoke", "--trials", "1", "--source", str(esc50_tree), "--name", "cc"]  # fmt: skip
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    log = tmp_path / "main.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        driver = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while " epoch 1/2: " not in log.read_text():
            assert driver.poll() is None, f"main ended before Ctrl-C:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no epoch in time:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        os.killpg(driver.pid, signal.SIGINT)
        rc = driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    text = log.read_text()
    print(f"main until exit: {time.monotonic() - t0:.1f} s\n{text[-4000:]}")
    assert rc == 130, text[-3000:]
    assert "interrupted in the search;" in text, text[-3000:]
    assert "esc50 search --resume cc" in text and "esc50 promote --search cc" in text, text[-3000:]
    parent, runs = mlflow_runs(uri, "cc")
    assert parent.info.status == "KILLED" and parent.data.tags["esc50.state"] == "interrupted"
    ((tid, run),) = runs.items()
    assert (run.data.tags["esc50.status"], run.info.status) == ("interrupted", "KILLED")
    assert not client(uri).search_registered_models()  # nothing promoted
    # The Ctrl-C came while epoch 1's checkpoint was still on its way into Tune's state (the driver
    # was held in that result's callbacks): the stop waited for it, so the epoch is not lost.
    assert "once the checkpoints in flight are saved" in text, text[-3000:]
    assert run.data.tags.get("esc50.checkpoint", "").endswith("checkpoint_000000"), run.data.tags

    # The command it printed goes on: the trial trains to its end in the same run, from epoch 1's
    # checkpoint (Tune's result.json gets epoch 2 only; epoch 1 again would mean it was lost).
    assert main(["search", "--resume", "cc", "--storage", str(tmp_path / "runs"), "-q"]) == 0
    (result_json,) = (tmp_path / "runs" / "cc").glob("*/result.json")
    epochs = [json.loads(line)["epoch"] for line in result_json.read_text().splitlines() if line.strip()]
    assert epochs == [1, 2], epochs
    parent, runs = mlflow_runs(uri, "cc")
    assert parent.info.status == "FINISHED" and list(runs) == [tid]
    assert (runs[tid].data.tags["esc50.status"], runs[tid].info.status) == ("completed", "FINISHED")
    steps = [m.step for m in client(uri).get_metric_history(runs[tid].info.run_id, "cv_acc_mean")]
    assert sorted(steps) == [1, 2], steps
