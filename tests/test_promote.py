"""`esc50 promote`: best trial -> ensemble pyfunc -> registry, with its out-of-fold report on the
promotion run, bad input as clear errors, and the promoted model in a fresh process without this
project. The out-of-fold predictions themselves: test_oof.py; aliases and rollback: test_registry.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from search.cli import main
from search.errors import UserError
from search.release.champion import CHAMPION, PREVIOUS
from search.release.promote import promote
from tests.fixtures.promoted import copy_checkpoint, log_search
from tests.fixtures.search_store import copy_store


def _trial(ckpt, acc: float, **extra) -> dict:
    return {"checkpoint": ckpt, "cv_acc_mean": acc, "cv_acc_std": 0.01, **extra}


def _aliases(uri: str, name: str = "esc50-cnn") -> dict[str, str]:
    from mlflow import MlflowClient

    return {a: str(v) for a, v in MlflowClient(uri, uri).get_registered_model(name).aliases.items()}


def test_promote_picks_the_best_finished_trial_and_registers_champion(
    trained_checkpoint, mlflow_uri: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    ckpt = trained_checkpoint.path
    other = copy_checkpoint(trained_checkpoint, tmp_path / "other")
    trials = [
        _trial(other, 0.5),
        _trial(ckpt, 0.9),
        _trial(other, 0.99, status="RUNNING"),  # better but not finished
        {"cv_acc_mean": 0.98},  # finished, but no checkpoint
    ]
    ids = log_search(mlflow_uri, "s1", trials, trained_checkpoint.shards, tmp_path / "artifacts")
    result = promote(search="s1", tracking=mlflow_uri)

    assert result.trial.run_id == ids[1]
    assert (result.version, result.previous) == ("1", None)
    assert _aliases(mlflow_uri) == {CHAMPION: "1"}
    c = MlflowClient(mlflow_uri, mlflow_uri)
    mv = c.get_model_version("esc50-cnn", "1")
    meta = json.loads((ckpt / "meta.json").read_text())
    assert mv.tags["esc50.search"] == "s1"
    assert mv.tags["esc50.trial"] == "s1_00001"
    assert json.loads(mv.tags["esc50.config"]) == meta["config"]
    assert float(mv.tags["cv_acc_mean"]) == pytest.approx(0.9)
    assert float(mv.tags["cv_acc_std"]) == pytest.approx(0.01)
    assert mv.tags["esc50.fingerprint"] == meta["fingerprint"]
    assert mv.tags["esc50.shards"] == trained_checkpoint.shards

    # The out-of-fold report lives on the promotion run, and agrees with the folds' own validation.
    run = c.get_run(result.run_id)
    arts = {a.path for a in c.list_artifacts(result.run_id, "out_of_fold")}
    assert {
        f"out_of_fold/{f}" for f in ("per_class_accuracy.csv", "confusion_matrix.png", "predictions.csv")
    } <= arts
    png = Path(c.download_artifacts(result.run_id, "out_of_fold/confusion_matrix.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for k in meta["folds"]:
        assert run.data.metrics[f"oof_fold{k}_acc"] == pytest.approx(
            meta["metrics"][f"fold{k}_acc"], abs=1e-6
        )
    assert run.data.metrics["oof_clips"] == 16  # folds 1 and 2 of the 40-clip tree
    assert "out-of-fold acc" in result.summary() and "esc50-cnn v1 is champion" in result.summary()


def test_tied_trials_promote_picks_the_search_best(tmp_path: Path, mlflow_uri: str) -> None:
    """Tied cv_acc_mean: the search's summary (report.best) and promote pick the same trial, the
    one Tune made first (tag esc50.trial_number), whatever order MLflow lists the runs in."""
    from search.release.promote import find_trial
    from search.report import TrialRow, best
    from search.store import client

    ckpt = tmp_path / "ckpt"
    numbers = [1, 0, 2]  # the runs' start order is not Tune's order of the trials
    trials = [_trial(ckpt, 0.5, trial=f"t{n}") for n in numbers] + [_trial(ckpt, 0.4, trial="t3")]
    ids = log_search(mlflow_uri, "tie", trials, None, tmp_path / "artifacts")
    c = client(mlflow_uri)
    for rid, n in zip(ids, [*numbers, 3], strict=True):
        c.set_tag(rid, "esc50.trial_number", str(n))
    rows = [
        TrialRow(f"t{n}", "completed", 2, 2, t["cv_acc_mean"], 0.01, {}, {}, str(ckpt), rid, index=n)
        for n, t, rid in zip([*numbers, 3], trials, ids, strict=True)
    ]
    assert best(rows).trial_id == best(rows[::-1]).trial_id == "t0"
    assert find_trial(c, search="tie").trial_id == "t0"


def test_promote_bad_input_is_a_clear_error(
    trained_checkpoint, mlflow_uri: str, tmp_path: Path, capsys
) -> None:
    shards, art = trained_checkpoint.shards, tmp_path / "artifacts"
    with pytest.raises(UserError, match="no MLflow store at sqlite:///.*mlflow.db"):
        promote(tracking=mlflow_uri)
    assert not Path(mlflow_uri[len("sqlite:///") :]).exists()  # and none was created
    log_search(mlflow_uri, "empty", [], shards, art)
    with pytest.raises(UserError, match="no search trials"):
        promote(tracking=mlflow_uri)
    log_search(
        mlflow_uri, "unfinished", [_trial(trained_checkpoint.path, 0.9, status="FAILED"), {}], shards, art
    )
    with pytest.raises(UserError, match=r"no finished trial .*1 FAILED, 1 FINISHED"):
        promote(search="unfinished", tracking=mlflow_uri)
    with pytest.raises(UserError, match="no search named 'nope'.*unfinished"):
        promote(search="nope", tracking=mlflow_uri)
    with pytest.raises(UserError, match="no MLflow run 'abc'"):
        promote(run_id="abc", tracking=mlflow_uri)
    with pytest.raises(UserError, match="no trial 'zzz'"):
        promote(trial_id="zzz", tracking=mlflow_uri)

    gone = tmp_path / "gone"
    log_search(mlflow_uri, "moved", [_trial(gone, 0.9)], shards, art)
    with pytest.raises(UserError, match="does not exist"):
        promote(search="moved", tracking=mlflow_uri)

    log_search(mlflow_uri, "noshards", [_trial(trained_checkpoint.path, 0.9)], None, art)
    with pytest.raises(UserError, match="--shards"):
        promote(search="noshards", tracking=mlflow_uri)

    # feature parameters that do not match the shards ...
    other = copy_checkpoint(trained_checkpoint, tmp_path / "hop")
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(
        json.dumps({**meta, "features": {**meta["features"], "hop_length": 128}})
    )
    log_search(mlflow_uri, "hop", [_trial(other, 0.9)], shards, art)
    with pytest.raises(UserError, match=r"other feature parameters.*hop_length: 128 != 256"):
        promote(search="hop", tracking=mlflow_uri)
    # ... or the fold models
    mels = copy_checkpoint(trained_checkpoint, tmp_path / "mels")
    (mels / "meta.json").write_text(json.dumps({**meta, "features": {**meta["features"], "n_mels": 32}}))
    log_search(mlflow_uri, "mels", [_trial(mels, 0.9)], shards, art)
    with pytest.raises(UserError, match="trained on 16 mels, the features give 32"):
        promote(search="mels", tracking=mlflow_uri)

    # the CLI: one line on stderr, exit status 2, nothing registered
    assert main(["promote", "--tracking-uri", mlflow_uri, "--search", "unfinished"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("esc50 promote: error: search 'unfinished' has no finished trial")
    assert "Traceback" not in err
    assert main(["promote", "--rollback", "--tracking-uri", mlflow_uri]) == 2
    assert "no registered model 'esc50-cnn'" in capsys.readouterr().err


FRESH = r"""
import importlib.util, json, sys
# This project is pip-installed in editable mode in the venv: take its import hooks away, so only
# the model's own copy of the code (its code_paths) can be imported.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "Editable" not in getattr(h, "__qualname__", "")]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("search") is None and importlib.util.find_spec("trainable") is None
import numpy as np, pandas as pd, mlflow
model = mlflow.pyfunc.load_model("models:/esc50-cnn@champion")
wave, rate = np.load(sys.argv[1]), int(sys.argv[2])
out = model.predict(pd.DataFrame({"waveform": [wave, wave[: len(wave) // 3]], "sample_rate": [rate, rate]}))
print(json.dumps({"probs": out["probabilities"].tolist(), "labels": out["label"].tolist(),
                  "code": sys.modules["trainable.model.ensemble"].__file__}))
"""


def test_promoted_model_in_a_fresh_process_matches_the_fold_models(
    promoted, new_clips, tmp_path: Path
) -> None:
    """Without this project importable, `models:/esc50-cnn@champion` gives the probabilities of the
    checkpoint's fold models, computed here with the training code (FoldTrainer, LogMel, to_wave)."""
    from trainable.audio import decode, to_wave
    from trainable.config import TrainConfig
    from trainable.fold import FoldTrainer
    from trainable.model.ensemble import read_checkpoint
    from trainable.model.features import FeatureParams, LogMel

    path, category = new_clips[4]  # high_beep, OGG, stereo
    wave, rate = decode(path)
    np.save(tmp_path / "wave.npy", wave)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = promoted.uri
    proc = subprocess.run(
        [sys.executable, "-I", "-c", FRESH, str(tmp_path / "wave.npy"), str(rate)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "/code/trainable/model/ensemble.py" in got["code"] and not got["code"].startswith(str(Path.cwd()))

    meta, states = read_checkpoint(promoted.checkpoint.path)
    params = FeatureParams.from_dict(meta["features"])
    mel = LogMel(params)
    expected = []
    for clip in (wave, wave[: len(wave) // 3]):
        spec = mel(to_wave(clip, rate, params).unsqueeze(0))
        probs = 0
        for k, s in states.items():
            trainer = FoldTrainer(
                TrainConfig.from_dict(s["config"]), spec, torch.zeros(1), spec, torch.zeros(1), fold=k
            )
            trainer.load_state_dict(s)
            probs = probs + torch.softmax(trainer.predict_logits(spec)[:, : len(meta["classes"])], dim=1)
        expected.append((probs / len(states))[0].numpy())
    np.testing.assert_allclose(np.array(got["probs"]), np.stack(expected), atol=1e-5)
    assert got["labels"][0] == category  # (the shortened clip need not be: the models never saw padding)


@pytest.mark.ray
def test_promote_a_real_smoke_search(smoke_search, tiny_shards: str, tmp_path: Path) -> None:
    """The MLflow records `esc50 search` writes (search/tune.py): the trial is found by its tags,
    its checkpoint by `esc50.checkpoint`, its shards by the checkpoint's meta.json (no --shards).
    The session's smoke search (tests/fixtures/search_store.py: 3 trials) and its promotion."""
    from mlflow import MlflowClient

    search, result, mlflow_uri = smoke_search.result, smoke_search.promotion, smoke_search.uri
    assert search.counts["completed"] >= 1
    c = MlflowClient(mlflow_uri, mlflow_uri)
    # the search's best trial: 2 smoke epochs often leave trials at the same accuracy, and then
    # both take the one Tune made first (trainable/protocol.py best_first)
    assert (result.trial.trial_id, result.trial.run_id) == (search.best_trial_id, search.best_run_id)
    assert result.trial.cv_acc_mean == pytest.approx(search.best_cv_acc_mean)
    trial_run = c.get_run(result.trial.run_id)
    assert trial_run.data.tags["esc50.status"] == "completed"
    assert result.trial.trial_id == trial_run.data.tags["esc50.trial_id"]
    assert result.trial.checkpoint == trial_run.data.tags["esc50.checkpoint"]
    mv = c.get_model_version("esc50-cnn", result.version)
    assert mv.aliases == [CHAMPION] and mv.tags["esc50.shards"] == tiny_shards
    assert c.get_run(result.run_id).data.metrics["oof_clips"] == 16  # smoke: folds 1 and 2
    # BBC-CV of the search's completed trials on the version, the promotion run and in the output.
    # (With one trial it is that trial's out-of-fold accuracy up to bootstrap noise:
    # tests/test_bbc.py::test_one_trial_bbc_equals_its_accuracy.)
    assert result.bbc is not None and result.bbc.n_trials == search.counts["completed"]
    for key in ("bbc_cv_acc", "bbc_cv_acc_lo", "bbc_cv_acc_hi"):
        assert float(mv.tags[key]) == pytest.approx(result.bbc.metrics()[key], abs=1e-6)
        assert c.get_run(result.run_id).data.metrics[key] == pytest.approx(result.bbc.metrics()[key])
    assert float(mv.tags["bbc_cv_acc_lo"]) <= float(mv.tags["bbc_cv_acc"]) <= float(mv.tags["bbc_cv_acc_hi"])
    assert "BBC-CV 0." in result.summary() and "\n" not in result.summary()
    # what retraining it needs: config, features, folds, data, code, search and trial
    fingerprint = json.loads((Path(tiny_shards) / "_manifest.json").read_text())["fingerprint"]
    assert mv.tags["esc50.fingerprint"] == fingerprint and mv.tags["esc50.folds"] == "1,2"
    assert json.loads(mv.tags["esc50.features"])["n_mels"] > 0
    assert json.loads(mv.tags["esc50.config"])["epochs"] == 2 and mv.tags["esc50.search"] == smoke_search.name
    assert mv.tags["esc50.trial"] == result.trial.trial_id
    assert len(mv.tags["mlflow.source.git.commit"]) == 40 and mv.tags["esc50.torch_version"]
    promotion = c.get_run(result.run_id)
    assert promotion.data.tags["mlflow.source.git.commit"] == mv.tags["mlflow.source.git.commit"]
    assert promotion.inputs.dataset_inputs[0].dataset.name == "esc50-shards"
    # the same trial named by its Tune trial id, then by its run id (in a copy: the session's store
    # stays as the other tests read it)
    uri = copy_store(smoke_search, tmp_path / "store")
    assert promote(trial_id=search.best_trial_id, tracking=uri).trial.run_id == search.best_run_id
    assert main(["promote", "--run", result.trial.run_id, "--tracking-uri", uri]) == 0
    assert _aliases(uri) == {CHAMPION: "3", PREVIOUS: "2"}
    assert _aliases(mlflow_uri) == {CHAMPION: result.version}  # the original is untouched
