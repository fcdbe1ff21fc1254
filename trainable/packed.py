"""Train several folds of one trial at once, as one batched network (the `packed` fold layout).

    trainers = [FoldTrainer(config, *split, fold=k) for k, split in splits.items()]
    for group in pack(trainers):        # folds with the same steps per epoch train together
        metrics = group.train_epoch()   # one metrics dict per fold, as FoldTrainer.train_epoch
        states = group.state_dicts()    # exactly FoldTrainer.state_dict(), one per fold

Why: a fold of the `full` preset is too small to fill a GPU on its own (README, issue 10: 5 folds
sharing a GPU as 5 processes moved the same work per second as 1 fold alone). Packed, each kernel
does K folds' work, so a GPU runs K times fewer, K times larger kernels.

How: the K folds' parameters and BatchNorm buffers are stacked along a new leading dimension
(`torch.func.stack_module_state`) and the network runs once per step under `torch.func.vmap` over
`functional_call`. vmap lowers a convolution with batched weights to one grouped convolution
(groups = K), a linear layer to one batched matmul, and BatchNorm to per-(fold, channel)
statistics, updating each fold's running statistics in place: the per-fold math is the network's
own. vmap is chosen over hand-written grouped-convolution modules because it covers every
architecture in trainable/model/networks.py unchanged (and whatever is added there) with the same kernels.

Exactness, piece by piece (what `tests/test_packed.py` checks against separate FoldTrainers):
  - batches: each fold draws its permutation, crops, rolls, gains (its generator) and its
    SpecAugment masks and mixup weights (its private global RNG) with FoldTrainer's own `batch`,
    inside its own RNG context, in the same order as when it trains alone;
  - loss: the sum of the folds' mean losses, so each fold's gradient is its own;
  - optimizer: one optimizer over the stacked parameters, with the weight-decay groups decided by
    each parameter's original dimension (`make_optimizer(stacked=1)`). AdamW, Adam and SGD update
    element by element with one learning rate and step count per group, and every fold of a group
    has the same schedule (same config, same steps per epoch), so each fold's slice gets exactly
    its own update. There is no gradient clipping (a clip by global norm would have to be per fold).
  - dropout: drawn under vmap(randomness="different") from the first fold's private RNG, so
    training with dropout stays deterministic and resumable, but its masks are not the ones the
    folds would draw alone (and the first fold's mask/mixup stream interleaves differently). With
    dropout 0 the packed folds equal the separate ones within float tolerance; with dropout they
    are the same training in distribution, not bit for bit.
  - evaluation: each fold's own FoldTrainer evaluates, after its model is refreshed from the stack.

State: `state_dicts()` copies the stacked tensors back into each fold's FoldTrainer (model,
optimizer state sliced along the stack, scheduler) and returns `FoldTrainer.state_dict()` of each,
so checkpoints keep the `meta.json + fold_<k>.pt` layout, and a state written by either layout
loads in the other (`load_state_dict` goes through `FoldTrainer.load_state_dict`, then restacks).

Folds of different train sizes have different steps per epoch and so different schedules: `pack`
groups folds by steps per epoch and packs each group (a group of one trains as plain FoldTrainer).
ESC-50's folds are equal (1600 training clips each), so all 5 folds form one group there.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch.func import functional_call, stack_module_state, vmap

from trainable.fold import FoldTrainer, lr_factor, make_optimizer


def pack(trainers: Sequence[FoldTrainer]) -> list[PackedTrainer]:
    """The trainers grouped by steps per epoch (in order of first appearance), one PackedTrainer each."""
    groups: dict[int, list[FoldTrainer]] = {}
    for t in trainers:
        groups.setdefault(t.steps_per_epoch, []).append(t)
    return [PackedTrainer(g) for g in groups.values()]


class PackedTrainer:
    """K FoldTrainers of one config trained as one batched network; see the module docstring.

    The trainers keep their data, generators, RNG states, epoch and history; while packed, the
    parameters, buffers and optimizer state live in the stack, and are copied back into the
    trainers by `sync()` (done by `state_dicts()` and before each evaluation).
    """

    def __init__(self, trainers: Sequence[FoldTrainer]) -> None:
        self.members = list(trainers)
        if not self.members:
            raise ValueError("PackedTrainer needs at least one FoldTrainer")
        first = self.members[0]
        for t in self.members[1:]:
            if t.config != first.config or t.device != first.device:
                raise ValueError(f"folds {first.fold} and {t.fold}: packed folds need one config and device")
            if t.steps_per_epoch != first.steps_per_epoch or t.n_mels != first.n_mels:
                raise ValueError(
                    f"folds {first.fold} and {t.fold} differ in steps per epoch or mels: "
                    "pack them in separate groups (`pack`)"
                )
        self.config, self.device = first.config, first.device
        self.folds = [t.fold for t in self.members]
        self.solo = len(self.members) == 1  # a group of one: plain FoldTrainer, nothing stacked
        if self.solo:
            return
        # The network's structure only; the tensors come from the stack at every call.
        self.base = copy.deepcopy(first.model).to("meta")
        self.params, self.buffers = stack_module_state([t.model for t in self.members])
        cfg = self.config
        self.optimizer = make_optimizer(cfg, self.params.values(), fused=first.on_gpu, stacked=1)
        steps, total = first.steps_per_epoch, first.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(cfg, step, total, steps)
        )
        self._stale = True  # the stack is to be (re)loaded from the trainers before training

    # ---- properties ---------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.members[0].epoch

    @property
    def done(self) -> bool:
        return self.members[0].done

    # ---- stack <-> trainers -------------------------------------------------------------------

    def _restack(self) -> None:
        """Load the stack (parameters, buffers, optimizer and scheduler) from the trainers."""
        epochs = {t.epoch for t in self.members}
        if len(epochs) != 1:
            raise ValueError(f"packed folds {self.folds} are at different epochs {sorted(epochs)}")
        with torch.no_grad():
            for i, t in enumerate(self.members):
                for name, p in t.model.named_parameters():
                    self.params[name][i].copy_(p)
                for name, b in t.model.named_buffers():
                    self.buffers[name][i].copy_(b)
        states = [t.optimizer.state_dict() for t in self.members]
        stacked = {
            "param_groups": copy.deepcopy(states[0]["param_groups"]),
            "state": {
                idx: _stack_param_state([s["state"][idx] for s in states]) for idx in states[0]["state"]
            },
        }
        self.optimizer.load_state_dict(stacked)
        self.scheduler.load_state_dict(self.members[0].scheduler.state_dict())
        self._stale = False

    def _sync_models(self) -> None:
        with torch.no_grad():
            for i, t in enumerate(self.members):
                for name, p in t.model.named_parameters():
                    p.copy_(self.params[name][i])
                for name, b in t.model.named_buffers():
                    b.copy_(self.buffers[name][i])

    def sync(self) -> None:
        """Copy the stack back into every trainer: model, optimizer state (its slice), scheduler."""
        if self.solo or self._stale:
            return
        self._sync_models()
        state = self.optimizer.state_dict()
        sched = self.scheduler.state_dict()
        for i, t in enumerate(self.members):
            t.optimizer.load_state_dict(
                {
                    "param_groups": copy.deepcopy(state["param_groups"]),
                    "state": {idx: _slice_param_state(s, i) for idx, s in state["state"].items()},
                }
            )
            t.scheduler.load_state_dict(sched)

    # ---- training -----------------------------------------------------------------------------

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        def one(params: dict, buffers: dict, xb: torch.Tensor) -> torch.Tensor:
            return functional_call(self.base, (params, buffers), (xb,))

        return vmap(one, randomness="different")(self.params, self.buffers, x)

    def train_epoch(self) -> list[dict[str, float]]:
        """Train one epoch of every fold; their metrics (FoldTrainer.train_epoch's), in fold order."""
        if self.solo:
            return [self.members[0].train_epoch()]
        if self.done:
            raise RuntimeError(f"folds {self.folds} have already trained their {self.config.epochs} epochs")
        if self._stale:
            self._restack()
        t0 = time.perf_counter()
        first, cfg, k = self.members[0], self.config, len(self.members)
        bs, steps = cfg.batch_size, first.steps_per_epoch
        self.base.train()
        orders = []
        for t in self.members:
            t.model.train()
            with t._private_rng():
                orders.append(torch.randperm(len(t.x_train), generator=t.generator, device=self.device))
        loss_sum = torch.zeros(k, device=self.device)
        for i in range(steps):
            xs, targets = [], []
            for t, order in zip(self.members, orders, strict=True):
                with t._private_rng():  # the same draws, in the same order, as the fold alone
                    x, target = t.batch(order[i * bs : (i + 1) * bs])
                xs.append(x)
                targets.append(target)
            x = torch.stack(xs)
            # Dropout's masks (if any): from the first fold's private stream, saved with its state.
            with first._private_rng():
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=first.autocast):
                    logits = self._forward(x)
            losses = torch.stack(
                [t.loss(logits[j], targets[j], cfg.label_smoothing) for j, t in enumerate(self.members)]
            )
            self.optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()  # d(sum)/d(fold j's slice) = fold j's own gradient
            self.optimizer.step()
            self.scheduler.step()
            loss_sum += losses.detach()
        self._sync_models()
        evals = [t._evaluate() for t in self.members]
        # the one host sync of the epoch
        values = torch.stack(
            [loss_sum / steps, torch.stack([e[0] for e in evals]), torch.stack([e[1] for e in evals])]
        ).tolist()
        seconds = time.perf_counter() - t0
        lr = self.optimizer.param_groups[0]["lr"]
        out = []
        for j, t in enumerate(self.members):
            t.epoch += 1
            metrics = {
                "fold": t.fold,
                "epoch": t.epoch,
                "train_loss": values[0][j],
                "val_loss": values[1][j],
                "val_acc": values[2][j],
                "lr": lr,
                "epoch_seconds": seconds,  # the packed epoch: every fold's took this long
            }
            t.history.append(metrics)
            out.append(metrics)
        return out

    # ---- state --------------------------------------------------------------------------------

    def state_dicts(self) -> list[dict[str, Any]]:
        """Every fold's `FoldTrainer.state_dict()`, in fold order."""
        self.sync()
        return [t.state_dict() for t in self.members]

    def load_state_dict(self, fold: int, state: dict[str, Any]) -> None:
        """Resume fold `fold` from a `FoldTrainer.state_dict()` (written by either layout)."""
        try:
            member = self.members[self.folds.index(int(fold))]
        except ValueError:
            raise ValueError(f"fold {fold} is not among the packed folds {self.folds}") from None
        member.load_state_dict(state)
        self._stale = True  # restacked when training continues, once every fold has loaded


def _stack_param_state(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One parameter's optimizer state for the stack, from each fold's: per-element tensors
    (exp_avg, momentum_buffer, ...) stacked; scalars (Adam's step) shared, so they must agree."""
    out: dict[str, Any] = {}
    for key, v in states[0].items():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            out[key] = torch.stack([s[key] for s in states])
        else:
            if any(not _equal(s[key], v) for s in states[1:]):
                raise ValueError(f"packed folds disagree on the optimizer's {key!r}: cannot pack them")
            out[key] = v.clone() if isinstance(v, torch.Tensor) else v
    return out


def _slice_param_state(state: dict[str, Any], i: int) -> dict[str, Any]:
    return {
        key: (v[i].clone() if v.dim() > 0 else v.clone()) if isinstance(v, torch.Tensor) else v
        for key, v in state.items()
    }


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return bool(torch.equal(a.cpu(), b.cpu()))
    return a == b
