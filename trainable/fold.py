"""Train one fold: plain torch, the whole training set on the device, resumable.

    trainer = FoldTrainer(config, x_train, y_train, x_val, y_val, fold=3)
    for metrics in trainer:                      # one dict per epoch
        print(metrics["epoch"], metrics["val_acc"])
        torch.save(trainer.state_dict(), path)   # everything needed to resume
    ...
    trainer = FoldTrainer(config, x_train, y_train, x_val, y_val, fold=3)
    trainer.load_state_dict(torch.load(path, weights_only=True))  # continues where it stopped

`train_fold(...)` is the same as a generator function. No Ray in here: the CV trainable drives
one FoldTrainer per fold worker, and the benchmarks call it directly.

How an epoch runs (read `train_epoch` top to bottom):
  1. a permutation of the training set from the fold's own seeded generator (on the device);
  2. for each batch: index the device-resident tensors, augment the whole batch on the device,
     forward + loss + backward + optimizer step + LR step (per step);
  3. evaluate on the validation clips (full clip or multi-crop);
  4. return the metrics; losses are kept on the device, so a GPU syncs once per epoch.

Determinism: fold f seeds its generator and its private copy of torch's global RNG (dropout, the
SpecAugment masks, the mixup Beta draw) with `config.seed + f`. The global RNG is swapped in
only while this trainer runs, so several trainers in one process do not disturb each other.
`state_dict()` holds model, optimizer, scheduler, epoch, history and all RNG states as plain
tensors and containers, so it survives torch.save/torch.load(weights_only=True).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from trainable.config import TrainConfig
from trainable.model.augment import eval_crops, training_batch, wrap
from trainable.model.networks import N_CLASSES, build_model

STATE_VERSION = 1


def resolve_device(name: str | torch.device) -> torch.device:
    """Device name -> device: auto = cuda if available else cpu; cuda without a GPU is an error."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("config asks for device 'cuda' but no CUDA device is available")
    return torch.device(name)


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast speeds training up on `device`: on CUDA, and on CPUs with AMX bf16
    tiles (an epoch of the compact recipe measured 2.2x faster on this project's 2-core Xeon,
    bench/results/cpu_bf16_20261128T221928.json); other CPUs emulate bf16 and would get slower."""
    if device.type == "cuda":
        return True
    caps = getattr(torch.cpu, "get_capabilities", dict)()
    return device.type == "cpu" and bool(caps.get("amx_bf16"))


def lr_factor(config: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of config.lr at optimizer step `step` (0-based), for the configured schedule."""
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if config.schedule == "onecycle":
        # OneCycleLR's shape: cosine rise from lr/25 to lr over the warmup, cosine fall to lr/25e4.
        start, end = 1 / 25, 1 / 25e4
        if step < warmup:
            p = step / warmup
            return start + (1 - start) * (1 - math.cos(math.pi * p)) / 2
        p = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return end + (1 - end) * (1 + math.cos(math.pi * p)) / 2
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "cosine":
        p = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * p))
    return 1.0  # constant


def make_optimizer(
    config: TrainConfig,
    model: torch.nn.Module | Iterable[torch.Tensor],
    fused: bool = False,
    stacked: int = 0,
) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights only (not on norms and biases). `fused`: the fused
    CUDA kernels of Adam/AdamW (one launch per step instead of several per parameter).

    `model` may also be the parameters themselves; `stacked`: how many leading dimensions stack
    several folds' copies of a parameter (trainable/packed.py), so the decay groups still go by
    each parameter's own dimension, in the same order (the optimizer states line up index by index)."""
    params = list(model.parameters() if isinstance(model, torch.nn.Module) else model)
    decay = [p for p in params if p.requires_grad and p.dim() - stacked >= 2]
    no_decay = [p for p in params if p.requires_grad and p.dim() - stacked < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    betas = (config.momentum, 0.999)
    extra = {"fused": True} if fused else {}
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=betas, **extra)
    return torch.optim.Adam(groups, lr=config.lr, betas=betas, **extra)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _squeeze_channel(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, M, T) as the shards give it, or (N, M, T) -> (N, M, T) (a view, no copy)."""
    if x.dim() == 4 and x.shape[1] == 1:
        return x.squeeze(1)
    if x.dim() != 3:
        raise ValueError(
            f"features must be (N, n_mels, frames) or (N, 1, n_mels, frames); got {tuple(x.shape)}"
        )
    return x


class FoldTrainer:
    """One fold's training run. Iterate it for per-epoch metrics; see the module docstring.

    x_*: (N, n_mels, frames) or (N, 1, n_mels, frames) log-mel dB (any float dtype; kept on the
    device in that dtype),
    y_*: (N,) integer class ids. They are moved to the device once, here.
    """

    def __init__(
        self,
        config: TrainConfig | dict[str, Any],
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_val: torch.Tensor,
        y_val: torch.Tensor,
        *,
        fold: int = 0,
        device: str | torch.device | None = None,
        n_classes: int = N_CLASSES,
    ) -> None:
        self.config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
        cfg = self.config
        self.fold = int(fold)
        self.n_classes = n_classes
        self.device = resolve_device(device if device is not None else cfg.device)
        self.on_gpu = self.device.type == "cuda"
        x_train, x_val = _squeeze_channel(x_train), _squeeze_channel(x_val)
        if len(x_train) != len(y_train) or len(x_val) != len(y_val):
            raise ValueError("features and labels differ in length")
        self.n_mels = int(x_train.shape[1])

        # The data, once, on the device.
        self.x_train = x_train.to(self.device)
        self.y_train = y_train.to(self.device, torch.long)
        self.x_val = x_val.to(self.device)
        self.y_val = y_val.to(self.device, torch.long)
        # Random rolls read windows of the clip followed by its own start: kept once (2x memory).
        self.x_wrapped = wrap(self.x_train) if cfg.time_shift > 0 else None

        # Seeding: the fold's generator (permutation, crop, roll, gain, mixup partners) and its
        # private global-RNG state (weight init now; dropout, masks, Beta draws later).
        seed = cfg.seed + self.fold
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        with self._private_rng(initial_seed=seed):
            self.model = build_model(cfg, self.n_mels, n_classes).to(self.device)
        # channels_last: measured 2.4x faster training steps on this CPU (oneDNN), faster on GPU too.
        self.channels_last = cfg.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.autocast = cfg.bf16 and bf16_is_fast(self.device)
        if self.on_gpu:
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels

        self.steps_per_epoch = max(1, len(self.x_train) // cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.optimizer = make_optimizer(cfg, self.model, fused=self.on_gpu)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(cfg, step, self.total_steps, self.steps_per_epoch)
        )
        self.epoch = 0  # epochs completed
        self.history: list[dict[str, float]] = []
        self.exact_resume = True  # False after loading a state saved on another device type

    # ---- RNG ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _private_rng(self, initial_seed: int | None = None) -> Iterator[None]:
        """Inside, torch's global RNG (CPU, and this GPU) is this trainer's own; outside it is
        left as it was. With `initial_seed`, the private state starts from that seed."""
        devices = [self.device] if self.on_gpu else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            if initial_seed is not None:
                torch.manual_seed(initial_seed)
            else:
                torch.set_rng_state(self._rng_cpu)
                if self.on_gpu:
                    torch.cuda.set_rng_state(self._rng_gpu, self.device)
            try:
                yield
            finally:
                self._rng_cpu = torch.get_rng_state()
                if self.on_gpu:
                    self._rng_gpu = torch.cuda.get_rng_state(self.device)

    # ---- the pieces of a step -----------------------------------------------------------------

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch `index` (a device tensor of row numbers): gathered, augmented, on the
        device. Returns (x (B, M, T') float, target (B, C) soft labels)."""
        x, target = training_batch(
            self.x_train, self.y_train, index, self.config, self.n_classes, self.generator, self.x_wrapped
        )
        if self.channels_last:
            x = x.unsqueeze(1).contiguous(memory_format=torch.channels_last)
        return x, target

    def loss(self, logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        logits = logits.float()
        if self.config.loss == "bce":
            if smoothing:
                target = target * (1 - smoothing) + smoothing / self.n_classes
            return F.binary_cross_entropy_with_logits(logits, target)
        return F.cross_entropy(logits, target, label_smoothing=smoothing)

    def step(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Forward, backward, optimizer and LR step on one batch; returns the loss (on device)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(x)
        loss = self.loss(logits, target, self.config.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    # ---- one epoch ----------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.epoch >= self.config.epochs

    def train_epoch(self) -> dict[str, float]:
        """Train one epoch, evaluate, and return this epoch's metrics."""
        if self.done:
            raise RuntimeError(f"fold {self.fold} has already trained its {self.config.epochs} epochs")
        t0 = time.perf_counter()
        bs, n = self.config.batch_size, len(self.x_train)
        self.model.train()
        with self._private_rng():
            order = torch.randperm(n, generator=self.generator, device=self.device)
            loss_sum = torch.zeros((), device=self.device)
            for i in range(self.steps_per_epoch):
                x, target = self.batch(order[i * bs : (i + 1) * bs])
                loss_sum += self.step(x, target)
        val_loss, val_acc = self._evaluate()
        # the one host sync of the epoch
        train_loss, val_loss, val_acc = torch.stack(
            [loss_sum / self.steps_per_epoch, val_loss, val_acc]
        ).tolist()
        self.epoch += 1
        metrics = {
            "fold": self.fold,
            "epoch": self.epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_seconds": time.perf_counter() - t0,
        }
        self.history.append(metrics)
        return metrics

    @torch.no_grad()
    def predict_logits(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Eval-mode logits for (N, M, T) features: the full clip, or the mean over eval crops."""
        x = _squeeze_channel(x)
        self.model.eval()
        out = []
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(self.device).float()
            crops = eval_crops(xb, self.config.crop_frames, self.config.eval_crops)
            logits = 0
            for c in crops:
                c = c.unsqueeze(1)
                if self.channels_last:
                    c = c.contiguous(memory_format=torch.channels_last)
                # CPU: evaluated in float32, as the shipped model computes (bf16 only speeds training)
                with torch.autocast(
                    self.device.type, dtype=torch.bfloat16, enabled=self.autocast and self.on_gpu
                ):
                    logits = logits + self.model(c).float()
            out.append(logits / len(crops))
        return torch.cat(out)

    def _evaluate(self) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.predict_logits(self.x_val)
        target = F.one_hot(self.y_val, self.n_classes).float()
        loss = self.loss(logits, target)
        acc = (logits.argmax(1) == self.y_val).float().mean()
        return loss, acc

    @torch.no_grad()
    def predict_val_probs(self) -> torch.Tensor:
        """(N_val, n_classes) float32 class probabilities of the validation clips, on the CPU:
        softmax of the same eval path as the validation accuracy (`predict_logits`), so the argmax
        of each row is the prediction that accuracy counted. The out-of-fold predictions of a
        trial (selection-bias correction, search/bbc.py) are these, one fold at a time."""
        return torch.softmax(self.predict_logits(self.x_val).float(), dim=1).cpu()

    def __iter__(self) -> Iterator[dict[str, float]]:
        while not self.done:
            yield self.train_epoch()

    # ---- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (or to rebuild the model: config, n_mels, model)."""
        state = {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "fold": self.fold,
            "epoch": self.epoch,
            "n_mels": self.n_mels,
            "n_classes": self.n_classes,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "device": self.device.type,
            "rng": {"generator": self.generator.get_state(), "cpu": self._rng_cpu},
            "history": [dict(h) for h in self.history],
        }
        if self.on_gpu:
            state["rng"]["gpu"] = self._rng_gpu
        return _to_cpu(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"fold state version {state.get('version')!r}, expected {STATE_VERSION}")
        saved = TrainConfig.from_dict(state["config"])
        diff = saved.differs_in(self.config)
        if diff:
            raise ValueError(f"fold state was saved with a different config (differs in {diff})")
        if state["fold"] != self.fold or state["n_mels"] != self.n_mels:
            raise ValueError(
                f"fold state is for fold {state['fold']} with {state['n_mels']} mels, "
                f"not fold {self.fold} with {self.n_mels}"
            )
        self.model.load_state_dict(state["model"])
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.history = [dict(h) for h in state["history"]]
        self._restore_rng(state["rng"])

    def _restore_rng(self, rng: dict[str, torch.Tensor]) -> None:
        """Restore the generator and the private global-RNG states. A state saved on another
        device type (CPU <-> GPU generators differ) cannot continue the same random streams: the
        missing streams are then re-seeded from (seed, fold, epoch), so training still resumes
        (model, optimizer, schedule exact), just not bit-identically. `self.exact_resume` says which."""
        self.exact_resume = True
        reseed = self.config.seed + self.fold + 1_000_003 * (self.epoch + 1)
        try:
            self.generator.set_state(rng["generator"])
        except RuntimeError:
            self.generator.manual_seed(reseed)
            self.exact_resume = False
        if self.on_gpu and "gpu" not in rng:
            with self._private_rng(initial_seed=reseed):
                pass  # fresh private CPU and GPU streams; the saved CPU stream is restored below
            self.exact_resume = False
        elif self.on_gpu:
            self._rng_gpu = rng["gpu"]
        self._rng_cpu = rng["cpu"]


def train_fold(
    config: TrainConfig | dict[str, Any],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    *,
    fold: int = 0,
    state: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> Iterator[dict[str, float]]:
    """Train one fold, yielding each epoch's metrics; resume from `state` if given.

    For checkpointing between epochs use FoldTrainer directly (its `state_dict()`).
    """
    trainer = FoldTrainer(config, x_train, y_train, x_val, y_val, fold=fold, device=device)
    if state is not None:
        trainer.load_state_dict(state)
    yield from trainer
