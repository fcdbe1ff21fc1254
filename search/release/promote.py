"""`esc50 promote`: the best trial of a search -> one MLflow pyfunc (the fold ensemble) -> the registry.

    promote(search="my-search")          # best finished trial by cv_acc_mean
    promote(run_id="...")                # or a named trial run / Tune trial id
    champion.rollback()                  # champion back to previous (search/release/champion.py)

How a promotion runs (`promote`, at the end of this file, top to bottom):
  1. find the trial in MLflow: child runs tagged `esc50.role=trial` and `esc50.search=<name>`, with
     the metric `cv_acc_mean` and the tag `esc50.checkpoint` (the CV checkpoint directory: meta.json +
     fold_<k>.pt); the best finished one, unless a run or trial is named;
  2. fetch the checkpoint (a local path or any URI pyarrow opens) and rebuild its fold models;
  3. out-of-fold report (search/release/oof.py): every clip of the checkpoint's folds predicted by the one
     fold model that validated on it, from the search's shards, which must have the checkpoint's
     feature parameters and fingerprint;
  4. one promotion run in the trial's experiment: the pyfunc, logged as an MLflow model from code
     (trainable/model/pyfunc_entry.py names `trainable.model.ensemble.EnsembleModel`; the shipped sources,
     trainable/model/ whole, is its code_paths; a slim copy of the checkpoint, plain state dicts read with
     weights_only, its artifact: no pickled Python object), the report's metrics and artifacts
     (per-class accuracy, confusion matrix picture);
  5. a new version of the registered model (search/release/champion.py), tagged with what retraining it
     needs (search, trial, config, features, folds, the shards and their fingerprint, the git
     commit and library versions), its cv_acc_mean/std and the search's BBC-CV estimate
     (`bbc_cv_acc`, `_lo`, `_hi`: search/bbc.py); alias `champion` moves to it, the version that
     held it gets `previous`.

Every step that can fail on user input raises `UserError` before anything is registered.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search import provenance
from search.bbc import search_bbc
from search.errors import UserError
from search.release.champion import CHAMPION, DEFAULT_NAME, PREVIOUS, register_champion
from search.release.oof import load_oof_data, out_of_fold, shards_uri, write_report
from search.store import (
    COMPLETED,
    PRUNED,
    ROLE_PROMOTION,
    ROLE_TRIAL,
    TAG_CHECKPOINT,
    TAG_CONFIG,
    TAG_EPOCH,
    TAG_FOLDS,
    TAG_PROMOTION_RUN,
    TAG_ROLE,
    TAG_SEARCH,
    TAG_SHARDS,
    TAG_STATUS,
    TAG_TRIAL,
    TAG_TRIAL_ALIAS,
    TAG_TRIAL_NUMBER,
    TAG_TRIAL_RUN,
    all_runs,
    client,
    filter_literal,
    hide_mlflow_notices,
    trial_oof,
)
from trainable.protocol import METRIC, best_first

TRIAL_ID_KEYS = (TAG_TRIAL, TAG_TRIAL_ALIAS)  # where a trial run holds its Tune trial id
ENTRY = "pyfunc_entry.py"  # in trainable/model/: the model's code file (models from code), names the pyfunc
REQUIREMENTS = ("torch", "torchaudio", "numpy", "pandas", "mlflow", "soundfile")

if TYPE_CHECKING:  # annotations only: torch loads when a checkpoint does
    from trainable.model.ensemble import FoldEnsemble


# ---- 1. the trial ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    run: Any  # mlflow.entities.Run
    search: str
    trial_id: str
    checkpoint: str
    cv_acc_mean: float
    cv_acc_std: float | None
    order: float = 0.0  # its place in Tune's trial list (tag esc50.trial_number), for ties

    @property
    def run_id(self) -> str:
        return self.run.info.run_id


def _search_runs(c: Any, filter_string: str) -> list[Any]:
    """The runs the filter matches in every experiment, newest first."""
    return all_runs(c, [e.experiment_id for e in c.search_experiments()], filter_string, "DESC")


def _trial(run: Any, pruned_ok: bool = False) -> Trial | None:
    """A finished trial run (or, if `pruned_ok`, a pruned one) with a metric and a checkpoint, else None."""
    tags, metrics = run.data.tags, run.data.metrics
    ended = run.info.status == "FINISHED" or (pruned_ok and tags.get(TAG_STATUS) == PRUNED)
    if not ended or METRIC not in metrics or not tags.get(TAG_CHECKPOINT):
        return None
    trial_id = (
        next((tags[k] for k in TRIAL_ID_KEYS if tags.get(k)), None) or run.info.run_name or run.info.run_id
    )
    return Trial(
        run=run,
        search=tags.get(TAG_SEARCH, ""),
        trial_id=str(trial_id),
        checkpoint=tags[TAG_CHECKPOINT],
        cv_acc_mean=float(metrics[METRIC]),
        cv_acc_std=metrics.get("cv_acc_std"),
        # a run made before the place was tagged: its start (the order trials started in)
        order=float(tags.get(TAG_TRIAL_NUMBER) or run.info.start_time or 0),
    )


def find_trial(
    c: Any, search: str | None = None, run_id: str | None = None, trial_id: str | None = None
) -> Trial:
    """The trial to promote: the named run or trial, else the best finished trial of `search`
    (default: the search of the most recent trial)."""
    from mlflow.exceptions import MlflowException

    if sum(x is not None for x in (search, run_id, trial_id)) > 1:
        raise UserError("name at most one of --search, --run, --trial")
    if run_id is not None:
        try:
            run = c.get_run(run_id)
        except MlflowException:
            raise UserError(f"no MLflow run {run_id!r} in {c.tracking_uri}") from None
        return _named_trial(run, f"run {run_id}")
    role = f"tags.`{TAG_ROLE}` = {filter_literal(ROLE_TRIAL)}"
    if trial_id is not None:
        runs = [
            r
            for r in _search_runs(c, role)
            if trial_id in {r.info.run_name, *(r.data.tags.get(k) for k in TRIAL_ID_KEYS)}
        ]
        if not runs:
            raise UserError(f"no trial {trial_id!r} in {c.tracking_uri} (a Tune trial id or trial run name)")
        return _named_trial(runs[0], f"trial {trial_id}")
    if search is None:
        latest = _search_runs(c, role)
        if not latest:
            raise UserError(
                f"no search trials in {c.tracking_uri}: run `esc50 search` first, or pass --tracking-uri"
            )
        search = latest[0].data.tags.get(TAG_SEARCH, "")
    runs = _search_runs(c, f"{role} AND tags.`{TAG_SEARCH}` = {filter_literal(search)}")
    if not runs:
        known = sorted({r.data.tags.get(TAG_SEARCH, "") for r in _search_runs(c, role)} - {""})
        raise UserError(f"no search named {search!r} in {c.tracking_uri}; searches there: {known or 'none'}")
    finished = [t for t in map(_trial, runs) if t is not None]
    if not finished:
        states: dict[str, int] = {}
        for r in runs:
            state = r.data.tags.get(TAG_STATUS) or r.info.status
            states[state] = states.get(state, 0) + 1
        raise UserError(
            f"search {search!r} has no finished trial with a {METRIC} and a checkpoint "
            f"({len(runs)} trial run(s): {', '.join(f'{n} {s}' for s, n in sorted(states.items()))}); "
            "a pruned trial can be promoted by naming it with --run or --trial"
        )
    return min(finished, key=lambda t: best_first(t.cv_acc_mean, t.order))  # the search's own rule


def _named_trial(run: Any, what: str) -> Trial:
    trial = _trial(run, pruned_ok=True)
    if trial is None:
        problems = []
        if run.info.status != "FINISHED" and run.data.tags.get(TAG_STATUS) != PRUNED:
            problems.append(f"status {run.data.tags.get(TAG_STATUS) or run.info.status}")
        if METRIC not in run.data.metrics:
            problems.append(f"no metric {METRIC}")
        if not run.data.tags.get(TAG_CHECKPOINT):
            problems.append(f"no tag {TAG_CHECKPOINT}")
        raise UserError(f"{what} is not a finished or pruned trial with a checkpoint: {'; '.join(problems)}")
    return trial


# ---- 2. the checkpoint ------------------------------------------------------------------------


def fetch_checkpoint(uri: str, dest: Path) -> Path:
    """A checkpoint directory (local path, file://, s3://, gs://, ...) as a local directory."""
    from trainable.storage import resolve

    if "://" not in uri or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://"))
        if not path.is_dir():
            raise UserError(f"checkpoint {uri} does not exist (was the search's storage moved or cleaned?)")
        return path
    import pyarrow.fs as pafs

    fs, root = resolve(uri)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise UserError(f"checkpoint {uri} does not exist")
    dest.mkdir(parents=True, exist_ok=True)  # copy_files makes no local directory (found on S3)
    pafs.copy_files(root, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def load_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[int, Any], FoldEnsemble]:
    """(meta, states, FoldEnsemble) of a checkpoint directory; UserError when it is not usable."""
    from trainable.model.ensemble import FoldEnsemble, read_checkpoint
    from trainable.model.features import FeatureParams

    try:
        meta, states = read_checkpoint(directory)
        ensemble = FoldEnsemble(FeatureParams.from_dict(meta["features"]), meta["classes"], states)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"checkpoint {directory}: {e}") from None
    return meta, states, ensemble


# ---- 4. the pyfunc (step 3, the out-of-fold report, is search/release/oof.py) ---------------------------


def model_code(dest: Path) -> Path:
    """The package shipped with the model: `trainable/` holding only its `model/` sub-package, whole
    (what prediction imports; trainable/model/__init__.py)."""
    import trainable
    import trainable.model

    pkg = dest / "trainable"
    pkg.mkdir(parents=True)
    shutil.copy2(trainable.__file__, pkg / "__init__.py")
    shutil.copytree(
        Path(trainable.model.__file__).parent,
        pkg / "model",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    return pkg


def requirements() -> list[str]:
    """The installed versions of what the model imports (local version suffixes like +cu130 dropped)."""
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def log_model(meta: dict[str, Any], states: dict[int, Any], work: Path) -> Any:
    """Log the ensemble pyfunc into the active run; returns mlflow's ModelInfo."""
    import mlflow

    from trainable.model.ensemble import write_slim_checkpoint

    slim = work / "checkpoint"
    write_slim_checkpoint(slim, meta, states)
    code = model_code(work / "code")
    # MLflow loads the saved model once to check the input example; importing the shipped code
    # would leave __pycache__/*.pyc (compiled code) inside the logged artifact.
    no_pyc, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        return _log_pyfunc(mlflow, meta, slim, code)
    finally:
        sys.dont_write_bytecode = no_pyc


def _log_pyfunc(mlflow: Any, meta: dict[str, Any], slim: Path, code: Path) -> Any:
    import trainable.model
    from trainable.model.ensemble import CHECKPOINT_ARTIFACT, example_input, signature
    from trainable.model.features import FeatureParams

    with hide_mlflow_notices():
        return mlflow.pyfunc.log_model(
            name="model",
            # A model from code: MLflow stores this file's source, not a pickled instance.
            python_model=str(Path(trainable.model.__file__).parent / ENTRY),
            artifacts={CHECKPOINT_ARTIFACT: str(slim)},
            code_paths=[str(code)],
            signature=signature(),
            input_example=example_input(FeatureParams.from_dict(meta["features"])),
            pip_requirements=requirements(),
            metadata={"classes": list(meta["classes"]), "features": meta["features"], "folds": meta["folds"]},
        )


# ---- the promotion: steps 1 to 5 (5, the registry, is search/release/champion.py) ------------------------


@dataclass(frozen=True)
class Promotion:
    name: str
    version: str
    previous: str | None
    trial: Trial
    run_id: str
    metrics: dict[str, float]
    worst: list[dict[str, Any]]
    bbc: Any = None  # search.bbc.BBCEstimate of the trial's search (None: no out-of-fold predictions)

    def summary(self) -> str:
        t = self.trial
        std = f" ± {t.cv_acc_std:.3f}" if t.cv_acc_std is not None else ""
        m = self.metrics
        worst = ", ".join(f"{w['class']} {w['accuracy']:.2f}" for w in self.worst)
        b = self.bbc
        bbc = (
            f"; BBC-CV {b.mean:.3f} (95% {b.lo:.3f}-{b.hi:.3f}, selection over {b.n_trials} trial(s))"
            if b is not None
            else "; BBC-CV not available (no out-of-fold predictions)"
        )
        return (
            f"{self.name} v{self.version} is {CHAMPION} (search {t.search or '?'}, trial {t.trial_id}: "
            f"cv_acc {t.cv_acc_mean:.3f}{std}{bbc}; out-of-fold acc {m['oof_acc']:.3f} on "
            f"{int(m['oof_clips'])} clips"
            + (f", weakest: {worst}" if worst else "")
            + f"); {PREVIOUS}: {'v' + self.previous if self.previous else 'none'}"
        )


def search_bbc_of(c: Any, trial: Trial) -> Any:
    """BBC-CV (search/bbc.py) of the completed trials of `trial`'s search: what selecting the best
    of them is worth on clips the selection did not see. None when no trial kept its out-of-fold
    predictions (a search from before they were kept)."""
    if not trial.search:
        return None
    runs = _search_runs(
        c,
        f"tags.`{TAG_ROLE}` = {filter_literal(ROLE_TRIAL)} AND tags.`{TAG_SEARCH}` = {filter_literal(trial.search)}",
    )
    runs = [r for r in runs if r.data.tags.get(TAG_STATUS) == COMPLETED and r.info.status == "FINISHED"]
    runs.sort(key=lambda r: r.data.tags.get(TAG_TRIAL, r.info.run_id))  # a stable trial order
    oofs = [trial_oof(c, r.info.run_id, r.data.tags.get(TAG_CHECKPOINT)) for r in runs]
    return search_bbc([o for o in oofs if o is not None])


def promote(
    search: str | None = None,
    run_id: str | None = None,
    trial_id: str | None = None,
    tracking: str | None = None,
    name: str = DEFAULT_NAME,
    shards: str | None = None,
) -> Promotion:
    """Promote a trial (see the module docstring); returns what was registered."""
    import mlflow

    c = client(tracking, must_exist=True)
    trial = find_trial(c, search, run_id, trial_id)
    with tempfile.TemporaryDirectory(prefix="esc50_promote_") as tmp:
        work = Path(tmp)
        meta, states, ensemble = load_checkpoint(fetch_checkpoint(trial.checkpoint, work / "fetched"))
        uri = shards_uri(c, trial, meta, shards)
        data = load_oof_data(uri, meta)
        oof = out_of_fold(ensemble, data)
        bbc = search_bbc_of(c, trial)
        fingerprint = str(meta.get("fingerprint") or data.info.get("fingerprint") or "")
        tags = {
            TAG_ROLE: ROLE_PROMOTION,
            TAG_SEARCH: trial.search,
            TAG_TRIAL_ALIAS: trial.trial_id,
            TAG_TRIAL_RUN: trial.run_id,
            TAG_SHARDS: uri,
            **provenance.code_tags(),
            **provenance.data_tags(fingerprint, meta["features"]),
        }
        with mlflow.start_run(
            experiment_id=trial.run.info.experiment_id, run_name=f"promote {trial.trial_id}", tags=tags
        ) as run:
            provenance.log_dataset(c, run.info.run_id, uri, fingerprint, meta["features"], len(data))
            metrics = write_report(oof, work / "report")
            if bbc is not None:
                metrics.update(bbc.metrics())
            metrics.update(
                {
                    METRIC: trial.cv_acc_mean,
                    **({"cv_acc_std": trial.cv_acc_std} if trial.cv_acc_std is not None else {}),
                }
            )
            mlflow.log_metrics(metrics)
            mlflow.log_params(
                {
                    "registered_model": name,
                    "checkpoint": trial.checkpoint,
                    "folds": ",".join(map(str, meta["folds"])),
                }
            )
            mlflow.log_artifacts(str(work / "report"), "out_of_fold")
            info = log_model(meta, states, work)
        # Everything needed to retrain it: config, features, data fingerprint and shards, folds,
        # code commit and versions, search and trial; and what it is worth.
        version_tags = {
            **{k: v for k, v in tags.items() if k != TAG_ROLE},
            TAG_CONFIG: json.dumps(meta["config"], sort_keys=True),
            TAG_FOLDS: ",".join(map(str, meta["folds"])),
            TAG_EPOCH: str(meta.get("epoch", "")),
            METRIC: f"{trial.cv_acc_mean:.6f}",
            "cv_acc_std": "" if trial.cv_acc_std is None else f"{trial.cv_acc_std:.6f}",
            "oof_acc": f"{metrics['oof_acc']:.6f}",
            TAG_PROMOTION_RUN: run.info.run_id,
            **({k: f"{v:.6f}" for k, v in bbc.metrics().items()} if bbc is not None else {}),
            **({"bbc_trials": str(bbc.n_trials)} if bbc is not None else {}),
        }
        description = f"search {trial.search}, trial {trial.trial_id}, cv_acc_mean {trial.cv_acc_mean:.4f}"
        version, previous = register_champion(c, name, info.model_uri, version_tags, description)
    seen = [r for r in oof.per_class() if r["clips"]]
    worst = sorted(seen, key=lambda r: r["accuracy"])[:3]
    return Promotion(name, version, previous, trial, run.info.run_id, metrics, worst, bbc)
