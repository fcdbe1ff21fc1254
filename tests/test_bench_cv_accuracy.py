"""Smoke test of bench/cv_accuracy.py on the tiny shards: each fold is scored on its own clips and
trained on all the others, the reported mean is the mean of the folds it ran, and runs over
disjoint folds merge into one result (overlapping ones are refused)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import cv_accuracy as bench  # noqa: E402

EPOCHS = 2


def _run(shards: str, folds: str, out: Path) -> dict:
    bench.main(["--shards", shards, "--preset", "smoke", "--folds", folds, "--set", f"epochs={EPOCHS}",
                "--threads", "2", "--out", str(out)])  # fmt: skip
    return json.loads(out.read_text())


def test_each_fold_is_scored_on_its_own_clips_and_runs_merge(tiny_shards: str, tmp_path: Path) -> None:
    runs = [_run(tiny_shards, str(k), tmp_path / f"fold{k}.json") for k in (1, 2)]
    for k, r in zip((1, 2), runs, strict=True):
        assert r["complete"] and list(r["folds"]) == [str(k)] and r["config"]["epochs"] == EPOCHS
        f = r["folds"][str(k)]
        assert (f["val_clips"], f["train_clips"]) == (8, 32)  # 40 tiny clips, 8 per fold
        assert [h["epoch"] for h in f["history"]] == list(range(1, EPOCHS + 1))
        assert f["val_acc"] == f["history"][-1]["val_acc"] and r["mean_acc"] == f["val_acc"]
        assert (
            f["seconds"] == pytest.approx(sum(h["epoch_seconds"] for h in f["history"])) and f["seconds"] > 0
        )
        assert r["machine"]["commit"] and r["shards"] == tiny_shards

    merged_path = tmp_path / "merged.json"
    bench.merge([str(tmp_path / "fold1.json"), str(tmp_path / "fold2.json")], "m", str(merged_path))
    merged = json.loads(merged_path.read_text())
    assert list(merged["folds"]) == ["1", "2"] and merged["complete"]
    assert merged["mean_acc"] == pytest.approx(statistics.mean(r["mean_acc"] for r in runs))
    with pytest.raises(SystemExit, match="more than one run"):
        bench.merge(
            [str(tmp_path / "fold1.json"), str(tmp_path / "fold1.json")], "x", str(tmp_path / "x.json")
        )
