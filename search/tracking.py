"""MLflow records of a search: one parent run per search, one nested child run per trial.

    store.check_tracking(uri)                            # UserError before any trial starts
    parent = open_search_run(uri, opts, space, budget)   # created, or found again on resume
    tune.RunConfig(callbacks=[MLflowTrialCallback(uri, parent.experiment_id, opts.name, ...)])
    close_search_run(uri, parent.run_id, ...)            # best result, counts, tables, plots; ended

The parent run holds every resolved option as a param, the budget, the space and, at the end, the
best result; each child run the trial's config as params, every epoch's metrics (step = epoch),
its latest checkpoint and its status (search/store.py: the tag names and statuses). Nothing is
logged twice: a trial's run is created with its Tune trial id as a tag in the one create request,
and found again by that tag after a failed hook or a resumed driver. Only the driver talks to
MLflow (the callback runs in the Tune driver).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ray import tune

from search import interrupt, provenance
from search.errors import UserError
from search.store import (
    FAILED,
    INTERRUPTED,
    LOST,
    MLFLOW_STATUS,
    OPTIONS_FILE,
    ROLE_SEARCH,
    ROLE_TRIAL,
    RUNNING,
    TAG_BEST_CHECKPOINT,
    TAG_BEST_RUN,
    TAG_BEST_TRIAL,
    TAG_CHECKPOINT,
    TAG_ERROR,
    TAG_FAILURES,
    TAG_FOLDS,
    TAG_NOTE,
    TAG_PARENT,
    TAG_PLOTS_SKIPPED,
    TAG_RESUMED,
    TAG_RESUMED_COMMIT,
    TAG_ROLE,
    TAG_SAMPLED,
    TAG_SEARCH,
    TAG_SPACE,
    TAG_STATE,
    TAG_STATUS,
    TAG_TRIAL,
    TAG_TRIAL_ALIAS,
    TAG_TRIAL_NUMBER,
    client,
    experiment_id,
    log_oof_artifact,
    search_runs,
    trial_status,
)
from trainable.errors import error_line
from trainable.protocol import METRIC, metric_names
from trainable.storage import uri_of

log = logging.getLogger(__name__)


# ---- the parent run --------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchRun:
    run_id: str
    experiment_id: str
    resumed: bool  # the run existed (a resumed search)


def open_search_run(
    uri: str,
    opts: Any,
    space: Any,
    budget: Mapping[str, Any],
    resume: bool = True,
    data: Mapping[str, Any] | None = None,
) -> SearchRun:
    """The search's parent run: found by tag (resume) or created with the options and the space.

    `data`: the shards' {shards, fingerprint, features, n_clips} (search/provenance.py), recorded
    with the code version as tags and as the run's MLflow dataset input.

    A new search (`resume=False`) whose name MLflow already has is a UserError, unless that earlier
    run never got to a trial (it failed while starting): then it is replaced."""
    data = dict(data or {})
    c = client(uri)
    exp_id = experiment_id(c, opts.experiment, uri)
    found = search_runs(c, exp_id, opts.name, ROLE_SEARCH)
    if found and not resume:
        if search_runs(c, exp_id, opts.name, ROLE_TRIAL):
            raise UserError(
                f"--name {opts.name}: MLflow at {uri} already has a search of that name (experiment "
                f"{opts.experiment}); choose another --name, or --resume {opts.name} with its --storage"
            )
        for run in found:
            c.delete_run(run.info.run_id)
        found = []
    if found:
        run = found[-1]
        if run.info.status != "RUNNING":
            c.update_run(run.info.run_id, status="RUNNING")
        c.set_tag(run.info.run_id, TAG_RESUMED, str(int(run.data.tags.get(TAG_RESUMED, "0")) + 1))
        # the code that goes on with it (the search's own commit tag stays the one it started with)
        c.set_tag(run.info.run_id, TAG_RESUMED_COMMIT, provenance.code_tags()[provenance.TAG_COMMIT])
        return SearchRun(run.info.run_id, exp_id, True)
    tags = {
        TAG_ROLE: ROLE_SEARCH,
        TAG_SEARCH: opts.name,
        TAG_SPACE: space.label,
        TAG_NOTE: _note(opts),
        **provenance.code_tags(),
        **provenance.data_tags(data.get("fingerprint"), data.get("features")),
    }
    run = c.create_run(exp_id, run_name=opts.name, tags=tags)
    rid = run.info.run_id
    _log_dataset(c, rid, data)
    from mlflow.entities import Param

    params = {**opts.mlflow_params(), **{f"budget_{k}": str(v) for k, v in budget.items()}}
    c.log_batch(rid, params=[Param(k, v) for k, v in params.items()])
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, OPTIONS_FILE), "w") as f:
            f.write(opts.to_json())
        src = "space.py"
        with open(os.path.join(d, src), "w") as f:
            f.write(space.source())
        try:
            text = space.describe().text()
        except Exception as e:  # describing is a courtesy; the space was validated already
            text = f"(could not describe: {e})"
        with open(os.path.join(d, "space.txt"), "w") as f:
            f.write(f"space: {space.label}\noverrides: {dict(space.overrides)}\n\n{text}\n")
        c.log_artifact(rid, os.path.join(d, OPTIONS_FILE))
        c.log_artifact(rid, os.path.join(d, src), "space")
        c.log_artifact(rid, os.path.join(d, "space.txt"), "space")
    return SearchRun(rid, exp_id, False)


def _log_dataset(c: Any, run_id: str, data: Mapping[str, Any]) -> None:
    """The shards as the run's dataset input (where the store supports it: a courtesy, never fatal)."""
    if not data.get("shards"):
        return
    try:
        provenance.log_dataset(
            c, run_id, data["shards"], data.get("fingerprint"), data.get("features"), data.get("n_clips")
        )
    except Exception as e:
        log.warning("could not log the dataset input of run %s: %s", run_id, e)


def _note(opts: Any) -> str:
    return (
        f"esc50 search {opts.name}: space {opts.space}, {opts.trials} trials x folds "
        f"{','.join(map(str, opts.folds))}, sampler {opts.sampler}, ASHA {'on' if opts.asha else 'off'}"
    )


def close_search_run(
    uri: str,
    run_id: str,
    rows: list[Any],
    best: Any,
    counts: Mapping[str, int],
    fold_epochs: int,
    interrupted: bool,
    bbc: Any = None,
    artifacts: Iterable[tuple[str, str | None]] = (),
    plots_skipped: str | None = None,
) -> None:
    """The search's outcome on its parent run, then the run ended (KILLED when `interrupted`, to be
    resumed; else FINISHED): counts, the best trial (a report.TrialRow), BBC-CV (a bbc.BBCEstimate),
    and `artifacts` ((local file, artifact dir)). A resume logs only the metrics that changed."""
    from mlflow.entities import Metric, RunTag

    metrics: dict[str, float] = {
        "n_trials": len(rows),
        "n_completed": counts.get("completed", 0),
        "n_pruned": counts.get("pruned", 0),
        "n_failed": counts.get("failed", 0),
        "fold_epochs": fold_epochs,
    }
    tags = {TAG_STATE: "interrupted" if interrupted else "finished"}
    if best is not None:
        metrics["best_cv_acc_mean"] = best.cv_acc_mean
        if best.cv_acc_std is not None:
            metrics["best_cv_acc_std"] = best.cv_acc_std
        tags[TAG_BEST_TRIAL] = best.trial_id
        tags[TAG_BEST_RUN] = best.run_id or ""
        tags[TAG_BEST_CHECKPOINT] = best.checkpoint or ""
    if bbc is not None:
        metrics.update(bbc.metrics())  # bbc_cv_acc, bbc_cv_acc_lo, bbc_cv_acc_hi
        metrics["bbc_trials"] = bbc.n_trials
    if plots_skipped:
        tags[TAG_PLOTS_SKIPPED] = plots_skipped[:5000]
    c = client(uri)
    have = c.get_run(run_id).data.metrics
    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, 0) for k, v in metrics.items() if _finite(v) and have.get(k) != v]
    c.log_batch(run_id, metrics=ms, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    for path, folder in artifacts:
        try:
            c.log_artifact(run_id, path, folder)
        except Exception as e:  # an artifact store hiccup must not lose the search's result
            log.warning("could not log artifact %s: %s", path, e)
    c.set_terminated(run_id, status="KILLED" if interrupted else "FINISHED")


def fail_search_run(uri: str, run_id: str, interrupted: bool = False) -> None:
    """End the parent run as FAILED (the search raised), or KILLED/interrupted when the user stopped
    it harder than Tune lets itself be stopped (a second Ctrl-C: KeyboardInterrupt), which a resume
    goes on with; quietly, the search's own error is what counts."""
    try:
        c = client(uri)
        if interrupted:
            c.set_tag(run_id, TAG_STATE, "interrupted")
        c.set_terminated(run_id, status="KILLED" if interrupted else "FAILED")
    except Exception:
        pass


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def trial_metrics(result: Mapping[str, Any], folds: Iterable[int]) -> dict[str, float]:
    """The metrics the trainable reports (trainable/protocol.py), numeric and present."""
    out = {}
    for k in metric_names(folds):
        v = result.get(k)
        if _finite(v):
            out[k] = float(v)
    return out


# ---- the Tune callback: one child run per trial ---------------------------------------------------


def _safe(hook):
    """A tracking hiccup (a store briefly unreachable) is retried once, then warned about (naming
    the hook): it must not end a search that has trained for an hour; Tune's own records stay whole."""
    import functools

    @functools.wraps(hook)
    def wrapper(self, *args, **kwargs):
        for attempt in (1, 2):
            try:
                return hook(self, *args, **kwargs)
            except Exception as e:
                if attempt == 2:
                    log.warning("MLflow tracking: %s failed: %s: %s", hook.__name__, type(e).__name__, e)
                    return None
                time.sleep(1.0)
                # Forget what this process believes about the store: the retry reads the trial
                # runs back by tag, so a run created before the failure (even one whose create
                # answer was lost) is found, not made again.
                self._client = None
                self._runs = None

    return wrapper


class MLflowTrialCallback(tune.Callback):
    """Logs every trial of a Tune run as a nested MLflow run under the search's parent run.

    Picklable with plain state only (Tune saves it in tuner.pkl and a resumed search uses that
    copy): MLflow clients and caches are made again after unpickling.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        search: str,
        parent_run_id: str,
        folds: Iterable[int],
        sampled: Iterable[str] = (),
        data: Mapping[str, Any] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        # the shards (search/provenance.py: shards, fingerprint, features, n_clips), recorded on
        # every trial run with the code version (`code`: read by the driver that logs, not pickled)
        self.data = dict(data or {})
        self.sampled = tuple(sampled)  # names the space samples (the rest of a config is constant)
        self.experiment_id = experiment_id
        self.search = search
        self.parent_run_id = parent_run_id
        self.folds = tuple(int(f) for f in folds)
        self._reset()

    def _reset(self) -> None:
        self._client = None
        self._runs: dict[str, str] | None = None  # trial id -> run id
        self._steps: dict[str, set[int]] = {}  # run id -> epochs logged
        self._done: set[str] = set()  # trial ids whose run was ended by this process
        self._no_params: set[str] = set()  # run ids whose params are not logged yet
        self._orphans_checked = False
        self._code: dict[str, str] | None = None
        self._created: set[str] = set()  # run ids created by this process
        self._continued: set[str] = set()  # run ids of an earlier driver, tagged with this one's code

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.pop("code", None)  # a tuner.pkl saved before the code version was read lazily
        self.__dict__.update(state)
        self._reset()

    @property
    def code(self) -> dict[str, str]:
        """The code version of the driver that runs now (search/provenance.py). Read here, never
        pickled: a resumed search unpickles the callback Tune saved, and its trial runs must carry
        the resuming code's commit, not the one the search started with."""
        if self._code is None:
            self._code = provenance.code_tags()
        return self._code

    # ---- runs ---------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            self._client = client(self.tracking_uri)
        return self._client

    def _known(self) -> dict[str, str]:
        if self._runs is None:
            self._runs = {}
            runs = search_runs(self.client, self.experiment_id, self.search, ROLE_TRIAL)
            # The oldest run of a trial is its run (a store written before runs were recorded at
            # creation may hold a later, second one).
            for run in sorted(runs, key=lambda r: r.info.start_time or 0):
                tid = run.data.tags.get(TAG_TRIAL)
                if tid and tid not in self._runs:
                    self._runs[tid] = run.info.run_id
                    if not run.data.params:
                        self._no_params.add(run.info.run_id)
        return self._runs

    def run_id(self, trial: Any, trials: list | None = None) -> str:
        """The trial's run: the one already recorded for it (resume, or a retried hook), else a new one.

        The run is created with the trial's id as a tag in the same request, so from the moment it
        exists a search by tag finds it (`_known`); everything logged to it afterwards (params,
        metrics) can fail and be retried without making a second run. `trials`: Tune's list of
        the search's trials, in the order it made them (the trial's place is tagged, for ties)."""
        runs = self._known()
        tid = trial.trial_id
        if tid not in runs:
            runs[tid] = self._create_run(trial, trials)
            self._no_params.add(runs[tid])
            self._created.add(runs[tid])
        rid = runs[tid]
        if rid not in self._created and rid not in self._continued:
            # a run an earlier driver created, continued by this one: its commit tag stays the one
            # it started with, the code that goes on with it is tagged beside (as on a search run)
            self.client.set_tag(rid, TAG_RESUMED_COMMIT, self.code[provenance.TAG_COMMIT])
            self._continued.add(rid)
        if rid in self._no_params:
            self._log_params(rid, trial)
            self._no_params.discard(rid)
        if rid not in self._steps:
            history = self.client.get_metric_history(rid, METRIC)
            self._steps[rid] = {int(m.step) for m in history}
        return rid

    def _log_params(self, rid: str, trial: Any) -> None:
        from mlflow.entities import Param

        from trainable.cv import resolve_config

        try:
            params = resolve_config(trial.config).to_dict()
        except ValueError:  # the trial will fail and say why; still record what it was given
            params = dict(trial.config)
        self.client.log_batch(rid, params=[Param(k, str(v)) for k, v in sorted(params.items())])
        _log_dataset(self.client, rid, getattr(self, "data", {}))

    def _create_run(self, trial: Any, trials: list | None = None) -> str:
        tid = trial.trial_id
        number = next((i for i, t in enumerate(trials or ()) if t.trial_id == tid), None)
        tags = {
            TAG_ROLE: ROLE_TRIAL,
            TAG_SEARCH: self.search,
            TAG_TRIAL: tid,
            TAG_TRIAL_ALIAS: tid,
            TAG_PARENT: self.parent_run_id,
            TAG_STATUS: RUNNING,
            TAG_FOLDS: ",".join(map(str, self.folds)),
            TAG_SAMPLED: ",".join(k for k in self.sampled if k in trial.config),
            **({TAG_TRIAL_NUMBER: str(number)} if number is not None else {}),
            **self.code,
            **provenance.data_tags(
                getattr(self, "data", {}).get("fingerprint"), getattr(self, "data", {}).get("features")
            ),
        }
        return self.client.create_run(self.experiment_id, run_name=f"trial_{tid}", tags=tags).info.run_id

    def _set_status(self, trial: Any, trials: list, status: str, error: str | None = None) -> None:
        rid = self.run_id(trial, trials)
        self.client.set_tag(rid, TAG_STATUS, status)
        if error:
            self.client.set_tag(rid, TAG_ERROR, error[:5000])
        self.client.set_terminated(rid, status=MLFLOW_STATUS[status])
        self._done.add(trial.trial_id)

    # ---- Tune hooks -----------------------------------------------------------------------------
    def setup(self, **info: Any) -> None:
        self._reset()

    @_safe
    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        """Once, at the first step: runs of trials that Tune does not know (the driver died after
        making a trial and before Tune saved its state; the resumed Tune never ran it) are deleted,
        so the search keeps exactly one run per trial Tune ran."""
        if self._orphans_checked:
            return
        self._orphans_checked = True
        live = {t.trial_id for t in trials}
        for tid, rid in list(self._known().items()):
            if tid not in live:
                self.client.set_tag(rid, TAG_STATUS, LOST)
                self.client.set_terminated(rid, status="KILLED")
                self.client.delete_run(rid)
                del self._runs[tid]  # type: ignore[union-attr]

    @_safe
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rid = self.run_id(trial, trials)
        run = self.client.get_run(rid)
        if run.info.status != "RUNNING":  # a resumed trial: its run goes on
            self.client.update_run(rid, status="RUNNING")
            self.client.set_tag(rid, TAG_STATUS, RUNNING)
        self._done.discard(trial.trial_id)

    @_safe
    def on_trial_restore(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.run_id(trial, trials)

    @_safe
    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        from mlflow.entities import Metric

        rid = self.run_id(trial, trials)
        step = int(result.get("epoch") or result.get("training_iteration") or 0)
        if step in self._steps[rid]:
            return  # a trial resumed from an older checkpoint reports this epoch again
        now = int(time.time() * 1000)
        metrics = trial_metrics(result, self.folds)
        self.client.log_batch(rid, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
        self._steps[rid].add(step)

    @_safe
    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        rid = self.run_id(trial, trials)
        self.client.set_tag(
            rid, TAG_CHECKPOINT, uri_of(getattr(checkpoint, "filesystem", None), checkpoint.path)
        )
        log_oof_artifact(self.client, rid, checkpoint)

    @_safe
    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.client.set_tag(self.run_id(trial, trials), TAG_FAILURES, str(getattr(trial, "num_failures", "")))

    @_safe
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._set_status(trial, trials, trial_status(trial.config, trial.last_result, errored=False))

    @_safe
    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = None
        try:
            if trial.error_file and os.path.exists(trial.error_file):
                with open(trial.error_file) as f:
                    text = f.read()
                error = error_line(text, last=True, limit=5000) if text.strip() else None
        except OSError:
            pass
        self._set_status(trial, trials, FAILED, error)

    @_safe
    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Close the runs Tune ended without a completion hook (a stopper's stop-all), and mark the
        unfinished ones KILLED/interrupted until a resume goes on: those Tune never ended, and after
        a Ctrl-C (search/interrupt.py) also the ones it stopped then (TERMINATED, as a stop-all
        leaves them; its saved state, written before, has them running: a resume goes on with them)."""
        by_signal = interrupt.stopped()
        for trial in trials:
            rid = self._known().get(trial.trial_id)
            if rid is None or trial.trial_id in self._done:
                continue
            if trial.status == "TERMINATED" and not by_signal:
                status = trial_status(trial.config, trial.last_result, errored=False)
            elif trial.status == "ERROR":
                status = FAILED
            else:
                status = INTERRUPTED
            self.client.set_tag(rid, TAG_STATUS, status)
            self.client.set_terminated(rid, status=MLFLOW_STATUS[status])
