"""The MLflow store, without Ray: the one MlflowClient, the tags and statuses a search writes, and
the queries and checks that read them back. `esc50 promote`, `predict` and `ui` import only this,
so they start without importing Ray; search/tracking.py (the Tune side) builds on it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from search.errors import UserError

TAG_ROLE = "esc50.role"
TAG_SEARCH = "esc50.search"
TAG_TRIAL = "esc50.trial_id"
TAG_TRIAL_ALIAS = "esc50.trial"  # the same id, under the name the promote step also reads
TAG_CHECKPOINT = "esc50.checkpoint"
TAG_STATUS = "esc50.status"
TAG_SPACE = "esc50.space"
TAG_PARENT = "mlflow.parentRunId"
METRIC = "cv_acc_mean"
COMPLETED, PRUNED, FAILED, RUNNING, INTERRUPTED = "completed", "pruned", "failed", "running", "interrupted"
ENDED = (COMPLETED, PRUNED, FAILED)  # a trial in one of these will not run again
MLFLOW_STATUS = {COMPLETED: "FINISHED", PRUNED: "KILLED", FAILED: "FAILED", INTERRUPTED: "KILLED"}


def quiet_mlflow() -> None:
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent", "mlflow.store.sql_alchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def client(uri: str | None = None, must_exist: bool = False) -> Any:
    """An MlflowClient for `uri`, else $MLFLOW_TRACKING_URI, else ./mlflow.db (search.options.tracking_uri);
    the fluent API (start_run, load_model, register_model) is pointed at the same store.

    `must_exist`: a SQLite store that does not exist is a UserError, for commands that read what a
    search wrote (MLflow would silently create an empty store). A search creates its store."""
    import mlflow
    from mlflow import MlflowClient

    from search.options import tracking_uri

    uri = tracking_uri(uri)
    if must_exist and uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///") :]):
        raise UserError(f"no MLflow store at {uri}: run where `esc50 search` ran, or pass --tracking-uri")
    quiet_mlflow()
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its notices about creating tables
    mlflow.set_tracking_uri(uri)  # the registry follows it (no sticky set_registry_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def hide_mlflow_notices() -> Iterator[None]:
    """Hide MLflow's log notices and warnings inside the block, where they are expected (pickled
    models, type hints, registering a version)."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextmanager
def _no_retries():
    """An unreachable server should fail in seconds, not after MLflow's minutes of retries."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_tracking(uri: str) -> None:
    """Reach the tracking store (and create a SQLite one); UserError naming --tracking-uri if not."""
    if uri.startswith("sqlite:///"):
        folder = os.path.dirname(uri[len("sqlite:///") :]) or "."
        if not os.path.isdir(folder):
            raise UserError(f"--tracking-uri {uri}: the folder {folder} does not exist")
    try:
        with _no_retries():
            client(uri).search_experiments(max_results=1)
    except Exception as e:  # MlflowException, connection errors, sqlalchemy errors...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--tracking-uri {uri}: cannot use this tracking store: {first[:300]}") from None


def artifact_root(uri: str) -> str | None:
    """Local artifacts beside a SQLite store (<db folder>/mlartifacts); None: the store's default."""
    if uri.startswith("sqlite:///"):
        return os.path.join(os.path.dirname(uri[len("sqlite:///") :]), "mlartifacts")
    return None


# MLflow 3's UI opens an experiment by its kind: without this tag it guesses GenAI (traces, an
# empty "Overview"); a training experiment opens on the runs table.
TAG_EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def experiment_id(c: Any, name: str, tracking_uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        mark_training(c, exp)
        return exp.experiment_id
    return c.create_experiment(
        name, artifact_location=artifact_root(tracking_uri), tags={TAG_EXPERIMENT_KIND: TRAINING_KIND}
    )


def mark_training(c: Any, exp: Any) -> None:
    """Tag an experiment made before this tag existed (or by hand) as model training, once; a
    kind a user chose is kept."""
    if TAG_EXPERIMENT_KIND not in (exp.tags or {}):
        c.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, TRAINING_KIND)


def filter_literal(value: str) -> str:
    """`value` quoted for an MLflow search filter. MLflow reads a literal verbatim between its
    quotes (no escapes: a backslash is kept), so the quote is whichever kind `value` lacks."""
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise UserError(f"{value!r}: an MLflow filter cannot match a value with both kinds of quotes")


def search_runs(c: Any, exp_id: str, search: str, role: str) -> list[Any]:
    """Every run of `search` with `role` (search | trial) in the experiment, oldest first."""
    flt = f"tags.`{TAG_ROLE}` = {filter_literal(role)} AND tags.`{TAG_SEARCH}` = {filter_literal(search)}"
    out, token = [], None
    while True:
        page = c.search_runs(
            [exp_id], flt, max_results=1000, page_token=token, order_by=["attributes.start_time ASC"]
        )
        out += list(page)
        token = page.token
        if not token:
            return out
