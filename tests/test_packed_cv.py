"""The packed fold layout under real Ray (loopback): the trial, its placement group, retry after a
killed worker, resume across layouts, and a search whose per-fold metrics reach MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest

from search.concurrency import trial_resources
from search.options import SearchOptions
from tests.test_cv import SMOKE, _assert_all_resources_free, _tune
from trainable.cv import TRIAL_CPUS, make_trainable
from trainable.layout import resolve_layout, trial_bundles
from trainable.model.checkpoint import read_checkpoint as read_checkpoint_states
from trainable.model.checkpoint import state_from_bytes


def _bundles(trainable) -> list[dict[str, float]]:
    """The placement group a trainable made by make_trainable asks Tune for."""
    return trainable._resources.bundles


@pytest.mark.ray
def test_each_layouts_placement_group(ray_session: None, tiny_shards: str) -> None:
    folds = (1, 2, 3)
    workers = make_trainable(tiny_shards, folds=folds, cpus_per_fold=0.5, layout="workers")
    assert _bundles(workers) == [{"CPU": TRIAL_CPUS}] + [{"CPU": 0.5}] * 3
    packed = make_trainable(tiny_shards, folds=folds, cpus_per_fold=0.5, layout="packed")
    assert _bundles(packed) == [{"CPU": TRIAL_CPUS}, {"CPU": 1.5}]
    # On GPUs: the packed trial holds the folds' GPU share in its one bundle, at most one GPU.
    assert trial_bundles(5, 1.0, 0.1, "packed") == [{"CPU": 5.0, "GPU": 0.5}]
    assert trial_bundles(5, 1.0, 0.4, "packed") == [{"CPU": 5.0, "GPU": 1.0}]
    assert trial_bundles(2, 1.0, 0.2, "workers") == [{"CPU": 1.0, "GPU": 0.2}] * 2
    assert resolve_layout("auto", 0.2) == "packed"
    assert resolve_layout("auto", 0.0) in ("workers", "packed")
    with pytest.raises(ValueError, match="fold layout 'sideways'"):
        make_trainable(tiny_shards, layout="sideways")
    # What search/concurrency.py counts per trial: the same CPUs in both layouts, GPUs capped packed.
    five = {"folds": (1, 2, 3, 4, 5), "cpus_per_fold": 1.0}
    assert trial_resources(SearchOptions(**five, gpus_per_fold=0.1, fold_layout="packed")) == pytest.approx(
        (5.1, 0.5)
    )
    assert trial_resources(SearchOptions(**five, gpus_per_fold=0.4, fold_layout="workers")) == pytest.approx(
        (5.1, 2.0)
    )
    assert trial_resources(SearchOptions(**five, gpus_per_fold=0.4)) == pytest.approx((5.1, 1.0))  # auto


@pytest.mark.ray
def test_packed_trial_retries_from_its_checkpoint_after_the_worker_is_killed(
    ray_session: None, tiny_shards: str, tmp_path: Path
) -> None:
    marker = tmp_path / "packed_crashed"
    # The packed worker (folds 1 and 2) exits hard before epoch 3 on the first attempt only.
    trainable = make_trainable(
        tiny_shards, folds=(1, 2), cpus_per_fold=1.0, fail_at=(2, 3, str(marker)), layout="packed"
    )
    results = _tune(trainable, {**SMOKE, "epochs": 4}, tmp_path, "packed_retry", max_failures=1)
    assert marker.exists(), "the fault was not injected"
    assert "packed worker" in marker.read_text()
    assert not results.errors, results.errors
    m = results[0].metrics
    assert m["epoch"] == 4 and m["iterations_since_restore"] == 2, m  # resumed at epoch 2's checkpoint
    assert m["cv_acc_mean"] == pytest.approx((m["fold1_acc"] + m["fold2_acc"]) / 2)
    with results[0].checkpoint.as_directory() as d:
        assert {"meta.json", "fold_1.pt", "fold_2.pt"} <= {p.name for p in Path(d).iterdir()}
        meta, states = read_checkpoint_states(d)
    assert meta["epoch"] == 4 and meta["folds"] == [1, 2]
    assert [h["epoch"] for h in states[1]["history"]] == [1, 2, 3, 4]
    assert states[2]["fold"] == 2 and set(meta["nodes"]) == {"1", "2"}
    _assert_all_resources_free()


@pytest.mark.ray
def test_fold_worker_states_resume_in_a_packed_worker_and_back(ray_session: None, tiny_shards: str) -> None:
    import ray

    from trainable.cv import share_data
    from trainable.fold_worker import FoldWorker
    from trainable.packed_worker import PackedFoldWorker

    cfg = {**SMOKE, "epochs": 3, "bf16": False}  # float32: the layouts agree up to float rounding
    shared = share_data(tiny_shards)
    alone = {k: FoldWorker.remote(shared.arrays, k, cfg) for k in (1, 2)}
    packed = PackedFoldWorker.remote(shared.arrays, [1, 2], cfg)
    try:
        first = {k: ray.get(w.run_epoch.remote(True)) for k, w in alone.items()}
        # epoch 1 alone -> epoch 2 packed -> epoch 3 alone again, against epochs 2-3 alone
        assert ray.get([packed.load_state.remote(first[k][1], f"fold_{k}.pt") for k in (1, 2)]) == [1, 1]
        second = ray.get(packed.run_epoch.options(num_returns=2).remote(True))
        reference = {k: ray.get(w.run_epoch.remote(False))[0] for k, w in alone.items()}
        for (m, blob, oof), k in zip(second, (1, 2), strict=True):
            assert m["fold"] == k and m["epoch"] == 2 and oof is None  # out-of-fold: final epoch only
            assert m["train_loss"] == pytest.approx(reference[k]["train_loss"], rel=1e-3)
            assert m["val_acc"] == pytest.approx(reference[k]["val_acc"])
            assert state_from_bytes(blob)["epoch"] == 2
        again = {k: FoldWorker.remote(shared.arrays, k, cfg) for k in (1, 2)}
        assert ray.get([again[k].load_state.remote(second[i][1]) for i, k in enumerate((1, 2))]) == [2, 2]
        third = {k: ray.get(w.run_epoch.remote(False))[0] for k, w in again.items()}
        reference = {k: ray.get(w.run_epoch.remote(False))[0] for k, w in alone.items()}
        for k in (1, 2):
            assert third[k]["train_loss"] == pytest.approx(reference[k]["train_loss"], rel=1e-3)
        with pytest.raises(ray.exceptions.RayTaskError, match="not one of this worker's folds"):
            three = FoldWorker.remote(shared.arrays, 3, cfg)
            ray.get(packed.load_state.remote(ray.get(three.state.remote()), "fold_3.pt"))
    finally:
        for w in [*alone.values(), packed, *locals().get("again", {}).values()]:
            ray.kill(w)


@pytest.mark.ray
def test_packed_search_records_per_fold_metrics_in_mlflow(
    ray_session: None, tiny_shards: str, mlflow_uri: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from search.tune import run_search

    opts = SearchOptions(
        name="packed",
        smoke=True,
        trials=1,
        shards=tiny_shards,
        storage=str(tmp_path / "runs"),
        tracking_uri=mlflow_uri,
        fold_layout="packed",
        verbose=0,
    )
    result = run_search(opts)
    assert result.counts.get("completed") == 1, result
    saved = (tmp_path / "runs" / "packed" / "esc50_search.json").read_text()
    assert '"fold_layout": "packed"' in saved
    c = MlflowClient(mlflow_uri)
    (run,) = c.search_runs([c.get_experiment_by_name("esc50").experiment_id], "tags.`esc50.role` = 'trial'")
    for k in (1, 2):
        assert [m.step for m in c.get_metric_history(run.info.run_id, f"fold{k}_acc")] == [1, 2]
    assert run.data.metrics["cv_acc_mean"] == pytest.approx(
        (run.data.metrics["fold1_acc"] + run.data.metrics["fold2_acc"]) / 2
    )
    # the final checkpoint holds the out-of-fold predictions, scored as the per-fold accuracies were
    from trainable.model.checkpoint import read_oof

    oof = read_oof(result.best_checkpoint)
    for k in (1, 2):
        mine = oof["fold"] == k
        acc = float((oof["pred"][mine] == oof["label"][mine]).mean())
        assert acc == pytest.approx(run.data.metrics[f"fold{k}_acc"], abs=1e-6)


def test_fold_layout_option_is_parsed_checked_and_saved(tmp_path: Path) -> None:
    from search.cli import build_parser, search_options
    from search.errors import UserError

    args = build_parser().parse_args(["search", "--fold-layout", "packed", "--gpus-per-fold", "0.1"])
    opts = search_options(args)
    assert opts.fold_layout == "packed"
    resolved = opts.resolve()
    assert SearchOptions.from_json(resolved.to_json()).fold_layout == "packed"
    # A search saved before the option existed resumes with the default.
    old = {k: v for k, v in resolved.to_dict().items() if k != "fold_layout"}
    assert SearchOptions.from_dict(old).fold_layout == "auto"
    with pytest.raises(UserError, match="--fold-layout 'sideways'"):
        SearchOptions(fold_layout="sideways", storage=str(tmp_path)).resolve()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["search", "--fold-layout", "sideways"])
