"""Batch augmentation on the device: shapes, effects, determinism from the generator."""

import torch

from trainable.config import TrainConfig
from trainable.model import augment as A


def _batch(b=6, m=16, t=40):
    return torch.randn(b, m, t, generator=torch.Generator().manual_seed(1)) * 10 - 30


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_gain_is_an_offset_within_bounds():
    x = _batch()
    y = A.random_gain(x, 6.0, gen())
    d = y - x
    per_clip = d[:, 0, 0]
    assert torch.allclose(d, per_clip.view(-1, 1, 1).expand_as(d), atol=1e-5)
    assert per_clip.abs().max() <= 6.0 and per_clip.abs().min() > 0
    assert torch.equal(A.random_gain(x, 0.0, gen()), x)


def test_roll_is_a_per_clip_circular_shift():
    x = _batch()
    rows = torch.arange(len(x))
    y = A.take(x, rows, 0, 0.5, gen(), A.wrap(x))
    assert y.shape == x.shape
    for i in range(len(x)):
        assert any(torch.equal(y[i], torch.roll(x[i], s, dims=-1)) for s in range(-20, 21))
    assert torch.equal(A.take(x, rows, 0, 0.0, gen()), x)


def test_crop_takes_contiguous_windows():
    x = _batch()
    rows = torch.arange(len(x))
    y = A.take(x, rows, 25, 0.0, gen())
    assert y.shape == (6, 16, 25)
    for i in range(len(x)):
        assert any(torch.equal(y[i], x[i, :, s : s + 25]) for s in range(16))
    assert torch.equal(A.take(x, rows, 0, 0.0, gen()), x) and torch.equal(A.take(x, rows, 100, 0.0, gen()), x)


def test_eval_crops_cover_the_clip():
    x = _batch()
    crops = A.eval_crops(x, 25, 3)
    assert [c.shape[-1] for c in crops] == [25, 25, 25]
    assert torch.equal(crops[0], x[..., :25]) and torch.equal(crops[-1], x[..., -25:])
    assert A.eval_crops(x, 0, 3)[0] is x


def test_spec_masks_mask_with_the_clip_mean():
    torch.manual_seed(0)
    x = _batch()
    y = A.spec_masks(x, freq_mask=6, time_mask=10, num_masks=2)
    assert y.shape == x.shape
    changed = y != x
    assert changed.any()
    mean = x.mean(dim=(1, 2), keepdim=True).expand_as(x)
    assert torch.allclose(y[changed], mean[changed], atol=1e-4)
    assert torch.equal(A.spec_masks(x, 0, 0, 2), x)


def test_mixup_mixes_inputs_and_targets_with_the_same_weight():
    torch.manual_seed(0)
    x = _batch()
    t = torch.nn.functional.one_hot(torch.arange(6), 50).float()
    y, tt = A.mixup(x, t, 0.4)
    assert y.shape == x.shape and tt.shape == t.shape
    assert torch.allclose(tt.sum(1), torch.ones(6))
    assert (tt.max(1).values >= 0.5 - 1e-6).all()  # each clip stays the main one
    own = tt[torch.arange(6), torch.arange(6)]
    assert torch.allclose(own, tt.max(1).values)
    partner = tt[torch.arange(6), torch.arange(-1, 5) % 6]  # clip i is mixed with clip i-1
    assert torch.allclose(own + partner, torch.ones(6))
    lam = own.view(-1, 1, 1)
    assert torch.allclose(y, lam * x + (1 - lam) * x.roll(1, dims=0), atol=1e-5)


def test_training_batch_is_reproducible_from_the_seeds():
    cfg = TrainConfig(
        mixup_alpha=0.3, freq_mask=4, time_mask=8, num_masks=2, time_shift=0.3, gain_db=3.0, crop_frames=30
    )
    x_all = _batch(20).half()  # resident features as the shards store them
    y_all = torch.arange(20) % 5
    rows = torch.tensor([3, 1, 4, 15, 9, 2])

    def draw():
        torch.manual_seed(5)
        return A.training_batch(x_all, y_all, rows, cfg, 50, gen(3))

    a, b = draw(), draw()
    assert a[0].shape == (6, 16, 30) and a[0].dtype == torch.float32
    assert a[1].shape == (6, 50)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_take_rolls_then_crops_in_one_gather():
    x_all = _batch(10)
    rows = torch.tensor([7, 2, 5])
    y = A.take(x_all, rows, crop_frames=12, time_shift=0.4, gen=gen(1))
    assert y.shape == (3, 16, 12)
    for i, r in enumerate(rows.tolist()):
        assert any(
            torch.equal(y[i], torch.roll(x_all[r], s, dims=-1)[:, c : c + 12])
            for s in range(-16, 17)
            for c in range(29)
        )
    assert torch.equal(A.take(x_all, rows), x_all[rows])
    # the unfolded window of the wrapped copy equals the gather fallback, draw for draw
    for crop, shift in ((12, 0.4), (0, 0.4), (12, 0.0)):
        fast = A.take(x_all, rows, crop, shift, gen(2), A.wrap(x_all))
        slow = A.take(x_all, rows, crop, shift, gen(2))
        assert torch.equal(fast, slow)
