"""A search's folder in --storage, beside Tune's own state: what is saved there when it starts
(its options, the shards it trains on, a user's space file), read back by `--resume NAME`, and the
checkpoints kept there. Every location is a path or URI (trainable/storage.py).
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

from search.errors import UserError
from search.options import DEFAULT_STORAGE, SearchOptions, absolute
from search.store import ENDED, OPTIONS_FILE
from trainable import storage
from trainable.errors import error_line

SPACE_FILE = "esc50_space.py"  # a user's space, as it was when the search started
DATA_FILE = "esc50_data.json"  # the shards a search started with: fingerprint, features, clips
TUNE_STATE = "tuner.pkl"  # Tune's: the search started


def experiment_dir(storage_uri: str, name: str) -> str:
    """Tune's experiment directory of search `name` (a path or URI)."""
    if "://" in storage_uri:
        return posixpath.join(storage_uri.rstrip("/"), name)
    return os.path.join(storage_uri, name)


def _file(storage_uri: str, name: str, file: str) -> str:
    return posixpath.join(experiment_dir(storage_uri, name), file)


def has(storage_uri: str, name: str, file: str) -> bool:
    return storage.exists(_file(storage_uri, name, file))


def check_storage(storage_uri: str) -> None:
    """Create --storage if needed and write a probe file there; UserError naming the option."""
    try:
        storage.resolve(storage_uri)
    except storage.LocationError as e:
        raise UserError(f"--storage {e}") from None
    try:
        storage.probe_writable(storage_uri)
    except Exception as e:  # OSError, ArrowInvalid, permission errors
        raise UserError(f"--storage {storage_uri}: cannot write there: {error_line(e)}") from None


def save_start(opts: SearchOptions, space: Any, shards: dict[str, Any]) -> None:
    """What a new search leaves beside Tune's results: its options, its shards' record and, for a
    user's space file, that file's text."""
    storage.write_text(_file(opts.storage, opts.name, OPTIONS_FILE), opts.to_json())
    storage.write_text(
        _file(opts.storage, opts.name, DATA_FILE), json.dumps(shards, indent=1, sort_keys=True)
    )
    if not space.builtin:
        storage.write_text(_file(opts.storage, opts.name, SPACE_FILE), space.source())


def saved_options(storage_uri: str, name: str) -> SearchOptions:
    """The options a search was started with (for --resume NAME)."""
    storage_uri = absolute(storage_uri)
    if not has(storage_uri, name, OPTIONS_FILE):
        raise UserError(
            f"--resume {name}: no search {name!r} in {storage_uri} (no {OPTIONS_FILE}); check --storage"
        )
    if not has(storage_uri, name, TUNE_STATE):
        raise UserError(
            f"--resume {name}: the search never started in {storage_uri} (no Tune state): start it again"
        )
    return SearchOptions.from_json(storage.read_text(_file(storage_uri, name, OPTIONS_FILE)))


def resume_options(given: SearchOptions) -> tuple[SearchOptions, Any]:
    """The saved options and space of the search to resume (`given`: name, storage, address, verbose)."""
    from spaces import load_space
    from spaces.registry import Space

    if not given.name:
        raise UserError("--resume needs the search's name")
    storage_uri = absolute(given.storage or DEFAULT_STORAGE)
    opts = saved_options(storage_uri, given.name)
    opts.storage = storage_uri  # the experiment may have moved with its storage
    if given.address is not None:
        opts.address = given.address or None
    opts.verbose = given.verbose
    if has(storage_uri, opts.name, SPACE_FILE):
        code = storage.read_text(_file(storage_uri, opts.name, SPACE_FILE))
        path, func = (opts.space_label or "space.py:space").rsplit(":", 1)
        return opts, Space(opts.space, func, path, code, opts.overrides())
    return opts, load_space(opts.space, opts.overrides())


def check_new(opts: SearchOptions) -> None:
    if has(opts.storage, opts.name, TUNE_STATE):
        raise UserError(
            f"--name {opts.name}: a search of that name exists in {opts.storage}; "
            f"continue it with --resume {opts.name}, or choose another --name"
        )


def check_shards(opts: SearchOptions) -> None:
    """The shards are a prepared dataset holding the folds asked for; UserError naming the option."""
    from trainable.shards import read_manifest

    try:
        manifest = read_manifest(opts.shards)
    except UserError as e:
        raise UserError(f"--shards {opts.shards}: {e}") from None
    if manifest is None:
        raise UserError(
            f"--shards {opts.shards}: not a prepared dataset (no _manifest.json): run `esc50 prepare` first"
        )
    have = {int(k) for k in manifest.get("files", {})}
    missing = [f for f in opts.folds or () if f not in have]
    if missing:
        raise UserError(
            f"--folds: the shards at {opts.shards} have no fold(s) {missing} (they have {sorted(have)})"
        )


def shards_record(opts: SearchOptions, resume: bool, force: bool) -> dict[str, Any]:
    """The shards' {shards, fingerprint, features, n_clips}; on resume, checked against the record
    the search started with (DATA_FILE)."""
    from search import provenance

    fingerprint, features, n_clips = provenance.manifest_data(opts.shards)
    now = {"shards": opts.shards, "fingerprint": fingerprint, "features": features, "n_clips": n_clips}
    if resume and has(opts.storage, opts.name, DATA_FILE):
        then = json.loads(storage.read_text(_file(opts.storage, opts.name, DATA_FILE)))
        if then.get("fingerprint") != fingerprint and not force:
            raise UserError(
                f"--resume {opts.name}: the shards at {opts.shards} have fingerprint {fingerprint}, but the "
                f"search started with {then.get('fingerprint')} (other audio or feature parameters), so "
                "its trials would not be comparable; restore those shards, or pass --force to go on anyway"
            )
    return now


# ---- checkpoints on object storage -------------------------------------------------------------
# Tune deletes a trial's older checkpoints (num_to_keep) as soon as a newer one is registered, but
# uploads its own state (which names each trial's latest checkpoint) to object storage later and
# asynchronously. A driver killed in between leaves a state that names a deleted checkpoint, and
# the resumed trial fails ("does not exist on storage anymore"): found with a search killed on an
# S3 API (tests/test_object_storage.py). On a local disk the state is written in place at once.
# So on object storage no checkpoint is deleted while the search runs; when fit() returns (Tune's
# state synced), every ended trial keeps only its latest one.


def keep_checkpoints(storage_uri: str) -> int | None:
    """Tune's num_to_keep: 1 on a local disk; None (all, until `prune_checkpoints`) on object storage."""
    return 1 if "://" not in storage_uri or storage_uri.startswith("file://") else None


def prune_checkpoints(results: Any, rows: list[Any]) -> int:
    """Delete every checkpoint of an ended trial but its latest; returns how many went. A failure
    is a warning: the search's result stands, the storage only keeps more than it needs."""
    import pyarrow.fs as pafs

    ended = {r.trial_id for r in rows if r.status in ENDED}
    deleted = 0
    for result in results:
        ckpt = result.checkpoint
        tid = (
            posixpath.basename(posixpath.dirname(ckpt.path.rstrip("/"))).removeprefix("trial_")
            if ckpt
            else ""
        )
        if ckpt is None or tid not in ended:
            continue
        fs, latest = ckpt.filesystem, ckpt.path.rstrip("/")
        try:
            for info in fs.get_file_info(pafs.FileSelector(posixpath.dirname(latest))):
                name = posixpath.basename(info.path.rstrip("/"))
                if info.type == pafs.FileType.Directory and name.startswith("checkpoint_"):
                    if info.path.rstrip("/") != latest:
                        fs.delete_dir(info.path)
                        deleted += 1
        except OSError as e:
            print(f"warning: could not delete old checkpoints of trial {tid}: {e}", flush=True)
    return deleted
