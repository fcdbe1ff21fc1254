"""Search efficiency: TPE + ASHA vs random search without early stopping, on a cheap proxy.

    .venv/bin/python bench/search_efficiency_bench.py                       # Ray Tune + MLflow, CPU
    python bench/search_efficiency_bench.py --engine optuna --device cuda \\
        --folds 1,2,3,4,5 --val-folds 1,2 --trials 30 --epochs 20 --repeats 3 --workers 12

The proxy (`--proxy`): a small CNN on the real ESC-50 shards, `small` (width 8, 3 stages, 96-frame
crops: cheap on a CPU) or `wide` (the compact preset's network: for a GPU). Each trial trains one
model per validation fold (`--val-folds`, each on the other `--folds`) and is scored by their mean
accuracy per epoch, as a product trial is. Both searches draw from the proxy's space below
(learning rate, weight decay, batch size, dropout, mixup, label smoothing; `wide` adds SpecAugment
and roll), with fixed seeds (each search its own, so they share no draws):

  1. random search: `--trials` trials, each trained all `--epochs` epochs;
     B = its best result: the best final score of its trials (what the search would report);
  2. TPE + ASHA (grace `--grace` epochs, reduction factor 3): new trials until it has spent as many
     trial-epochs as the random search did, stopped as soon as a trial reports >= B.

The figure is trial-epochs spent until some trial first reported >= B, counting every epoch of
every trial in the order they were reported (trials ASHA stopped included). Goal: TPE+ASHA <= 1/3
of random's. `--repeats` runs both searches again with other seeds; the medians are reported.

Engines: `tune` (default) runs both searches through the product's `run_search` (Ray Tune's
OptunaSearch + ASHAScheduler, MLflow records read back for the epoch order), the data put into
Ray's object store once. `optuna` (bench/search_efficiency_optuna.py) runs the same space, sampler
and fold training in worker processes sharing an Optuna study, with Optuna's SuccessiveHalvingPruner
as ASHA: for a machine without Ray, such as a GPU box. Results go to bench/results/.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported: loopback only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

Event = tuple[float, str, int, float]  # (arrival time, trial, epoch, score)


def proxy_space(trial):
    """The small proxy (cheap on a CPU): width 8, 3 stages, 96-frame crops. A user space file."""
    trial.suggest_float("lr", 1e-4, 3e-1, log=True)
    trial.suggest_float("weight_decay", 1e-5, 1e-1, log=True)
    trial.suggest_categorical("batch_size", [32, 64, 128])
    trial.suggest_float("dropout", 0.0, 0.5)
    trial.suggest_float("mixup_alpha", 0.0, 1.0)
    trial.suggest_float("label_smoothing", 0.0, 0.2)
    return {
        "arch": "cnn", "width": 8, "depth": 3, "optimizer": "adamw", "schedule": "cosine",
        "warmup_epochs": 0.5, "crop_frames": 96, "device": "cpu", "seed": 0,
    }  # fmt: skip


def proxy_space_wide(trial):
    """The wide proxy (for a GPU): the compact preset's network (width 16, 4 stages, 128-frame
    crops), which can overfit, so regularization and augmentation matter, as in the real search.
    The small proxy saturated near 42% within 3 epochs on a GPU: nothing there for a search to find."""
    proxy_space(trial)
    trial.suggest_int("freq_mask", 0, 16, step=4)
    trial.suggest_int("time_mask", 0, 48, step=8)
    trial.suggest_float("time_shift", 0.0, 0.5)
    return {
        "arch": "cnn", "width": 16, "depth": 4, "optimizer": "adamw", "schedule": "onecycle",
        "warmup_epochs": 4.0, "epochs": 20, "crop_frames": 128, "num_masks": 2, "gain_db": 6.0,
        "device": "cpu", "seed": 0,
    }  # fmt: skip


PROXIES = {"small": "proxy_space", "wide": "proxy_space_wide"}
TPE_SEED_OFFSET = 7919  # TPE+ASHA's seed = the random search's + this


def final_best(events: list[Event], epochs: int) -> float:
    """The random search's best result: the best final score of a trial that trained all epochs."""
    return max(score for _, _, epoch, score in events if epoch == epochs)


def epochs_to_reach(events: list[Event], target: float) -> int | None:
    """Trial-epochs spent (all trials) until a trial first reported >= target; None if never."""
    for i, (_, _, _, score) in enumerate(events, 1):
        if score >= target - 1e-12:
            return i
    return None


# ---- engine: Ray Tune + MLflow (the product's run_search) ----------------------------------------


def _tune_arrivals(uri: str, search: str) -> list[Event]:
    """Every reported epoch of the search from MLflow: (time, trial id, epoch, cv_acc_mean)."""
    from search.store import TAG_TRIAL, client, search_runs

    c = client(uri)
    exp = c.get_experiment_by_name("esc50").experiment_id
    out = []
    for run in search_runs(c, exp, search, "trial"):
        for m in c.get_metric_history(run.info.run_id, "cv_acc_mean"):
            out.append((m.timestamp / 1000, run.data.tags[TAG_TRIAL], int(m.step), float(m.value)))
    return sorted(out)


def _tune_search(
    args, name, sampler, asha, seed, trials, budget, target, shared, work
) -> tuple[list[Event], dict]:
    from ray.tune import Stopper

    from search.options import SearchOptions
    from search.tune import run_search

    class ReachTarget(Stopper):
        """Stops the whole search once a trial reports >= target or `budget` epochs were reported."""

        def __init__(self) -> None:
            # distinct (trial, epoch): Tune may show the stopper a trial's last result twice
            self.epochs: set[tuple[str, int]] = set()
            self.reached = False

        def __call__(self, trial_id: str, result: dict) -> bool:
            self.epochs.add((trial_id, int(result.get("epoch", 0))))
            self.reached |= target is not None and result.get("cv_acc_mean", -1.0) >= target - 1e-12
            return False

        def stop_all(self) -> bool:
            return self.reached or len(self.epochs) >= budget

    uri = f"sqlite:///{work / 'mlflow.db'}"
    opts = SearchOptions(
        name=name, space=f"{Path(__file__).resolve()}:{PROXIES[args.proxy]}", trials=trials, epochs=args.epochs,
        folds=tuple(args.val_folds), cpus_per_fold=1.0, shards=args.shards, storage=str(work / "runs"),
        tracking_uri=uri, seed=seed, sampler=sampler, asha=asha, grace_period=args.grace,
        concurrency=args.workers, verbose=0,
    )  # fmt: skip
    result = run_search(opts, data=shared, stop=ReachTarget())
    return _tune_arrivals(uri, name), dict(result.counts)


def summarize(out: dict, dest: Path) -> None:
    """Medians over the repeats so far, written to `dest` (atomically)."""
    reps = out["repeats"]
    out["median_ratio_to_B"] = statistics.median(r["ratio_to_B"] for r in reps)
    out["median_ratio_to_budget"] = statistics.median(r["ratio_to_budget"] for r in reps)
    out["reached"] = sum(r["reached"] for r in reps)
    out["seconds"] = time.time() - out["started"]
    out["machine"]["load_after"] = list(os.getloadavg())
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(dest)


def merge(paths: list[str], dest: Path) -> None:
    """One result from runs of the same proxy with other seeds (e.g. run one after another)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    same = ("engine", "proxy")
    key = [{k: v for k, v in r["proxy"].items() if k not in ("seed", "repeats")} for r in runs]
    if any(r["engine"] != runs[0]["engine"] for r in runs) or any(k != key[0] for k in key):
        raise SystemExit(f"cannot merge: the runs differ in {same} (other than seed and repeats)")
    out = {**runs[0], "merged_from": paths, "repeats": [rep for r in runs for rep in r["repeats"]]}
    seeds = [rep["seed"] for rep in out["repeats"]]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"cannot merge: seeds {sorted(seeds)} repeat")
    out["started"] = time.time() - sum(r["seconds"] for r in runs)
    summarize(out, dest)
    for rep in out["repeats"]:
        print(
            f"seed {rep['seed']}: ratio {rep['ratio_to_B']:.3f} to B, {rep['ratio_to_budget']:.3f} of budget"
        )
    print(
        f"{len(seeds)} seeds: TPE+ASHA reached B in {out['reached']}; median {out['median_ratio_to_B']:.3f} "
        f"of random's epochs to B, {out['median_ratio_to_budget']:.3f} of its budget; result: {dest}"
    )


# ---- the benchmark --------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("tune", "optuna"), default="tune")
    ap.add_argument("--shards", default=None, help="real ESC-50 shards (default: .team/REAL_SHARDS.txt)")
    ap.add_argument("--proxy", choices=sorted(PROXIES), default="small", help="the proxy's space and network")
    ap.add_argument("--folds", default="1,2,3", help="the folds in play")
    ap.add_argument("--val-folds", default="1", help="the folds each trial validates (its score: their mean)")
    ap.add_argument("--trials", type=int, default=10, help="random search's trials")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--grace", type=int, default=1, help="ASHA's grace period in epochs")
    ap.add_argument("--workers", type=int, default=2, help="trials at once")
    ap.add_argument("--repeats", type=int, default=1, help="both searches again with seeds seed+1, ...")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="optuna engine: cpu or cuda")
    ap.add_argument(
        "--out", default=None, help="default bench/results/search_efficiency_<engine>_<time>.json"
    )
    ap.add_argument("--merge", nargs="+", metavar="RESULT_JSON", help="combine runs that used other seeds")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, Path(args.out or ROOT / "bench" / "results" / "search_efficiency_merged.json"))
        return 0
    args.folds = [int(f) for f in args.folds.split(",")]
    args.val_folds = [int(f) for f in args.val_folds.split(",")]
    if not set(args.val_folds) <= set(args.folds):
        ap.error("--val-folds must be among --folds")
    if not args.shards:
        note = ROOT / ".team" / "REAL_SHARDS.txt"
        if not note.exists():
            ap.error("--shards is required")
        args.shards = note.read_text().strip()

    from machine import machine

    work = Path(tempfile.mkdtemp(prefix="esc50_search_bench_"))
    t0 = time.time()
    out: dict = {
        "engine": args.engine,
        "machine": machine(),
        "proxy": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "repeats": [],
        "started": t0,
    }
    shared = None
    if args.engine == "tune":
        import ray

        from trainable.cv import share_data
        from trainable.shards import load_shards

        ray.init(
            num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
            configure_logging=False, _system_config={"worker_niceness": 0},  # as search/tune.py
        )  # fmt: skip
        shared = share_data(load_shards(args.shards, folds=args.folds), folds=args.val_folds)

    def search(name, sampler, asha, seed, trials, budget, target):
        if args.engine == "tune":
            return _tune_search(args, name, sampler, asha, seed, trials, budget, target, shared, work)
        from search_efficiency_optuna import Job, counts, run

        job = Job(
            name=name, sampler=sampler, asha=asha, seed=seed, trials=trials, epoch_budget=budget,
            target=target, epochs=args.epochs, grace=args.grace, reduction_factor=3,
            space=f"{Path(__file__).resolve()}:{PROXIES[args.proxy]}", shards=args.shards, folds=tuple(args.folds),
            val_folds=tuple(args.val_folds), device=args.device, workdir=str(work),
        )  # fmt: skip
        return run(job, args.workers), counts(job)

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    dest = Path(args.out or ROOT / "bench" / "results" / f"search_efficiency_{args.engine}_{stamp}.json")
    for r in range(args.repeats):
        seed = args.seed + r
        s0 = time.time()
        full = args.trials * args.epochs
        rnd_events, rnd_counts = search(f"random-{seed}", "random", False, seed, args.trials, full, None)
        target = final_best(rnd_events, args.epochs)
        s1 = time.time()
        # TPE+ASHA: as many trials as its epoch budget (random's whole spend) allows, stopping at B.
        # Its own seed: TPE's first trials are random draws, which with the same seed would repeat the
        # random search's first trials (and so its best, if that came early).
        tpe_seed = seed + TPE_SEED_OFFSET
        tpe_events, tpe_counts = search(
            f"tpe_asha-{seed}", "tpe", True, tpe_seed, full, len(rnd_events), target
        )
        rnd, tpe = epochs_to_reach(rnd_events, target), epochs_to_reach(tpe_events, target)
        rep = {
            "seed": seed,
            "target_B": target,
            "random_best_any_epoch": max(e[3] for e in rnd_events),
            "random": {
                "epochs": len(rnd_events),
                "epochs_to_B": rnd,
                "counts": rnd_counts,
                "seconds": s1 - s0,
            },
            "tpe_asha": {
                "epochs": len(tpe_events),
                "epochs_to_B": tpe,
                "best": max(e[3] for e in tpe_events),
                "trials": len({e[1] for e in tpe_events}),
                "counts": tpe_counts,
                "seconds": time.time() - s1,
            },
            # not reached: counted as the whole budget (an upper bound on the ratio's numerator)
            "ratio_to_B": (tpe or len(rnd_events)) / rnd,
            "ratio_to_budget": (tpe or len(rnd_events)) / len(rnd_events),
            "reached": tpe is not None,
            "events": {"random": rnd_events, "tpe_asha": tpe_events},  # for a later look
        }
        out["repeats"].append(rep)
        print(
            f"seed {seed}: B = {target:.4f}; random reached it after {rnd} of {len(rnd_events)} trial-epochs; "
            f"TPE+ASHA {'after ' + str(tpe) if tpe else 'did not (best ' + format(rep['tpe_asha']['best'], '.4f') + ')'}"
            f" in {len(tpe_events)} trial-epochs over {rep['tpe_asha']['trials']} trials {tpe_counts}; "
            f"ratio {rep['ratio_to_B']:.3f} of random's epochs to B ({rep['ratio_to_budget']:.3f} of its budget)",
            flush=True,
        )
        summarize(out, dest)  # after every repeat: an interrupted run keeps what it measured
    print(
        f"\n{args.engine} engine on {out['machine'].get('gpu') or out['machine'].get('cpu_model')}: proxy {args.proxy}, "
        f"folds {args.folds}, validated on {args.val_folds}, {args.trials} random trials x {args.epochs} epochs, "
        f"{args.workers} at once, ASHA grace {args.grace}, eta 3, {len(out['repeats'])} seed(s)\n"
        f"TPE+ASHA reached B in {out['reached']}/{len(out['repeats'])}; median ratio {out['median_ratio_to_B']:.3f} of "
        f"random's epochs to B, {out['median_ratio_to_budget']:.3f} of its budget (goal <= 0.333); {out['seconds']:.0f} s"
    )
    print(f"result: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
