"""The packed fold layout (trainable/packed.py) against separate FoldTrainers, without Ray."""

from __future__ import annotations

import pytest
import torch

from trainable.config import TrainConfig
from trainable.fold import FoldTrainer
from trainable.model.checkpoint import state_from_bytes, state_to_bytes
from trainable.packed import PackedTrainer, pack

# Augmentation on (every draw is per fold: crop, roll, gain, masks, mixup), dropout 0: packed
# dropout masks are drawn under vmap and cannot equal the ones each fold draws alone.
CONFIG = TrainConfig(
    arch="cnn",
    width=4,
    depth=2,
    dropout=0.0,
    epochs=3,
    batch_size=8,
    optimizer="adamw",
    lr=1e-2,
    weight_decay=5e-2,
    schedule="onecycle",
    warmup_epochs=1.0,
    label_smoothing=0.1,
    mixup_alpha=0.4,
    freq_mask=3,
    time_mask=6,
    num_masks=2,
    time_shift=0.5,
    gain_db=6.0,
    crop_frames=24,
    device="cpu",
    # float32: the equivalence is exact up to float rounding; bf16 autocast (on an AMX CPU) rounds
    # a grouped convolution's sums differently from a plain one's.
    bf16=False,
)
N_MELS, FRAMES, N_CLASSES = 12, 32, 5


def _splits(sizes: dict[int, int]) -> dict[int, tuple[torch.Tensor, ...]]:
    """Per fold, (x_train, y_train, x_val, y_val): the fold's clips validate, the others train."""
    g = torch.Generator().manual_seed(7)
    x = {k: torch.randn(n, N_MELS, FRAMES, generator=g) * 10 - 40 for k, n in sizes.items()}
    y = {k: torch.randint(0, N_CLASSES, (n,), generator=g) for k, n in sizes.items()}
    out = {}
    for k in sizes:
        rest = [f for f in sizes if f != k]
        out[k] = (torch.cat([x[f] for f in rest]), torch.cat([y[f] for f in rest]), x[k], y[k])
    return out


def _trainers(config: TrainConfig, splits: dict) -> list[FoldTrainer]:
    return [FoldTrainer(config, *s, fold=k, n_classes=N_CLASSES) for k, s in splits.items()]


def _assert_states_close(a: dict, b: dict, atol: float = 2e-4) -> None:
    """Equal up to float rounding. The default tolerance is for Adam(W): its normalized first steps
    turn last-bit differences of a near-zero gradient (grouped vs plain convolution sums) into
    ~1e-5 weight differences after a few epochs; SGD stays within ~1e-7 (checked at 1e-5 below)."""
    assert a.keys() == b.keys()
    assert a["epoch"] == b["epoch"] and a["fold"] == b["fold"]
    for name, v in a["model"].items():
        torch.testing.assert_close(v, b["model"][name], atol=atol, rtol=1e-3, msg=f"model {name}")
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for idx, s in oa["state"].items():
        for key, v in s.items():
            torch.testing.assert_close(v, ob["state"][idx][key], atol=atol, rtol=1e-3, msg=f"opt {idx} {key}")
    assert a["scheduler"] == b["scheduler"]
    for key in ("generator", "cpu"):
        assert torch.equal(a["rng"][key], b["rng"][key]), f"rng {key}"
    assert [h["epoch"] for h in a["history"]] == [h["epoch"] for h in b["history"]]
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-4, abs=1e-5)
        assert ha["val_acc"] == pytest.approx(hb["val_acc"])


def test_packed_folds_train_to_the_weights_they_reach_alone() -> None:
    splits = _splits({1: 24, 2: 24, 3: 24})
    alone = _trainers(CONFIG, splits)
    for t in alone:
        for _ in range(2):
            t.train_epoch()
    (group,) = pack(_trainers(CONFIG, splits))
    assert group.folds == [1, 2, 3] and not group.solo
    metrics = [group.train_epoch() for _ in range(2)]
    assert [[m["fold"] for m in ms] for ms in metrics] == [[1, 2, 3], [1, 2, 3]]
    assert [ms[0]["epoch"] for ms in metrics] == [1, 2]
    for a, b in zip(alone, group.state_dicts(), strict=True):
        _assert_states_close(a.state_dict(), b)
    # Not trivially equal: training moved the weights away from the initial ones.
    fresh = FoldTrainer(CONFIG, *splits[1], fold=1, n_classes=N_CLASSES).state_dict()["model"]
    moved = group.state_dicts()[0]["model"]
    assert any(not torch.allclose(fresh[k], moved[k]) for k in fresh if fresh[k].is_floating_point())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_packed_update_equals_each_folds_own_for_other_optimizers(optimizer: str) -> None:
    cfg = CONFIG.replace(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3, epochs=2)
    splits = _splits({1: 16, 4: 16})
    alone = _trainers(cfg, splits)
    for t in alone:
        t.train_epoch()
    (group,) = pack(_trainers(cfg, splits))
    group.train_epoch()
    for a, b in zip(alone, group.state_dicts(), strict=True):
        _assert_states_close(a.state_dict(), b, atol=1e-5 if optimizer == "sgd" else 2e-4)


def test_packed_state_resumes_in_either_layout() -> None:
    splits = _splits({2: 24, 5: 24})
    reference = _trainers(CONFIG, splits)
    for t in reference:
        for _ in range(3):
            t.train_epoch()
    # packed epoch 1 -> bytes (a checkpoint's fold files) -> separate trainers, epochs 2 and 3
    (group,) = pack(_trainers(CONFIG, splits))
    group.train_epoch()
    blobs = {s["fold"]: state_to_bytes(s) for s in group.state_dicts()}
    alone = _trainers(CONFIG, splits)
    for t in alone:
        t.load_state_dict(state_from_bytes(blobs[t.fold]))
        assert t.exact_resume
        t.train_epoch()
    # separate epoch 2 -> a new packed group, epoch 3
    (resumed,) = pack(_trainers(CONFIG, splits))
    for t in alone:
        resumed.load_state_dict(t.fold, state_from_bytes(state_to_bytes(t.state_dict())))
    assert resumed.epoch == 2
    resumed.train_epoch()
    assert resumed.done
    for a, b in zip(reference, resumed.state_dicts(), strict=True):
        _assert_states_close(a.state_dict(), b)
    with pytest.raises(RuntimeError, match="already trained"):
        resumed.train_epoch()
    with pytest.raises(ValueError, match="not among the packed folds"):
        resumed.load_state_dict(1, reference[0].state_dict())


def test_folds_of_different_train_sizes_pack_in_groups() -> None:
    # Fold 3 is larger, so folds 1 and 2 train on more clips (more steps) than fold 3.
    splits = _splits({1: 16, 2: 16, 3: 32})
    trainers = _trainers(CONFIG.replace(epochs=1, warmup_epochs=0.5), splits)
    groups = pack(trainers)
    assert [g.folds for g in groups] == [[1, 2], [3]] and groups[1].solo
    with pytest.raises(ValueError, match="steps per epoch"):
        PackedTrainer(trainers)
    alone = _trainers(CONFIG.replace(epochs=1, warmup_epochs=0.5), splits)
    for g in groups:
        g.train_epoch()
    for t in alone:
        t.train_epoch()
    states = [s for g in groups for s in g.state_dicts()]
    for a, b in zip(alone, states, strict=True):
        _assert_states_close(a.state_dict(), b)


def test_packed_training_with_dropout_is_deterministic() -> None:
    cfg = CONFIG.replace(dropout=0.3, epochs=2)
    splits = _splits({1: 16, 2: 16})
    runs = []
    for _ in range(2):
        (group,) = pack(_trainers(cfg, splits))
        group.train_epoch()
        runs.append(group.state_dicts())
    for a, b in zip(*runs, strict=True):
        _assert_states_close(a, b, atol=0)
