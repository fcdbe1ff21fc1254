"""Smoke test of bench/predict_bench.py: it times the promoted (trained) model it is given, says so
in its result file, and the model's accuracy on the timed clips shows it is trained."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import predict_bench  # noqa: E402


def test_times_the_promoted_model_and_shows_it_is_trained(promoted, esc50_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "predict.json"
    argv = ["--model", f"models:/{promoted.name}@champion", "--tracking-uri", promoted.uri,
            "--audio", str(esc50_tree / "audio"), "--clips", "4", "--batch", "2", "--json", str(out)]  # fmt: skip
    assert predict_bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["trained"] is True and result["version_tags"]["version"] == promoted.version
    assert float(result["version_tags"]["cv_acc_mean"]) > 0.5
    # the tiny model learned the 4 tone classes: far above chance (0.25) on the timed clips
    assert result["accuracy_on_timed_clips"] >= 0.75
    assert len(result["raw"]["pyfunc_s"]) == result["clips"] == 4
    assert len(result["machine"]["commit"]) == 40 and "--model" in result["command"]
