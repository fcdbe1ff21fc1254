"""The Ray actor that trains all folds of a trial in one process: the `packed` fold layout.

It answers what `FoldWorker` answers, per fold, so the lock-step loop of trainable/cv.py, ASHA,
the per-fold metrics and the checkpoints stay the same: `run_epoch` and `ready` are called with
`.options(num_returns=len(folds))` and return one result per fold, in fold order (cv.py's
`_gather` then takes them fold by fold, as from separate workers). `load_state` takes one fold's
checkpoint bytes at a time (the fold is read from the state itself), as FoldWorker's does.

torch is imported inside the methods, as in trainable/fold_worker.py.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from trainable.fold_worker import out_of_fold, split_fold, val_rows
from trainable.model.checkpoint import state_from_bytes, state_to_bytes


def _one_or_list(out: list[Any]) -> Any:
    """Ray wants a list of num_returns values, or the value itself when num_returns is 1."""
    return out if len(out) > 1 else out[0]


@ray.remote
class PackedFoldWorker:
    """Every fold of one trial. Created by `cv_trainable` with the whole trial's resources."""

    def __init__(
        self,
        arrays_ref: list[ray.ObjectRef],
        folds: Sequence[int],
        config: dict[str, Any],
        threads: int = 1,
        fail_at: tuple[int, int, str] | None = None,
    ) -> None:
        import torch

        from trainable.fold import FoldTrainer
        from trainable.packed import pack

        # All folds' CPUs, but no more threads than the node has cores (5 folds x 1 CPU on 2 cores).
        torch.set_num_threads(max(1, min(int(threads), os.cpu_count() or 1)))
        self.folds = [int(k) for k in folds]
        self.fail_at = fail_at
        arrays = ray.get(arrays_ref[0])
        trainers = [FoldTrainer(config, *split_fold(arrays, k), fold=k) for k in self.folds]
        self.val_rows = {k: val_rows(arrays, k) for k in self.folds}
        del arrays
        self.groups = pack(trainers)  # one group unless folds differ in steps per epoch
        self.group_of = {k: g for g in self.groups for k in g.folds}

    def ready(self) -> Any:
        node = ray.get_runtime_context().get_node_id()
        device = str(self.groups[0].device)
        return _one_or_list(
            [
                {"fold": k, "device": device, "pid": os.getpid(), "node": node, "packed": True}
                for k in self.folds
            ]
        )

    def load_state(self, blob: bytes, source: str = "fold state") -> int:
        """Resume one fold from its saved state (bytes of torch.save(FoldTrainer.state_dict()),
        from either layout); returns its epoch."""
        state = state_from_bytes(blob, source)
        fold = int(state.get("fold", -1))
        if fold not in self.group_of:
            raise ValueError(f"{source}: a state of fold {fold}, not one of this worker's folds {self.folds}")
        self.group_of[fold].load_state_dict(fold, state)
        return int(state["epoch"])

    def run_epoch(self, with_state: bool = False) -> Any:
        """Train the next epoch of every fold; per fold, as FoldWorker.run_epoch: (metrics, state
        bytes if asked else None, out-of-fold predictions after the final epoch else None)."""
        self._maybe_crash(self.groups[0].epoch + 1)
        out: dict[int, tuple[dict[str, float], bytes | None, Any]] = {}
        for g in self.groups:
            metrics = g.train_epoch()  # leaves every member's model in step with the stack
            states = g.state_dicts() if with_state else [None] * len(metrics)
            for t, m, s in zip(g.members, metrics, states, strict=True):
                oof = out_of_fold(t, self.val_rows[t.fold]) if t.done else None
                out[t.fold] = (m, None if s is None else state_to_bytes(s), oof)
        return _one_or_list([out[k] for k in self.folds])

    def _maybe_crash(self, epoch: int) -> None:
        """Test hook, as FoldWorker's: the process (all its folds) dies before `epoch` if its
        fold is here, once per marker file."""
        if self.fail_at is None:
            return
        fold, at_epoch, marker = self.fail_at
        if fold in self.folds and at_epoch == epoch and not Path(marker).exists():
            Path(marker).write_text(f"fold {fold} (packed worker) exited before epoch {epoch}\n")
            os._exit(1)
