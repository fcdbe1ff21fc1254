"""Bootstrap bias-corrected cross-validation (BBC-CV; Tsamardinos, Greasidou and Borboudakis,
"Bootstrapping the out-of-sample predictions for efficient and accurate cross-validation",
Machine Learning 107, 2018): the accuracy to expect from the configuration a search selects.

A search picks the best of N trials by their cross-validated accuracy, on the very clips that
accuracy is measured on, so the winner's cv_acc_mean is biased upward, more as N grows. BBC-CV
re-plays the selection on bootstrap samples of the clips' out-of-fold predictions (each clip scored
by the fold model that did not train on it; no retraining):

    for b in 1..B:  draw N clips with replacement (in-bag); the rest are out-of-bag
                    pick the trial with the best accuracy on the in-bag clips
                    score that pick on the out-of-bag clips
    estimate = mean of the B scores; 95% interval = their 2.5th and 97.5th percentiles

    correct = correctness(oofs)          # (clips, trials) bool, rows lined up across trials
    est = bbc_cv(correct, n_boot=1000, seed=0)
    est.mean, est.lo, est.hi, est.best_of_n

Pure numpy: no Ray, no MLflow, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

N_BOOT = 1000
LEVEL = 0.95
METRICS = ("bbc_cv_acc", "bbc_cv_acc_lo", "bbc_cv_acc_hi")  # names on the search run and the version


@dataclass(frozen=True)
class BBCEstimate:
    mean: float  # BBC-CV accuracy of the selection procedure
    lo: float  # 2.5th percentile of the bootstrap scores
    hi: float  # 97.5th percentile
    best_of_n: float  # accuracy of the trial picked on all clips (what the search reports)
    n_trials: int
    n_clips: int
    n_boot: int

    def metrics(self) -> dict[str, float]:
        return dict(zip(METRICS, (self.mean, self.lo, self.hi), strict=True))

    def text(self) -> str:
        return (
            f"BBC-CV {self.mean:.4f} (95% interval {self.lo:.4f}-{self.hi:.4f}; "
            f"{self.n_trials} completed trial(s), {self.n_clips} clips, {self.n_boot} bootstraps)"
        )


def bbc_cv(correct: np.ndarray, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> BBCEstimate:
    """BBC-CV from a (clips, trials) matrix: correct[i, j] = trial j's out-of-fold prediction of
    clip i is right. Ties in the in-bag selection go to the lower trial index (deterministic)."""
    k = np.asarray(correct, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] < 2 or k.shape[1] < 1:
        raise ValueError(f"BBC-CV needs a (clips >= 2, trials >= 1) matrix, got shape {k.shape}")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    n, t = k.shape
    rng = np.random.default_rng(seed)
    scores: list[np.ndarray] = []
    chunk = max(1, min(n_boot, 4_000_000 // max(n, 1)))  # bound memory: chunk x clips counts at once
    left = n_boot
    while left > 0:
        b = min(chunk, left)
        left -= b
        draws = rng.integers(0, n, size=(b, n))
        flat = (draws + (np.arange(b) * n)[:, None]).ravel()
        counts = np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)
        pick = (counts @ k).argmax(axis=1)  # best in-bag accuracy (sums: every sample has n draws)
        out = counts == 0
        n_out = out.sum(axis=1)
        hits = (out * k[:, pick].T).sum(axis=1)
        ok = n_out > 0  # an empty out-of-bag sample (only for tiny n) scores nothing
        scores.append(hits[ok] / n_out[ok])
    s = np.concatenate(scores)
    if not len(s):
        raise ValueError("every bootstrap sample left no out-of-bag clip: too few clips")
    tail = (1 - level) / 2 * 100
    return BBCEstimate(
        mean=float(s.mean()),
        lo=float(np.percentile(s, tail)),
        hi=float(np.percentile(s, 100 - tail)),
        best_of_n=float(k.mean(axis=0).max()),
        n_trials=t,
        n_clips=n,
        n_boot=len(s),
    )


def correctness(oofs: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """(clips, trials) bool from each trial's out-of-fold arrays (trainable.model.checkpoint.read_oof:
    row, fold, label, pred), on the clips every trial scored. Trials whose clips disagree on a
    clip's label or fold (other data) are a ValueError: their predictions do not line up."""
    if not oofs:
        raise ValueError("no out-of-fold predictions")
    common = oofs[0]["row"]
    for o in oofs[1:]:
        common = np.intersect1d(common, o["row"])
    if not len(common):
        raise ValueError("the trials' out-of-fold predictions share no clip")
    cols, ref = [], None
    for j, o in enumerate(oofs):
        idx = np.searchsorted(o["row"], common)
        here = (np.asarray(o["label"])[idx], np.asarray(o["fold"])[idx])
        if ref is None:
            ref = here
        elif not (np.array_equal(ref[0], here[0]) and np.array_equal(ref[1], here[1])):
            raise ValueError(
                f"trial {j}: its clips' labels or folds differ from the first trial's (other data)"
            )
        cols.append(np.asarray(o["pred"])[idx] == here[0])
    return np.stack(cols, axis=1)


def search_bbc(oofs: list[dict[str, np.ndarray]], seed: int = 0) -> BBCEstimate | None:
    """BBC-CV of the completed trials' out-of-fold arrays (`correctness` of each); None without any."""
    if not oofs:
        return None
    return bbc_cv(correctness(oofs), seed=seed)
