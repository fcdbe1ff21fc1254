"""Overhead of a Tune trial: the same folds, config and epochs under Ray Tune vs a bare loop, same run.

Tune: `Tuner(make_trainable(data, folds, cpus_per_fold)).fit()` with one trial, everything the
product does per trial included: the trial actor and one FoldWorker actor per fold in a placement
group, data from the object store, lock-step epochs, `tune.report` and a checkpoint (every fold's
state) every epoch, and with `--mlflow` the search's MLflow callback (search/tracking.py) logging
the trial as a child run. Ray is started once and the data put in the object store once before
the repeats, as a search does once for all its trials; both are timed and printed separately.

Bare loop: the same folds trained by `FoldTrainer` directly, one freshly spawned process per fold
(torch.set_num_threads(cpus_per_fold)) so the parallelism and the per-process start (Python,
torch import) are the same as the fold workers'; no checkpoints, no reporting.

Ray runs its workers at nice 15 by default; on a CPU shared with other work that alone slows the
fold workers against the bare loop's nice-0 processes, so the bench starts Ray with
`worker_niceness` 0 (`--worker-niceness 15` shows Ray's default).

Repeats alternate the order (bare first, then Tune first, ...) and the medians are compared; the
goal is Tune <= 5% slower. Both runs are seeded alike, so their final fold accuracies are printed
side by side as a check that they trained the same thing.

    python bench/tune_overhead_bench.py [--shards URI] [--folds 1,2] [--epochs 6] [--repeats 3]
        [--clips-per-fold 200] [--no-mlflow]

`--shards` defaults to the path in .team/REAL_SHARDS.txt. Writes bench/results/tune_overhead_<time>.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # see bench/cv_accuracy.py; Ray workers inherit it
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

from machine import machine  # noqa: E402 - bench/machine.py; scripts run as `python bench/<name>.py`

from trainable.config import TrainConfig  # noqa: E402


def subset(data: Any, clips_per_fold: int) -> Any:
    """The first `clips_per_fold` clips of every fold (all when 0), as a FoldData."""
    if clips_per_fold <= 0:
        return data
    import torch

    from trainable.shards import FoldData

    idx = torch.cat([torch.nonzero(data.fold == f).squeeze(1)[:clips_per_fold] for f in data.fold.unique()])
    return FoldData(data.x[idx], data.y[idx], data.fold[idx], data.params, data.classes, (), data.info)


# ---- bare loop ----------------------------------------------------------------------------------


def _bare_fold(config: dict[str, Any], fold: int, threads: int, x, y, folds_of) -> dict[str, Any]:
    """Child process: train one fold with FoldTrainer, no Ray, no checkpoints."""
    import torch

    from trainable.fold import FoldTrainer

    torch.set_num_threads(threads)
    x, y, folds_of = torch.as_tensor(x), torch.as_tensor(y), torch.as_tensor(folds_of)
    val = folds_of == fold
    trainer = FoldTrainer(config, x[~val], y[~val], x[val], y[val], fold=fold)
    history = list(trainer)
    return {
        "fold": fold,
        "val_acc": history[-1]["val_acc"],
        "epoch_seconds": [h["epoch_seconds"] for h in history],
    }


def run_bare(config: dict[str, Any], folds: list[int], threads: int, arrays: dict[str, np.ndarray]) -> dict:
    t0 = time.perf_counter()
    with ProcessPoolExecutor(len(folds), mp_context=mp.get_context("spawn")) as pool:
        futures = [
            pool.submit(_bare_fold, config, k, threads, arrays["x"], arrays["y"], arrays["fold"])
            for k in folds
        ]
        out = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "fold_acc": {r["fold"]: r["val_acc"] for r in out},
        "compute_s": float(np.sum(np.max([r["epoch_seconds"] for r in out], axis=0))),
    }


# ---- under Tune ---------------------------------------------------------------------------------


def run_tune(
    config: dict[str, Any], shared: Any, folds: list[int], cpus: float, storage: str, i: int, mlflow_cb
):
    from ray import tune

    from trainable.cv import make_trainable
    from trainable.protocol import METRIC, MODE

    trainable = make_trainable(shared, folds=folds, cpus_per_fold=cpus)
    t0 = time.perf_counter()
    results = tune.Tuner(
        trainable,
        param_space=config,
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, num_samples=1),
        run_config=tune.RunConfig(
            name=f"overhead_{i}",
            storage_path=storage,
            verbose=0,
            callbacks=[mlflow_cb(i)] if mlflow_cb else None,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    ).fit()
    wall = time.perf_counter() - t0
    if results.errors:
        raise RuntimeError(f"trial failed: {results.errors[0]}")
    r = results[0]
    history = r.metrics_dataframe
    return {
        "wall_s": wall,
        "trial_s": float(r.metrics["time_total_s"]),
        "fold_acc": {k: float(r.metrics[f"fold{k}_acc"]) for k in folds},
        "compute_s": float(history["fold_seconds_max"].sum()),
        "lockstep_s": float(history["epoch_seconds"].sum()),
    }


def mlflow_callback_factory(tmp: str, folds: list[int]):
    """The search's MLflow callback (search/tracking.py) under a parent run, as `esc50 search` logs."""
    try:
        from search import store, tracking
    except ImportError:
        return None
    uri = f"sqlite:///{tmp}/mlflow.db"
    store.check_tracking(uri)
    c = store.client(uri)
    exp = store.experiment_id(c, "tune_overhead", uri)

    def make(i: int):
        name = f"overhead_{i}"
        tags = {store.TAG_ROLE: "search", store.TAG_SEARCH: name}
        parent = c.create_run(exp, run_name=name, tags=tags)
        return tracking.MLflowTrialCallback(uri, exp, name, parent.info.run_id, folds)

    return make


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    real = ROOT / ".team" / "REAL_SHARDS.txt"
    p.add_argument("--shards", default=real.read_text().strip() if real.exists() else None)
    p.add_argument("--folds", default="1,2")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clips-per-fold", type=int, default=200, help="0 = all 400")
    p.add_argument("--cpus-per-fold", type=float, default=1.0)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument(
        "--worker-niceness",
        type=int,
        default=0,
        help="nice level of Ray's workers (Ray's default is 15; the bare loop's processes run at 0, "
        "and on a shared CPU a niced fold worker gets less of it)",
    )
    p.add_argument(
        "--no-mlflow", dest="mlflow", action="store_false", help="Tune alone, without the MLflow callback"
    )
    p.add_argument("--out", help="the result file (default bench/results/tune_overhead_<time>.json)")
    args = p.parse_args(argv)
    if not args.shards:
        p.error("--shards is required (no .team/REAL_SHARDS.txt)")
    folds = [int(f) for f in args.folds.split(",")]
    threads = max(1, int(args.cpus_per_fold))
    config = TrainConfig(
        arch="cnn",
        width=args.width,
        depth=args.depth,
        epochs=args.epochs,
        batch_size=64,
        schedule="constant",
        warmup_epochs=0.0,
        device="cpu",
        mixup_alpha=0.2,
        freq_mask=8,
        time_mask=16,
        time_shift=0.3,
    ).to_dict()

    import ray

    from trainable.cv import share_data
    from trainable.shards import load_shards

    data = subset(load_shards(args.shards), args.clips_per_fold)
    arrays = {"x": data.x.squeeze(1).numpy(), "y": data.y.numpy(), "fold": data.fold.numpy()}
    info = machine(ray=ray.__version__)
    print(f"machine: {json.dumps(info)}")
    print(
        f"data: {args.shards}: {len(data)} clips {tuple(data.x.shape[2:])}, folds {folds}, "
        f"{args.epochs} epochs, cnn width {args.width} depth {args.depth}, {threads} thread(s) per fold"
    )

    t0 = time.perf_counter()
    ray.init(
        num_cpus=int(np.ceil(len(folds) * args.cpus_per_fold + 0.1)),
        num_gpus=0,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _system_config={"worker_niceness": args.worker_niceness},
    )
    ray_init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    shared = share_data(data)
    share_s = time.perf_counter() - t0
    print(f"once per search: ray.init {ray_init_s:.1f} s, data into the object store {share_s:.2f} s")

    tmp = tempfile.mkdtemp(prefix="tune_overhead_")
    mlflow_cb = mlflow_callback_factory(tmp, folds) if args.mlflow else None
    if args.mlflow and mlflow_cb is None:
        print("search/tracking.py is missing: measuring Tune alone")
    bare, tuned = [], []
    for i in range(args.repeats):
        order = ("bare", "tune") if i % 2 == 0 else ("tune", "bare")
        for what in order:
            if what == "bare":
                bare.append(run_bare(config, folds, threads, arrays))
                r = bare[-1]
            else:
                tuned.append(run_tune(config, shared, folds, args.cpus_per_fold, f"{tmp}/tune", i, mlflow_cb))
                r = tuned[-1]
            print(
                f"repeat {i + 1} {what:>4}: wall {r['wall_s']:.1f} s, training {r['compute_s']:.1f} s, "
                f"acc {[round(v, 3) for v in r['fold_acc'].values()]}",
                flush=True,
            )
    ray.shutdown()

    for r in bare + tuned:
        r["fixed_s"] = r["wall_s"] - r["compute_s"]  # start, data, teardown: all but training
    med = {k: statistics.median(r[k] for r in bare) for k in ("wall_s", "compute_s", "fixed_s")}
    med_t = {
        k: statistics.median(r[k] for r in tuned)
        for k in ("wall_s", "compute_s", "fixed_s", "trial_s", "lockstep_s")
    }
    ratio = med_t["wall_s"] / med["wall_s"]
    # Where the difference goes: a fixed cost per trial, and a cost per epoch (lock-step wait,
    # report, checkpoint) that is left after pipelining. Projected onto a longer trial.
    per_epoch = (med_t["lockstep_s"] - med_t["compute_s"]) / args.epochs
    fixed = med_t["fixed_s"] - med["fixed_s"] - per_epoch * args.epochs
    epoch_s = med["compute_s"] / args.epochs
    projected = {
        f"{e}x{t:g}s": (fixed + e * per_epoch) / (med["fixed_s"] + e * t)
        for e, t in ((30, epoch_s), (30, 30.0))
    }
    # Seeded alike, both arms must train the same models: otherwise the timings compare two jobs.
    same = [
        all(abs(b["fold_acc"][k] - t["fold_acc"][k]) <= 1e-6 for k in b["fold_acc"])
        for b, t in zip(bare, tuned, strict=True)
    ]
    summary = {
        "command": ["python", "bench/tune_overhead_bench.py", *(sys.argv[1:] if argv is None else argv)],
        "machine": info,
        "same_training": all(same),
        "args": vars(args),
        "config": config,
        "mlflow": bool(mlflow_cb),
        "ray_init_s": ray_init_s,
        "share_data_s": share_s,
        "bare": bare,
        "tune": tuned,
        "median_bare_wall_s": med["wall_s"],
        "median_tune_wall_s": med_t["wall_s"],
        "median_tune_trial_s": med_t["trial_s"],
        "overhead": ratio - 1,
        "extra_fixed_s_per_trial": fixed,
        "extra_s_per_epoch": per_epoch,
        "projected_overhead": projected,  # a projection onto 30-epoch trials, not a measurement
        "goal": "<= 0.05",
    }
    label = "Tune + MLflow" if mlflow_cb else "Tune (no MLflow callback)"
    print(
        f"\nmedian wall of a trial: bare loop {med['wall_s']:.1f} s, {label} {med_t['wall_s']:.1f} s "
        f"(trial function {med_t['trial_s']:.1f} s); ratio {ratio:.3f} -> overhead {100 * (ratio - 1):+.1f}% "
        f"(goal <= +5%)"
    )
    print(
        f"median training time (slowest fold, summed over epochs): bare {med['compute_s']:.1f} s, "
        f"tune {med_t['compute_s']:.1f} s; outside training: bare {med['fixed_s']:.1f} s, tune {med_t['fixed_s']:.1f} s"
    )
    print(
        f"Tune's extra cost: {fixed:+.1f} s per trial + {per_epoch:+.3f} s per epoch; projected overhead: "
        + ", ".join(f"{k} epochs {100 * v:+.1f}%" for k, v in projected.items())
    )
    out = Path(args.out) if args.out else RESULTS / f"tune_overhead_{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
