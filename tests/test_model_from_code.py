"""The shipped model holds no pickled code: it is an MLflow model from code (trainable/model/pyfunc_entry.py
plus the shipped `trainable/` sources) whose weights are state dicts that load with
`torch.load(weights_only=True)`. A version registered before that (a cloudpickled `EnsembleModel`)
keeps its place in the aliases and rollback, but `esc50 predict` refuses to load it unless told to."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from search.cli import main
from search.errors import UserError
from search.release.champion import CHAMPION, PREVIOUS, register_champion, rollback
from search.release.predict import pickled_code, predict
from search.release.promote import promote
from tests.fixtures.promoted import log_search
from tests.test_promote import _aliases, _trial

TENSORS_AND_PLAIN_DATA = (dict, list, tuple, str, int, float, bool, type(None), torch.Tensor)


def _plain(obj) -> bool:
    if isinstance(obj, dict):
        return all(_plain(k) and _plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    return isinstance(obj, TENSORS_AND_PLAIN_DATA)


def test_the_shipped_model_holds_no_pickled_python_object(promoted, tmp_path: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(promoted.uri)
    model_dir = Path(
        mlflow.artifacts.download_artifacts("models:/esc50-cnn@champion", dst_path=str(tmp_path))
    )
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    assert "python_model" not in flavor and flavor["model_code_path"].endswith("pyfunc_entry.py")
    assert pickled_code(f"models:/esc50-cnn/{promoted.version}") is None

    # __pycache__: Python's bytecode cache, written when a test loads the model in place from this
    # local store; it is not part of what promote logged (promote itself writes none).
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert not [p for p in files if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
    weights = [p for p in files if p.suffix == ".pt"]
    assert len(weights) == 2  # folds 1 and 2
    for p in files:
        if p in weights:
            # torch's zip format; its data.pkl may only name tensors and plain containers
            assert zipfile.is_zipfile(p)
            state = torch.load(p, map_location="cpu", weights_only=True)
            assert _plain(state) and set(state) == {"config", "fold", "epoch", "n_mels", "n_classes", "model"}
        else:
            # everything else is text (MLmodel, YAML, JSON, requirements, Python sources): a pickle
            # (protocol 2+ starts with 0x80) is not valid UTF-8
            p.read_bytes().decode("utf-8")
    sources = {p.relative_to(model_dir).as_posix() for p in files if p.suffix == ".py"}
    assert "pyfunc_entry.py" in sources and "code/trainable/model/ensemble.py" in sources


def _log_pickled_version(checkpoint: Path, work: Path) -> str:
    """A version as promotions before this change logged it: a cloudpickled EnsembleModel instance."""
    import mlflow

    from search.release.promote import model_code
    from trainable.model.ensemble import CHECKPOINT_ARTIFACT, EnsembleModel

    code = model_code(work / "code")
    exp = mlflow.create_experiment("old", artifact_location=str(work / "artifacts"))
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=EnsembleModel(),
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
            code_paths=[str(code)],
        )
    return info.model_uri


def test_an_older_pickled_version_keeps_its_aliases_but_is_not_loaded_unless_allowed(
    trained_checkpoint, new_clips, mlflow_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from search.store import client

    c = client(mlflow_uri)
    old_uri = _log_pickled_version(trained_checkpoint.path, tmp_path / "old")
    assert register_champion(c, "esc50-cnn", old_uri, {}, "pickled") == ("1", None)
    assert "pickled Python object" in (pickled_code("models:/esc50-cnn/1") or "")

    log_search(mlflow_uri, "new", [_trial(trained_checkpoint.path, 0.9)], trained_checkpoint.shards, tmp_path)
    assert promote(search="new", tracking=mlflow_uri).previous == "1"  # aliases move across the change
    assert _aliases(mlflow_uri) == {CHAMPION: "2", PREVIOUS: "1"}
    clip, category = new_clips[0]
    assert predict([clip], tracking=mlflow_uri)[0]["label"] == category  # the champion: from code

    with pytest.raises(UserError, match=r"refusing to load models:/esc50-cnn/1: it holds a pickled"):
        predict([clip], "models:/esc50-cnn/1", tracking=mlflow_uri)
    assert rollback(mlflow_uri) == ("1", None)  # rollback still works; the CLI then refuses to load it
    assert main(["predict", str(clip), "--tracking-uri", mlflow_uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "refusing to load models:/esc50-cnn@champion" in err and "--allow-pickled" in err
    assert main(["predict", str(clip), "--tracking-uri", mlflow_uri, "--allow-pickled", "--json"]) == 0
    assert category in capsys.readouterr().out


def test_a_version_whose_code_names_the_old_module_path_still_predicts(
    trained_checkpoint, new_clips, mlflow_uri: str, tmp_path: Path
) -> None:
    """Versions promoted before the model's code moved to trainable/model/ load `EnsembleModel`
    from `trainable.ensemble`; in `esc50 predict` this project's `trainable` is imported first, so
    that name must still lead to the ensemble (trainable/ensemble.py)."""
    import mlflow

    from search.release.promote import model_code
    from search.store import client
    from trainable.model.checkpoint import read_checkpoint
    from trainable.model.ensemble import CHECKPOINT_ARTIFACT, write_slim_checkpoint

    entry = tmp_path / "pyfunc_entry.py"
    entry.write_text(
        "import mlflow.models\n\nfrom trainable.ensemble import EnsembleModel\n\n"
        "mlflow.models.set_model(EnsembleModel())\n"
    )
    meta, states = read_checkpoint(trained_checkpoint.path)
    write_slim_checkpoint(tmp_path / "slim", meta, states)
    c = client(mlflow_uri)
    with mlflow.start_run(experiment_id=mlflow.create_experiment("old-code")):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(entry),
            artifacts={CHECKPOINT_ARTIFACT: str(tmp_path / "slim")},
            code_paths=[str(model_code(tmp_path / "code"))],
        )
    register_champion(c, "esc50-cnn", info.model_uri, {}, "old module path")
    clip, category = new_clips[0]
    assert predict([clip], tracking=mlflow_uri)[0]["label"] == category
