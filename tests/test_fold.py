"""FoldTrainer: learns a separable toy task, resumes exactly, state survives weights_only loading.

The toy data is built here (class k = extra energy in mel band k), so these tests need nothing
from the data step.
"""

import io

import pytest
import torch

from trainable.config import TrainConfig
from trainable.fold import FoldTrainer, lr_factor, train_fold
from trainable.model.networks import build_model

N_MELS, FRAMES, CLASSES = 16, 24, 4


def toy(n: int, seed: int, channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel-like clips: noise around -40 dB, class k is +15 dB louder in mel bins 4k..4k+3."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    x = torch.randn(n, N_MELS, FRAMES, generator=g) * 4 - 40
    for k in range(CLASSES):
        x[y == k, 4 * k : 4 * k + 4] += 15
    x = x.half()  # shards store float16; the trainer must take it as it comes
    return (x.unsqueeze(1) if channel else x), y


def trainer(config: TrainConfig, fold: int = 1, channel: bool = False) -> FoldTrainer:
    xt, yt = toy(96, 0, channel)
    xv, yv = toy(40, 1, channel)
    return FoldTrainer(config, xt, yt, xv, yv, fold=fold, n_classes=CLASSES)


AUGMENTED = TrainConfig.preset(
    "smoke",
    epochs=3,
    dropout=0.2,
    mixup_alpha=0.4,
    freq_mask=2,  # of 16 mel bins; class bands are 4 bins wide
    time_mask=4,
    num_masks=2,
    time_shift=0.3,
    gain_db=3.0,
    crop_frames=16,
    eval_crops=2,
    schedule="onecycle",
    warmup_epochs=1.0,
    label_smoothing=0.1,
)


def strip_time(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "epoch_seconds"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core box OpenMP threads that spin
    against other processes make these tests 30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_learns_a_separable_toy_task():
    cfg = TrainConfig.preset("smoke", epochs=6, lr=1e-2)
    t = trainer(cfg, channel=True)  # (N, 1, M, T) as the shards give it
    history = list(t)
    assert [m["epoch"] for m in history] == list(range(1, 7))
    assert set(history[-1]) >= {"epoch", "train_loss", "val_loss", "val_acc", "epoch_seconds", "fold"}
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_acc"] >= 0.9
    assert t.done
    with pytest.raises(RuntimeError, match="already trained"):
        t.train_epoch()


def test_learns_with_every_augmentation():
    accs = [m["val_acc"] for m in trainer(AUGMENTED.replace(epochs=8, batch_size=8))]
    assert accs[-1] >= 0.9  # chance is 0.25


@pytest.mark.parametrize(
    "changes",
    [
        dict(optimizer="sgd", lr=5e-2, schedule="cosine", warmup_epochs=1.0),
        dict(loss="bce", optimizer="adam", lr=2e-2, schedule="constant", warmup_epochs=0.0),
    ],
)
def test_learns_with_sgd_nesterov_and_with_bce(changes):
    history = list(trainer(TrainConfig.preset("smoke", epochs=8, **changes)))
    assert history[-1]["val_acc"] >= 0.75


def test_resume_gives_the_same_next_epochs(deterministic):
    full = [strip_time(m) for m in trainer(AUGMENTED)]

    first = trainer(AUGMENTED)
    first.train_epoch()
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    del first
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)

    resumed = trainer(AUGMENTED)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    rest = [strip_time(m) for m in resumed]
    assert rest == full[1:]


def test_train_fold_generator_and_resume_from_state(deterministic):
    xt, yt = toy(96, 0)
    xv, yv = toy(40, 1)
    full = [strip_time(m) for m in train_fold(AUGMENTED, xt, yt, xv, yv, fold=2)]
    t = FoldTrainer(AUGMENTED, xt, yt, xv, yv, fold=2)
    t.train_epoch()
    t.train_epoch()
    rest = [
        strip_time(m) for m in train_fold(AUGMENTED.to_dict(), xt, yt, xv, yv, fold=2, state=t.state_dict())
    ]
    assert rest == full[2:]


def test_folds_are_seeded_differently_and_reproducibly():
    a = trainer(AUGMENTED.replace(epochs=1, warmup_epochs=0.5), fold=1).train_epoch()
    b = trainer(AUGMENTED.replace(epochs=1, warmup_epochs=0.5), fold=1).train_epoch()
    c = trainer(AUGMENTED.replace(epochs=1, warmup_epochs=0.5), fold=2).train_epoch()
    assert strip_time(a) == strip_time(b)
    assert a["train_loss"] != c["train_loss"]


def test_global_rng_is_left_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    t = trainer(AUGMENTED.replace(epochs=1, warmup_epochs=0.5))
    t.train_epoch()
    assert torch.equal(torch.rand(3), expected)


def test_state_rebuilds_the_model_for_prediction():
    t = trainer(TrainConfig.preset("smoke", epochs=1))
    t.train_epoch()
    buf = io.BytesIO()
    torch.save(t.state_dict(), buf)
    sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    model = build_model(TrainConfig.from_dict(sd["config"]), sd["n_mels"], sd["n_classes"])
    model.load_state_dict(sd["model"])
    model.eval()
    x, _ = toy(8, 3)
    with torch.no_grad():
        assert torch.allclose(model(x.float()), t.predict_logits(x), atol=1e-5)


def test_state_from_another_config_or_fold_is_refused():
    t = trainer(TrainConfig.preset("smoke", epochs=1))
    sd = t.state_dict()
    with pytest.raises(ValueError, match="different config"):
        trainer(TrainConfig.preset("smoke", epochs=1, lr=0.5)).load_state_dict(sd)
    with pytest.raises(ValueError, match="fold"):
        trainer(TrainConfig.preset("smoke", epochs=1), fold=3).load_state_dict(sd)


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_schedules(schedule):
    cfg = TrainConfig(schedule=schedule, epochs=10, warmup_epochs=2)
    f = [lr_factor(cfg, s, 100, 10) for s in range(100)]
    assert max(f) <= 1.0 + 1e-9 and min(f) > 0
    assert f[0] < f[19]  # warming up
    if schedule != "constant":
        assert f[-1] < 0.01  # annealed


def test_cuda_without_gpu_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no CUDA"):
        trainer(TrainConfig.preset("smoke", device="cuda"))


def test_state_saved_on_another_device_type_still_resumes():
    """A CUDA generator's state does not fit a CPU generator: training resumes, not bit-exact."""
    t = trainer(AUGMENTED)
    t.train_epoch()
    sd = t.state_dict()
    sd["rng"]["generator"] = torch.zeros(16, dtype=torch.uint8)  # what a CUDA generator saves
    resumed = trainer(AUGMENTED)
    resumed.load_state_dict(sd)
    assert not resumed.exact_resume and resumed.epoch == 1
    assert resumed.train_epoch()["epoch"] == 2


def test_validation_probabilities_are_the_eval_path_of_the_accuracy():
    """The out-of-fold predictions (BBC-CV) must be what val_acc counted: same model, same crops."""
    t = trainer(AUGMENTED.replace(epochs=2, batch_size=8))  # multi-crop evaluation
    last = list(t)[-1]
    probs = t.predict_val_probs()
    assert probs.shape == (40, CLASSES) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(1), torch.ones(40), atol=1e-5)
    acc = (probs.argmax(1) == t.y_val.cpu()).float().mean().item()
    assert acc == pytest.approx(last["val_acc"], abs=1e-6)


def test_bf16_trains_in_bf16_where_fast_and_evaluates_in_float32():
    """On an AMX CPU the training convolutions run in bf16 (the measured 2-3x), evaluation stays
    float32 (what the shipped model computes); elsewhere, and with bf16 off, all is float32."""
    amx = bool(getattr(torch.cpu, "get_capabilities", dict)().get("amx_bf16"))
    cfg = TrainConfig.preset("smoke", epochs=6, lr=1e-2)
    for bf16 in (True, False):
        t = trainer(cfg.replace(bf16=bf16))
        seen: list[torch.dtype] = []
        conv = next(m for m in t.model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda mod, inp, out, seen=seen: seen.append(out.dtype))
        t.step(*t.batch(torch.arange(8)))
        assert seen == [torch.bfloat16 if (bf16 and amx) else torch.float32]
        seen.clear()
        t.predict_logits(toy(8, 2)[0])
        assert set(seen) == {torch.float32}
        metrics = list(t)
        assert metrics[-1]["val_acc"] >= 0.9  # it still learns the toy task
