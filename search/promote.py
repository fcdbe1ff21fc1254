"""`esc50 promote`: the best trial of a search -> one MLflow pyfunc (the fold ensemble) -> the registry.

    promote(search="my-search")          # best finished trial by cv_acc_mean
    promote(run_id="...")                # or a named trial run / Tune trial id
    rollback()                           # champion back to previous

How a promotion runs (`promote`, top to bottom):
  1. find the trial in MLflow: child runs tagged `esc50.role=trial` and `esc50.search=<name>`, with
     the metric `cv_acc_mean` and the tag `esc50.checkpoint` (the CV checkpoint directory: meta.json +
     fold_<k>.pt); the best finished one, unless a run or trial is named;
  2. fetch the checkpoint (a local path or any URI pyarrow opens) and rebuild its fold models;
  3. out-of-fold report: every clip of the checkpoint's folds predicted by the one fold model that
     validated on it (never one that trained on it), from the search's shards, which must have the
     checkpoint's feature parameters and fingerprint;
  4. one promotion run in the trial's experiment: the pyfunc (`trainable.ensemble.EnsembleModel`,
     with a slim copy of the checkpoint as its artifact and features/models/augment/checkpoint/ensemble
     as its code), the report's metrics and artifacts (per-class accuracy, confusion matrix picture);
  5. a new version of the registered model, tagged with search, trial, config, cv_acc_mean/std and
     the shards' fingerprint; alias `champion` moves to it, the version that held it gets `previous`.

Every step that can fail on user input raises `UserError` before anything is registered.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from search.errors import UserError

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

DEFAULT_NAME = "esc50-cnn"
CHAMPION, PREVIOUS = "champion", "previous"
# The search's MLflow records (search/tracking.py; not imported: it imports Ray).
TAG_ROLE, TAG_SEARCH, TAG_CHECKPOINT = "esc50.role", "esc50.search", "esc50.checkpoint"
TAG_STATUS, PRUNED = "esc50.status", "pruned"  # a pruned trial (stopped by ASHA) is MLflow KILLED
TRIAL_ID_KEYS = ("esc50.trial_id", "esc50.trial")  # the Tune trial id
SHARDS_KEYS = ("esc50.shards", "shards")  # params/tags that may name a search's shards
TAG_REPLACED = "esc50.replaced"  # on a version: the champion it replaced (for rollback)
METRIC = "cv_acc_mean"
SHIPPED = ("__init__.py", "features.py", "models.py", "augment.py", "checkpoint.py", "ensemble.py")
REQUIREMENTS = ("torch", "torchaudio", "numpy", "pandas", "mlflow", "soundfile")


def client(uri: str | None = None, must_exist: bool = True):
    """An MlflowClient for the option, else $MLFLOW_TRACKING_URI, else ./mlflow.db (as `esc50 search`);
    the fluent API (start_run, load_model) is pointed at the same store. A SQLite store that does
    not exist is a UserError (MLflow would silently create an empty one)."""
    import mlflow
    from mlflow import MlflowClient

    from search.options import tracking_uri

    uri = tracking_uri(uri)
    if must_exist and uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///") :]):
        raise UserError(f"no MLflow store at {uri}: run where `esc50 search` ran, or pass --tracking-uri")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its notices about creating tables
    mlflow.set_tracking_uri(uri)  # the registry follows it (no sticky set_registry_uri)
    return MlflowClient(uri, uri)


# ---- 1. the trial ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    run: Any  # mlflow.entities.Run
    search: str
    trial_id: str
    checkpoint: str
    cv_acc_mean: float
    cv_acc_std: float | None

    @property
    def run_id(self) -> str:
        return self.run.info.run_id


def _quote(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _search_runs(c, filter_string: str) -> list[Any]:
    ids = [e.experiment_id for e in c.search_experiments()]
    runs: list[Any] = []
    token = None
    while ids:
        page = c.search_runs(
            ids, filter_string, max_results=1000, page_token=token, order_by=["attributes.start_time DESC"]
        )
        runs += list(page)
        token = page.token
        if not token:
            break
    return runs


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
    )


def find_trial(c, search: str | None = None, run_id: str | None = None, trial_id: str | None = None) -> Trial:
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
    role = f"tags.`{TAG_ROLE}` = 'trial'"
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
    runs = _search_runs(c, f"{role} AND tags.`{TAG_SEARCH}` = {_quote(search)}")
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
    return max(finished, key=lambda t: t.cv_acc_mean)


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
    from trainable.shards import resolve

    if "://" not in uri or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://"))
        if not path.is_dir():
            raise UserError(f"checkpoint {uri} does not exist (was the search's storage moved or cleaned?)")
        return path
    import pyarrow.fs as pafs

    fs, root = resolve(uri)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise UserError(f"checkpoint {uri} does not exist")
    pafs.copy_files(root, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def load_checkpoint(directory: Path):
    """(meta, states, FoldEnsemble) of a checkpoint directory; UserError when it is not usable."""
    from trainable.ensemble import FoldEnsemble, read_checkpoint
    from trainable.features import FeatureParams

    try:
        meta, states = read_checkpoint(directory)
        ensemble = FoldEnsemble(FeatureParams.from_dict(meta["features"]), meta["classes"], states)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"checkpoint {directory}: {e}") from None
    return meta, states, ensemble


# ---- 3. out-of-fold report --------------------------------------------------------------------


def shards_uri(c, trial: Trial, meta: dict[str, Any], shards: str | None) -> str:
    """Where the trial's training data is: --shards, meta.json, the trial's or its search's params/tags."""
    if shards:
        return shards
    if meta.get("shards"):
        return str(meta["shards"])
    runs = [trial.run]
    parent = trial.run.data.tags.get("mlflow.parentRunId")
    if parent:
        with contextlib.suppress(Exception):
            runs.append(c.get_run(parent))
    for run in runs:
        for source in (run.data.params, run.data.tags):
            for key in SHARDS_KEYS:
                if source.get(key):
                    return str(source[key])
    raise UserError(
        f"cannot tell which shards trial {trial.trial_id} trained on (no 'shards' in its checkpoint, "
        "run or search run): pass --shards URI for the out-of-fold report"
    )


@dataclass(frozen=True)
class OutOfFold:
    """One row per clip: its own fold's model's prediction."""

    classes: tuple[str, ...]
    filenames: tuple[str, ...]
    fold: np.ndarray  # (N,) official fold of the clip
    model_fold: np.ndarray  # (N,) the fold model that predicted it (its validation fold)
    target: np.ndarray  # (N,)
    probs: np.ndarray  # (N, C)

    @property
    def pred(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def accuracy(self) -> float:
        return float((self.pred == self.target).mean()) if len(self.target) else float("nan")

    def fold_accuracy(self) -> dict[int, float]:
        return {
            int(k): float((self.pred[self.fold == k] == self.target[self.fold == k]).mean())
            for k in np.unique(self.fold)
        }

    def confusion(self) -> np.ndarray:
        """(C, C) counts: row = true class, column = predicted."""
        c = len(self.classes)
        return np.bincount(self.target * c + self.pred, minlength=c * c).reshape(c, c)

    def per_class(self) -> list[dict[str, Any]]:
        cm = self.confusion()
        clips = cm.sum(axis=1)
        return [
            {
                "class": name,
                "clips": int(clips[i]),
                "correct": int(cm[i, i]),
                "accuracy": float(cm[i, i] / clips[i]) if clips[i] else float("nan"),
            }
            for i, name in enumerate(self.classes)
        ]


def out_of_fold(ensemble: Any, data: Any, batch: int = 256) -> OutOfFold:
    """Each clip of `data` (FoldData) predicted by the fold model of `ensemble` that validated on
    the clip's fold, i.e. the one model that never trained on it. Clips of folds the ensemble has
    no model for are left out."""
    import torch

    keep = torch.isin(data.fold, torch.as_tensor(ensemble.folds))
    idx = torch.nonzero(keep).squeeze(1)
    fold = data.fold[idx]
    probs = torch.zeros((len(idx), ensemble.n_classes))
    model_fold = torch.zeros(len(idx), dtype=torch.int64)
    for i, k in enumerate(ensemble.folds):
        rows = torch.nonzero(fold == k).squeeze(1)
        for s in range(0, len(rows), batch):
            r = rows[s : s + batch]
            probs[r] = torch.softmax(ensemble.fold_logits(i, data.x[idx[r]].squeeze(1)), dim=1)
            model_fold[r] = k
    names = tuple(data.filenames[j] for j in idx.tolist()) if data.filenames else ()
    return OutOfFold(
        classes=tuple(ensemble.classes),
        filenames=names,
        fold=fold.numpy(),
        model_fold=model_fold.numpy(),
        target=data.y[idx].numpy(),
        probs=probs.numpy(),
    )


def load_oof_data(uri: str, meta: dict[str, Any]):
    """The shards of the checkpoint's folds, checked against the checkpoint's features and data."""
    from trainable.features import FeatureParams
    from trainable.shards import ShardError, load_shards

    params = FeatureParams.from_dict(meta["features"])
    try:
        data = load_shards(uri, folds=meta["folds"], expect=params)
    except ShardError as e:
        raise UserError(
            f"out-of-fold report: {e} (the checkpoint's feature parameters are {params.to_json()})"
        ) from None
    want, have = meta.get("fingerprint"), data.info.get("fingerprint")
    if want and have and want != have:
        raise UserError(
            f"{uri}: shards fingerprint {have} is not the checkpoint's {want} (other audio or features)"
        )
    if tuple(data.classes) != tuple(meta["classes"]):
        raise UserError(f"{uri}: the shards' classes differ from the checkpoint's")
    return data


def write_report(oof: OutOfFold, out: Path) -> dict[str, float]:
    """predictions.csv, per_class_accuracy.csv, confusion_matrix.csv/.png under `out`; returns metrics."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    classes = np.asarray(oof.classes)
    pred = oof.pred
    pd.DataFrame(
        {
            "filename": list(oof.filenames) or [""] * len(pred),
            "fold": oof.fold,
            "model_fold": oof.model_fold,
            "target": oof.target,
            "category": classes[oof.target],
            "predicted": pred,
            "predicted_category": classes[pred],
            "probability": oof.probs[np.arange(len(pred)), pred],
            "correct": pred == oof.target,
        }
    ).to_csv(out / "predictions.csv", index=False)
    per_class = pd.DataFrame(oof.per_class())
    per_class.to_csv(out / "per_class_accuracy.csv", index=False)
    cm = oof.confusion()
    pd.DataFrame(cm, index=classes, columns=classes).to_csv(out / "confusion_matrix.csv")
    plot_confusion(cm, oof.classes, out / "confusion_matrix.png", f"out-of-fold accuracy {oof.accuracy:.3f}")
    metrics = {"oof_acc": oof.accuracy, "oof_clips": float(len(pred))}
    metrics.update({f"oof_fold{k}_acc": v for k, v in oof.fold_accuracy().items()})
    seen = per_class[per_class.clips > 0]
    if len(seen):
        metrics["oof_worst_class_acc"] = float(seen.accuracy.min())
    return metrics


def plot_confusion(cm: np.ndarray, classes: tuple[str, ...], path: Path, title: str) -> None:
    """Row-normalized confusion matrix as a PNG heat map (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    n = len(classes)
    size = max(4.0, 0.22 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- 4. the pyfunc ------------------------------------------------------------------------------


def model_code(dest: Path) -> Path:
    """The package shipped with the model: `trainable/` with only what prediction imports."""
    import trainable

    src = Path(trainable.__file__).parent
    pkg = dest / "trainable"
    pkg.mkdir(parents=True)
    for name in SHIPPED:
        shutil.copy2(src / name, pkg / name)
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


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """Hide mlflow's notices about pickled models and type hints: they are expected here."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def log_model(meta: dict[str, Any], states: dict[int, Any], work: Path) -> Any:
    """Log the ensemble pyfunc into the active run; returns mlflow's ModelInfo."""
    import mlflow

    from trainable.ensemble import (
        CHECKPOINT_ARTIFACT,
        EnsembleModel,
        example_input,
        signature,
        write_slim_checkpoint,
    )
    from trainable.features import FeatureParams

    slim = work / "checkpoint"
    write_slim_checkpoint(slim, meta, states)
    code = model_code(work / "code")
    with _quiet_mlflow():
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=EnsembleModel(),
            artifacts={CHECKPOINT_ARTIFACT: str(slim)},
            code_paths=[str(code)],
            signature=signature(),
            input_example=example_input(FeatureParams.from_dict(meta["features"])),
            pip_requirements=requirements(),
            metadata={"classes": list(meta["classes"]), "features": meta["features"], "folds": meta["folds"]},
        )


# ---- 5. registry --------------------------------------------------------------------------------


def alias_version(c, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


@dataclass(frozen=True)
class Promotion:
    name: str
    version: str
    previous: str | None
    trial: Trial
    run_id: str
    metrics: dict[str, float]
    worst: list[dict[str, Any]]

    def summary(self) -> str:
        t = self.trial
        std = f" ± {t.cv_acc_std:.3f}" if t.cv_acc_std is not None else ""
        m = self.metrics
        worst = ", ".join(f"{w['class']} {w['accuracy']:.2f}" for w in self.worst)
        return (
            f"{self.name} v{self.version} is {CHAMPION} (search {t.search or '?'}, trial {t.trial_id}: "
            f"cv_acc {t.cv_acc_mean:.3f}{std}; out-of-fold acc {m['oof_acc']:.3f} on {int(m['oof_clips'])} clips"
            + (f", weakest: {worst}" if worst else "")
            + f"); {PREVIOUS}: {'v' + self.previous if self.previous else 'none'}"
        )


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

    c = client(tracking)
    trial = find_trial(c, search, run_id, trial_id)
    with tempfile.TemporaryDirectory(prefix="esc50_promote_") as tmp:
        work = Path(tmp)
        meta, states, ensemble = load_checkpoint(fetch_checkpoint(trial.checkpoint, work / "fetched"))
        uri = shards_uri(c, trial, meta, shards)
        data = load_oof_data(uri, meta)
        oof = out_of_fold(ensemble, data)
        config = json.dumps(meta["config"], sort_keys=True)
        tags = {
            TAG_ROLE: "promotion",
            TAG_SEARCH: trial.search,
            "esc50.trial": trial.trial_id,
            "esc50.trial_run": trial.run_id,
            "esc50.shards": uri,
            "esc50.fingerprint": str(meta.get("fingerprint") or data.info.get("fingerprint") or ""),
        }
        with mlflow.start_run(
            experiment_id=trial.run.info.experiment_id, run_name=f"promote {trial.trial_id}", tags=tags
        ) as run:
            metrics = write_report(oof, work / "report")
            metrics.update(
                {
                    "cv_acc_mean": trial.cv_acc_mean,
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
        previous = alias_version(c, name, CHAMPION)
        version_tags = {
            **{k: v for k, v in tags.items() if k != TAG_ROLE},
            "esc50.config": config,
            "cv_acc_mean": f"{trial.cv_acc_mean:.6f}",
            "cv_acc_std": "" if trial.cv_acc_std is None else f"{trial.cv_acc_std:.6f}",
            "oof_acc": f"{metrics['oof_acc']:.6f}",
            "esc50.promotion_run": run.info.run_id,
            TAG_REPLACED: previous or "",
        }
        with _quiet_mlflow(), contextlib.redirect_stderr(io.StringIO()):  # its "Created version" prints
            mv = mlflow.register_model(info.model_uri, name, tags=version_tags)
    version = str(mv.version)
    c.update_model_version(
        name,
        version,
        description=f"search {trial.search}, trial {trial.trial_id}, cv_acc_mean {trial.cv_acc_mean:.4f}",
    )
    c.set_registered_model_alias(name, CHAMPION, version)
    if previous and previous != version:
        c.set_registered_model_alias(name, PREVIOUS, previous)
    seen = [r for r in oof.per_class() if r["clips"]]
    worst = sorted(seen, key=lambda r: r["accuracy"])[:3]
    return Promotion(name, version, previous, trial, run.info.run_id, metrics, worst)


def rollback(tracking: str | None = None, name: str = DEFAULT_NAME) -> tuple[str, str | None]:
    """Move `champion` back to `previous`; `previous` moves to the version that one had replaced
    (or is cleared). Returns (new champion, new previous)."""
    from mlflow.exceptions import MlflowException

    c = client(tracking)
    try:
        c.get_registered_model(name)
    except MlflowException:
        raise UserError(f"no registered model {name!r} in {c.tracking_uri}") from None
    current = alias_version(c, name, CHAMPION)
    back = alias_version(c, name, PREVIOUS)
    if back is None:
        raise UserError(f"{name} has no {PREVIOUS!r} version to roll back to (champion: v{current})")
    c.set_registered_model_alias(name, CHAMPION, back)
    if current:
        c.set_model_version_tag(name, current, "esc50.rolled_back_from", "true")
    before = c.get_model_version(name, back).tags.get(TAG_REPLACED) or None
    if before and before != back and _version_exists(c, name, before):
        c.set_registered_model_alias(name, PREVIOUS, before)
    else:
        before = None
        c.delete_registered_model_alias(name, PREVIOUS)
    return back, before


def _version_exists(c, name: str, version: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        c.get_model_version(name, version)
        return True
    except MlflowException:
        return False
