"""The evaluation protocol every layer shares: ESC-50's official folds, and the metric a trial
reports and a search maximizes. Plain constants (no Ray, no torch), so anything may import them."""

from __future__ import annotations

from collections.abc import Iterable

FOLDS = (1, 2, 3, 4, 5)  # ESC-50's official cross-validation folds
METRIC, MODE = "cv_acc_mean", "max"


def check_folds(folds: Iterable[int]) -> tuple[int, ...]:
    """Sorted, distinct official fold numbers; ValueError on none or on one not official."""
    out = tuple(sorted({int(f) for f in folds}))
    if not out:
        raise ValueError("folds: at least one fold is needed")
    bad = [f for f in out if f not in FOLDS]
    if bad:
        raise ValueError(f"folds {bad} are not official ESC-50 folds {FOLDS}")
    return out


def metric_names(folds: Iterable[int] = FOLDS) -> list[str]:
    """Every metric a trial reports each epoch, for `folds` (official fold numbers)."""
    names = [METRIC, "cv_acc_std", "cv_loss_mean", "cv_train_loss_mean", "epoch", "epoch_seconds"]
    names.append("fold_seconds_max")
    for k in folds:
        names += [f"fold{int(k)}_acc", f"fold{int(k)}_loss"]
    return names
