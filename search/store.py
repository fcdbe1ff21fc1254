"""The MLflow store, without Ray: the one MlflowClient, every tag name and trial status the project
writes, the rule that tells a pruned trial, and the queries and checks that read them back.
`esc50 promote`, `predict` and `ui` need only this of the tracking layer, so they start without
Ray; search/tracking.py (the Tune side) builds on it. No tag name is spelled elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from search.errors import UserError
from trainable.errors import error_line

# ---- tags ------------------------------------------------------------------------------------
# every run
TAG_ROLE = "esc50.role"  # ROLE_SEARCH | ROLE_TRIAL | ROLE_PROMOTION
ROLE_SEARCH, ROLE_TRIAL, ROLE_PROMOTION = "search", "trial", "promotion"
TAG_SEARCH = "esc50.search"
TAG_PARENT = "mlflow.parentRunId"
TAG_NOTE = "mlflow.note.content"
# a search run
TAG_SPACE = "esc50.space"
TAG_RESUMED, TAG_RESUMED_COMMIT = "esc50.resumed", "esc50.resumed_commit"  # resumes, and the last one's code
TAG_STATE = "esc50.state"  # finished | interrupted
TAG_BEST_TRIAL, TAG_BEST_RUN = "esc50.best_trial_id", "esc50.best_run_id"
TAG_BEST_CHECKPOINT = "esc50.best_checkpoint"
TAG_PLOTS_SKIPPED = "esc50.plots_skipped"
# a trial run
TAG_TRIAL = "esc50.trial_id"
TAG_TRIAL_ALIAS = "esc50.trial"  # the same id, under the name the promote step also reads
TAG_TRIAL_NUMBER = "esc50.trial_number"  # its place in Tune's trial list (0 = made first): ties
TAG_CHECKPOINT = "esc50.checkpoint"
TAG_STATUS = "esc50.status"
TAG_FOLDS = "esc50.folds"
TAG_SAMPLED = "esc50.sampled"  # the config keys the space sampled
TAG_ERROR = "esc50.error"
TAG_FAILURES = "esc50.failures"
# a promotion run and a registered version (search/release/champion.py adds the registry's own)
TAG_TRIAL_RUN = "esc50.trial_run"  # the trial run it was made from
TAG_SHARDS = "esc50.shards"
TAG_CONFIG = "esc50.config"
TAG_EPOCH = "esc50.epoch"
TAG_PROMOTION_RUN = "esc50.promotion_run"
# the registry (search/release/champion.py)
TAG_REPLACED = "esc50.replaced"  # on a version: the champion it replaced (for rollback)
TAG_ROLLED_BACK = "esc50.rolled_back_from"  # on a version: it was champion until a rollback
# On runs, for the MLflow runs table: the trial run a version was made from and its search run
# carry `esc50.champion` = "esc50-cnn v3" while that version is champion (moved by promote and
# rollback); the trial run keeps `esc50.registered` = "esc50-cnn v3" for good.
TAG_CHAMPION, TAG_REGISTERED = "esc50.champion", "esc50.registered"
TAG_VIEW_PREFIX = "mlflow.sharedViewState."  # an experiment's saved runs-table view

# ---- a trial's status (tag esc50.status) -------------------------------------------------------
COMPLETED, PRUNED, FAILED, RUNNING, INTERRUPTED = "completed", "pruned", "failed", "running", "interrupted"
LOST = "lost"  # a run of a trial Tune never knew (deleted on resume)
ENDED = (COMPLETED, PRUNED, FAILED)  # a trial in one of these will not run again
MLFLOW_STATUS = {COMPLETED: "FINISHED", PRUNED: "KILLED", FAILED: "FAILED", INTERRUPTED: "KILLED"}
# a search's resolved options: its parent run's artifact, and the file beside Tune's results
OPTIONS_FILE = "esc50_search.json"
OOF_ARTIFACT_DIR = "oof"  # on a trial run: oof/oof.npz, the final epoch's out-of-fold predictions


def planned_epochs(config: Mapping[str, Any]) -> int:
    """The epochs a trial's config asks for (TrainConfig's default when the space sets none)."""
    from trainable.config import TrainConfig

    return int(config.get("epochs", TrainConfig().epochs))


def stopped_early(done: Any, planned: Any) -> bool:
    """The trial's last reported epoch is short of its planned epochs: the scheduler stopped it."""
    return done is not None and planned is not None and int(done) < int(planned)


def trial_status(config: Mapping[str, Any], last_result: Mapping[str, Any] | None, errored: bool) -> str:
    """completed (all epochs), pruned (stopped early by the scheduler) or failed."""
    if errored:
        return FAILED
    done = int((last_result or {}).get("epoch") or 0)
    return PRUNED if stopped_early(done, planned_epochs(config)) else COMPLETED


def tracking_uri(uri: str | None = None) -> str:
    """The option, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (made absolute)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri[len("sqlite:///") :]
        if path and path != ":memory:":
            uri = "sqlite:///" + os.path.abspath(path)
    elif "://" not in uri:  # a plain directory: MLflow's file store
        uri = os.path.abspath(uri)
    return uri


def quiet_mlflow() -> None:
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent", "mlflow.store.sql_alchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def client(uri: str | None = None, must_exist: bool = False) -> Any:
    """An MlflowClient for `uri`, else $MLFLOW_TRACKING_URI, else ./mlflow.db (`tracking_uri`);
    the fluent API (start_run, load_model, register_model) is pointed at the same store.

    `must_exist`: a SQLite store that does not exist is a UserError, for commands that read what a
    search wrote (MLflow would silently create an empty store). A search creates its store."""
    import mlflow
    from mlflow import MlflowClient

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
    from trainable.storage import check_sqlite_folder  # pyarrow: imported only when needed

    check_sqlite_folder(uri, "--tracking-uri")
    try:
        with _no_retries():
            client(uri).search_experiments(max_results=1)
    except Exception as e:  # MlflowException, connection errors, sqlalchemy errors...
        raise UserError(f"--tracking-uri {uri}: cannot use this tracking store: {error_line(e)}") from None


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


def all_runs(c: Any, experiment_ids: list[str], filter_string: str, order: str = "ASC") -> list[Any]:
    """Every run the filter matches in the experiments, by start time (`order` ASC or DESC), page by page."""
    out: list[Any] = []
    token = None
    while experiment_ids:
        page = c.search_runs(
            experiment_ids,
            filter_string,
            max_results=1000,
            page_token=token,
            order_by=[f"attributes.start_time {order}"],
        )
        out += list(page)
        token = page.token
        if not token:
            break
    return out


def search_runs(c: Any, exp_id: str, search: str, role: str) -> list[Any]:
    """Every run of `search` with `role` (search | trial) in the experiment, oldest first."""
    flt = f"tags.`{TAG_ROLE}` = {filter_literal(role)} AND tags.`{TAG_SEARCH}` = {filter_literal(search)}"
    return all_runs(c, [exp_id], flt)


# ---- a trial's out-of-fold predictions, for BBC-CV (search/bbc.py) ---------------------------------


def _fetch(fs: Any, path: str, local: str) -> bool:
    """Copy `path` of a pyarrow filesystem to the local file `local`; False when there is no such file."""
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    with fs.open_input_stream(path) as src, open(local, "wb") as dst:
        dst.write(src.read())
    return True


def log_oof_artifact(c: Any, run_id: str, checkpoint: Any) -> bool:
    """A Tune checkpoint's out-of-fold predictions (its oof.npz, trainable/model/checkpoint.py) as the
    trial run's artifact oof/oof.npz; False when this checkpoint has none (not the last epoch)."""
    import tempfile

    import pyarrow.fs as pafs

    from trainable.model.checkpoint import OOF_FILE

    fs = getattr(checkpoint, "filesystem", None) or pafs.LocalFileSystem()
    with tempfile.TemporaryDirectory(prefix="esc50_oof_") as d:
        local = os.path.join(d, OOF_FILE)
        if not _fetch(fs, f"{str(checkpoint.path).rstrip('/')}/{OOF_FILE}", local):
            return False
        c.log_artifact(run_id, local, OOF_ARTIFACT_DIR)
    return True


def read_checkpoint_oof(uri: str) -> dict[str, Any] | None:
    """The out-of-fold arrays in a trial's checkpoint (a local path or URI); None when it has none
    (a checkpoint of an epoch before the last)."""
    import tempfile

    from trainable.model.checkpoint import OOF_FILE, read_oof
    from trainable.storage import resolve

    fs, root = resolve(uri.removeprefix("file://"))
    with tempfile.TemporaryDirectory(prefix="esc50_oof_") as d:
        local = os.path.join(d, OOF_FILE)
        return read_oof(local) if _fetch(fs, f"{root.rstrip('/')}/{OOF_FILE}", local) else None


def read_run_oof(c: Any, run_id: str) -> dict[str, Any] | None:
    """The out-of-fold arrays logged on a trial run (artifact oof/oof.npz); None when it has none."""
    import tempfile

    from trainable.model.checkpoint import OOF_FILE, read_oof

    with tempfile.TemporaryDirectory(prefix="esc50_oof_") as d:
        try:
            local = c.download_artifacts(run_id, f"{OOF_ARTIFACT_DIR}/{OOF_FILE}", d)
        except Exception:  # no such artifact (an older search, a failed upload)
            return None
        return read_oof(local)


def trial_oof(c: Any, run_id: str | None, checkpoint: str | None) -> dict[str, Any] | None:
    """A completed trial's out-of-fold arrays: its run's artifact, else its checkpoint's file."""
    oof = read_run_oof(c, run_id) if run_id else None
    if oof is None and checkpoint:
        with contextlib.suppress(Exception):  # the storage moved: then the trial has none to give
            oof = read_checkpoint_oof(checkpoint)
    return oof
