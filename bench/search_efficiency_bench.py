"""Search efficiency: TPE + ASHA vs random search without early stopping, on a cheap proxy.

    .venv/bin/python bench/search_efficiency_bench.py [--shards DIR] [--trials 10] [--epochs 9]

The proxy: a small CNN (width 8, 3 stages, 96-frame crops) trained on two folds of the real
ESC-50 shards and validated on a third, a few epochs per trial. Both searches draw from the same
space (`proxy_space` below: learning rate, weight decay, batch size, dropout, mixup, label
smoothing) with the same seeds and concurrency, through `run_search` (Tune, ASHA and MLflow as in
production); the data is put into Ray's object store once and shared by both.

  1. random search, `--trials` trials, every trial trained for all `--epochs` epochs;
     B = its best cv_acc_mean (any trial, any epoch);
  2. TPE + ASHA (grace 1 epoch, reduction factor 3), up to `--tpe-trials` trials (default twice
     as many: early stopping makes a trial cheap), stopped as soon as a trial reports >= B.

Measured from MLflow's per-epoch records (every reported epoch of every trial, in the order they
reached the driver): trial-epochs each search spent until some trial first reported >= B, every
epoch of every trial counted (also those of trials ASHA stopped). Goal: TPE+ASHA <= 1/3 of
random's. Printed with the machine and its load, and saved to bench/results/.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported: loopback only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from ray.tune import Stopper  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def proxy_space(trial):
    """The proxy's space (a user space file: `--space bench/search_efficiency_bench.py:proxy_space`)."""
    trial.suggest_float("lr", 1e-4, 3e-1, log=True)
    trial.suggest_float("weight_decay", 1e-5, 1e-1, log=True)
    trial.suggest_categorical("batch_size", [16, 32, 64, 128])
    trial.suggest_float("dropout", 0.0, 0.5)
    trial.suggest_float("mixup_alpha", 0.0, 1.0)
    trial.suggest_float("label_smoothing", 0.0, 0.2)
    return {
        "arch": "cnn", "width": 8, "depth": 3, "optimizer": "adamw", "schedule": "cosine",
        "warmup_epochs": 0.5, "crop_frames": 96, "device": "cpu", "seed": 0,
    }  # fmt: skip


class ReachTarget(Stopper):
    """A Tune stopper: the whole search stops once any trial reports cv_acc_mean >= target."""

    def __init__(self, target: float) -> None:
        self.target = target
        self.reached = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        if result.get("cv_acc_mean", -1.0) >= self.target - 1e-12:
            self.reached = True
        return False

    def stop_all(self) -> bool:
        return self.reached


def _real_shards() -> str:
    note = ROOT / ".team" / "REAL_SHARDS.txt"
    if note.exists():
        return note.read_text().strip()
    from search.prepare import default_out
    from trainable.features import FeatureParams

    return str(ROOT / default_out(FeatureParams()))


def arrivals(uri: str, search: str) -> list[tuple[int, str, int, float]]:
    """Every reported epoch of the search: (arrival ms, trial id, epoch, cv_acc_mean), in order."""
    from search.tracking import TAG_TRIAL, client, search_runs

    c = client(uri)
    exp = c.get_experiment_by_name("esc50").experiment_id
    out = []
    for run in search_runs(c, exp, search, "trial"):
        for m in c.get_metric_history(run.info.run_id, "cv_acc_mean"):
            out.append((m.timestamp, run.data.tags[TAG_TRIAL], int(m.step), float(m.value)))
    return sorted(out)


def epochs_to_reach(events: list[tuple[int, str, int, float]], target: float) -> int | None:
    """Trial-epochs spent (all trials) until a trial first reported >= target; None if never."""
    for i, (_, _, _, acc) in enumerate(events, 1):
        if acc >= target - 1e-12:
            return i
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default=None, help="real ESC-50 shards (default: .team/REAL_SHARDS.txt)")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=9)
    ap.add_argument("--val-fold", type=int, default=1, help="the fold validated on")
    ap.add_argument("--train-folds", default="2,3", help="the folds trained on (a subset: cheap)")
    ap.add_argument(
        "--tpe-trials",
        type=int,
        default=None,
        help="TPE+ASHA's trial limit (default 2x --trials; it stops at B)",
    )
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default bench/results/search_efficiency_e<epochs>.json")
    args = ap.parse_args()

    import ray

    from search.options import SearchOptions
    from search.tune import run_search
    from trainable.cv import share_data
    from trainable.shards import load_shards

    shards = args.shards or _real_shards()
    train = [int(f) for f in args.train_folds.split(",")]
    folds = sorted({args.val_fold, *train})
    t0 = time.time()
    data = load_shards(shards, folds=folds)
    ray.init(
        num_cpus=max(2, os.cpu_count() or 2),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _system_config={"worker_niceness": 0},  # as the product's local Ray (search/tune.py)
    )
    shared = share_data(data, folds=[args.val_fold])
    work = Path(tempfile.mkdtemp(prefix="esc50_search_bench_"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    space = f"{Path(__file__).resolve()}:proxy_space"
    common = dict(
        space=space, trials=args.trials, epochs=args.epochs, folds=(args.val_fold,), cpus_per_fold=1.0,
        shards=shards, storage=str(work / "runs"), tracking_uri=uri, seed=args.seed,
        concurrency=args.concurrency, verbose=0,
    )  # fmt: skip
    tpe_trials = args.tpe_trials or 2 * args.trials
    runs = {
        "random": SearchOptions(name="random", sampler="random", asha=False, **common),
        "tpe_asha": SearchOptions(name="tpe_asha", sampler="tpe", asha=True, grace_period=1, **common),
    }
    runs["tpe_asha"].trials = tpe_trials
    out: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_before": os.getloadavg(),
        },
        "proxy": {
            "shards": shards,
            "val_fold": args.val_fold,
            "train_folds": train,
            "clips": len(data),
            "trials": args.trials,
            "epochs": args.epochs,
            "concurrency": args.concurrency,
            "seed": args.seed,
        },  # fmt: skip
        "searches": {},
    }
    events = {}
    for name, opts in runs.items():
        s0 = time.time()
        # TPE+ASHA runs until a trial reaches the random search's best (or its trial limit).
        stop = ReachTarget(out["searches"]["random"]["best_cv_acc_mean"]) if name == "tpe_asha" else None
        result = run_search(opts, data=shared, stop=stop)
        events[name] = arrivals(uri, name)
        out["searches"][name] = {
            "seconds": round(time.time() - s0, 1),
            "trial_epochs": len(events[name]),
            "best_cv_acc_mean": max((e[3] for e in events[name]), default=None),
            "counts": result.counts,
            "trials_run": len(result.rows),
        }
        print(f"{name}: {out['searches'][name]}", flush=True)
    ray.shutdown()

    target = out["searches"]["random"]["best_cv_acc_mean"]
    rnd = epochs_to_reach(events["random"], target)
    tpe = epochs_to_reach(events["tpe_asha"], target)
    out["target_B"] = target
    out["random_epochs_to_B"] = rnd
    out["random_epochs_total"] = len(events["random"])
    out["tpe_asha_epochs_to_B"] = tpe
    out["ratio_vs_random_to_B"] = None if tpe is None or not rnd else round(tpe / rnd, 3)
    out["ratio_vs_random_total"] = None if tpe is None else round(tpe / len(events["random"]), 3)
    out["machine"]["load_after"] = os.getloadavg()
    out["seconds"] = round(time.time() - t0, 1)

    print(
        f"\nmachine: {out['machine']['cpu']}, {out['machine']['cores']} cores, load "
        f"{out['machine']['load_before'][0]:.1f} -> {out['machine']['load_after'][0]:.1f}"
    )
    print(
        f"proxy: cnn w8 d3, crop 96, train folds {train} -> val fold {args.val_fold} ({len(data)} clips), "
        f"{args.trials} trials (TPE+ASHA: up to {tpe_trials}, stopping at B) x {args.epochs} epochs, "
        f"concurrency {args.concurrency}, seed {args.seed}, ASHA grace 1, reduction factor 3"
    )
    print(f"baseline (random, no early stopping): best cv_acc_mean B = {target:.4f}, "
          f"reached after {rnd} of {len(events['random'])} trial-epochs")  # fmt: skip
    if tpe is None:
        best = out["searches"]["tpe_asha"]["best_cv_acc_mean"]
        print(f"TPE+ASHA: did not reach B (best {best:.4f}) in {len(events['tpe_asha'])} trial-epochs")
    else:
        print(f"TPE+ASHA: reached B after {tpe} trial-epochs ({len(events['tpe_asha'])} in all)")
        print(f"ratio: {out['ratio_vs_random_to_B']} of random's epochs to B, "
              f"{out['ratio_vs_random_total']} of random's whole budget (goal <= 0.333)")  # fmt: skip
    print(f"total {out['seconds']:.0f} s; records in {work}")
    dest = Path(args.out or ROOT / "bench" / "results" / f"search_efficiency_e{args.epochs}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
