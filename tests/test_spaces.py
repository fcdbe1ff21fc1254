"""Search spaces: the named ones resolve to valid training configs, user files load (or fail clearly),
the options' overrides apply, and `esc50 spaces` lists parameters and ranges. No Ray here."""

from __future__ import annotations

import pickle
import textwrap
from pathlib import Path

import pytest

from search.cli import main
from search.errors import UserError
from spaces import load_space, names
from spaces.registry import Space
from trainable.config import TrainConfig


@pytest.mark.parametrize("name", ["seed", "default", "cpu", "augment", "regularize", "compact", "full"])
def test_named_space_gives_valid_configs(name: str) -> None:
    space = load_space(name)
    samples = space.validate(n=24, seed=1)
    for s in samples:
        TrainConfig.from_dict(s.config)  # the trainable will accept it


def test_named_spaces_search_what_they_say() -> None:
    assert set(names()) >= {"seed", "default", "augment", "regularize"}
    seed = load_space("seed").describe(n=5)
    assert seed.params == {}  # one fixed point: the notebook's recipe
    for preset in ("seed", "compact", "full"):  # the presets as searchable fixed points
        assert load_space(preset).describe(n=3).params == {}
        assert TrainConfig.from_dict(load_space(preset).sample(1)[0].config) == TrainConfig.preset(preset)

    default = load_space("default").describe()
    for key in (
        "arch",
        "lr",
        "weight_decay",
        "dropout",
        "mixup_alpha",
        "freq_mask",
        "time_shift",
        "optimizer",
    ):
        assert key in default.params, key
    assert len(default.params["lr"].distributions) == 2  # conditional on the optimizer: two ranges

    augment = set(load_space("augment").describe().params)
    regularize = set(load_space("regularize").describe().params)
    assert augment >= {"mixup_alpha", "freq_mask", "time_mask", "time_shift", "gain_db"}
    assert not augment & {"lr", "dropout", "weight_decay", "arch"}
    assert regularize == {"dropout", "weight_decay", "label_smoothing"}
    assert load_space("augment").describe().params["eval_crops"].conditional


def test_overrides_win_and_rescale_warmup() -> None:
    space = load_space("default", {"epochs": 6, "width": 4})
    for s in space.sample(20, seed=3):
        assert s.config["epochs"] == 6 and s.config["width"] == 4
        # warmup sampled in the space's 60 epochs is kept as the same fraction of 6
        assert s.config["warmup_epochs"] == pytest.approx(s.params["warmup_epochs"] * 6 / 60)
        TrainConfig.from_dict(s.config)


def _write(tmp_path: Path, text: str, name: str = "my_space.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_user_space_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        import optuna

        def space(trial: optuna.Trial) -> dict:
            arch = trial.suggest_categorical("arch", ["cnn", "resnet"])
            if arch == "cnn":
                trial.suggest_int("depth", 2, 4)
            trial.suggest_float("lr", 1e-4, 1e-2, log=True)
            return {"epochs": 3, "schedule": "cosine", "warmup_epochs": 1.0}

        def wide(trial):
            trial.suggest_categorical("width", [32, 64])
            return {"epochs": 3, "warmup_epochs": 1.0}
        """,
    )
    space = load_space(str(path))
    assert space.function == "space" and not space.builtin
    info = space.describe()
    assert set(info.params) == {"arch", "depth", "lr"} and info.params["depth"].conditional
    assert info.constants["epochs"] == (3,)
    assert set(load_space(f"{path}:wide").describe().params) == {"width"}

    # Frozen when loaded: a pickled space (Tune keeps it for resume) works after the file is gone.
    samples = space.validate()
    path.unlink()
    again = pickle.loads(pickle.dumps(space))
    assert again == space
    assert again.sample(3) and samples


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "def space(trial):\n    trial.suggest_float('lr_rate', 1e-4, 1e-2)\n",
            "unknown training config key(s) ['lr_rate']",
        ),
        ("def space(trial):\n    return {'epoch': 3}\n", "unknown training config key(s) ['epoch']"),
        (
            "def space(trial):\n    trial.suggest_float('lr', 1e-4, 1e-2)\n    return {'lr': 0.1}\n",
            "both sampled and returned",
        ),
        ("def space(trial):\n    return {'dropout': 1.5}\n", "dropout=1.5 must be in [0, 1.0)"),
        ("def space(trial):\n    return [1]\n", "expected a dict or None"),
        ("def space(trial)\n    return {}\n", "line 1"),
        ("def other(trial):\n    return {}\ndef more(trial):\n    return {}\n", "no function 'space'"),
    ],
)
def test_bad_user_space_is_a_clear_error(tmp_path: Path, body: str, message: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(UserError) as e:
        load_space(str(path)).validate()
    assert message in str(e.value)
    assert str(path) in str(e.value) or "--space" in str(e.value)


def test_bad_space_names() -> None:
    with pytest.raises(UserError, match=r"--space 'nope': no such space; named spaces: seed, default"):
        load_space("nope")
    with pytest.raises(UserError, match="cannot read"):
        load_space("missing/dir/space.py")


def test_one_function_file_needs_no_name(tmp_path: Path) -> None:
    path = _write(tmp_path, "def mine(trial):\n    trial.suggest_float('dropout', 0.0, 0.5)\n")
    assert load_space(str(path)).function == "mine"
    assert isinstance(load_space(str(path)), Space)


def test_cli_lists_spaces(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["spaces"]) == 0
    out = capsys.readouterr().out
    for name in ("seed", "default", "augment", "regularize"):
        assert f"\n{name}:" in "\n" + out
    assert "lr " in out and "float [0.0003, 0.01] log | float [0.01, 0.2] log" in out
    path = _write(tmp_path, "def space(trial):\n    trial.suggest_int('width', 8, 32, step=8)\n")
    assert main(["spaces", str(path)]) == 0
    assert "int [8, 32] step 8" in capsys.readouterr().out

    assert main(["spaces", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("esc50 spaces: error: --space 'nope': no such space") and "\n" not in err
