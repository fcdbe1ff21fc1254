"""BBC-CV (search/bbc.py): on synthetic out-of-fold predictions whose trials all have the same true
accuracy, the best of N is biased upward and BBC-CV is not; with one trial the two agree; trials'
predictions line up by clip row."""

from __future__ import annotations

import numpy as np
import pytest

from search.bbc import METRICS, bbc_cv, correctness

TRUE_ACC, CLIPS = 0.6, 2000


def _same_accuracy(trials: int, seed: int) -> np.ndarray:
    """(clips, trials): each trial independently right on each clip with probability TRUE_ACC."""
    return np.random.default_rng(seed).random((CLIPS, trials)) < TRUE_ACC


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_of_n_is_biased_upward_and_bbc_is_not(seed: int) -> None:
    est = bbc_cv(_same_accuracy(50, seed), n_boot=500, seed=seed)
    # best of 50 trials of equal worth: about 2.2 standard errors (~0.011 each) above the truth
    assert est.best_of_n - TRUE_ACC > 0.015
    # BBC-CV: the truth inside its 95% interval, its mean within half the best-of-N's bias
    assert est.lo <= TRUE_ACC <= est.hi
    assert abs(est.mean - TRUE_ACC) < 0.5 * (est.best_of_n - TRUE_ACC)
    assert est.mean < est.best_of_n
    assert est.n_trials == 50 and est.n_clips == CLIPS and est.n_boot == 500


def test_one_trial_bbc_equals_its_accuracy() -> None:
    """With one trial there is no selection: BBC-CV is that trial's accuracy, up to bootstrap noise
    (here: the mean of 1000 out-of-bag accuracies, each with a standard error of ~0.018 on the ~736
    out-of-bag clips, so the mean is within 0.005 of the accuracy on all clips)."""
    correct = _same_accuracy(1, 7)
    est = bbc_cv(correct, n_boot=1000, seed=3)
    assert est.best_of_n == pytest.approx(correct.mean())
    assert abs(est.mean - est.best_of_n) < 0.005
    assert est.lo < est.best_of_n < est.hi


def test_estimate_is_reproducible_and_metrics_are_named() -> None:
    correct = _same_accuracy(5, 4)
    a, b = bbc_cv(correct, n_boot=200, seed=9), bbc_cv(correct, n_boot=200, seed=9)
    assert a == b
    assert list(a.metrics()) == ["bbc_cv_acc", "bbc_cv_acc_lo", "bbc_cv_acc_hi"] == list(METRICS)
    assert "BBC-CV" in a.text()
    with pytest.raises(ValueError, match="matrix"):
        bbc_cv(np.zeros((1, 3), dtype=bool))


def _oof(rows, labels, preds, folds=None) -> dict:
    rows = np.asarray(rows)
    return {
        "row": rows,
        "label": np.asarray(labels),
        "pred": np.asarray(preds),
        "fold": np.asarray(folds if folds is not None else [1] * len(rows)),
    }


def test_correctness_lines_trials_up_by_row_and_refuses_other_data() -> None:
    a = _oof([0, 1, 2, 3], [5, 6, 7, 8], [5, 0, 7, 0])
    b = _oof([1, 2, 3, 9], [6, 7, 8, 1], [6, 0, 8, 1])  # clip 0 missing, clip 9 extra
    got = correctness([a, b])
    assert got.tolist() == [[False, True], [True, False], [False, True]]  # rows 1, 2, 3
    other = _oof([1, 2, 3], [6, 7, 9], [6, 7, 9])  # row 3 has another label: other data
    with pytest.raises(ValueError, match="trial 1: .*differ"):
        correctness([a, other])
