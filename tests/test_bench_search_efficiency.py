"""Smoke tests of bench/search_efficiency_bench.py, both engines, on the tiny shards: each trial
trains what its sampler drew (the optuna engine once trained the defaults in every trial), both arms
are counted by one rule (a COMPLETED trial's final score), and the result JSON can be re-derived."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import search_efficiency_bench as bench  # noqa: E402

SAMPLED = ("lr", "weight_decay", "batch_size", "dropout", "mixup_alpha", "label_smoothing")


def _run(engine: str, shards: str, out: Path, trials: int) -> dict:
    argv = ["--engine", engine, "--shards", shards, "--folds", "1,2", "--val-folds", "1", "--trials", str(trials),
            "--epochs", "2", "--workers", "1", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    return json.loads(out.read_text())


def _assert_trained_what_was_sampled(result: dict) -> None:
    (rep,) = result["repeats"]
    for arm in ("random", "tpe_asha"):
        configs = rep["configs"][arm]
        assert len(configs) >= 2, (arm, configs)
        for c in configs.values():
            assert set(SAMPLED) <= set(c["sampled"])
            for k in SAMPLED:
                assert c["trained"][k] == pytest.approx(c["sampled"][k])
        assert len({c["trained"]["lr"] for c in configs.values()}) == len(configs)  # different configs
    assert bench.check_configs(rep["configs"]["random"]) == []


def _assert_one_rule(result: dict) -> None:
    (rep,) = result["repeats"]
    epochs = result["proxy"]["epochs"]
    rnd = [tuple(e) for e in rep["events"]["random"]]
    tpe = [tuple(e) for e in rep["events"]["tpe_asha"]]
    assert rep["target_B"] == bench.final_best(rnd, epochs) == rep["random"]["best_final"]
    assert rep["random"]["epochs_to_deliver_B"] == bench.delivered(rnd, epochs, rep["target_B"])
    assert rep["tpe_asha"]["epochs_to_deliver_B"] == bench.delivered(tpe, epochs, rep["target_B"])
    assert len(tpe) <= len(rnd) + result["proxy"]["workers"] * epochs  # an equal budget (+ trials in flight)
    assert result["rule"] == bench.RULE and result["verdict"].startswith("not measured: 1 seed")
    m = result["machine"]
    assert len(m["commit"]) == 40 and m["versions"]["torch"] and "--engine" in result["command"]


def test_optuna_engine_trains_what_it_samples(tiny_shards: str, tmp_path: Path) -> None:
    result = _run("optuna", tiny_shards, tmp_path / "optuna.json", trials=3)
    _assert_trained_what_was_sampled(result)
    _assert_one_rule(result)


@pytest.mark.ray
def test_tune_engine_trains_what_it_samples(ray_session: None, tiny_shards: str, tmp_path: Path) -> None:
    result = _run("tune", tiny_shards, tmp_path / "tune.json", trials=2)  # a Tune trial starts slowly
    _assert_trained_what_was_sampled(result)
    _assert_one_rule(result)


def test_delivered_counts_only_completed_trials_and_check_configs_catches_defaults() -> None:
    # (time, trial, epoch, score): trial a peaks at epoch 1 then is stopped; b completes at 0.5
    events = [(1, "a", 1, 0.9), (2, "b", 1, 0.2), (3, "b", 2, 0.5), (4, "c", 1, 0.1), (5, "c", 2, 0.6)]
    assert bench.delivered(events, 2, 0.5) == 3  # not 1: a's epoch 1 was never delivered
    assert bench.delivered(events, 2, 0.6) == 5 and bench.delivered(events, 2, 0.9) is None
    assert bench.final_best(events, 2) == 0.6 and bench.final_best(events, 2, budget=4) == 0.5
    defaults = {"lr": 0.003, "batch_size": 64}
    bug = {str(i): {"sampled": {"lr": 0.01 * (i + 1)}, "trained": dict(defaults)} for i in range(3)}
    problems = bench.check_configs(bug)
    assert "trial 0: sampled lr=0.01 but trained lr=0.003" in problems
    assert "all 3 trials trained the same config" in problems


def _result(seeds: list[int], ratios: list[float | None], proxy: str = "small") -> dict:
    reps = [
        {"seed": s, "ratio": r, "random": {"best_final": 0.2}, "tpe_asha": {"best_final": 0.1 + s / 100,
         "epochs_to_deliver_B": None if r is None else 10}}
        for s, r in zip(seeds, ratios, strict=True)
    ]  # fmt: skip
    return {"engine": "optuna", "rule": bench.RULE, "proxy": {"proxy": proxy, "seed": seeds[0], "repeats": len(seeds)},
            "machine": {}, "repeats": reps, "seconds": 1.0}  # fmt: skip


def test_merge_takes_the_median_over_every_seed_and_refuses_mismatched_runs(tmp_path: Path) -> None:
    """Seeds run side by side are merged into one verdict: the median over all of them, a seed that
    never delivered B counted as infinitely many epochs."""
    parts = [_result([0, 1], [1.06, 2.2]), _result([2, 3], [None, 1.0]), _result([4], [0.58])]
    paths = []
    for i, r in enumerate(parts):
        paths.append(str(tmp_path / f"part{i}.json"))
        Path(paths[-1]).write_text(json.dumps(r))
    bench.merge(paths, tmp_path / "merged.json")
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert [r["seed"] for r in merged["repeats"]] == [0, 1, 2, 3, 4]
    assert merged["median_ratio"] == 1.06 and merged["delivered"] == 4 and merged["verdict"] == "not met"
    assert merged["merged_from"] == paths
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_result([5], [0.1], proxy="wide")))
    with pytest.raises(SystemExit, match="differ"):
        bench.merge([paths[0], str(other)], tmp_path / "x.json")
    with pytest.raises(SystemExit, match="repeat"):
        bench.merge([paths[0], paths[0]], tmp_path / "x.json")
