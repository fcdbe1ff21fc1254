"""The search algorithm: Optuna over the define-by-run space (its sampler: search/sampler.py), told
which trials the scheduler stopped early, and the scheduler itself (ASHA over epochs, or FIFO)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from search.options import SearchOptions
from search.sampler import make_sampler
from search.store import planned_epochs, stopped_early
from trainable.protocol import METRIC, MODE

# Tune's OptunaSearch tells every trial that ended with a result as COMPLETE with its last value, so
# a trial ASHA stopped after 1 epoch looks to TPE like a finished trial that scored its epoch-1
# accuracy. Told as PRUNED instead (its per-epoch values were reported as intermediate values), TPE
# ranks it as Optuna intends: below the finished trials, by how far it got.


class EarlyStopAwareOptunaSearch(OptunaSearch):
    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if config is not None:
            self._esc50_planned = getattr(self, "_esc50_planned", {})  # pickled with the searcher
            self._esc50_planned[trial_id] = planned_epochs(config)
            if self._storage is not None:  # a stored study: tie its trial to Tune's (dashboard, tests)
                from search.study import TUNE_TRIAL_ATTR

                self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        return config

    def restore(self, checkpoint_path: str) -> None:
        """Tune's saved searcher state (a resumed search); a stored study's trials that this state
        does not know (asked for by a driver killed before Tune saved them) are told FAIL."""
        super().restore(checkpoint_path)
        if self._storage is not None:
            from search.study import fail_lost

            fail_lost(self._ot_study, (t.number for t in self._ot_trials.values()))

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        try:
            with _first_value_kept():
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
                    with _first_value_kept():
                        self._ot_trials[trial_id].report(float(value), int(done))
                except Exception:  # a trial the stored study already saw finish: its record stands
                    pass
            return super().on_trial_complete(trial_id, result=result, error=error)
        try:
            ot_trial = self._ot_trials[trial_id]
            value = (result or {}).get(self.metric)
            if value is not None:  # Tune hands the last result here, not to on_trial_result
                with _first_value_kept():
                    ot_trial.report(float(value), int(done))
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        except Exception:  # e.g. a trial Optuna does not know: Tune's default handling
            return super().on_trial_complete(trial_id, result=result, error=error)
        self._completed_trials.add(trial_id)


@contextlib.contextmanager
def _first_value_kept() -> Iterator[None]:
    """An epoch reported again keeps its first value, quietly. A resumed trial repeats the epochs
    after its last saved checkpoint (a killed driver's); Optuna keeps the first value, as MLflow
    does, but warns each time, which is noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The reported value is ignored because this `step=")
        yield


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
    """The most epochs a trial of the search may train: --epochs, else the most the space's samples ask."""
    if opts.epochs is not None:
        return int(opts.epochs)
    return max(planned_epochs(s.config) for s in samples) if samples else 1


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
