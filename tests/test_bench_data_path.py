"""Smoke test of bench/data_path_bench.py on the synthetic tree and the tiny shards: the seed path
decoded every clip it was given into the seed's features, ours delivered every batch it timed,
cropped by the preset's augmentation, and the ratio and the step split are those of the rates."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import data_path_bench as bench  # noqa: E402

from trainable.config import TrainConfig  # noqa: E402
from trainable.model.features import FeatureParams  # noqa: E402


def test_both_paths_deliver_what_they_time(esc50_tree: Path, tiny_shards: str, tmp_path: Path) -> None:
    out = tmp_path / "data_path.json"
    # seed workers 0 only: a DataLoader worker would fork this test process (and its Ray threads)
    # the compact preset's augmentation on a narrow network: the step split's 12 steps stay cheap
    bench.main(["--source", str(esc50_tree), "--shards", tiny_shards, "--clips", "8", "--repeats", "1",
                "--batches", "4", "--set", "batch_size=16", "--set", "width=4", "--seed-workers", "0",
                "--out", str(out)])  # fmt: skip
    r = json.loads(out.read_text())
    seed, ours = r["delivered"]["seed_workers_0"], r["delivered"]["ours"]
    assert seed["clips"] == r["seed_clips"] == 8
    assert seed["batch_shape"][0] == 8 and seed["batch_shape"][2] == FeatureParams.seed().n_mels
    assert ours["clips"] == r["our_batches"] * r["batch_size"] == 4 * 16
    crop = TrainConfig.preset("compact").crop_frames
    assert ours["batch_shape"] == [16, 1, 16, crop], ours  # tiny shards: 16 mels, cropped as compact does
    assert r["ratio"] == pytest.approx(r["ours_clips_per_s"] / max(r["seed_clips_per_s"].values()))
    s = r["step_split"]
    assert s["data_s"] > 0 and s["forward_backward_s"] > 0 and s["optimizer_s"] > 0
    total = s["data_s"] + s["forward_backward_s"] + s["optimizer_s"]
    assert s["data_fraction"] == pytest.approx(s["data_s"] / total)
    assert s["outside_forward_backward_fraction"] == pytest.approx((s["data_s"] + s["optimizer_s"]) / total)
