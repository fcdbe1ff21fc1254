"""The Ray actor that trains one fold of a trial: a thin shell around `FoldTrainer`.

The CV trainable (trainable/cv.py) starts one `FoldWorker` per fold inside the trial's placement
group. A worker receives the ObjectRef of the search's shared arrays (never the arrays
themselves), takes its fold's train/val split from them once, and then trains when told to, one
epoch per `run_epoch` call. States travel as `torch.save` bytes (the content of a checkpoint's
fold file, trainable/model/checkpoint.py), so the trial can write them into its checkpoint and hand them
back on a retry, whichever node the worker lands on.

torch is imported inside the methods: the trial process that creates these actors never needs it
(importing torch costs seconds of CPU per process, per trial).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import ray

from trainable.model.checkpoint import oof_part, state_from_bytes, state_to_bytes


def split_fold(arrays: dict[str, np.ndarray], fold: int) -> tuple[Any, ...]:
    """(x_train, y_train, x_val, y_val) of official fold `fold` from the shared arrays.

    The shared arrays come out of Ray's object store as read-only zero-copy views; boolean
    indexing copies just this fold's rows into ordinary writable memory, so the object-store
    copy is never duplicated whole and torch never sees a read-only buffer.
    """
    val = arrays["fold"] == fold
    if not val.any():
        raise ValueError(
            f"fold {fold}: no clips of this fold in the data (folds present: "
            f"{sorted(set(arrays['fold'].tolist()))})"
        )
    train = ~val
    import torch

    return (
        torch.from_numpy(arrays["x"][train]),
        torch.from_numpy(arrays["y"][train]),
        torch.from_numpy(arrays["x"][val]),
        torch.from_numpy(arrays["y"][val]),
    )


def val_rows(arrays: dict[str, np.ndarray], fold: int) -> np.ndarray:
    """The validation clips' rows in the shared arrays: they name the clips of the out-of-fold
    predictions, the same rows in every trial of the search."""
    return np.nonzero(arrays["fold"] == fold)[0]


def out_of_fold(trainer: Any, rows: np.ndarray) -> dict[str, np.ndarray]:
    """A FoldTrainer's validation clips scored by its model now (trainable.model.checkpoint.oof_part)."""
    probs = trainer.predict_val_probs()
    return oof_part(rows, trainer.fold, trainer.y_val.cpu().numpy(), probs.numpy())


@ray.remote
class FoldWorker:
    """One fold of one trial. Created by `cv_trainable` with the fold's resources."""

    def __init__(
        self,
        arrays_ref: list[ray.ObjectRef],
        fold: int,
        config: dict[str, Any],
        threads: int = 1,
        fail_at: tuple[int, int, str] | None = None,
    ) -> None:
        import torch

        from trainable.fold import FoldTrainer

        torch.set_num_threads(max(1, int(threads)))
        self.fold = int(fold)
        self.fail_at = fail_at
        # arrays_ref is a one-element list so Ray hands us the ref itself, not its value.
        arrays = ray.get(arrays_ref[0])
        x_train, y_train, x_val, y_val = split_fold(arrays, self.fold)
        self.val_rows = val_rows(arrays, self.fold)
        del arrays  # release the object-store view; only this fold's copy stays
        self.trainer = FoldTrainer(config, x_train, y_train, x_val, y_val, fold=self.fold)

    def ready(self) -> dict[str, Any]:
        return {
            "fold": self.fold,
            "device": str(self.trainer.device),
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
        }

    def load_state(self, blob: bytes, source: str = "fold state") -> int:
        """Resume from a saved state (bytes of torch.save(FoldTrainer.state_dict())); returns its epoch.

        `source`: where the bytes came from (the checkpoint's fold file), named if they are corrupt."""
        self.trainer.load_state_dict(state_from_bytes(blob, source))
        return self.trainer.epoch

    def state(self) -> bytes:
        return state_to_bytes(self.trainer.state_dict())

    def run_epoch(
        self, with_state: bool = False
    ) -> tuple[dict[str, float], bytes | None, dict[str, np.ndarray] | None]:
        """Train the next epoch; returns its metrics, if asked the state after it, and after the
        trial's final epoch the out-of-fold predictions of this fold (`out_of_fold`), else None."""
        self._maybe_crash(self.trainer.epoch + 1)
        metrics = self.trainer.train_epoch()
        oof = self.out_of_fold() if self.trainer.done else None
        return metrics, (self.state() if with_state else None), oof

    def out_of_fold(self) -> dict[str, np.ndarray]:
        return out_of_fold(self.trainer, self.val_rows)

    def _maybe_crash(self, epoch: int) -> None:
        """Test hook: die hard (like a lost node) before `epoch` of `fold`, once per marker file."""
        if self.fail_at is None:
            return
        fold, at_epoch, marker = self.fail_at
        if fold == self.fold and at_epoch == epoch and not Path(marker).exists():
            Path(marker).write_text(f"fold {fold} worker exited before epoch {epoch}\n")
            os._exit(1)
