"""The CV trainable under real Ray (loopback): metrics, checkpoint layout, retry from a checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trainable.config import TrainConfig
from trainable.cv import (
    FoldWorkerError,
    SharedData,
    cv_metrics,
    make_trainable,
    read_checkpoint,
    resolve_config,
    share_data,
    write_checkpoint,
)
from trainable.fold_worker import split_fold, state_to_bytes
from trainable.model.checkpoint import read_checkpoint as read_checkpoint_states
from trainable.model.checkpoint import read_oof
from trainable.protocol import METRIC, metric_names

SMOKE = TrainConfig.preset("smoke").to_dict()


def test_resolve_config_is_strict_and_names_the_key() -> None:
    assert resolve_config({"lr": 0.01, "epochs": 5}) == TrainConfig(lr=0.01, epochs=5)
    with pytest.raises(ValueError, match="learning_rate"):
        resolve_config({"learning_rate": 0.01})
    with pytest.raises(ValueError, match="batch_size"):
        resolve_config({"batch_size": 0})


def test_cv_metrics_mean_std_and_fold_names() -> None:
    m = cv_metrics(
        {
            2: {"val_acc": 0.5, "val_loss": 1.0, "train_loss": 2.0},
            4: {"val_acc": 1.0, "val_loss": 0.0, "train_loss": 1.0},
        },
        epoch=3,
        seconds=1.5,
    )
    assert m["cv_acc_mean"] == 0.75 and m["cv_acc_std"] == 0.25 and m["cv_loss_mean"] == 0.5
    assert m["fold2_acc"] == 0.5 and m["fold4_loss"] == 0.0 and m["epoch"] == 3
    assert set(m) == set(metric_names((2, 4)))


def test_split_fold_takes_its_rows_out_of_read_only_shared_arrays() -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.standard_normal((10, 4, 6)).astype(np.float32),
        "y": np.arange(10, dtype=np.int64),
        "fold": np.array([1, 2, 3, 4, 5] * 2, dtype=np.int64),
    }
    for a in arrays.values():
        a.setflags(write=False)  # as numpy arrays come out of Ray's object store
    x_train, y_train, x_val, y_val = split_fold(arrays, 3)
    assert y_val.tolist() == [2, 7] and len(y_train) == 8 and 2 not in y_train.tolist()
    assert x_train.shape == (8, 4, 6) and np.array_equal(x_val.numpy(), arrays["x"][[2, 7]])
    x_train.add_(1.0)  # its own writable copy: the shared arrays stay untouched
    assert not np.shares_memory(x_train.numpy(), arrays["x"])
    with pytest.raises(ValueError, match="fold 6"):
        split_fold(arrays, 6)


def test_checkpoint_roundtrip_and_missing_fold(tmp_path: Path, tiny_params) -> None:
    shared = SharedData(
        arrays=[],
        features=tiny_params.to_dict(),
        classes=("a", "b"),
        fingerprint="abc",
        folds_present=(1, 2, 3, 4, 5),
        n_clips=10,
        shards="/data/shards",
    )
    cfg = resolve_config(SMOKE)
    states = {1: state_to_bytes({"epoch": 3, "w": torch.ones(2)}), 4: state_to_bytes({"epoch": 3})}
    write_checkpoint(tmp_path, cfg, shared, states, 3, {"cv_acc_mean": 0.5, "epoch": 3}, {1: "n1", 4: "n2"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fold_1.pt", "fold_4.pt", "meta.json"]
    meta, loaded = read_checkpoint_states(tmp_path)
    assert meta["folds"] == [1, 4] and meta["epoch"] == 3 and meta["shards"] == "/data/shards"
    assert meta["nodes"] == {"1": "n1", "4": "n2"} and meta["fingerprint"] == "abc"
    assert resolve_config(meta["config"]) == cfg and meta["features"] == tiny_params.to_dict()
    assert torch.equal(loaded[1]["w"], torch.ones(2))
    with pytest.raises(ValueError, match=r"no state for fold\(s\) \[2\]"):
        read_checkpoint(tmp_path, folds=(1, 2))


def test_make_trainable_rejects_bad_arguments(tiny_shards: str) -> None:
    with pytest.raises(ValueError, match="official"):
        make_trainable(tiny_shards, folds=(0, 6))
    with pytest.raises(ValueError, match="strategy"):
        make_trainable(tiny_shards, strategy="SIDEWAYS")


def _tune(trainable, config: dict, tmp_path: Path, name: str, max_failures: int = 0, stop=None, callbacks=()):
    from ray import tune

    tuner = tune.Tuner(
        trainable,
        param_space=config,
        tune_config=tune.TuneConfig(num_samples=1, metric=METRIC, mode="max"),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(tmp_path / "tune"),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            stop=stop,
            callbacks=list(callbacks),
            verbose=0,
        ),
    )
    return tuner.fit()


@pytest.mark.ray
def test_two_fold_trial_reports_fold_mean_and_writes_contract_checkpoint(
    ray_session: None, tiny_shards: str, tiny_params, tmp_path: Path
) -> None:
    import ray

    from trainable.shards import load_shards

    data = load_shards(tiny_shards)
    shared = share_data(data)  # what make_trainable does with a FoldData; once per search
    arrays = ray.get(shared.arrays[0])
    assert arrays["x"].dtype == np.float16  # float16 shards: shared as float16, losslessly
    assert arrays["x"].shape == (len(data), *tiny_params.shape) and not arrays["x"].flags.writeable
    assert np.array_equal(arrays["x"].astype(np.float32), data.x.squeeze(1).numpy())
    del arrays
    trainable = make_trainable(shared, folds=(1, 2), cpus_per_fold=1.0)
    # Stopped by Tune after epoch 2 of 3, as ASHA stops a trial: its fold workers must go too.
    results = _tune(trainable, {**SMOKE, "epochs": 3}, tmp_path, "two_fold", stop={"epoch": 2})
    assert not results.errors, results.errors
    result = results[0]
    m = result.metrics
    assert m["epoch"] == 2
    assert m["cv_acc_mean"] == pytest.approx((m["fold1_acc"] + m["fold2_acc"]) / 2)
    assert "fold3_acc" not in m
    history = result.metrics_dataframe
    assert list(history["epoch"]) == [1, 2]

    assert result.checkpoint is not None
    with result.checkpoint.as_directory() as d:
        files = sorted(p.name for p in Path(d).iterdir())
        assert {"meta.json", "fold_1.pt", "fold_2.pt"} <= set(files)
        assert "oof.npz" not in files  # stopped before its last epoch: no out-of-fold predictions
        meta, states = read_checkpoint_states(d)
    assert meta["epoch"] == 2 and meta["folds"] == [1, 2]
    assert TrainConfig.from_dict(meta["config"]) == TrainConfig.from_dict({**SMOKE, "epochs": 3})
    assert meta["features"] == tiny_params.to_dict()
    assert meta["classes"] == list(data.classes)
    assert meta["fingerprint"] == data.info["fingerprint"]
    assert states[1]["fold"] == 1 and states[2]["epoch"] == 2
    assert set(meta["nodes"]) == {"1", "2"}
    assert meta["metrics"]["cv_acc_mean"] == pytest.approx(m["cv_acc_mean"])
    assert meta["shards"] is None  # given a FoldData, not a URI
    _assert_all_resources_free()


def _assert_all_resources_free(timeout: float = 15.0) -> None:
    """Every CPU of the session is free again: no fold worker outlived its trial."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        free, total = ray.available_resources().get("CPU", 0), ray.cluster_resources()["CPU"]
        if free == total:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{total - free} CPU(s) still held after the trial ended")
        time.sleep(0.2)


@pytest.mark.ray
def test_killed_fold_worker_fails_the_trial_and_retry_resumes_from_checkpoint(
    ray_session: None, tiny_shards: str, tmp_path: Path
) -> None:
    from search.tune_progress import TrialProgress
    from trainable.shards import load_shards

    marker = tmp_path / "fold2_crashed"
    # Fold 2's worker exits hard before epoch 3 on the first attempt only (the marker file).
    trainable = make_trainable(tiny_shards, folds=(1, 2), cpus_per_fold=1.0, fail_at=(2, 3, str(marker)))
    lines: list[str] = []  # the search's progress lines (search/tune_progress.py), as a search prints them
    progress = TrialProgress("retry", 1, 4, 1, max_failures=1)
    progress._emit = lines.append
    results = _tune(
        trainable, {**SMOKE, "epochs": 4}, tmp_path, "retry", max_failures=1, callbacks=[progress]
    )
    assert marker.exists(), "the fault was not injected"
    assert not results.errors, results.errors
    result = results[0]
    assert result.metrics["epoch"] == 4
    # The first attempt checkpointed epoch 2 and died before epoch 3; the retry restored that
    # checkpoint and trained only epochs 3 and 4 (from zero it would have trained 4 since restore).
    assert result.metrics["iterations_since_restore"] == 2, result.metrics
    assert result.metrics["training_iteration"] == 4
    with result.checkpoint.as_directory() as d:
        meta, states = read_checkpoint_states(d)
        oof = read_oof(d)  # the final epoch's out-of-fold predictions, after a retry too
    assert [h["epoch"] for h in states[2]["history"]] == [1, 2, 3, 4]
    data = load_shards(tiny_shards)
    assert oof["row"].tolist() == np.nonzero(np.isin(data.fold.numpy(), [1, 2]))[0].tolist()
    assert (oof["fold"] == data.fold.numpy()[oof["row"]]).all()
    assert (oof["label"] == data.y.numpy()[oof["row"]]).all()
    for k in (1, 2):  # each fold's predictions score exactly its reported accuracy
        mine = oof["fold"] == k
        acc = (oof["pred"][mine] == oof["label"][mine]).mean()
        assert acc == pytest.approx(result.metrics[f"fold{k}_acc"], abs=1e-6)
    assert meta["shards"] == str(Path(tiny_shards).resolve())
    # The retry is one progress line (it was tests/test_progress.py's own retried trial).
    events = [x.split("] ", 1)[1] for x in lines]
    retries = [e for e in events if "failed, retry 1 of 1 from its checkpoint (epoch 2)" in e]
    assert len(retries) == 1, events
    assert any(e.endswith("completed 4 epochs: cv_acc_mean " + e.rsplit(" ", 1)[-1]) for e in events), events
    assert events[-1].startswith("search retry: 1/1 trials done (1 completed)"), events
    _assert_all_resources_free()


@pytest.mark.ray
def test_killed_fold_worker_without_retries_names_the_fold(
    ray_session: None, tiny_shards: str, tmp_path: Path
) -> None:
    marker = tmp_path / "fold3_crashed"
    trainable = make_trainable(tiny_shards, folds=(3,), cpus_per_fold=1.0, fail_at=(3, 1, str(marker)))
    results = _tune(trainable, SMOKE, tmp_path, "noretry", max_failures=0)
    assert len(results.errors) == 1
    err = str(results.errors[0])
    assert "fold 3 worker died (epoch 1)" in err and FoldWorkerError.__name__ in err
