"""`esc50 search`: Ray Tune's Tuner over an Optuna define-by-run space, ASHA over epochs, MLflow records.

    result = run_search(SearchOptions(space="default", trials=20, shards="data/shards/<id>"))
    result = run_search(SearchOptions(name="my-search", storage="runs"), resume=True)

`run_search` reads top to bottom: every check that can fail on user input (options, space,
storage, shards, tracking store) before anything starts; Ray (search/cluster.py); the records
(the options beside Tune's results: search/experiment.py; the parent MLflow run:
search/tracking.py); the Tuner over `make_trainable` (trainable/cv.py) with the searcher and
scheduler (search/searcher.py), or Tune's saved state on resume; then the results: the ranked
table (search/report.py), BBC-CV of the selection (search/bbc.py) and the parent run closed.
A search stopped early (Ctrl-C, SIGUSR1) ends `interrupted`, its parent run KILLED until
`esc50 search --resume NAME` goes on to exactly `trials` trials.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from search import experiment, interrupt, store
from search.cluster import start_ray
from search.options import SearchOptions
from search.searcher import (  # noqa: F401  (EarlyStopAwareOptunaSearch: named here by older tuner.pkl)
    EarlyStopAwareOptunaSearch,
    make_scheduler,
    make_searcher,
    max_epochs,
)
from trainable.errors import error_line
from trainable.protocol import METRIC, MODE


@dataclass(frozen=True)
class SearchResult:
    name: str
    experiment_name: str  # MLflow experiment
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    results_dir: str  # Tune's experiment directory (path or URI)
    best_trial_id: str | None
    best_cv_acc_mean: float | None
    best_cv_acc_std: float | None
    best_checkpoint: str | None  # the best trial's latest checkpoint (meta.json + fold_<k>.pt)
    best_run_id: str | None  # the best trial's MLflow run
    counts: dict[str, int]  # completed / pruned / failed
    interrupted: bool  # fewer than `trials` trials ended: resume with --resume NAME
    fold_epochs: int  # fold-epochs trained in all (the compute spent)
    seconds: float
    options: SearchOptions
    rows: list[Any] = field(default_factory=list)  # report.TrialRow, ranked
    bbc: Any = None  # search.bbc.BBCEstimate of the completed trials (None: no out-of-fold predictions)

    @property
    def best_config(self) -> dict[str, Any] | None:
        for r in self.rows:
            if r.trial_id == self.best_trial_id:
                return dict(r.config)
        return None

    def summary(self) -> str:
        if self.best_trial_id is None:
            best = "no trial reported a result"
        else:
            best = (
                f"best trial {self.best_trial_id}: cv_acc_mean {self.best_cv_acc_mean:.4f}"
                f" (std {self.best_cv_acc_std or 0:.4f})\n  selection-bias corrected: "
                + (
                    self.bbc.text()
                    if self.bbc is not None
                    else "BBC-CV not available (no completed trial left out-of-fold predictions)"
                )
                + f"\n  checkpoint: {self.best_checkpoint}\n  MLflow run: {self.best_run_id}"
            )
        c = self.counts
        state = "interrupted" if self.interrupted else "finished"
        return (
            f"search {self.name} {state}: {c.get('completed', 0)} completed, {c.get('pruned', 0)} pruned, "
            f"{c.get('failed', 0)} failed in {self.seconds:.0f} s ({self.fold_epochs} fold-epochs)\n"
            f"{best}\n  results: {self.results_dir}\n  MLflow: {self.tracking_uri} "
            f"(experiment {self.experiment_name}, search run {self.parent_run_id}; `esc50 ui` to browse)"
        )


# ---- the search --------------------------------------------------------------------------------


def run_search(
    opts: SearchOptions, resume: bool = False, data: Any = None, stop: Any = None, force: bool = False
) -> SearchResult:
    """Run a search; with `resume`, continue the one named `opts.name` in `opts.storage`.

    A resume refuses (UserError) when the shards' fingerprint differs from the one the search
    started with (other audio or features: its trials would not be comparable); `force` goes on.
    On resume the saved options are used; only `address` and `verbose` are taken from `opts`.
    `data`: the training data already loaded or shared (trainable.shards.FoldData, or the
    trainable.cv.SharedData of `share_data`, so several searches put it in the object store once);
    default: `opts.shards`, loaded by the driver. `opts.shards` is recorded either way.
    `stop`: a Tune stopper (or dict) for RunConfig(stop=...), e.g. a time budget; it must pickle.
    """
    from spaces import load_space

    t0 = time.time()
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

    # 1. options, space, storage, shards, tracking: every check before anything starts
    if resume:
        opts, space = experiment.resume_options(opts)
    else:
        opts = opts.resolve()
        space = load_space(opts.space, opts.overrides())
        opts.space_label = space.label
    samples = space.validate()
    experiment.check_storage(opts.storage)
    if not resume:
        experiment.check_new(opts)
    experiment.check_shards(opts)
    shards = experiment.shards_record(opts, resume, force)
    store.check_tracking(opts.tracking_uri)
    if opts.optuna_storage:  # older saved options have none: the study is in memory
        from search.study import open_storage

        open_storage(opts.optuna_storage)

    # 2. Ray
    import ray

    started = start_ray(opts)  # and the trials at once: opts.concurrency
    try:
        return _search(opts, space, samples, resume, t0, data, stop, shards)
    finally:
        if started:
            ray.shutdown()


def _search(
    opts: SearchOptions,
    space: Any,
    samples: list[Any],
    resume: bool,
    t0: float,
    data: Any,
    stop: Any,
    shards: dict[str, Any],
) -> SearchResult:
    from ray import tune

    from search import report, tracking

    epochs = max_epochs(opts, samples)
    fixed = set(space.overrides)
    sampled = [k for k in dict.fromkeys(k for s in samples for k in s.params) if k not in fixed]
    budget = {
        "trials": opts.trials,
        "epochs_per_trial": epochs,
        "fold_epochs": opts.trials * epochs * len(opts.folds),
    }

    # 3. the records: the parent run in MLflow, the options and space beside Tune's results
    parent = tracking.open_search_run(opts.tracking_uri, opts, space, budget, resume=resume, data=shards)
    if not resume:
        experiment.save_start(opts, space, shards)
    try:
        # 4. the Tuner: trainable, searcher, scheduler (or Tune's saved state)
        exp_dir = experiment.experiment_dir(opts.storage, opts.name)
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's CLIReporter table (the new output ignores it)
        if opts.verbose:
            print(_start_line(opts, space, epochs, resume), flush=True)
        trainable = _trainable(opts, data)
        if resume:
            tuner = tune.Tuner.restore(exp_dir, trainable, resume_unfinished=True, resume_errored=True)
            _set_output(tuner, opts, sampled)
        else:
            tuner = _tuner(trainable, opts, space, epochs, sampled, parent, shards, stop)
        with interrupt.guard():
            results = tuner.fit()

        # 5. the results: ranked rows, counts, BBC-CV; the parent run closed
        c = store.client(opts.tracking_uri)
        runs = store.search_runs(c, parent.experiment_id, opts.name, store.ROLE_TRIAL)
        run_ids = {r.data.tags.get(store.TAG_TRIAL): r.info.run_id for r in runs}
        statuses = {r.data.tags.get(store.TAG_TRIAL): r.data.tags.get(store.TAG_STATUS) for r in runs}
        rows = report.collect(results, run_ids, statuses)
        if experiment.keep_checkpoints(opts.storage) is None:
            experiment.prune_checkpoints(results, rows)
        counts = report.counts(rows)
        # stopped by Ctrl-C (Tune returns from fit as if done), or fewer trials ended than asked
        interrupted = interrupt.stopped() or sum(counts.get(k, 0) for k in store.ENDED) < opts.trials
        best = report.best(rows)
        fold_epochs = sum(r.epochs_done for r in rows) * len(opts.folds)
        bbc = _bbc(c, rows, opts.seed)
        with tempfile.TemporaryDirectory(prefix="esc50_search_") as d:
            artifacts, skipped = _artifacts(opts, space, rows, interrupted, d)
            tracking.close_search_run(
                opts.tracking_uri,
                parent.run_id,
                rows,
                best,
                counts,
                fold_epochs,
                interrupted,
                bbc,
                artifacts,
                skipped,
            )
    except BaseException as e:
        tracking.fail_search_run(opts.tracking_uri, parent.run_id, isinstance(e, KeyboardInterrupt))
        raise
    result = SearchResult(
        name=opts.name,
        experiment_name=opts.experiment,
        experiment_id=parent.experiment_id,
        parent_run_id=parent.run_id,
        tracking_uri=opts.tracking_uri,
        results_dir=exp_dir,
        best_trial_id=best.trial_id if best else None,
        best_cv_acc_mean=best.cv_acc_mean if best else None,
        best_cv_acc_std=best.cv_acc_std if best else None,
        best_checkpoint=best.checkpoint if best else None,
        best_run_id=best.run_id if best else None,
        counts=counts,
        interrupted=interrupted,
        fold_epochs=fold_epochs,
        seconds=time.time() - t0,
        options=opts,
        rows=rows,
        bbc=bbc,
    )
    if opts.verbose:
        print("\n" + report.summary_table(rows, sampled), flush=True)
        print("\n" + result.summary(), flush=True)
        if interrupted:
            print(f"\ncontinue with: esc50 search --resume {opts.name} --storage {opts.storage}", flush=True)
    return result


def _start_line(opts: SearchOptions, space: Any, epochs: int, resume: bool) -> str:
    from trainable.layout import resolve_layout

    return (
        f"search {opts.name}: space {space.label}, {opts.trials} trials x folds "
        f"{','.join(map(str, opts.folds))} ({resolve_layout(opts.fold_layout, opts.gpus_per_fold)}), "
        f"up to {epochs} epochs, {opts.concurrency} at once, "
        f"sampler {opts.sampler}, ASHA {f'on (grace {opts.grace(epochs)})' if opts.asha else 'off'}"
        f"{' (resumed)' if resume else ''}"
    )


def _trainable(opts: SearchOptions, data: Any) -> Any:
    from trainable.cv import make_trainable

    return make_trainable(
        opts.shards if data is None else data,
        folds=opts.folds,
        cpus_per_fold=opts.cpus_per_fold,
        gpus_per_fold=opts.gpus_per_fold,
        layout=opts.fold_layout,
    )


def _tuner(
    trainable: Any,
    opts: SearchOptions,
    space: Any,
    epochs: int,
    sampled: list[str],
    parent: Any,
    shards: dict[str, Any],
    stop: Any,
) -> Any:
    """A new search's Tuner: the searcher in a ConcurrencyLimiter, the scheduler, the MLflow and
    progress callbacks, retries from the latest checkpoint."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from search import report, tracking

    searcher = make_searcher(
        space, opts, {"mlflow_run_id": parent.run_id, "mlflow_tracking_uri": opts.tracking_uri}
    )
    callback = tracking.MLflowTrialCallback(
        opts.tracking_uri, parent.experiment_id, opts.name, parent.run_id, opts.folds, sampled, shards
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=opts.concurrency),
            scheduler=make_scheduler(opts, epochs),
            num_samples=opts.trials,
            trial_name_creator=report.trial_dirname,
            trial_dirname_creator=report.trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=opts.name,
            storage_path=opts.storage,
            callbacks=[interrupt.StopWatch(), callback, *_progress_callbacks(opts, epochs, sampled)],
            stop=stop,
            failure_config=tune.FailureConfig(max_failures=opts.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=experiment.keep_checkpoints(opts.storage)),
            progress_reporter=report.progress_reporter(sampled) if opts.verbose >= 2 else None,
            verbose=1 if opts.verbose >= 2 else 0,  # Tune's table only under -v
        ),
    )


def _progress_callbacks(opts: SearchOptions, epochs: int, sampled: list[str]) -> list[Any]:
    """The default progress (one line per trial event) unless -q or -v (Tune's table)."""
    from search.tune_progress import TrialProgress

    progress = TrialProgress(
        opts.name, opts.trials, epochs, opts.concurrency or 1, sampled, opts.max_failures
    )
    progress.enabled = opts.verbose == 1
    return [progress]


def _set_output(tuner: Any, opts: SearchOptions, sampled: list[str]) -> None:
    """A resumed search prints as asked now (-q, default, -v), not as its first run did, and
    watches for Ctrl-C: the restored RunConfig (Tune's private copy; no public setter) is adjusted."""
    from search import report
    from search.tune_progress import TrialProgress

    try:
        rc = tuner._local_tuner.get_run_config()
    except AttributeError:  # another Tune layout: keep what was saved
        return
    if not any(isinstance(cb, interrupt.StopWatch) for cb in rc.callbacks or []):
        rc.callbacks = [interrupt.StopWatch(), *(rc.callbacks or [])]  # a search saved before it had one
    rc.verbose = 1 if opts.verbose >= 2 else 0
    rc.progress_reporter = report.progress_reporter(sampled) if opts.verbose >= 2 else None
    for cb in rc.callbacks or []:
        if isinstance(cb, TrialProgress):
            cb.enabled = opts.verbose == 1


def _bbc(c: Any, rows: list[Any], seed: int) -> Any:
    """BBC-CV over the completed trials' out-of-fold predictions (search/bbc.py); None when none
    has any. A courtesy beside the result: a failure here is a warning, never a lost search."""
    from search.bbc import search_bbc

    try:
        done = [r for r in rows if r.status == store.COMPLETED]
        oofs = [o for o in (store.trial_oof(c, r.run_id, r.checkpoint) for r in done) if o is not None]
        return search_bbc(oofs, seed=seed)
    except Exception as e:
        import logging

        logging.getLogger(__name__).warning("BBC-CV: %s: %s", type(e).__name__, error_line(e))
        return None


def _artifacts(
    opts: SearchOptions, space: Any, rows: list[Any], interrupted: bool, folder: str
) -> tuple[list[tuple[str, str | None]], str | None]:
    """The parent run's files, written under `folder`: results.csv and, once the search is done,
    the Optuna plots; and why plots were skipped, if any were (plots are a courtesy: never lose
    the result for them)."""
    from search import report

    artifacts: list[tuple[str, str | None]] = [
        (report.write_csv(rows, os.path.join(folder, "results.csv")), None)
    ]
    if interrupted or not rows:
        return artifacts, None
    try:
        from search.study import load

        # the search's own study when it was stored; else one rebuilt from Tune's results
        study = load(opts.optuna_storage, opts.name) or report.optuna_study(space, rows)
        files, skipped = report.write_plots(study, os.path.join(folder, "plots"))
    except Exception as e:
        return artifacts, f"{type(e).__name__}: {error_line(e)}"
    artifacts += [(f, "plots") for f in files]
    return artifacts, "; ".join(f"{k}: {v}" for k, v in skipped.items()) or None
