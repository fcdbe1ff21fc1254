"""Fold layouts compared: one worker per fold (`workers`) against all folds in one (`packed`).

As a script it is the CPU measurement of issue 10 ("the new layout must not slow the CPU path"):
the `cpu` space's trial (a fixed point in the middle of the space, trainable/config.py keys below)
through the product's own path, `tune.Tuner(make_trainable(..., layout=L)).fit()` with one trial
of 5 folds, for each layout, interleaved (the order alternates every repeat) in the same run, on
the same data; medians and the packed/workers ratio of the trial wall time and of the per-epoch
time are reported. Ray is started and the data shared once, as a search does.

    python bench/layout_bench.py [--shards URI] [--clips-per-fold 80] [--epochs 3] [--repeats 3]
        [--cpus-per-fold 1.0] [--smoke] [--out FILE]

Called in a process already connected to Ray (tests/test_bench_layout.py), it uses that Ray.

Without --shards the data are synthetic (random dB values of the product's feature shape; timing
does not depend on the values). `--clips-per-fold` takes the first clips of every fold, to keep
the run short on a shared 2-core machine. Writes bench/results/cpu_layout_<time>.json (or --out).

The functions here are also what bench/gpu_bench.py uses: `actor_rates` (steady-state fold-epochs
per second of each layout, with the product's own Ray actors and no Tune) and `fold_epoch_flops`.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results"

# The middle of the `cpu` space as it was when bench/results/cpu_layout_20261128T192348.json was
# measured (a width-12 CNN; the space is now the compact recipe). Fixed, so both layouts train
# exactly the same thing.
CPU_TRIAL = {
    "arch": "cnn", "width": 12, "depth": 4, "batch_size": 64, "lr": 3e-3, "weight_decay": 1e-2,
    "dropout": 0.2, "mixup_alpha": 0.25, "freq_mask": 4, "time_mask": 16, "epochs": 12,
    "optimizer": "adamw", "schedule": "onecycle", "warmup_epochs": 2.0, "crop_frames": 128,
    "time_shift": 0.5, "gain_db": 6.0, "num_masks": 2, "eval_crops": 0, "device": "cpu",
}  # fmt: skip
SMOKE_TRIAL = {**CPU_TRIAL, "width": 4, "depth": 2, "batch_size": 8, "crop_frames": 0, "warmup_epochs": 0.5}


def commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True
        )
        return (
            out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
        )
    except OSError:
        return None


def synthetic_data(clips_per_fold: int, n_mels: int = 64, frames: int = 216, n_classes: int = 50) -> Any:
    """A FoldData of random dB values with the product's feature shape, `clips_per_fold` per fold."""
    import torch

    from trainable.model.features import FeatureParams
    from trainable.shards import FoldData

    g = torch.Generator().manual_seed(0)
    n = 5 * clips_per_fold
    x = (torch.rand(n, 1, n_mels, frames, generator=g) * -80).to(torch.float16).float()
    y = torch.arange(n) % n_classes
    fold = torch.arange(n) // clips_per_fold + 1
    classes = tuple(f"class{i}" for i in range(n_classes))
    return FoldData(x, y, fold, FeatureParams(n_mels=n_mels), classes, (), {"fingerprint": "synthetic"})


def load_data(shards: str | None, clips_per_fold: int, n_mels: int = 64, frames: int = 216) -> Any:
    """Real shards (the first `clips_per_fold` clips of each fold; 0 = all) or synthetic data."""
    if not shards:
        return synthetic_data(clips_per_fold or 400, n_mels, frames)
    import torch

    from trainable.shards import FoldData, load_shards

    data = load_shards(shards)
    if clips_per_fold <= 0:
        return data
    idx = torch.cat([torch.nonzero(data.fold == f).squeeze(1)[:clips_per_fold] for f in data.fold.unique()])
    return FoldData(data.x[idx], data.y[idx], data.fold[idx], data.params, data.classes, (), data.info)


# ---- through Tune: one trial -------------------------------------------------------------------


def fold_actors() -> dict[str, str]:
    """Actor id -> class of every fold actor this Ray has seen (the GCS keeps finished ones), so
    a run can show which layout really trained it."""
    from ray._private.state import state

    classes = ("FoldWorker", "PackedFoldWorker")
    return {
        k: a["ActorClassName"] for k, a in state.actor_table(None).items() if a["ActorClassName"] in classes
    }


def tune_trial(
    shared: Any,
    folds: tuple[int, ...],
    config: dict,
    layout: str,
    cpus_per_fold: float,
    gpus_per_fold: float = 0.0,
) -> dict[str, Any]:
    """One trial of `config` through make_trainable + Tuner.fit (checkpoints every epoch, as a search)."""
    from ray import tune

    from trainable.cv import make_trainable
    from trainable.protocol import METRIC

    trainable = make_trainable(
        shared, folds=folds, cpus_per_fold=cpus_per_fold, gpus_per_fold=gpus_per_fold, layout=layout
    )
    before = fold_actors()
    with tempfile.TemporaryDirectory(prefix="layout_bench_") as d:
        t0 = time.perf_counter()
        results = tune.Tuner(
            trainable,
            param_space=config,
            tune_config=tune.TuneConfig(num_samples=1, metric=METRIC, mode="max"),
            # A trial killed by Ray's memory monitor (a shared machine) retries from its checkpoint,
            # as in a search; the retries are recorded.
            run_config=tune.RunConfig(
                name="t", storage_path=d, verbose=0, failure_config=tune.FailureConfig(max_failures=2)
            ),
        ).fit()
        wall = time.perf_counter() - t0
        if results.errors:
            raise RuntimeError(f"layout {layout}: the trial failed: {results.errors[0]}")
        history = results[0].metrics_dataframe
        started = [cls for k, cls in fold_actors().items() if k not in before]
        return {
            "layout": layout,
            # the fold actors this trial started, by class: one per fold, or one packed for all
            "actors": {cls: started.count(cls) for cls in sorted(set(started))},
            "trial_seconds": wall,
            "epoch_seconds": [float(s) for s in history["epoch_seconds"]],
            "epochs": int(history["epoch"].iloc[-1]),
            "cv_acc_mean": float(history["cv_acc_mean"].iloc[-1]),
            "epochs_since_restore": int(results[0].metrics.get("iterations_since_restore", 0)),
        }


# ---- without Tune: steady-state rates of each layout -------------------------------------------


def actor_rates(
    shared: Any,
    folds: tuple[int, ...],
    config: dict,
    layout: str,
    epochs: int,
    cpus_per_fold: float,
    gpus_per_fold: float = 0.0,
) -> dict[str, Any]:
    """Fold-epochs per second of `layout` ("alone": the first fold in one FoldWorker; "workers": one
    FoldWorker per fold, lock-step; "packed": one PackedFoldWorker), with the product's actors.
    The first epoch (start-up, cudnn autotuning) is timed apart; the rate is over the others."""
    import ray

    from trainable.fold_worker import FoldWorker
    from trainable.layout import trial_bundles, worker_threads
    from trainable.packed_worker import PackedFoldWorker

    config = {**config, "epochs": epochs}
    if layout == "alone":
        folds = folds[:1]
    t0 = time.perf_counter()
    if layout == "packed":
        (b,) = trial_bundles(len(folds), cpus_per_fold, gpus_per_fold, "packed")
        actor = PackedFoldWorker.options(num_cpus=b["CPU"], num_gpus=b.get("GPU", 0.0)).remote(
            shared.arrays, list(folds), config, threads=worker_threads(b["CPU"])
        )
        actors = [actor]

        def epoch() -> list[Any]:
            out = ray.get(actor.run_epoch.options(num_returns=len(folds)).remote(False))
            return [out] if len(folds) == 1 else list(out)
    else:
        actors = [
            FoldWorker.options(num_cpus=cpus_per_fold, num_gpus=gpus_per_fold).remote(
                shared.arrays, k, config, threads=worker_threads(cpus_per_fold)
            )
            for k in folds
        ]

        def epoch() -> list[Any]:
            return ray.get([a.run_epoch.remote(False) for a in actors])

    try:
        ray.get([a.ready.remote() for a in actors])
        start = time.perf_counter() - t0
        times, fold_epochs = [], 0
        for _ in range(epochs):
            t = time.perf_counter()
            results = epoch()
            times.append(time.perf_counter() - t)
            fold_epochs += len(results)
    finally:
        for a in actors:
            ray.kill(a)
    steady = times[1:] or times
    per_epoch = fold_epochs / epochs
    return {
        "layout": layout,
        "folds": list(folds),
        "start_seconds": start,
        "epoch_seconds": times,
        "fold_epochs": fold_epochs,
        "fold_epochs_per_s": per_epoch * len(steady) / sum(steady),
    }


def fold_epoch_flops(config: dict, data: Any, fold: int = 1, device: str | None = None) -> float:
    """FLOPs of one training fold-epoch (train steps forward+backward, and the evaluation), counted by
    torch.utils.flop_counter over a real `FoldTrainer.train_epoch` of `fold`."""
    from torch.utils.flop_counter import FlopCounterMode

    from trainable.fold import FoldTrainer

    x = data.x.squeeze(1) if data.x.dim() == 4 else data.x
    val = data.fold == fold
    trainer = FoldTrainer(config, x[~val], data.y[~val], x[val], data.y[val], fold=fold, device=device)
    with FlopCounterMode(display=False) as counter:
        trainer.train_epoch()
    return float(counter.get_total_flops())


# ---- the CPU measurement -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", help="prepared shards (default: synthetic data of the product's shape)")
    p.add_argument("--clips-per-fold", type=int, default=80)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpus-per-fold", type=float, default=1.0, help="esc50 search's default: 1")
    p.add_argument("--smoke", action="store_true", help="tiny model and data, 1 repeat, 2 folds: seconds")
    p.add_argument("--out", help="result JSON (default bench/results/cpu_layout_<time>.json)")
    args = p.parse_args(argv)
    import ray
    from machine import machine

    from trainable.cv import share_data

    config = dict(SMOKE_TRIAL if args.smoke else CPU_TRIAL)
    config["epochs"] = args.epochs
    config["warmup_epochs"] = min(config["warmup_epochs"], args.epochs / 2)  # onecycle: warm-up < epochs
    folds = (1, 2) if args.smoke else (1, 2, 3, 4, 5)
    data = load_data(
        args.shards,
        8 if args.smoke else args.clips_per_fold,
        16 if args.smoke else 64,
        64 if args.smoke else 216,
    )
    repeats = 1 if args.smoke else args.repeats
    command = [sys.executable, *sys.argv] if argv is None else ["bench/layout_bench.py", *argv]
    own_ray = not ray.is_initialized()  # in-process callers (the smoke test) bring their Ray
    if own_ray:
        ray.init(
            num_cpus=max(os.cpu_count() or 1, int(len(folds) * args.cpus_per_fold + 1)),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            _system_config={"worker_niceness": 0},
        )
    try:
        shared = share_data(data, folds)
        runs = []
        for r in range(repeats):
            order = ("workers", "packed") if r % 2 == 0 else ("packed", "workers")
            for layout in order:
                run = tune_trial(shared, folds, config, layout, args.cpus_per_fold)
                run["repeat"] = r
                runs.append(run)
                print(json.dumps(run), flush=True)
        info = machine(ray=ray.__version__)
    finally:
        if own_ray:
            ray.shutdown()

    def median(layout: str, key: str) -> float:
        vals = [r[key] for r in runs if r["layout"] == layout]
        return statistics.median(vals)

    for r in runs:
        r["epoch_seconds_median"] = statistics.median(r["epoch_seconds"])
    summary = {
        "what": "the cpu space's trial (fixed middle point), 5 folds through make_trainable + Tune, per fold layout",
        "machine": info,
        "commit": commit(),
        "command": command,
        "config": config,
        "folds": list(folds),
        "cpus_per_fold": args.cpus_per_fold,
        "data": args.shards or "synthetic",
        "clips_per_fold": 8 if args.smoke else args.clips_per_fold,
        "runs": runs,
        "median_trial_seconds": {k: median(k, "trial_seconds") for k in ("workers", "packed")},
        "median_epoch_seconds": {k: median(k, "epoch_seconds_median") for k in ("workers", "packed")},
    }
    summary["packed_over_workers_trial"] = (
        summary["median_trial_seconds"]["packed"] / summary["median_trial_seconds"]["workers"]
    )
    summary["packed_over_workers_epoch"] = (
        summary["median_epoch_seconds"]["packed"] / summary["median_epoch_seconds"]["workers"]
    )
    out = Path(args.out) if args.out else RESULTS / f"cpu_layout_{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    tmp.replace(out)
    print(
        f"median trial {summary['median_trial_seconds']}, packed/workers {summary['packed_over_workers_trial']:.2f} "
        f"(epoch {summary['packed_over_workers_epoch']:.2f}); {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
