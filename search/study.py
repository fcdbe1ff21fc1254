"""The search's Optuna study, kept in a persistent Optuna storage beside the MLflow store, so that
`esc50 dashboard` (optuna-dashboard) shows it live and the report's plots read it back.

    url = storage_url(None, tracking_uri, storage)   # sqlite:///<dir of mlflow.db>/optuna.db ...
    study = load(url, "my-search")                   # None when the search kept no study

Where the study lives (`--optuna-storage`, else):
  - the tracking store is SQLite (`sqlite:///dir/mlflow.db`): `sqlite:///dir/optuna.db`, beside it;
  - else Tune's storage is a local folder: `sqlite:///<storage>/optuna.db`;
  - else (a tracking server and object-store results, e.g. on a cluster) no file is guessed: pass
    `--optuna-storage` a database URL of its own (e.g. a second database on the tracking database
    server: MLflow and Optuna both keep an `alembic_version` table, so they cannot share one).
`none` keeps the study in memory (inside Tune's searcher state only, as before).

The study is named after the search. Only the driver writes to it (Tune's searcher runs there);
the dashboard reads. Each Optuna trial carries the Tune trial id (user attribute `tune_trial_id`),
the study the search's MLflow run (`mlflow_run_id`, `mlflow_tracking_uri`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from search.errors import UserError

STUDY_FILE = "optuna.db"
TUNE_TRIAL_ATTR = "tune_trial_id"
LOST_ATTR = "esc50_lost"  # on a trial told FAIL because Tune never saved it (`fail_lost`)
NONE = ("", "none", "memory")


def storage_url(given: str | None, tracking_uri: str, storage: str | None) -> str:
    """The Optuna storage URL of a search ('' = in memory); see the module docstring."""
    if given is not None:
        given = str(given).strip()
        if given.lower() in NONE:
            return ""
        if given.startswith("sqlite:///") and not given.startswith("sqlite:////"):
            return "sqlite:///" + os.path.abspath(given[len("sqlite:///") :])
        if "://" not in given:  # a file path
            return "sqlite:///" + os.path.abspath(given)
        return given
    if tracking_uri.startswith("sqlite:///"):
        folder = os.path.dirname(tracking_uri[len("sqlite:///") :])
        return "sqlite:///" + os.path.join(folder, STUDY_FILE)
    if storage and "://" not in storage:
        return "sqlite:///" + os.path.join(os.path.abspath(storage), STUDY_FILE)
    return ""


def open_storage(url: str) -> Any:
    """An Optuna RDBStorage at `url` (created if new); UserError naming --optuna-storage if not."""
    import optuna

    from trainable.storage import check_sqlite_folder  # pyarrow: imported only when needed

    check_sqlite_folder(url, "--optuna-storage")
    try:
        # SQLite: wait for a dashboard's read instead of failing a write with "database is locked"
        kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as e:  # sqlalchemy errors, a missing driver
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--optuna-storage {url}: cannot use this Optuna storage: {first[:300]}") from None


def fresh(storage: Any, name: str) -> None:
    """A new search starts its study empty: a study of that name left by a search that failed to
    start (its Tune state and MLflow trials do not exist: the name was checked free) is dropped."""
    import optuna

    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        pass


def load(url: str | None, name: str) -> Any:
    """The stored study of search `name`, or None (no persistent storage, or no such study)."""
    if not url:
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        return None


def fail_lost(study: Any, known: Iterable[int]) -> list[int]:
    """Tell FAIL to the study's RUNNING trials whose numbers are not in `known` (the trials the
    restored Tune state has); returns their numbers.

    A driver killed after asking Optuna for a trial and before Tune saved it leaves that trial
    RUNNING in the stored study; the resumed Tune never runs it, so it would stay RUNNING for
    good: shown as running in optuna-dashboard, and a pending trial to the sampler."""
    from optuna.trial import TrialState

    known = set(known)
    lost = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.number not in known
    ]
    for t in lost:
        study._storage.set_trial_user_attr(
            t._trial_id, LOST_ATTR, "the search's driver stopped before Tune saved this trial; never run"
        )
        study.tell(t.number, state=TrialState.FAIL)
    return [t.number for t in lost]
