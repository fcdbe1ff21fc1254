"""The CV checkpoint layout: one directory per checkpoint, written whole or not at all.

    <checkpoint>/
        meta.json     JSON object: format (`FORMAT`), folds (sorted fold numbers), config, features,
                      classes, and what the writer adds (trainable/cv.py: epoch, metrics, fingerprint,
                      shards, nodes)
        fold_<k>.pt   torch.save of fold k's `FoldTrainer.state_dict()` (or its slim form, in the
                      promoted model), one file for every fold that meta.json lists
        oof.npz       only in a trial's final checkpoint: the out-of-fold predictions of its last
                      epoch, every validation clip scored by the fold model that did not train on it
                      (`OOF_FILE`; arrays `OOF_ARRAYS`; read with `read_oof`)

The Tune trainable (trainable/cv.py) writes one every checkpointed epoch and reads it back on a
retry; promotion reads it and writes the slim copy that the MLflow model ships (trainable/model/ensemble.py).
This module is shipped inside the promoted model too, which loads without Ray or this project
installed: it imports only the standard library and torch. torch is imported only where a state
is (de)serialized, because the Tune trial process that writes and reads checkpoints never imports
it (seconds of CPU per trial); there, fold states stay `torch.save` bytes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

FORMAT = 1
META_FILE = "meta.json"
OOF_FILE = "oof.npz"
# Per clip: its row in the search's data (the order `load_shards` gives, the same for every trial of
# a search, so rows line up across trials), its official fold, true label, the predicted class
# (argmax of the float32 probabilities: exactly what the accuracy counted, which float16 rounding
# could tie) and the class probabilities (float16: 100 bytes per clip for 50 classes).
OOF_ARRAYS = {"row": "int64", "fold": "int16", "label": "int16", "pred": "int16", "probs": "float16"}
REQUIRED = ("config", "features", "classes", "folds")  # besides `format`: what every reader needs

# A fold state as the writer takes it: torch.save bytes (what fold workers send) or a state dict.
State = bytes | Mapping[str, Any]


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read back; the message names the file at fault."""


def fold_file(fold: int) -> str:
    """The file name of fold `fold`'s state inside a checkpoint directory."""
    return f"fold_{int(fold)}.pt"


# ---- one fold state ---------------------------------------------------------------------------


def state_to_bytes(state: Mapping[str, Any]) -> bytes:
    """torch.save(state) as bytes: the content of a fold file, and how states travel through Ray."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def state_from_bytes(blob: bytes, source: str = "fold state") -> dict[str, Any]:
    """The state dict in a fold file's bytes; `source` (the file) is named in the error if they are
    not one. weights_only: a checkpoint may come from anywhere, so it must not run pickled code."""
    import torch

    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip (RuntimeError), not a pickle, a disallowed global, ...
        raise CheckpointError(f"{source}: not a readable fold state ({type(e).__name__}: {e})") from None


def load_state(path: str | Path) -> dict[str, Any]:
    """The state dict in one fold file (map_location cpu, weights_only)."""
    return state_from_bytes(_read_bytes(Path(path)), str(path))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read fold state ({e.strerror or e})") from None


# ---- out-of-fold predictions ----------------------------------------------------------------------


def oof_part(rows: Any, fold: int, labels: Any, probs: Any) -> dict[str, Any]:
    """One fold's out-of-fold predictions as the arrays of `OOF_ARRAYS`.

    rows: (N,) the clips' rows in the search's data; labels: (N,) class ids; probs: (N, C) class
    probabilities (numpy or CPU tensors) of the fold model that validated on these clips."""
    import numpy as np

    probs = np.asarray(probs, dtype=np.float32)
    rows = np.asarray(rows)
    if probs.ndim != 2 or len(probs) != len(rows) or len(np.asarray(labels)) != len(rows):
        raise ValueError(f"fold {fold}: out-of-fold arrays differ in length or shape {probs.shape}")
    return _typed(
        {
            "row": rows,
            "fold": np.full(len(rows), int(fold)),
            "label": np.asarray(labels),
            "pred": probs.argmax(axis=1),
            "probs": probs,
        }
    )


def _typed(arrays: Mapping[str, Any]) -> dict[str, Any]:
    import numpy as np

    return {
        k: np.ascontiguousarray(np.asarray(arrays[k]).astype(t, copy=False)) for k, t in OOF_ARRAYS.items()
    }


def merge_oof(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The folds' `oof_part`s as one set of arrays, sorted by row; a row scored twice is an error."""
    import numpy as np

    parts = [_typed(p) for p in parts]
    if not parts:
        raise ValueError("no out-of-fold predictions to merge")
    out = {k: np.concatenate([p[k] for p in parts]) for k in OOF_ARRAYS}
    order = np.argsort(out["row"], kind="stable")
    out = {k: v[order] for k, v in out.items()}
    if len(out["row"]) > 1 and (np.diff(out["row"]) == 0).any():
        raise ValueError("out-of-fold predictions: a clip (row) is scored by more than one fold model")
    return out


def write_oof(path: str | Path, oof: Mapping[str, Any]) -> Path:
    """Write out-of-fold arrays as an .npz file, to a temporary name renamed at the end."""
    import numpy as np

    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **_typed(oof))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_oof(path: str | Path) -> dict[str, Any]:
    """Out-of-fold arrays from an .npz file or a checkpoint directory holding `OOF_FILE`, checked:
    every array of `OOF_ARRAYS`, one row per clip. A `CheckpointError` names the file at fault."""
    import numpy as np

    path = Path(path)
    if path.is_dir():
        path = path / OOF_FILE
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in OOF_ARRAYS if k in z.files}
    except Exception as e:  # missing, truncated, not an npz
        raise CheckpointError(
            f"{path}: not readable out-of-fold predictions ({type(e).__name__}: {e})"
        ) from None
    missing = [k for k in OOF_ARRAYS if k not in arrays]
    n = len(arrays.get("row", ()))
    if missing or any(len(v) != n for v in arrays.values()) or arrays["probs"].ndim != 2:
        raise CheckpointError(f"{path}: out-of-fold arrays missing {missing} or of unequal length")
    return _typed(arrays)


# ---- a checkpoint directory -------------------------------------------------------------------


def write_checkpoint(
    directory: str | Path,
    meta: Mapping[str, Any],
    states: Mapping[int, State],
    oof: Mapping[str, Any] | None = None,
) -> Path:
    """Write `states` (fold -> torch.save bytes or state dict) and `meta` as the checkpoint `directory`;
    with `oof` (arrays of `merge_oof`), also the out-of-fold predictions as `OOF_FILE`.

    meta.json gets `format` and `folds` (the folds of `states`) from here, so every fold it lists
    has its file. Atomic: everything goes into a temporary sibling directory that is renamed to
    `directory` at the end, so a failure midway (a full disk, an interrupt) leaves no partial
    checkpoint that a retry or a promotion could take for a whole one. `directory` must not exist
    or be an empty directory (POSIX rename replaces an empty one); its parents are created.
    Returns `directory`.
    """
    directory = Path(os.path.abspath(directory))  # "." or "x/" have no usable name for a sibling
    if not states:
        raise ValueError(f"{directory}: a checkpoint needs at least one fold state")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        # Refused rather than merged or deleted: stale fold files would not match the new meta.json,
        # and the directory may hold things that are not ours.
        raise FileExistsError(
            f"{directory}: exists and is not an empty directory; not writing a checkpoint there"
        )
    folds = sorted(int(k) for k in states)
    # Serialized before anything touches the disk: a meta that is not JSON fails here.
    text = json.dumps({**meta, "format": FORMAT, "folds": folds}, indent=1, sort_keys=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Same parent, so the rename stays on one filesystem (and is atomic); unique, so concurrent
    # writers of different checkpoints never share a temporary directory.
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        for k, state in states.items():
            path = tmp / fold_file(k)
            if isinstance(state, (bytes, bytearray, memoryview)):
                path.write_bytes(state)
            else:
                import torch

                torch.save(state, path)
        if oof is not None:
            write_oof(tmp / OOF_FILE, oof)
        (tmp / META_FILE).write_text(text)
        # No fsync: this guards against failures of the writer, not of the machine; Tune copies
        # the directory into its storage afterwards, and promotion uploads it to MLflow.
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    """A checkpoint's meta.json, checked: the format this code writes, and the keys every reader needs."""
    directory = Path(directory)
    path = directory / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # missing, unreadable, not JSON (or not UTF-8)
        raise CheckpointError(f"{directory}: not a CV checkpoint ({META_FILE}: {e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory}: checkpoint format {meta.get('format')!r}, expected {FORMAT}")
    for key in REQUIRED:
        if key not in meta:
            raise CheckpointError(f"{path}: no {key!r}")
    folds = meta["folds"]
    if not isinstance(folds, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in folds):
        raise CheckpointError(f"{path}: 'folds' must be a list of fold numbers, got {folds!r}")
    return meta


def read_checkpoint(
    directory: str | Path, folds: Iterable[int] | None = None, *, load: bool = True
) -> tuple[dict[str, Any], dict[int, Any]]:
    """(meta, {fold: state}) of a checkpoint directory, for `folds` (default: every fold meta lists).

    load=True: state dicts (torch.load, weights_only). load=False: each fold file's bytes, for a
    process without torch (the Tune trial, whose fold workers load them: `state_from_bytes`).
    A fold that meta.json does not list, or whose file is missing or unreadable, is a
    `CheckpointError` naming the fold and its file.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    listed = list(meta["folds"])
    want = listed if folds is None else sorted({int(k) for k in folds})
    unlisted = [k for k in want if k not in listed]
    if unlisted:
        raise CheckpointError(
            f"{directory}: checkpoint has no state for fold(s) {unlisted} ({META_FILE} lists folds {listed})"
        )
    absent = [k for k in want if not (directory / fold_file(k)).is_file()]
    if absent:
        names = ", ".join(fold_file(k) for k in absent)
        raise CheckpointError(
            f"{directory}: checkpoint has no state for fold(s) {absent}: {names} missing "
            f"({META_FILE} lists folds {listed})"
        )
    read = load_state if load else _read_bytes
    return meta, {k: read(directory / fold_file(k)) for k in want}
