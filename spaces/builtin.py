"""The named search spaces: Optuna define-by-run functions over TrainConfig keys.

A space is `def space(trial: optuna.Trial) -> dict | None`: every `trial.suggest_*` name is a
TrainConfig key (trainable/config.py), parameters may be conditional (suggested only on some
branches), and the returned dict holds the constant keys of the recipe. A key is either sampled
or returned, never both.

`warmup_epochs` is in epochs of the space's own `epochs`; `esc50 search --epochs N` rescales it
(spaces/registry.py), so the shape of the schedule is kept.

Ranges follow what strong from-scratch ESC-50 recipes use: AdamW at 1e-3..3e-3 (or SGD with
Nesterov momentum at 0.01..0.1) with one-cycle or warmup+cosine schedules, weight decay 1e-4..1e-1,
mixup alpha up to ~1, SpecAugment masks of a few mel bins / tens of frames, random roll and gain,
label smoothing up to 0.2, dropout up to 0.5, batch 32..128, CNNs of 3..5 stages, 16..64 base width.
"""

from __future__ import annotations

from typing import Any

from trainable.config import PRESETS

# Keys of the recipe the `augment` and `regularize` spaces start from (the compact CPU preset).
_AUGMENT_KEYS = (
    "mixup_alpha",
    "freq_mask",
    "time_mask",
    "num_masks",
    "time_shift",
    "gain_db",
    "crop_frames",
    "eval_crops",
)
_REGULARIZE_KEYS = ("dropout", "weight_decay", "label_smoothing")


def seed(trial: Any) -> dict[str, Any]:
    """The notebook's recipe, one fixed point (a baseline): its ResNet, Adam 1e-3, batch 128, BCE."""
    return dict(PRESETS["seed"])


def compact(trial: Any) -> dict[str, Any]:
    """The compact preset, one fixed point: 75.8% over the 5 folds, 30 epochs on a 2-core CPU (README)."""
    return dict(PRESETS["compact"])


def full(trial: Any) -> dict[str, Any]:
    """The full preset, one fixed point (reported 90.6% on a GPU, no kept result file: README). Use --trials 1."""
    return dict(PRESETS["full"])


def default(trial: Any) -> dict[str, Any]:
    """Architecture, optimization, regularization and augmentation together."""
    trial.suggest_categorical("arch", ["cnn", "resnet"])
    trial.suggest_categorical("width", [16, 32, 48, 64])
    trial.suggest_int("depth", 3, 5)
    trial.suggest_categorical("batch_size", [32, 64, 128])
    optimizer = trial.suggest_categorical("optimizer", ["adamw", "sgd"])
    if optimizer == "adamw":
        trial.suggest_float("lr", 3e-4, 1e-2, log=True)
        trial.suggest_float("weight_decay", 1e-4, 1e-1, log=True)
    else:  # SGD with Nesterov momentum
        trial.suggest_float("lr", 1e-2, 2e-1, log=True)
        trial.suggest_float("weight_decay", 1e-5, 1e-3, log=True)
    trial.suggest_categorical("schedule", ["onecycle", "cosine"])
    trial.suggest_float("warmup_epochs", 1.0, 12.0)  # of 60
    trial.suggest_float("dropout", 0.0, 0.5)
    trial.suggest_float("label_smoothing", 0.0, 0.2)
    trial.suggest_float("mixup_alpha", 0.0, 1.0)
    trial.suggest_int("freq_mask", 0, 16, step=4)
    trial.suggest_int("time_mask", 0, 48, step=8)
    trial.suggest_int("num_masks", 1, 2)
    trial.suggest_float("time_shift", 0.0, 0.5)
    trial.suggest_float("gain_db", 0.0, 8.0)
    trial.suggest_categorical("crop_frames", [0, 128, 160])
    return {"epochs": 60, "momentum": 0.9, "loss": "ce", "eval_crops": 0}


def augment(trial: Any) -> dict[str, Any]:
    """Augmentation only, on the compact recipe (model and optimizer fixed)."""
    trial.suggest_float("mixup_alpha", 0.0, 1.0)
    trial.suggest_int("freq_mask", 0, 16, step=2)
    trial.suggest_int("time_mask", 0, 64, step=8)
    trial.suggest_int("num_masks", 1, 3)
    trial.suggest_float("time_shift", 0.0, 0.5)
    trial.suggest_float("gain_db", 0.0, 10.0)
    crop = trial.suggest_categorical("crop_frames", [0, 128, 160, 192])
    if crop:  # multi-crop evaluation only makes sense with cropped training
        trial.suggest_categorical("eval_crops", [0, 3])
    # without a crop, eval_crops keeps TrainConfig's default (0: evaluate the full clip)
    return {k: v for k, v in PRESETS["compact"].items() if k not in _AUGMENT_KEYS}


def regularize(trial: Any) -> dict[str, Any]:
    """Regularization only, on the compact recipe (augmentation, model and optimizer fixed)."""
    trial.suggest_float("dropout", 0.0, 0.6)
    trial.suggest_float("weight_decay", 1e-4, 2e-1, log=True)
    trial.suggest_float("label_smoothing", 0.0, 0.2)
    return {k: v for k, v in PRESETS["compact"].items() if k not in _REGULARIZE_KEYS}


# The `cpu` space's recipe: the compact preset for 15 epochs. With bf16 autocast on an AMX CPU
# (trainable/fold.py) its 5 folds train in about 8 minutes on 2 cores; see the README's main job.
CPU_RECIPE = {**PRESETS["compact"], "epochs": 15, "warmup_epochs": 4.0}


def cpu(trial: Any) -> dict[str, Any]:
    """What a 2-core CPU affords (`make run`): the compact recipe, searched only around its edges."""
    trial.suggest_float("lr", 2e-3, 4e-3, log=True)
    trial.suggest_float("weight_decay", 5e-3, 3e-2, log=True)
    trial.suggest_float("dropout", 0.2, 0.4)
    trial.suggest_float("mixup_alpha", 0.2, 0.4)
    trial.suggest_categorical("time_mask", [16, 24, 32])
    sampled = ("lr", "weight_decay", "dropout", "mixup_alpha", "time_mask")
    return {k: v for k, v in CPU_RECIPE.items() if k not in sampled}


SPACES = {
    "seed": seed,
    "default": default,
    "cpu": cpu,
    "augment": augment,
    "regularize": regularize,
    "compact": compact,
    "full": full,
}
