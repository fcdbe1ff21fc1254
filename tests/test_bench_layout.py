"""Smoke test of bench/layout_bench.py (the CPU comparison of fold layouts) in the shared Ray session:
each arm is trained by its own layout (one FoldWorker per fold against one PackedFoldWorker for
all), both arms train the same config for the same epochs, and the ratios are those of the runs."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import layout_bench as bench  # noqa: E402


@pytest.mark.ray
def test_each_arm_runs_its_own_layout_on_the_same_training(ray_session: None, tmp_path: Path) -> None:
    out = tmp_path / "layout.json"
    epochs = 2
    assert bench.main(["--smoke", "--epochs", str(epochs), "--cpus-per-fold", "0.5", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    runs = {x["layout"]: x for x in r["runs"]}
    assert len(r["runs"]) == 2 and set(runs) == {"workers", "packed"}
    folds = len(r["folds"])
    assert runs["workers"]["actors"] == {"FoldWorker": folds}, runs["workers"]["actors"]
    assert runs["packed"]["actors"] == {"PackedFoldWorker": 1}, runs["packed"]["actors"]
    assert r["config"]["epochs"] == epochs
    for x in runs.values():
        assert (
            x["epochs"] == epochs
            and len(x["epoch_seconds"]) == epochs
            and all(s > 0 for s in x["epoch_seconds"])
        )
        assert x["trial_seconds"] > sum(x["epoch_seconds"]) * 0.5 and 0.0 <= x["cv_acc_mean"] <= 1.0
        assert x["epoch_seconds_median"] == pytest.approx(statistics.median(x["epoch_seconds"]))
    trial = r["median_trial_seconds"]
    assert trial == {k: runs[k]["trial_seconds"] for k in ("workers", "packed")}
    assert r["packed_over_workers_trial"] == pytest.approx(trial["packed"] / trial["workers"])
    epoch = r["median_epoch_seconds"]
    assert r["packed_over_workers_epoch"] == pytest.approx(epoch["packed"] / epoch["workers"])
    assert r["machine"]["commit"] and "--smoke" in r["command"]
