"""The checkpoint layout (trainable/model/checkpoint.py): round trip with real fold states, errors that
name the file at fault, atomic writes, and that both writers (trainable, promotion) agree with it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainable.config import TrainConfig
from trainable.fold import FoldTrainer
from trainable.model import checkpoint as layout
from trainable.model.checkpoint import (
    FORMAT,
    META_FILE,
    CheckpointError,
    fold_file,
    read_checkpoint,
    read_meta,
    state_from_bytes,
    state_to_bytes,
    write_checkpoint,
)

N_MELS, FRAMES, CLASSES = 16, 24, 4
FOLDS = (1, 3)


def fold_state(fold: int, epochs: int = 1) -> dict:
    """A real FoldTrainer.state_dict() (smoke preset, tiny random data), trained `epochs` epochs."""
    g = torch.Generator().manual_seed(fold)
    x, y = torch.randn(24, N_MELS, FRAMES, generator=g), torch.arange(24) % CLASSES
    cfg = TrainConfig.preset("smoke", epochs=epochs, batch_size=8)
    trainer = FoldTrainer(cfg, x[:16], y[:16], x[16:], y[16:], fold=fold)  # 50 outputs, as ESC-50
    for _ in range(epochs):
        trainer.train_epoch()
    return trainer.state_dict()


@pytest.fixture(scope="module")
def states() -> dict[int, dict]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only spin against other processes
    try:
        return {k: fold_state(k) for k in FOLDS}
    finally:
        torch.set_num_threads(before)


def meta_for(states: dict[int, dict]) -> dict:
    state = next(iter(states.values()))
    return {
        "config": state["config"],
        "features": {"n_mels": N_MELS},
        "classes": [f"c{i}" for i in range(CLASSES)],
        "epoch": 1,
    }


def assert_same_state(a, b) -> None:
    """Equal nested state dicts: tensors by value, everything else by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    else:
        assert a == b


def test_round_trip_of_real_fold_states(tmp_path: Path, states: dict[int, dict]) -> None:
    # Fold 1 as bytes (as fold workers send it), fold 3 as a state dict (as promotion writes it).
    given = {1: state_to_bytes(states[1]), 3: states[3]}
    out = write_checkpoint(tmp_path / "ckpt", {**meta_for(states), "folds": [9]}, given)
    assert out == tmp_path / "ckpt"
    assert sorted(p.name for p in out.iterdir()) == ["fold_1.pt", "fold_3.pt", "meta.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left

    meta, loaded = read_checkpoint(out)
    # format and folds come from the writer (the given "folds" is overridden by the states')
    assert meta == {**meta_for(states), "format": FORMAT, "folds": [1, 3]}
    assert json.loads((out / META_FILE).read_text()) == meta
    assert list(loaded) == [1, 3]
    for k in FOLDS:
        assert_same_state(states[k], loaded[k])

    # bytes for a process without torch; the fold worker turns them back into the same state
    meta2, blobs = read_checkpoint(out, folds=[3], load=False)
    assert meta2 == meta and list(blobs) == [3] and isinstance(blobs[3], bytes)
    assert_same_state(states[3], state_from_bytes(blobs[3]))

    # a loaded state resumes training
    cfg = TrainConfig.from_dict(loaded[3]["config"])
    x = torch.randn(8, N_MELS, FRAMES)
    trainer = FoldTrainer(cfg, x, torch.arange(8) % CLASSES, x, torch.arange(8) % CLASSES, fold=3)
    trainer.load_state_dict(loaded[3])
    assert trainer.epoch == 1


def test_into_an_existing_empty_directory(tmp_path: Path, states: dict[int, dict]) -> None:
    (tmp_path / "empty").mkdir()
    write_checkpoint(tmp_path / "empty", meta_for(states), {1: states[1]})
    assert read_meta(tmp_path / "empty")["folds"] == [1]


def test_missing_fold_file_is_named(tmp_path: Path, states: dict[int, dict]) -> None:
    out = write_checkpoint(tmp_path / "ckpt", meta_for(states), states)
    (out / fold_file(3)).unlink()
    for load in (True, False):
        with pytest.raises(CheckpointError, match=r"no state for fold\(s\) \[3\]: fold_3\.pt missing"):
            read_checkpoint(out, load=load)
    assert list(read_checkpoint(out, folds=[1])[1]) == [1]  # the other fold still reads
    with pytest.raises(
        CheckpointError, match=r"no state for fold\(s\) \[2\] \(meta.json lists folds \[1, 3\]\)"
    ):
        read_checkpoint(out, folds=[1, 2])


def test_corrupt_fold_file_is_named(tmp_path: Path, states: dict[int, dict]) -> None:
    out = write_checkpoint(tmp_path / "ckpt", meta_for(states), states)
    path = out / fold_file(1)
    blob = path.read_bytes()
    for bad in (blob[: len(blob) // 2], b"not a torch file"):  # truncated, and not one at all
        path.write_bytes(bad)
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: not a readable fold state"):
            read_checkpoint(out)
    # As bytes it reads (no torch here); the fold worker that loads it names the file it came from.
    _, blobs = read_checkpoint(out, load=False)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: not a readable fold state"):
        state_from_bytes(blobs[1], str(path))
    # A checkpoint must not run code on load: a pickled object that is not plain data is refused.
    path.write_bytes(state_to_bytes({"model": torch.nn.Linear(2, 2)}))
    with pytest.raises(
        CheckpointError, match=rf"^{re.escape(str(path))}: not a readable fold state \(UnpicklingError"
    ):
        read_checkpoint(out)


@pytest.mark.parametrize(
    "text, message",
    [
        (None, r"not a CV checkpoint \(meta.json: .*No such file"),
        ("{not json", r"not a CV checkpoint \(meta.json: Expecting"),
        ("[1, 3]", r"meta.json: not a JSON object"),
        ('{"format": 99}', r"checkpoint format 99, expected 1"),
        ('{"format": 1, "config": {}, "features": {}, "folds": [1]}', r"meta.json: no 'classes'"),
        (
            '{"format": 1, "config": {}, "features": {}, "classes": [], "folds": "1,3"}',
            r"meta.json: 'folds' must be a list",
        ),
    ],
)
def test_bad_meta_is_named(tmp_path: Path, states: dict[int, dict], text: str | None, message: str) -> None:
    out = write_checkpoint(tmp_path / "ckpt", meta_for(states), states)
    if text is None:
        (out / META_FILE).unlink()
    else:
        (out / META_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(out)


def test_failure_midway_leaves_no_directory(
    tmp_path: Path, states: dict[int, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second fold file fails to write: neither the checkpoint nor its temporary directory remain."""
    written = []
    real = Path.write_bytes

    def failing_write_bytes(self: Path, data: bytes) -> int:
        if written:
            raise OSError(28, "No space left on device")
        written.append(self)
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", failing_write_bytes)
    blobs = {k: state_to_bytes(s) for k, s in states.items()}
    with pytest.raises(OSError, match="No space left"):
        write_checkpoint(tmp_path / "ckpt", meta_for(states), blobs)
    assert written and written[0].parent.name.startswith(".ckpt.tmp-")  # it got that far, in a temp dir
    assert list(tmp_path.iterdir()) == []


def test_written_under_a_temporary_name_then_renamed(
    tmp_path: Path, states: dict[int, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    renames = []
    real = os.replace

    def spy(src, dst):
        # At the rename the temp directory is complete and the target does not exist yet.
        renames.append(
            (Path(src), Path(dst), sorted(p.name for p in Path(src).iterdir()), Path(dst).exists())
        )
        return real(src, dst)

    monkeypatch.setattr(layout.os, "replace", spy)
    write_checkpoint(tmp_path / "ckpt", meta_for(states), states)
    [(src, dst, files, existed)] = renames
    assert src.parent == dst.parent == tmp_path and src.name.startswith(".ckpt.tmp-")
    assert dst == tmp_path / "ckpt" and not existed
    assert files == ["fold_1.pt", "fold_3.pt", "meta.json"]


def test_refuses_a_non_empty_directory_and_leaves_it_alone(tmp_path: Path, states: dict[int, dict]) -> None:
    old = write_checkpoint(tmp_path / "ckpt", meta_for(states), {1: states[1]})
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(FileExistsError, match="not an empty directory"):
        write_checkpoint(old, meta_for(states), states)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(ValueError, match="at least one fold"):
        write_checkpoint(tmp_path / "none", meta_for(states), {})
    assert not (tmp_path / "none").exists()


def test_trainable_and_promotion_share_the_layout(
    tmp_path: Path, states: dict[int, dict], tiny_params
) -> None:
    """What the Tune trainable writes, the promoted model reads; promotion's slim copy reads back too."""
    from trainable import cv
    from trainable.model import ensemble

    shared = cv.SharedData(
        arrays=[],
        features=tiny_params.to_dict(),  # 16 mels, as the fold states
        classes=tuple(f"c{i}" for i in range(CLASSES)),
        fingerprint="f",
        folds_present=(1, 2, 3, 4, 5),
        n_clips=40,
    )
    cfg = TrainConfig.from_dict(states[1]["config"])
    full = cv.write_checkpoint(
        tmp_path / "full", cfg, shared, {k: state_to_bytes(s) for k, s in states.items()}, 1
    )
    meta, blobs = cv.read_checkpoint(full)
    assert meta["folds"] == [1, 3] and set(blobs) == {1, 3}
    _, loaded = read_checkpoint(full)
    assert_same_state(states[1], loaded[1])

    meta, loaded = ensemble.read_checkpoint(full)
    ensemble.write_slim_checkpoint(tmp_path / "slim", meta, loaded)
    slim_meta, slim = ensemble.read_checkpoint(tmp_path / "slim")
    assert slim_meta == meta
    for k in FOLDS:
        assert_same_state(ensemble.slim_state(states[k]), slim[k])
    ens = ensemble.FoldEnsemble.from_checkpoint(tmp_path / "slim")
    assert ens.folds == FOLDS and ens.n_classes == CLASSES
    assert ens(torch.zeros(2, tiny_params.num_samples)).shape == (2, CLASSES)


def test_importing_the_layout_imports_neither_torch_nor_ray() -> None:
    """The Tune trial process writes and reads checkpoints without importing torch (seconds per trial)."""
    code = (
        "import sys, trainable.model.checkpoint\n"
        "assert 'torch' not in sys.modules and 'ray' not in sys.modules, sorted(sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_out_of_fold_file_round_trip_beside_the_fold_states(tmp_path: Path, states: dict[int, dict]) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    probs = {k: rng.dirichlet(np.ones(CLASSES), size=3) for k in FOLDS}
    rows = {1: [4, 0, 2], 3: [1, 5, 3]}  # interleaved rows of the search's data
    parts = [layout.oof_part(rows[k], k, [0, 1, 2], probs[k]) for k in FOLDS]
    oof = layout.merge_oof(parts)
    path = write_checkpoint(tmp_path / "ckpt", meta_for(states), states, oof=oof)
    assert sorted(p.name for p in path.iterdir()) == ["fold_1.pt", "fold_3.pt", META_FILE, layout.OOF_FILE]
    back = layout.read_oof(path)
    assert back["row"].tolist() == [0, 1, 2, 3, 4, 5]  # sorted by row: trials line up
    assert back["fold"].tolist() == [1, 3, 1, 3, 1, 3]
    assert back["label"].tolist() == [1, 0, 2, 2, 0, 1]
    assert {k: str(v.dtype) for k, v in back.items()} == layout.OOF_ARRAYS
    # pred is the argmax of the float32 probabilities, float16 probabilities close to them
    assert back["pred"][4] == probs[1][0].argmax() and back["pred"][5] == probs[3][1].argmax()
    np.testing.assert_allclose(back["probs"][4], probs[1][0], atol=1e-3)
    with pytest.raises(ValueError, match="more than one fold model"):
        layout.merge_oof([parts[0], parts[0]])
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(CheckpointError, match=r"bad\.npz: not readable out-of-fold"):
        layout.read_oof(tmp_path / "bad.npz")
    # a checkpoint without out-of-fold predictions (an epoch before the last) has no file
    assert not (write_checkpoint(tmp_path / "early", meta_for(states), states) / layout.OOF_FILE).exists()
