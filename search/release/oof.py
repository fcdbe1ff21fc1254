"""The out-of-fold report of a promotion: every clip of the checkpoint's folds predicted by the one
fold model that validated on it (never one that trained on it), so the report scores the promoted
models on clips they did not see.

    data = load_oof_data(shards_uri(c, trial, meta, shards), meta)   # checked against the checkpoint
    oof = out_of_fold(ensemble, data)
    metrics = write_report(oof, out)   # predictions, per-class accuracy, confusion matrix (CSV + PNG)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from search.errors import UserError
from search.store import TAG_PARENT, TAG_SHARDS

if TYPE_CHECKING:  # annotations only: torch loads when needed
    from trainable.model.ensemble import FoldEnsemble
    from trainable.shards import FoldData

SHARDS_KEYS = (TAG_SHARDS, "shards")  # params/tags that may name a search's shards


def shards_uri(c: Any, trial: Any, meta: dict[str, Any], shards: str | None) -> str:
    """Where the trial's (a search.release.promote.Trial) training data is: --shards, meta.json, the trial's or its search's params/tags."""
    if shards:
        return shards
    if meta.get("shards"):
        return str(meta["shards"])
    runs = [trial.run]
    parent = trial.run.data.tags.get(TAG_PARENT)
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


def out_of_fold(ensemble: FoldEnsemble, data: FoldData, batch: int = 256) -> OutOfFold:
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


def load_oof_data(uri: str, meta: dict[str, Any]) -> FoldData:
    """The shards of the checkpoint's folds, checked against the checkpoint's features and data."""
    from trainable.model.features import FeatureParams
    from trainable.shards import ShardError, load_shards
    from trainable.storage import LocationError

    params = FeatureParams.from_dict(meta["features"])
    try:
        data = load_shards(uri, folds=meta["folds"], expect=params)
    except (ShardError, LocationError) as e:
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
