"""The evaluation protocol every layer shares: ESC-50's official folds, and the metric a trial
reports and a search maximizes. Plain constants (no Ray, no torch), so anything may import them."""

from __future__ import annotations

import math
from collections.abc import Iterable

FOLDS = (1, 2, 3, 4, 5)  # ESC-50's official cross-validation folds
METRIC, MODE = "cv_acc_mean", "max"


def best_first(value: float | None, order: float) -> tuple[float, float]:
    """The sort key, best trial first, that the search's summary and BBC-CV and `esc50 promote`
    all use: the higher METRIC (MODE "max"; none or NaN ranks last); on a tie the trial Tune made
    first (`order`: its place in Tune's trial list). Ties are common (a few epochs on few clips
    give the same accuracy), and the first trial is what Tune's own get_best_result and Optuna's
    best_trial pick, and what a user reading the trials in order expects: a later trial that
    only equals it did not improve on it."""
    if value is None or math.isnan(value):
        value = -math.inf
    return (-value, order)


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
