"""Smoke test of bench/cpu_bf16_bench.py: its two arms differ in bf16 autocast and in nothing else,
and its figures are the medians of the epochs it timed."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import cpu_bf16_bench  # noqa: E402

from trainable.fold import bf16_is_fast  # noqa: E402


def test_compares_bf16_against_float32_on_the_same_recipe(tmp_path: Path) -> None:
    out = tmp_path / "bf16.json"
    assert cpu_bf16_bench.main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (run,) = result["recipes"].values()
    # the arms: float32 against bf16 where this CPU runs it fast (else both float32, and it says so)
    fast = bf16_is_fast(torch.device("cpu"))
    assert result["bf16_is_fast_on_this_cpu"] is fast
    assert run["autocast"] == {"fp32_arm": False, "bf16_arm": fast}
    for arm in ("fp32", "bf16"):
        seconds = run["epoch_seconds"][arm]
        assert len(seconds) == result["repeats"] == 2 and all(s > 0 for s in seconds)
        assert run["median_epoch_seconds"][arm] == statistics.median(seconds)
    med = run["median_epoch_seconds"]
    assert run["fp32_over_bf16"] == med["fp32"] / med["bf16"]
    assert len(result["machine"]["commit"]) == 40 and "--smoke" in result["command"]
