"""Smoke test of bench/prepare_bench.py on the synthetic 40-clip tree: every arm it times (our
`esc50 prepare`, the per-clip baseline, decoding alone) processed every clip, the speed-ups are
the ratios of its own medians, and each storage dtype was written, read back and compared."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import prepare_bench as bench  # noqa: E402


def test_every_arm_processes_every_clip_and_each_dtype_is_read_back(esc50_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepare.json"
    bench.main(["--source", str(esc50_tree), "--repeats", "1", "--loads", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    p = r["prepare"]
    arms = ("ours", "baseline", "decode_only")
    assert p["clips_processed"] == {k: [40] for k in arms}, p["clips_processed"]
    for k in arms:
        assert p["median_wall_s"][k] == p["wall_s"][k][0] > 0 and p["median_cpu_s"][k] > 0
    assert p["speedup_vs_baseline_wall"] == pytest.approx(
        p["median_wall_s"]["baseline"] / p["median_wall_s"]["ours"]
    )
    assert p["speedup_vs_baseline_cpu"] == pytest.approx(
        p["median_cpu_s"]["baseline"] / p["median_cpu_s"]["ours"]
    )

    d = r["dtypes"]
    assert set(d) == {"float32", "float16", "uint8"}
    assert d["float32"]["bytes"] > d["float16"]["bytes"] > d["uint8"]["bytes"]  # really each dtype
    assert d["float32"]["max_abs_error_db"] < 1e-3 < d["uint8"]["max_abs_error_db"] < 1.0
    assert d["float16"]["max_abs_error_db"] < 0.1
    for v in d.values():
        assert v["load_all_5_median_s"] > 0 and len(v["load_all_5_s"]) == 1
    assert r["machine"]["commit"] and r["source"] == str(esc50_tree.resolve())
