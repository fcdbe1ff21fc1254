"""TrainConfig: validation names every problem, conversions round-trip, presets are valid."""

import json

import pytest

from trainable.config import PRESETS, TrainConfig


def test_defaults_and_presets_are_valid():
    TrainConfig()
    for name in PRESETS:
        cfg = TrainConfig.preset(name)
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg
        assert TrainConfig.from_json(cfg.to_json()) == cfg


def test_seed_preset_is_the_notebook_recipe():
    cfg = TrainConfig.preset("seed")
    assert (cfg.arch, cfg.optimizer, cfg.lr, cfg.batch_size, cfg.loss) == (
        "seed_resnet",
        "adam",
        1e-3,
        128,
        "bce",
    )
    assert cfg.mixup_alpha == cfg.freq_mask == cfg.time_mask == cfg.time_shift == cfg.gain_db == 0
    assert cfg.crop_frames == 0


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_all_problems_are_named_at_once():
    with pytest.raises(ValueError) as e:
        TrainConfig(arch="vgg", optimizer="rmsprop", lr=-1.0, dropout=1.5, batch_size=0, schedule="step")
    msg = str(e.value)
    for word in ("arch", "optimizer", "lr", "dropout", "batch_size", "schedule"):
        assert word in msg


@pytest.mark.parametrize(
    "bad",
    [
        {"loss": "mse"},
        {"device": "tpu"},
        {"epochs": 2.5},
        {"width": "16"},
        {"label_smoothing": 1.0},
        {"time_shift": -0.1},
        {"bf16": "yes"},
        {"schedule": "onecycle", "epochs": 5, "warmup_epochs": 5},
        {"eval_crops": 3, "crop_frames": 0},
        {"arch": "cnn", "depth": 9},
    ],
)
def test_invalid_values(bad):
    with pytest.raises(ValueError, match="invalid training config"):
        TrainConfig.from_dict(bad)


def test_integral_floats_from_json_or_optuna_are_accepted():
    cfg = TrainConfig.from_dict({"width": 32.0, "epochs": 10.0, "batch_size": 64.0})
    assert isinstance(cfg.width, int) and cfg.width == 32
    assert json.loads(cfg.to_json())["epochs"] == 10


def test_preset_overrides_and_replace():
    cfg = TrainConfig.preset("compact", epochs=3, warmup_epochs=1)
    assert cfg.epochs == 3 and cfg.arch == PRESETS["compact"]["arch"]
    assert cfg.replace(lr=0.1).lr == 0.1
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig.preset("nope")
