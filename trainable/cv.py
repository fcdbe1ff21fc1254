"""The Ray Tune trainable: one trial = one config, cross-validated on the official folds at once.

`make_trainable` puts the data into Ray's object store once (`share_data`) and returns
`cv_trainable` with its resources: one fold worker per fold (trainable/fold_worker.py), or one
packed worker for all of them (trainable/layout.py). The folds train in lock-step, one
`tune.report` per epoch (`cv_metrics`; names in trainable/protocol.py) and a checkpoint every
`checkpoint_every` epochs (layout: trainable/model/checkpoint.py). The trial process imports neither
torch nor the data modules: it only coordinates (seconds per trial on a small CPU).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import tune
from ray.tune import PlacementGroupFactory

from trainable.config import TrainConfig
from trainable.fold_worker import FoldWorker
from trainable.layout import resolve_layout, trial_bundles, worker_threads
from trainable.model import checkpoint as checkpoints
from trainable.protocol import FOLDS, METRIC, check_folds

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
TRIAL_CPUS = 0.1  # bundle 0: the trial function only coordinates its fold workers


class FoldWorkerError(RuntimeError):
    """A fold worker of a trial died or failed; the message names the fold and the epoch."""


def resolve_config(config: Mapping[str, Any]) -> TrainConfig:
    """A trial's config dict (Tune/Optuna: sampled params + constants) -> TrainConfig.

    Strict: every key must be a TrainConfig field (an unknown key is a ValueError naming it), and
    every value is checked. Missing keys take TrainConfig's defaults.
    """
    try:
        return TrainConfig.from_dict(dict(config))
    except TypeError as e:  # e.g. a non-string key
        raise ValueError(f"invalid training config: {e}") from None


# ---- the data, shared once per search ---------------------------------------------------------


@dataclass(frozen=True)
class SharedData:
    """What a trial needs to know about the search's data, plus the ObjectRef of the arrays.

    `arrays` is a one-element list holding the ref of {"x": (N, n_mels, frames) float16 when the
    shards store float16 (lossless), else float32, "y": (N,) int64,
    "fold": (N,) int64} numpy arrays in the object store (a list, so Ray passes the ref on to the
    fold workers instead of fetching the arrays into the trial process).
    """

    arrays: list[Any]
    features: dict[str, Any]
    classes: tuple[str, ...]
    fingerprint: str | None
    folds_present: tuple[int, ...]
    n_clips: int
    info: dict[str, Any] = field(default_factory=dict)
    shards: str | None = None  # the shards URI, when the data was given as one


def share_data(data: Any, folds: Iterable[int] | None = None) -> SharedData:
    """Put the search's data into Ray's object store, once. Needs `ray.init()` first.

    `data`: a `trainable.shards.FoldData`, a shards URI (loaded here, in the driver), or a
    `SharedData` (returned as is, so several searches/resumes can reuse one put).
    """
    if isinstance(data, SharedData):
        return data
    if not ray.is_initialized():
        raise RuntimeError("share_data/make_trainable need a running Ray: call ray.init() first")
    import torch

    uri = None
    if isinstance(data, (str, os.PathLike)):
        from trainable.shards import load_shards

        uri = str(data)
        data = load_shards(uri)
        if "://" not in uri:
            uri = os.path.abspath(uri)  # recorded in checkpoints: must mean the same on any node
    x = data.x
    if x.dim() == 4:  # FoldData keeps a channel axis: (N, 1, n_mels, frames)
        x = x.squeeze(1)
    if getattr(data.params, "storage_dtype", None) == "float16" and x.dtype == torch.float32:
        # The shards hold float16, so this is lossless; it halves the object store's copy, every
        # fold worker's, and the device memory (FoldTrainer converts each batch to float32).
        x = x.to(torch.float16)
    arrays = {
        "x": x.contiguous().numpy(),
        "y": data.y.to(torch.int64).contiguous().numpy(),
        "fold": data.fold.to(torch.int64).contiguous().numpy(),
    }
    if folds is not None:
        missing = [f for f in check_folds(folds) if not (arrays["fold"] == f).any()]
        if missing:
            raise ValueError(f"the data has no clips of fold(s) {missing}")
    info = dict(getattr(data, "info", {}) or {})
    return SharedData(
        arrays=[ray.put(arrays)],
        features=data.params.to_dict(),
        classes=tuple(data.classes),
        fingerprint=info.get("fingerprint"),
        folds_present=tuple(sorted(set(arrays["fold"].tolist()))),
        n_clips=int(len(arrays["y"])),
        info=info,
        shards=uri,
    )


# ---- the trainable ----------------------------------------------------------------------------


def make_trainable(
    data: Any,
    folds: Sequence[int] = FOLDS,
    cpus_per_fold: float = 1.0,
    gpus_per_fold: float = 0.0,
    strategy: str = "PACK",
    checkpoint_every: int = 1,
    fail_at: tuple[int, int, str] | None = None,
    layout: str = "auto",
):
    """The trainable to give `tune.Tuner`: `cv_trainable` with the data and its resources.

    data: FoldData, shards URI or SharedData (see `share_data`; put in the object store once, here).
    folds: which official folds to cross-validate (default all 5; fewer for smoke runs). Each fold
        trains on every other fold present in the data and validates on itself.
    cpus_per_fold, gpus_per_fold: resources of each fold worker (fractional allowed; a worker uses
        max(1, int(cpus_per_fold)) torch threads).
    strategy: placement of a trial's bundles: PACK (default: one node when they fit, else spread),
        SPREAD, or the STRICT_ variants.
    checkpoint_every: report a checkpoint every this many epochs (and always at the last epoch).
    fail_at: test hook (fold, epoch, marker_file): that fold's worker exits hard before that epoch
        if the marker file does not exist yet (and creates it), i.e. on the first attempt only.
    layout: "workers" (one actor per fold), "packed" (all folds in one actor, as one batched
        network) or "auto" (see trainable/layout.py: packed on GPU).
    """
    folds = check_folds(folds)
    strategy = str(strategy).upper()
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of {STRATEGIES}")
    if cpus_per_fold <= 0 or gpus_per_fold < 0:
        raise ValueError("need cpus_per_fold > 0 and gpus_per_fold >= 0")
    if int(checkpoint_every) < 1:
        raise ValueError("checkpoint_every must be >= 1")
    layout = resolve_layout(layout, gpus_per_fold)
    shared = share_data(data, folds)
    resources = PlacementGroupFactory(
        [{"CPU": TRIAL_CPUS}] + trial_bundles(len(folds), cpus_per_fold, gpus_per_fold, layout),
        strategy=strategy,
    )
    fn = tune.with_parameters(
        cv_trainable,
        data=shared,
        folds=folds,
        cpus_per_fold=float(cpus_per_fold),
        gpus_per_fold=float(gpus_per_fold),
        checkpoint_every=int(checkpoint_every),
        fail_at=fail_at,
        layout=layout,
    )
    return tune.with_resources(fn, resources)


def cv_trainable(
    config: dict[str, Any],
    data: SharedData,
    folds: Sequence[int] = FOLDS,
    cpus_per_fold: float = 1.0,
    gpus_per_fold: float = 0.0,
    checkpoint_every: int = 1,
    fail_at: tuple[int, int, str] | None = None,
    layout: str = "workers",
) -> None:
    """One Tune trial (function API): see the module docstring. Use `make_trainable` to build it.

    This process only coordinates: it never imports torch (the fold workers do the training).
    """
    cfg = resolve_config(config)
    folds = check_folds(folds)
    missing = [f for f in folds if f not in data.folds_present]
    if missing:
        raise ValueError(f"the data has no clips of fold(s) {missing}")
    workers, nodes = _start_workers(data, cfg, folds, cpus_per_fold, gpus_per_fold, fail_at, layout)
    try:
        epoch = _restore(workers, cfg, folds)

        def start(e: int) -> list[Any] | None:  # launch epoch e+1 on every fold
            if e >= cfg.epochs:
                return None
            save = (e + 1) % checkpoint_every == 0 or e + 1 == cfg.epochs
            if layout == "packed":  # one actor for every fold: one call, one result ref per fold
                return _per_fold_refs(next(iter(workers.values())).run_epoch, len(workers), save)
            return [w.run_epoch.remote(save) for w in workers.values()]

        pending, t0 = start(epoch), time.perf_counter()
        while pending is not None:
            results = _gather(workers, pending, f"epoch {epoch + 1}")
            epoch += 1
            # Lock-step, pipelined: the next epoch starts before this one is reported, so the
            # report round trip (Tune, its callbacks, checkpoint upload) overlaps with training.
            pending = start(epoch)
            t1 = time.perf_counter()
            per_fold = {k: r[0] for k, r in zip(workers, results, strict=True)}
            metrics = cv_metrics(per_fold, epoch, t1 - t0)
            t0 = t1
            states = {k: r[1] for k, r in zip(workers, results, strict=True) if r[1] is not None}
            # the final epoch: every fold's out-of-fold predictions, kept in its checkpoint
            parts = [r[2] for r in results if r[2] is not None]
            oof = checkpoints.merge_oof(parts) if parts else None
            if states:
                with tempfile.TemporaryDirectory(prefix="cv_ckpt_") as d:
                    # A directory that does not exist yet: the writer's temporary sibling then
                    # lives inside `d` too, and goes with it even if this process is killed midway.
                    path = write_checkpoint(
                        Path(d) / "checkpoint", cfg, data, states, epoch, metrics, nodes, oof=oof
                    )
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(path))
            else:
                tune.report(metrics)
    finally:
        for w in workers.values():
            ray.kill(w)


def cv_metrics(per_fold: Mapping[int, Mapping[str, float]], epoch: int, seconds: float) -> dict[str, Any]:
    """The reported metrics from each fold's `FoldTrainer.train_epoch()` metrics.

    `seconds`: wall time of the lock-step epoch (`epoch_seconds`); `fold_seconds_max` is the
    slowest fold's own training + evaluation time, so their difference is the coordination cost."""
    accs = np.array([per_fold[k]["val_acc"] for k in per_fold], dtype=np.float64)
    losses = np.array([per_fold[k]["val_loss"] for k in per_fold], dtype=np.float64)
    train = np.array([per_fold[k]["train_loss"] for k in per_fold], dtype=np.float64)
    out: dict[str, Any] = {
        METRIC: float(accs.mean()),
        "cv_acc_std": float(accs.std()),
        "cv_loss_mean": float(losses.mean()),
        "cv_train_loss_mean": float(train.mean()),
        "epoch": int(epoch),
        "epoch_seconds": float(seconds),
        "fold_seconds_max": float(max(m.get("epoch_seconds", 0.0) for m in per_fold.values())),
    }
    for k, m in per_fold.items():
        out[f"fold{k}_acc"] = float(m["val_acc"])
        out[f"fold{k}_loss"] = float(m["val_loss"])
    return out


def _start_workers(
    data: SharedData,
    cfg: TrainConfig,
    folds: Sequence[int],
    cpus_per_fold: float,
    gpus_per_fold: float,
    fail_at: tuple[int, int, str] | None,
    layout: str = "workers",
) -> tuple[dict[int, Any], dict[int, str]]:
    """One FoldWorker per fold, in bundle i+1 of the trial's placement group (if it has one); or,
    packed, one PackedFoldWorker for every fold in bundle 1 (the same handle under each fold).

    Returns the workers and the node id each one runs on, by fold."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = ray.util.get_current_placement_group()
    if layout == "packed":
        return _start_packed(data, cfg, folds, cpus_per_fold, gpus_per_fold, fail_at, pg)
    workers = {}
    for i, k in enumerate(folds):
        opts: dict[str, Any] = {"num_cpus": cpus_per_fold, "num_gpus": gpus_per_fold, "max_restarts": 0}
        if pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=i + 1
            )
        workers[k] = FoldWorker.options(**opts).remote(
            data.arrays, k, cfg.to_dict(), threads=max(1, int(cpus_per_fold)), fail_at=fail_at
        )
    try:
        ready = _gather(workers, [w.ready.remote() for w in workers.values()], "start")
    except BaseException:
        for w in workers.values():
            ray.kill(w)
        raise
    return workers, {r["fold"]: r["node"] for r in ready}


def _start_packed(
    data: SharedData,
    cfg: TrainConfig,
    folds: Sequence[int],
    cpus_per_fold: float,
    gpus_per_fold: float,
    fail_at: tuple[int, int, str] | None,
    pg: Any,
) -> tuple[dict[int, Any], dict[int, str]]:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from trainable.packed_worker import PackedFoldWorker

    (bundle,) = trial_bundles(len(folds), cpus_per_fold, gpus_per_fold, "packed")
    opts: dict[str, Any] = {"num_cpus": bundle["CPU"], "num_gpus": bundle.get("GPU", 0.0), "max_restarts": 0}
    if pg is not None:
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=1
        )
    actor = PackedFoldWorker.options(**opts).remote(
        data.arrays, list(folds), cfg.to_dict(), threads=worker_threads(bundle["CPU"]), fail_at=fail_at
    )
    workers = {k: actor for k in folds}
    try:
        ready = _gather(workers, _per_fold_refs(actor.ready, len(folds)), "start")
    except BaseException:
        ray.kill(actor)
        raise
    return workers, {r["fold"]: r["node"] for r in ready}


def _per_fold_refs(method: Any, n: int, *args: Any) -> list[Any]:
    """Call a PackedFoldWorker method that answers per fold: one ObjectRef per fold, in fold order."""
    refs = method.options(num_returns=n).remote(*args)
    return list(refs) if n > 1 else [refs]


def _restore(workers: Mapping[int, Any], cfg: TrainConfig, folds: Sequence[int]) -> int:
    """Load every fold's state from Tune's checkpoint, if there is one; returns the epoch to go on from."""
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        meta, blobs = read_checkpoint(d, folds)
        saved = resolve_config(meta["config"])
        diff = saved.differs_in(cfg)
        if diff:
            raise ValueError(f"checkpoint {d} was written for another config (differs in {diff})")
        # The workers load the bytes (this process has no torch); a corrupt file is named by its path.
        loads = [
            workers[k].load_state.remote(blobs[k], str(Path(d) / checkpoints.fold_file(k))) for k in workers
        ]
        epochs = _gather(workers, loads, "resume")
    if any(e != meta["epoch"] for e in epochs):
        raise ValueError(f"checkpoint fold states are at epochs {epochs}, meta.json says {meta['epoch']}")
    return int(meta["epoch"])


def _gather(workers: Mapping[int, Any], refs: list[Any], what: str) -> list[Any]:
    """The results of one call per worker, in fold order; a dead or failing worker names its fold.

    Results are taken as they come (ray.wait), so a fold lost early fails the trial at once instead
    of after the other folds finish their epoch."""
    fold_of = {ref: k for k, ref in zip(workers, refs, strict=True)}
    done: dict[int, Any] = {}
    remaining = list(refs)
    while remaining:
        ready, remaining = ray.wait(remaining, num_returns=1)
        for ref in ready:
            k = fold_of[ref]
            try:
                done[k] = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                how = "failed to start" if "creation task" in str(e) else "died"  # bad config vs lost process
                raise FoldWorkerError(f"fold {k} worker {how} ({what}): {type(e).__name__}: {e}") from None
            except ray.exceptions.RayTaskError as e:
                raise FoldWorkerError(f"fold {k} worker failed ({what}): {e}") from None
    return [done[k] for k in workers]


# ---- checkpoints (the layout itself: trainable/model/checkpoint.py) ------------------------------------


def write_checkpoint(
    directory: str | Path,
    cfg: TrainConfig,
    data: SharedData,
    states: Mapping[int, bytes],
    epoch: int,
    metrics: Mapping[str, Any] | None = None,
    nodes: Mapping[int, str] | None = None,
    oof: Mapping[str, Any] | None = None,
) -> Path:
    """Write a trial's checkpoint: meta.json + fold_<k>.pt (bytes of torch.save(state_dict())),
    and oof.npz when `oof` (the final epoch's out-of-fold predictions, `checkpoints.merge_oof`) is given.

    `directory` must not exist or be empty; it appears whole or not at all (see
    `trainable.model.checkpoint.write_checkpoint`).
    `nodes`: the Ray node id each fold trained on (for the multi-node test and for debugging)."""
    meta = {
        "config": cfg.to_dict(),
        "features": dict(data.features),
        "fingerprint": data.fingerprint,
        "shards": data.shards,
        "classes": list(data.classes),
        "epoch": int(epoch),
        "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))},
        "nodes": {str(k): v for k, v in (nodes or {}).items()},
    }
    return checkpoints.write_checkpoint(directory, meta, states, oof=oof)


def read_checkpoint(
    directory: str | Path, folds: Iterable[int] | None = None
) -> tuple[dict[str, Any], dict[int, bytes]]:
    """(meta, {fold: state bytes}) of a checkpoint directory; `folds` (default: meta's) must be in it.

    Bytes, not state dicts: the trial process never imports torch; the fold workers load them."""
    meta, blobs = checkpoints.read_checkpoint(
        directory, None if folds is None else check_folds(folds), load=False
    )
    check_folds(meta["folds"])
    return meta, blobs
