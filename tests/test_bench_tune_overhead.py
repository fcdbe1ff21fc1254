"""Smoke test of bench/tune_overhead_bench.py on the tiny shards: both arms (a Tune + MLflow trial and
the bare loop) train the same models, so its timings compare like with like, and the result file
is re-derivable (command, commit, raw per-repeat timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ray
def test_both_arms_train_the_same_and_the_result_is_kept(tiny_shards: str, tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    argv = [sys.executable, str(ROOT / "bench" / "tune_overhead_bench.py"), "--shards", tiny_shards,
            "--folds", "1,2", "--epochs", "1", "--repeats", "1", "--clips-per-fold", "0", "--width", "4",
            "--depth", "2", "--cpus-per-fold", "0.5", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["same_training"] is True, (result["bare"], result["tune"])
    assert len(result["bare"]) == len(result["tune"]) == 1 and result["mlflow"] is True
    assert result["median_bare_wall_s"] > 0 and result["median_tune_wall_s"] > 0
    assert len(result["machine"]["commit"]) == 40 and "--repeats" in result["command"]
