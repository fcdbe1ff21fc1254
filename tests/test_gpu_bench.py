"""bench/gpu_bench.py end to end in its CPU smoke mode: every step runs and the JSON says what it measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ray
def test_gpu_bench_smoke_writes_every_measurement(
    ray_session: None, tiny_shards: str, tmp_path: Path
) -> None:
    import ray

    out = tmp_path / "gpu_bench.json"
    epochs = 2  # a warm-up epoch and one timed: the rates below are over the timed ones
    # The ASHA search is stopped 3 s after its first trial shows in MLflow: enough to count trials.
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--smoke", "--shards", tiny_shards,
           "--out", str(out), "--budget", "900", "--layout-epochs", str(epochs), "--search-minutes", "0.05",
           # every step on the tests' shared Ray (three Ray start-ups fewer; the Ctrl-C test of
           # tests/test_resume.py runs `esc50 main` with a Ray of its own)
           "--ray-address", ray.get_runtime_context().gcs_address]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ""}  # no default Ray: each step connects or starts as told
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    print({k: round(v.get("seconds", -1), 1) for k, v in r["steps"].items()}, f"total {r['seconds']:.1f} s")
    assert r["smoke"] is True and r["machine"]["torch"] and "--ray-address" in r["command"]
    assert set(r["steps"]) == {"layouts", "full", "promote", "predict", "search"}, r["steps"].keys()

    layouts = r["steps"]["layouts"]
    assert layouts["flops_per_fold_epoch"] > 1e6  # a real count of a training epoch, not zero
    runs = {x["layout"]: x for x in layouts["runs"]}
    assert set(runs) == {"alone", "workers", "packed"}
    # Fold-epochs counted per fold, for every layout: the packed worker's epochs count 2 each (the
    # smoke's 2 folds: a count per worker or per call, not per fold, would give `epochs`).
    assert layouts["folds"] == runs["workers"]["folds"] == runs["packed"]["folds"] == [1, 2]
    assert runs["alone"]["fold_epochs"] == epochs and runs["alone"]["folds"] == [1]
    assert runs["workers"]["fold_epochs"] == runs["packed"]["fold_epochs"] == 2 * epochs
    for x in runs.values():
        assert len(x["epoch_seconds"]) == epochs and all(s > 0 for s in x["epoch_seconds"])
        steady = x["epoch_seconds"][1:]
        assert x["fold_epochs_per_s"] == pytest.approx(len(x["folds"]) * len(steady) / sum(steady))
        assert x["tflops"] == pytest.approx(x["fold_epochs_per_s"] * layouts["flops_per_fold_epoch"] / 1e12)

    full = r["steps"]["full"]
    assert full["rc"] == 0, full["output_tail"]
    assert len(full["trials"]) == 1 and full["trials"][0]["status"] == "completed"
    assert 0.0 <= full["cv_acc_mean"] <= 1.0 and isinstance(full["within_1_point_of_90_6"], bool)
    assert full["gpu"]["busy_fraction"] is None  # no nvidia-smi here: no samples, not a made-up figure
    assert r["steps"]["promote"]["rc"] == 0, r["steps"]["promote"]["output_tail"]
    predict = r["steps"]["predict"]
    assert predict["rc"] == 0 and "clip.wav" in predict["output_tail"], predict["output_tail"]

    search = r["steps"]["search"]
    assert search["interrupted"] and not search["killed"], search["output_tail"]
    assert sum(search["counts"].values()) == len(search["trials"]) >= 1
    assert search["ended_per_hour"] >= 0 and search["goal_80_percent_busy_met"] is None
    assert r["seconds"] < 900
