"""The out-of-fold report (search/release/oof.py): which model predicts which clip, the report's files and
metrics, and where the trial's shards are found."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from search.errors import UserError
from search.release.oof import OutOfFold, out_of_fold, shards_uri, write_report
from search.release.promote import Trial, load_checkpoint


def test_out_of_fold_predictions_come_from_the_model_that_did_not_train_on_the_clip(
    trained_checkpoint,
) -> None:
    """Each fold model is rigged to always answer its own class: every clip's answer then shows
    which model scored it."""
    from trainable.shards import load_shards

    meta, states, ensemble = load_checkpoint(trained_checkpoint.path)
    rigged = {1: 3, 2: 0}  # fold -> the class its model always predicts
    for i, k in enumerate(ensemble.folds):
        fc = ensemble.nets[i].head.fc
        with torch.no_grad():
            fc.weight.zero_()
            fc.bias.fill_(-10.0)
            fc.bias[rigged[k]] = 10.0
    data = load_shards(trained_checkpoint.shards)  # all 5 folds: 3-5 have no model in this checkpoint
    oof = out_of_fold(ensemble, data)
    assert sorted(set(oof.fold.tolist())) == [1, 2] and len(oof.fold) == 16
    assert (oof.model_fold == oof.fold).all()
    for k, cls in rigged.items():
        assert (oof.pred[oof.fold == k] == cls).all()
    # and the fold models really were trained without their validation fold
    for k, s in states.items():
        assert s["fold"] == k
    assert oof.confusion().sum() == 16 and oof.confusion()[:, 3].sum() == 8


def test_report_files_and_metrics_from_known_predictions(tmp_path: Path) -> None:
    """Six clips of classes a-c over two folds, four right; class d has no clips (so no accuracy)."""
    classes = ("a", "b", "c", "d")
    target = np.array([0, 1, 2, 0, 1, 2])
    pred = np.array([0, 1, 2, 0, 2, 0])
    probs = np.full((6, 4), 0.1)
    probs[np.arange(6), pred] = 0.7
    oof = OutOfFold(
        classes=classes,
        filenames=tuple(f"clip{i}.wav" for i in range(6)),
        fold=np.array([1, 1, 1, 2, 2, 2]),
        model_fold=np.array([1, 1, 1, 2, 2, 2]),
        target=target,
        probs=probs,
    )
    np.testing.assert_array_equal(oof.confusion(), [[2, 0, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    metrics = write_report(oof, tmp_path / "report")
    assert metrics == pytest.approx(
        {
            "oof_acc": 4 / 6,
            "oof_clips": 6.0,
            "oof_fold1_acc": 1.0,
            "oof_fold2_acc": 1 / 3,
            "oof_worst_class_acc": 0.5,
        }
    )
    predictions = pd.read_csv(tmp_path / "report" / "predictions.csv")
    assert predictions.filename.tolist() == [f"clip{i}.wav" for i in range(6)]
    assert predictions.predicted_category.tolist() == ["a", "b", "c", "a", "c", "a"]
    assert predictions.probability.tolist() == pytest.approx([0.7] * 6)
    assert predictions.correct.tolist() == [True, True, True, True, False, False]
    per_class = pd.read_csv(tmp_path / "report" / "per_class_accuracy.csv")
    assert per_class["class"].tolist() == list(classes) and per_class.clips.tolist() == [2, 2, 2, 0]
    assert per_class.accuracy[:3].tolist() == [1.0, 0.5, 0.5] and np.isnan(per_class.accuracy[3])
    cm = pd.read_csv(tmp_path / "report" / "confusion_matrix.csv", index_col=0)
    assert cm.to_numpy().tolist() == oof.confusion().tolist() and list(cm.columns) == list(classes)
    assert (tmp_path / "report" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run(params: dict | None = None, tags: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(data=SimpleNamespace(params=params or {}, tags=tags or {}))


class _Runs:
    """A stand-in MLflow client that knows some runs by id (an unknown id raises, as MLflow does)."""

    def __init__(self, **runs: SimpleNamespace) -> None:
        self.runs = runs

    def get_run(self, run_id: str) -> SimpleNamespace:
        return self.runs[run_id]


def _trial_of(run: SimpleNamespace) -> Trial:
    return Trial(
        run=run, search="s", trial_id="s_00001", checkpoint="/ckpt", cv_acc_mean=0.5, cv_acc_std=None
    )


def test_shards_are_found_by_option_then_checkpoint_then_trial_run_then_search_run() -> None:
    child = {"mlflow.parentRunId": "parent"}
    c = _Runs(
        parent=_run(params={"shards": "/from/search/params"}, tags={"esc50.shards": "/from/search/tags"})
    )
    trial = _trial_of(_run(params={"esc50.shards": "/from/trial"}, tags=child))
    assert shards_uri(c, trial, {"shards": "/from/meta"}, "/from/option") == "/from/option"
    assert shards_uri(c, trial, {"shards": "/from/meta"}, None) == "/from/meta"
    assert shards_uri(c, trial, {}, None) == "/from/trial"
    assert shards_uri(c, _trial_of(_run(tags=child)), {}, None) == "/from/search/params"
    c = _Runs(parent=_run(tags={"esc50.shards": "/from/search/tags"}))
    assert shards_uri(c, _trial_of(_run(tags=child)), {}, None) == "/from/search/tags"
    # a parent run that cannot be read, and nothing else: the error says what to pass
    with pytest.raises(UserError, match=r"trial s_00001 .*pass --shards"):
        shards_uri(_Runs(), _trial_of(_run(tags=child)), {}, None)
