"""`esc50 search`: Ray Tune's Tuner over an Optuna define-by-run space, ASHA over epochs, MLflow records.

    from search.options import SearchOptions
    from search.tune import run_search
    result = run_search(SearchOptions(space="default", trials=20, shards="data/shards/<id>"))
    result = run_search(SearchOptions(name="my-search", storage="runs"), resume=True)

How a search runs (`run_search`, top to bottom); everything that can fail on user input fails
before the first trial, as a UserError naming the option:
  1. options resolved (search/options.py) or, on resume, read back from
     `<storage>/<name>/esc50_search.json`; the space is loaded and a few configs drawn from it
     are validated as TrainConfigs; the storage is written to, the tracking store reached, the
     shards' manifest read;
  2. Ray: the cluster at `--address` (connect only), else a local Ray on 127.0.0.1 with at least
     the CPUs one trial needs; concurrency defaults to the trials the cluster fits at once (an
     autoscaling cluster: at the most its autoscaler config allows);
  3. the parent MLflow run (found again on resume), the options JSON beside Tune's results
     (`esc50_search.json`) and, for a user's space file, its text (`esc50_space.py`);
  4. `make_trainable(shards, folds, cpus_per_fold, gpus_per_fold)` (trainable/cv.py: the data goes
     into the object store once), OptunaSearch(space, cv_acc_mean, max, sampler) in a
     ConcurrencyLimiter, ASHA on `epoch` (or FIFO), FailureConfig(max_failures), one checkpoint
     kept per trial; or `Tuner.restore(..., resume_errored=True)` (the searcher's history is
     restored from Tune's experiment state);
  5. fit, printing one line per trial event (search/tune_progress.py; `-v`: Tune's table); then
     the ranked summary, results.csv and the Optuna plots (from the stored study, search/study.py)
     on the parent run, the best trial, and beside its cv_acc_mean the BBC-CV estimate of the
     selection from the completed trials' out-of-fold predictions (search/bbc.py; metrics
     `bbc_cv_acc`, `bbc_cv_acc_lo`, `bbc_cv_acc_hi` on the parent run).

A resume checks the shards' fingerprint against the one the search started with (DATA_FILE beside
Tune's results) and refuses another unless forced.

A search stopped early (Ctrl-C, SIGUSR1) ends with `interrupted=True` and the parent run KILLED;
`esc50 search --resume NAME` goes on from Tune's saved state to exactly `trials` trials.
"""

from __future__ import annotations

import math
import os
import posixpath
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from search import store
from search.concurrency import default_concurrency, trial_resources
from search.errors import UserError
from search.options import OPTIONS_FILE, SearchOptions
from search.sampler import make_sampler

SPACE_FILE = "esc50_space.py"
DATA_FILE = "esc50_data.json"  # the shards a search started with: fingerprint, features, clips
METRIC, MODE = "cv_acc_mean", "max"


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


# ---- storage -----------------------------------------------------------------------------------


def _fs(storage: str):
    """(pyarrow filesystem, path) of --storage; UserError naming the option."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    if "://" not in storage:
        return pafs.LocalFileSystem(), storage
    try:
        fs, path = pafs.FileSystem.from_uri(storage)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as e:
        raise UserError(f"--storage {storage}: cannot open this location: {e}") from None
    return fs, path.rstrip("/")


def check_storage(storage: str) -> None:
    """Create --storage if needed and write a probe file there; UserError naming the option."""
    fs, path = _fs(storage)
    probe = posixpath.join(path, f".esc50-probe-{uuid.uuid4().hex[:8]}")
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as e:  # OSError, ArrowInvalid, permission errors
        raise UserError(f"--storage {storage}: cannot write there: {_first(e)}") from None


def experiment_dir(storage: str, name: str) -> str:
    return posixpath.join(storage.rstrip("/"), name) if "://" in storage else os.path.join(storage, name)


def _exists(storage: str, name: str, file: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = _fs(storage)
    return fs.get_file_info(posixpath.join(path, name, file)).type != pafs.FileType.NotFound


def _write(storage: str, name: str, file: str, text: str) -> None:
    fs, path = _fs(storage)
    fs.create_dir(posixpath.join(path, name), recursive=True)
    with fs.open_output_stream(posixpath.join(path, name, file)) as f:
        f.write(text.encode())


def _read(storage: str, name: str, file: str) -> str:
    fs, path = _fs(storage)
    with fs.open_input_stream(posixpath.join(path, name, file)) as f:
        return f.read().decode()


def saved_options(storage: str, name: str) -> SearchOptions:
    """The options a search was started with (for --resume NAME)."""
    from search.options import absolute

    storage = absolute(storage)
    if not _exists(storage, name, OPTIONS_FILE):
        raise UserError(
            f"--resume {name}: no search {name!r} in {storage} (no {OPTIONS_FILE}); check --storage"
        )
    if not _exists(storage, name, "tuner.pkl"):
        raise UserError(
            f"--resume {name}: the search never started in {storage} (no Tune state): start it again"
        )
    return SearchOptions.from_json(_read(storage, name, OPTIONS_FILE))


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


# ---- checkpoints on object storage -------------------------------------------------------------
# Tune deletes a trial's older checkpoints (num_to_keep) as soon as a newer one is registered, but
# uploads its own state (which names each trial's latest checkpoint) to object storage later and
# asynchronously. A driver killed in between leaves a state that names a deleted checkpoint, and
# the resumed trial fails ("does not exist on storage anymore"): found with a search killed on an
# S3 API (tests/test_object_storage.py). On a local disk the state is written in place at once.
# So on object storage no checkpoint is deleted while the search runs; when fit() returns (Tune's
# state synced), every ended trial keeps only its latest one.


def keep_checkpoints(storage: str) -> int | None:
    """Tune's num_to_keep: 1 on a local disk; None (all, until `prune_checkpoints`) on object storage."""
    return 1 if "://" not in storage or storage.startswith("file://") else None


def prune_checkpoints(results: Any, rows: list[Any]) -> int:
    """Delete every checkpoint of an ended trial but its latest; returns how many went. A failure
    is a warning: the search's result stands, the storage only keeps more than it needs."""
    import pyarrow.fs as pafs

    ended = {r.trial_id for r in rows if r.status in store.ENDED}
    deleted = 0
    for result in results:
        ckpt = result.checkpoint
        tid = (
            posixpath.basename(posixpath.dirname(ckpt.path.rstrip("/"))).removeprefix("trial_")
            if ckpt
            else ""
        )
        if ckpt is None or tid not in ended:
            continue
        fs, latest = ckpt.filesystem, ckpt.path.rstrip("/")
        try:
            for info in fs.get_file_info(pafs.FileSelector(posixpath.dirname(latest))):
                name = posixpath.basename(info.path.rstrip("/"))
                if info.type == pafs.FileType.Directory and name.startswith("checkpoint_"):
                    if info.path.rstrip("/") != latest:
                        fs.delete_dir(info.path)
                        deleted += 1
        except OSError as e:
            print(f"warning: could not delete old checkpoints of trial {tid}: {e}", flush=True)
    return deleted


# ---- Ray ---------------------------------------------------------------------------------------


# The standard AWS variables that say where object storage is and who we are there. Trials read and
# write their checkpoints in --storage from their own processes, which on a running cluster do not
# inherit the driver's environment; these go to them with the job (Ray keeps a job's runtime_env
# in its GCS, behind the cluster's token). On AWS with instance profiles none of them is set.
STORAGE_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


def storage_env() -> dict[str, str]:
    """The STORAGE_ENV variables this process has, for the trials' runtime_env."""
    return {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}


def start_ray(opts: SearchOptions) -> bool:
    """Connect to --address, or start a local Ray on loopback. Returns whether this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = {"env_vars": storage_env()} if storage_env() else None
    if opts.address:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        try:
            ray.init(
                address=opts.address, runtime_env=runtime_env, log_to_driver=False, configure_logging=False
            )
        except Exception as e:
            raise UserError(f"--address {opts.address}: cannot connect to Ray: {_first(e)}") from None
        return True
    # Local Ray on loopback only: Ray reads this switch when it is imported, so set the constant too.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    cpus, _ = trial_resources(opts)
    need = math.ceil(cpus * (opts.concurrency or 1))
    ray.init(
        num_cpus=max(os.cpu_count() or 1, need),
        include_dashboard=False,
        runtime_env=runtime_env,
        log_to_driver=False,
        configure_logging=False,
        # Ray runs workers at nice 15 by default; the trials are this job's main work, and on a CPU
        # shared with anything else they would crawl.
        _system_config={"worker_niceness": 0},
    )
    return True


# ---- the searcher --------------------------------------------------------------------------------
# Tune's OptunaSearch tells every trial that ended with a result as COMPLETE with its last value, so
# a trial ASHA stopped after 1 epoch looks to TPE like a finished trial that scored its epoch-1
# accuracy. Told as PRUNED instead (its per-epoch values were reported as intermediate values), TPE
# ranks it as Optuna intends: below the finished trials, by how far it got.


def stopped_early(done: Any, planned: Any) -> bool:
    """The trial's last reported epoch is short of its configured epochs: the scheduler stopped it."""
    return done is not None and planned is not None and int(done) < int(planned)


class EarlyStopAwareOptunaSearch(OptunaSearch):
    def suggest(self, trial_id: str) -> dict | None:
        from trainable.config import TrainConfig

        config = super().suggest(trial_id)
        if config is not None:
            self._esc50_planned = getattr(self, "_esc50_planned", {})  # pickled with the searcher
            self._esc50_planned[trial_id] = config.get("epochs", TrainConfig().epochs)
            if self._storage is not None:  # a stored study: tie its trial to Tune's (dashboard, tests)
                from search.study import TUNE_TRIAL_ATTR

                self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        try:
            super().on_trial_result(trial_id, result)
        except UpdateFinishedTrialError:
            # A stored study can be ahead of Tune's saved state: after a killed driver, Tune
            # replays a trial the study already saw finish. Its first record stands.
            pass

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        planned = getattr(self, "_esc50_planned", {}).get(trial_id)
        done = (result or {}).get("epoch")
        if error or not stopped_early(done, planned) or trial_id in self._completed_trials:
            value = (result or {}).get(self.metric)
            if not error and value is not None and done is not None and trial_id in self._ot_trials:
                # the last epoch's value as an intermediate value too (Tune hands it only here), so
                # a stored study's curves end where MLflow's do
                try:
                    self._ot_trials[trial_id].report(float(value), int(done))
                except Exception:  # a step already reported (a resumed trial): keep the first
                    pass
            return super().on_trial_complete(trial_id, result=result, error=error)
        try:
            ot_trial = self._ot_trials[trial_id]
            value = (result or {}).get(self.metric)
            if value is not None:  # Tune hands the last result here, not to on_trial_result
                ot_trial.report(float(value), int(done))
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        except Exception:  # e.g. a trial Optuna does not know: Tune's default handling
            return super().on_trial_complete(trial_id, result=result, error=error)
        self._completed_trials.add(trial_id)


def make_searcher(space: Any, opts: SearchOptions, attrs: dict[str, str] | None = None):
    """OptunaSearch over the define-by-run `space`, telling Optuna which trials ASHA stopped early;
    its study is stored at `opts.optuna_storage` (search/study.py), with `attrs` on it, if set."""
    kwargs: dict[str, Any] = {}
    if opts.optuna_storage:
        from search import study

        storage = study.open_storage(opts.optuna_storage)
        study.fresh(storage, opts.name)
        kwargs = {"storage": storage, "study_name": opts.name}
    searcher = EarlyStopAwareOptunaSearch(
        space=space, metric=METRIC, mode=MODE, sampler=make_sampler(opts), **kwargs
    )
    for k, v in (attrs or {}).items() if kwargs else ():
        searcher._ot_study.set_user_attr(k, v)
    return searcher


def max_epochs(opts: SearchOptions, samples: list[Any]) -> int:
    from trainable.config import TrainConfig

    if opts.epochs is not None:
        return int(opts.epochs)
    return max(int(s.config.get("epochs", TrainConfig().epochs)) for s in samples) if samples else 1


def make_scheduler(opts: SearchOptions, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if not opts.asha:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",
        max_t=max(1, epochs),
        grace_period=opts.grace(epochs),
        reduction_factor=opts.reduction_factor,
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

    # 1. options, space, storage, tracking, shards: every check before anything starts
    if resume:
        opts, space = _resume_options(opts)
    else:
        opts = opts.resolve()
        space = load_space(opts.space, opts.overrides())
        opts.space_label = space.label
    samples = space.validate()
    check_storage(opts.storage)
    if not resume and _exists(opts.storage, opts.name, "tuner.pkl"):
        raise UserError(
            f"--name {opts.name}: a search of that name exists in {opts.storage}; "
            f"continue it with --resume {opts.name}, or choose another --name"
        )
    _check_shards(opts)
    shards = _shards_record(opts, resume, force)
    store.check_tracking(opts.tracking_uri)
    if opts.optuna_storage:  # older saved options have none: the study is in memory
        from search.study import open_storage

        open_storage(opts.optuna_storage)

    # 2. Ray
    import ray

    started = start_ray(opts)
    try:
        if opts.concurrency is None:
            opts.concurrency = default_concurrency(opts)
        else:
            default_concurrency(opts)  # checks that one trial fits at all
        return _search(opts, space, samples, resume, t0, data, stop, shards)
    finally:
        if started:
            ray.shutdown()


def _check_shards(opts: SearchOptions) -> None:
    from trainable.shards import read_manifest

    try:
        manifest = read_manifest(opts.shards)
    except UserError as e:
        raise UserError(f"--shards {opts.shards}: {e}") from None
    if manifest is None:
        raise UserError(
            f"--shards {opts.shards}: not a prepared dataset (no _manifest.json): run `esc50 prepare` first"
        )
    have = {int(k) for k in manifest.get("files", {})}
    missing = [f for f in opts.folds or () if f not in have]
    if missing:
        raise UserError(
            f"--folds: the shards at {opts.shards} have no fold(s) {missing} (they have {sorted(have)})"
        )


def _shards_record(opts: SearchOptions, resume: bool, force: bool) -> dict[str, Any]:
    """The shards' {shards, fingerprint, features, n_clips}; on resume, checked against the record
    the search started with (DATA_FILE beside Tune's results)."""
    import json

    from search import provenance

    fingerprint, features, n_clips = provenance.manifest_data(opts.shards)
    now = {"shards": opts.shards, "fingerprint": fingerprint, "features": features, "n_clips": n_clips}
    if resume and _exists(opts.storage, opts.name, DATA_FILE):
        then = json.loads(_read(opts.storage, opts.name, DATA_FILE))
        if then.get("fingerprint") != fingerprint and not force:
            raise UserError(
                f"--resume {opts.name}: the shards at {opts.shards} have fingerprint {fingerprint}, but the "
                f"search started with {then.get('fingerprint')} (other audio or feature parameters), so "
                "its trials would not be comparable; restore those shards, or pass --force to go on anyway"
            )
    return now


def _search(
    opts: SearchOptions,
    space: Any,
    samples: list[Any],
    resume: bool,
    t0: float,
    data: Any = None,
    stop: Any = None,
    shards: dict[str, Any] | None = None,
) -> SearchResult:
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from search import report, tracking
    from trainable.cv import make_trainable
    from trainable.layout import resolve_layout

    epochs = max_epochs(opts, samples)
    fixed = set(space.overrides)
    sampled = [k for k in dict.fromkeys(k for s in samples for k in s.params) if k not in fixed]
    budget = {
        "trials": opts.trials,
        "epochs_per_trial": epochs,
        "fold_epochs": opts.trials * epochs * len(opts.folds),
    }

    # 3. the record: options and space beside Tune's results, the parent run in MLflow
    parent = tracking.open_search_run(opts.tracking_uri, opts, space, budget, resume=resume, data=shards)
    if not resume:
        import json

        _write(opts.storage, opts.name, OPTIONS_FILE, opts.to_json())
        _write(opts.storage, opts.name, DATA_FILE, json.dumps(shards or {}, indent=1, sort_keys=True))
        if not space.builtin:
            _write(opts.storage, opts.name, SPACE_FILE, space.source())
    status = "FAILED"
    try:
        # 4. trainable, searcher, scheduler, Tuner
        trainable = make_trainable(
            opts.shards if data is None else data,
            folds=opts.folds,
            cpus_per_fold=opts.cpus_per_fold,
            gpus_per_fold=opts.gpus_per_fold,
            layout=opts.fold_layout,
        )
        exp_dir = experiment_dir(opts.storage, opts.name)
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's CLIReporter table (the new output ignores it)
        if opts.verbose:
            print(
                f"search {opts.name}: space {space.label}, {opts.trials} trials x folds "
                f"{','.join(map(str, opts.folds))} ({resolve_layout(opts.fold_layout, opts.gpus_per_fold)}), "
                f"up to {epochs} epochs, {opts.concurrency} at once, "
                f"sampler {opts.sampler}, ASHA {f'on (grace {opts.grace(epochs)})' if opts.asha else 'off'}"
                f"{' (resumed)' if resume else ''}",
                flush=True,
            )
        if resume:
            tuner = tune.Tuner.restore(exp_dir, trainable, resume_unfinished=True, resume_errored=True)
            _set_output(tuner, opts, sampled)
        else:
            searcher = make_searcher(
                space, opts, {"mlflow_run_id": parent.run_id, "mlflow_tracking_uri": opts.tracking_uri}
            )
            callback = tracking.MLflowTrialCallback(
                opts.tracking_uri, parent.experiment_id, opts.name, parent.run_id, opts.folds, sampled, shards
            )
            tuner = tune.Tuner(
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
                    callbacks=[callback, *_progress_callbacks(opts, epochs, sampled)],
                    stop=stop,
                    failure_config=tune.FailureConfig(max_failures=opts.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=keep_checkpoints(opts.storage)),
                    progress_reporter=report.progress_reporter(sampled) if opts.verbose >= 2 else None,
                    verbose=1 if opts.verbose >= 2 else 0,  # Tune's table only under -v
                ),
            )
        results = tuner.fit()

        # 5. results: table, files, parent run
        c = store.client(opts.tracking_uri)
        runs = store.search_runs(c, parent.experiment_id, opts.name, "trial")
        run_ids = {r.data.tags.get(store.TAG_TRIAL): r.info.run_id for r in runs}
        statuses = {r.data.tags.get(store.TAG_TRIAL): r.data.tags.get(store.TAG_STATUS) for r in runs}
        rows = report.collect(results, run_ids, statuses)
        if keep_checkpoints(opts.storage) is None:
            prune_checkpoints(results, rows)
        counts = report.counts(rows)
        ended = sum(counts.get(k, 0) for k in store.ENDED)
        interrupted = ended < opts.trials
        best = report.best(rows)
        fold_epochs = sum(r.epochs_done for r in rows) * len(opts.folds)
        status = "KILLED" if interrupted else "FINISHED"
        bbc = _bbc(c, rows, opts.seed)
        _finish_parent(opts, parent, space, rows, best, counts, fold_epochs, interrupted, status, bbc)
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
                print(
                    f"\ncontinue with: esc50 search --resume {opts.name} --storage {opts.storage}", flush=True
                )
        return result
    except BaseException:
        if status == "FAILED":
            try:
                store.client(opts.tracking_uri).set_terminated(parent.run_id, status="FAILED")
            except Exception:
                pass
        raise


def _bbc(c: Any, rows: list[Any], seed: int) -> Any:
    """BBC-CV over the completed trials' out-of-fold predictions (search/bbc.py); None when none
    has any. A courtesy beside the result: a failure here is a warning, never a lost search."""
    from search.oof import search_bbc, trial_oof
    from search.store import COMPLETED

    try:
        done = [r for r in rows if r.status == COMPLETED]
        oofs = [o for o in (trial_oof(c, r.run_id, r.checkpoint) for r in done) if o is not None]
        return search_bbc(oofs, seed=seed)
    except Exception as e:
        import logging

        logging.getLogger(__name__).warning("BBC-CV: %s: %s", type(e).__name__, _first(e))
        return None


def _progress_callbacks(opts: SearchOptions, epochs: int, sampled: list[str]) -> list[Any]:
    """The default progress (one line per trial event) unless -q or -v (Tune's table)."""
    from search.tune_progress import TrialProgress

    progress = TrialProgress(
        opts.name, opts.trials, epochs, opts.concurrency or 1, sampled, opts.max_failures
    )
    progress.enabled = opts.verbose == 1
    return [progress]


def _set_output(tuner: Any, opts: SearchOptions, sampled: list[str]) -> None:
    """A resumed search prints as asked now (-q, default, -v), not as its first run did: the
    restored RunConfig (Tune's private copy; there is no public setter) is adjusted."""
    from search import report
    from search.tune_progress import TrialProgress

    try:
        rc = tuner._local_tuner.get_run_config()
    except AttributeError:  # another Tune layout: keep what was saved
        return
    rc.verbose = 1 if opts.verbose >= 2 else 0
    rc.progress_reporter = report.progress_reporter(sampled) if opts.verbose >= 2 else None
    for cb in rc.callbacks or []:
        if isinstance(cb, TrialProgress):
            cb.enabled = opts.verbose == 1


def _finish_parent(
    opts, parent, space, rows, best, counts, fold_epochs, interrupted, status, bbc=None
) -> None:
    from search import report, tracking

    metrics: dict[str, float] = {
        "n_trials": len(rows),
        "n_completed": counts.get("completed", 0),
        "n_pruned": counts.get("pruned", 0),
        "n_failed": counts.get("failed", 0),
        "fold_epochs": fold_epochs,
    }
    tags = {"esc50.state": "interrupted" if interrupted else "finished"}
    if best is not None:
        metrics["best_cv_acc_mean"] = best.cv_acc_mean
        if best.cv_acc_std is not None:
            metrics["best_cv_acc_std"] = best.cv_acc_std
        tags.update(
            {
                "esc50.best_trial_id": best.trial_id,
                "esc50.best_run_id": best.run_id or "",
                "esc50.best_checkpoint": best.checkpoint or "",
            }
        )
    if bbc is not None:
        metrics.update(bbc.metrics())  # bbc_cv_acc, bbc_cv_acc_lo, bbc_cv_acc_hi
        metrics["bbc_trials"] = bbc.n_trials
    c = store.client(opts.tracking_uri)
    have = c.get_run(parent.run_id).data.metrics
    metrics = {k: v for k, v in metrics.items() if have.get(k) != v}  # a resume logs only what changed
    with tempfile.TemporaryDirectory(prefix="esc50_search_") as d:
        artifacts: list[tuple[str, str | None]] = [
            (report.write_csv(rows, os.path.join(d, "results.csv")), None)
        ]
        if not interrupted and rows:
            try:
                from search.study import load

                # the search's own study when it was stored; else one rebuilt from Tune's results
                study = load(opts.optuna_storage, opts.name) or report.optuna_study(space, rows)
                files, skipped = report.write_plots(study, os.path.join(d, "plots"))
                artifacts += [(f, "plots") for f in files]
                if skipped:
                    tags["esc50.plots_skipped"] = "; ".join(f"{k}: {v}" for k, v in skipped.items())[:5000]
            except Exception as e:  # plots are a courtesy: never lose the result for them
                tags["esc50.plots_skipped"] = f"{type(e).__name__}: {_first(e)}"
        tracking.finish_search_run(opts.tracking_uri, parent.run_id, status, metrics, tags, artifacts)


def _resume_options(given: SearchOptions) -> tuple[SearchOptions, Any]:
    """The saved options and space of the search to resume (`given`: name, storage, address, verbose)."""
    from search.options import DEFAULT_STORAGE, absolute
    from spaces import load_space
    from spaces.registry import Space

    if not given.name:
        raise UserError("--resume needs the search's name")
    storage = absolute(given.storage or DEFAULT_STORAGE)
    opts = saved_options(storage, given.name)
    opts.storage = storage  # the experiment may have moved with its storage
    if given.address is not None:
        opts.address = given.address or None
    opts.verbose = given.verbose
    if _exists(storage, opts.name, SPACE_FILE):  # a user's space, as it was when the search started
        code = _read(storage, opts.name, SPACE_FILE)
        path, func = (opts.space_label or "space.py:space").rsplit(":", 1)
        return opts, Space(opts.space, func, path, code, opts.overrides())
    return opts, load_space(opts.space, opts.overrides())
