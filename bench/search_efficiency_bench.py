"""Search efficiency: TPE + ASHA vs random search without early stopping, on a cheap proxy.

    .venv/bin/python bench/search_efficiency_bench.py --shards data/shards/<digest> --repeats 5
    python bench/search_efficiency_bench.py --engine optuna --device cuda --proxy wide \\
        --folds 1,2,3,4,5 --val-folds 1,2 --trials 30 --epochs 20 --repeats 5 --workers 12

The proxy (`--proxy`): a small CNN on the real ESC-50 shards, `small` (width 8, 3 stages, 96-frame
crops: cheap on a CPU) or `wide` (the compact preset's network: for a GPU). Each trial trains one
model per validation fold (`--val-folds`, each on the other `--folds`) and is scored by their mean
accuracy per epoch, as a product trial is. Both searches draw from the proxy's space below
(learning rate, weight decay, batch size, dropout, mixup, label smoothing; `wide` adds SpecAugment
and roll), with fixed seeds (each search its own, so they share no draws):

  1. random search: `--trials` trials, each trained all `--epochs` epochs; B = the best final score
     of its trials (the result it would deliver);
  2. TPE + ASHA (grace `--grace` epochs, reduction factor 3): new trials until it has spent as many
     trial-epochs as the random search did (an equal epoch budget).

One rule for both arms (`delivered`): the trial-epochs an arm spent, every epoch of every trial in
the order they were reported (trials ASHA stopped included), until it had delivered a COMPLETED
trial (all epochs trained) whose final score is >= B. An intermediate epoch of a trial that ASHA
later stopped does not count: the product never delivers it. Goal: TPE+ASHA's <= 1/3 of random's,
by the median over seeds (`--repeats`, at least 5 for a verdict); a seed where TPE+ASHA never
delivers B counts as infinitely many epochs. Beside it: the best final score of a completed trial
each arm delivered within the equal epoch budget. `saturation` in each repeat says whether the
proxy left anything to find (random's best final score vs its best score after a quarter of the
epochs).

Every trial's sampled values and the config it trained are recorded and checked (`check_configs`):
a trial that did not train what its sampler drew fails the benchmark.

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
import math  # noqa: E402
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
    crops), which can overfit, so regularization and augmentation matter, as in the real search."""
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
RULE = "epochs until a completed trial's final score >= B, both arms"  # in every result JSON


GOAL = 1 / 3  # TPE+ASHA's epochs to deliver B, as a fraction of random search's


def final_scores(events: list[Event], epochs: int) -> list[tuple[int, float]]:
    """(trial-epochs spent when it arrived, final score) of every COMPLETED trial, in arrival order."""
    return [(i, score) for i, (_, _, epoch, score) in enumerate(events, 1) if epoch == epochs]


def final_best(events: list[Event], epochs: int, budget: int | None = None) -> float | None:
    """The best final score of a trial completed within `budget` trial-epochs (default: all)."""
    scores = [s for i, s in final_scores(events, epochs) if budget is None or i <= budget]
    return max(scores) if scores else None


def delivered(events: list[Event], epochs: int, target: float) -> int | None:
    """Trial-epochs spent (all trials) until a COMPLETED trial's final score was >= target; None if never."""
    for i, score in final_scores(events, epochs):
        if score >= target - 1e-12:
            return i
    return None


def check_configs(configs: dict[str, dict]) -> list[str]:
    """Problems with what the trials trained: a sampled value the trained config does not have,
    or (with several trials) every trial training the same config."""
    problems = []
    for trial, c in sorted(configs.items()):
        for k, v in c["sampled"].items():
            got = c["trained"].get(k)
            same = got == v or (
                isinstance(v, float)
                and isinstance(got, (int, float))
                and abs(got - v) <= 1e-12 * max(1, abs(v))
            )
            if not same:
                problems.append(f"trial {trial}: sampled {k}={v!r} but trained {k}={got!r}")
    trained = {json.dumps(c["trained"], sort_keys=True) for c in configs.values()}
    if len(configs) > 1 and len(trained) == 1:
        problems.append(f"all {len(configs)} trials trained the same config")
    return problems


def saturation(events: list[Event], epochs: int) -> dict:
    """Random's best final score vs its best score by a quarter of the epochs: a proxy whose
    trials are as good early as at the end leaves a search nothing to find."""
    early = max(1, epochs // 4)
    at_early = [score for _, _, epoch, score in events if epoch == early]
    best_final = final_best(events, epochs)
    best_early = max(at_early) if at_early else None
    gain = None if best_final is None or best_early is None else best_final - best_early
    return {"early_epoch": early, "best_early": best_early, "best_final": best_final, "gain": gain}


# ---- engine: Ray Tune + MLflow (the product's run_search) ----------------------------------------


def _tune_arrivals(uri: str, search: str) -> tuple[list[Event], dict[str, dict]]:
    """Every reported epoch of the search from MLflow: (time, trial id, epoch, cv_acc_mean); and
    per trial its sampled values (run params) and the config its fold workers trained (its
    checkpoint's meta.json)."""
    from search.store import TAG_CHECKPOINT, TAG_TRIAL, client, search_runs

    c = client(uri)
    exp = c.get_experiment_by_name("esc50").experiment_id
    out, configs = [], {}
    for run in search_runs(c, exp, search, "trial"):
        tid = run.data.tags[TAG_TRIAL]
        for m in c.get_metric_history(run.info.run_id, "cv_acc_mean"):
            out.append((m.timestamp / 1000, tid, int(m.step), float(m.value)))
        ckpt = run.data.tags.get(TAG_CHECKPOINT)
        if ckpt and (Path(ckpt) / "meta.json").exists():
            names = [k for k in run.data.tags.get("esc50.sampled", "").split(",") if k]
            trained = json.loads((Path(ckpt) / "meta.json").read_text())["config"]
            sampled = {k: type(trained[k])(run.data.params[k]) for k in names if k in run.data.params}
            configs[tid] = {"sampled": sampled, "trained": trained}
    return sorted(out), configs


def _tune_search(
    args, name, sampler, asha, seed, trials, budget, target, shared, work
) -> tuple[list[Event], dict, dict]:
    from ray.tune import Stopper

    from search.options import SearchOptions
    from search.tune import run_search

    epochs = args.epochs

    class Budget(Stopper):
        """Stops the whole search once `budget` trial-epochs were reported (or, with a target, a
        trial completed with a final score >= target)."""

        def __init__(self) -> None:
            # distinct (trial, epoch): Tune may show the stopper a trial's last result twice
            self.epochs: set[tuple[str, int]] = set()
            self.reached = False

        def __call__(self, trial_id: str, result: dict) -> bool:
            epoch = int(result.get("epoch", 0))
            self.epochs.add((trial_id, epoch))
            final = epoch == epochs and result.get("cv_acc_mean", -1.0) >= (target or 0) - 1e-12
            self.reached |= target is not None and final
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
    result = run_search(opts, data=shared, stop=Budget())
    events, configs = _tune_arrivals(uri, name)
    return events, dict(result.counts), configs


def _median(values: list[float | None]) -> float:
    """Median with None (never delivered) as infinity."""
    return statistics.median(math.inf if v is None else v for v in values)


def summarize(out: dict, dest: Path) -> None:
    """Medians over the repeats so far and the verdict, written to `dest` (atomically)."""
    reps = out["repeats"]
    med = _median([r["ratio"] for r in reps])
    out["median_ratio"] = None if math.isinf(med) else med
    out["delivered"] = sum(r["tpe_asha"]["epochs_to_deliver_B"] is not None for r in reps)
    out["median_best_final_random"] = statistics.median(r["random"]["best_final"] for r in reps)
    tpe_best = [r["tpe_asha"]["best_final"] for r in reps]
    out["median_best_final_tpe_asha"] = (
        statistics.median(-math.inf if v is None else v for v in tpe_best) if tpe_best else None
    )
    if out["median_best_final_tpe_asha"] == -math.inf:
        out["median_best_final_tpe_asha"] = None
    out["goal"] = f"median ratio <= {GOAL:.3f} over >= 5 seeds"
    if len(reps) < 5:
        out["verdict"] = f"not measured: {len(reps)} seed(s), the goal needs >= 5"
    else:
        out["verdict"] = "met" if med <= GOAL else "not met"
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
    if any(r.get("rule") != RULE for r in runs):
        raise SystemExit("cannot merge: a run counted by another rule (an older version of this benchmark)")
    out = {**runs[0], "merged_from": paths, "repeats": [rep for r in runs for rep in r["repeats"]]}
    seeds = [rep["seed"] for rep in out["repeats"]]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"cannot merge: seeds {sorted(seeds)} repeat")
    out["started"] = time.time() - sum(r["seconds"] for r in runs)
    summarize(out, dest)
    _report(out, dest)


def _report(out: dict, dest: Path) -> None:
    for rep in out["repeats"]:
        print(f"seed {rep['seed']}: ratio {_fmt(rep['ratio'])}")
    print(
        f"{len(out['repeats'])} seed(s): TPE+ASHA delivered B in {out['delivered']}; median ratio "
        f"{_fmt(out['median_ratio'])} of random's epochs to deliver B (goal <= {GOAL:.3f}): {out['verdict']}; "
        f"best final score at an equal epoch budget, median: random {out['median_best_final_random']:.4f}, "
        f"TPE+ASHA {_fmt(out['median_best_final_tpe_asha'])}\nresult: {dest}"
    )


def _fmt(v: float | None) -> str:
    return "never" if v is None else f"{v:.3f}"


# ---- the benchmark --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
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
    args = ap.parse_args(argv)
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
        "rule": RULE,
        "command": ["python", "bench/search_efficiency_bench.py", *(sys.argv[1:] if argv is None else argv)],
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

        if not ray.is_initialized():  # (the suite's smoke test brings its own)
            ray.init(
                num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
                configure_logging=False, _system_config={"worker_niceness": 0},  # as search/cluster.py
            )  # fmt: skip
        shared = share_data(load_shards(args.shards, folds=args.folds), folds=args.val_folds)

    def search(name, sampler, asha, seed, trials, budget, target):
        if args.engine == "tune":
            return _tune_search(args, name, sampler, asha, seed, trials, budget, target, shared, work)
        from search_efficiency_optuna import Job, configs, counts, run

        job = Job(
            name=name, sampler=sampler, asha=asha, seed=seed, trials=trials, epoch_budget=budget,
            target=target, epochs=args.epochs, grace=args.grace, reduction_factor=3,
            space=f"{Path(__file__).resolve()}:{PROXIES[args.proxy]}", shards=args.shards, folds=tuple(args.folds),
            val_folds=tuple(args.val_folds), device=args.device, workdir=str(work),
        )  # fmt: skip
        return run(job, args.workers), counts(job), configs(job)

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    dest = Path(args.out or ROOT / "bench" / "results" / f"search_efficiency_{args.engine}_{stamp}.json")
    for r in range(args.repeats):
        seed = args.seed + r
        s0 = time.time()
        full = args.trials * args.epochs
        rnd_events, rnd_counts, rnd_configs = search(
            f"random-{seed}", "random", False, seed, args.trials, full, None
        )
        target = final_best(rnd_events, args.epochs)
        if target is None:
            raise SystemExit(f"seed {seed}: no random trial completed: nothing to compare against")
        s1 = time.time()
        # TPE+ASHA: as many trials as an equal epoch budget (random's whole spend) allows, run to the
        # end of that budget (for the best final score at an equal budget). Its own seed: TPE's first
        # trials are random draws, which with the same seed would repeat the random search's.
        tpe_seed = seed + TPE_SEED_OFFSET
        tpe_events, tpe_counts, tpe_configs = search(
            f"tpe_asha-{seed}", "tpe", True, tpe_seed, full, len(rnd_events), None
        )
        problems = check_configs(rnd_configs) + check_configs(tpe_configs)
        if problems:
            raise SystemExit(f"seed {seed}: trials did not train what was sampled: {'; '.join(problems[:5])}")
        rnd = delivered(rnd_events, args.epochs, target)
        tpe = delivered(tpe_events, args.epochs, target)
        rep = {
            "seed": seed,
            "target_B": target,
            "random": {
                "epochs": len(rnd_events),
                "epochs_to_deliver_B": rnd,
                "best_final": target,
                "counts": rnd_counts,
                "seconds": s1 - s0,
            },
            "tpe_asha": {
                "epochs": len(tpe_events),
                "epochs_to_deliver_B": tpe,
                "best_final": final_best(tpe_events, args.epochs, budget=len(rnd_events)),
                "best_any_epoch": max(e[3] for e in tpe_events),
                "trials": len({e[1] for e in tpe_events}),
                "counts": tpe_counts,
                "seconds": time.time() - s1,
            },
            "ratio": None if tpe is None else tpe / rnd,  # None: never delivered (infinity in the median)
            "saturation": saturation(rnd_events, args.epochs),
            "configs": {"random": rnd_configs, "tpe_asha": tpe_configs},
            "events": {"random": rnd_events, "tpe_asha": tpe_events},  # raw: the figures re-derive from them
        }
        out["repeats"].append(rep)
        print(
            f"seed {seed}: B = {target:.4f}; random delivered it after {rnd} of {len(rnd_events)} trial-epochs; "
            f"TPE+ASHA {'after ' + str(tpe) if tpe else 'never'} in {len(tpe_events)} trial-epochs over "
            f"{rep['tpe_asha']['trials']} trials {tpe_counts} (best final {_fmt(rep['tpe_asha']['best_final'])}); "
            f"ratio {_fmt(rep['ratio'])}",
            flush=True,
        )
        summarize(out, dest)  # after every repeat: an interrupted run keeps what it measured
    print(
        f"\n{args.engine} engine on {out['machine'].get('gpu') or out['machine'].get('cpu_model')}: proxy {args.proxy}, "
        f"folds {args.folds}, validated on {args.val_folds}, {args.trials} random trials x {args.epochs} epochs, "
        f"{args.workers} at once, ASHA grace {args.grace}, eta 3; {out['seconds']:.0f} s"
    )
    _report(out, dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
