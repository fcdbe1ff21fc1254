"""`esc50 prepare`: ESC-50 audio -> one Parquet log-mel shard per fold.

validate metadata (search/data/metadata.py) -> decode, mono, resample, 5 s (trainable/audio.py) -> LogMel in
batches on a small process pool -> atomic shards + manifest (trainable/shards.py).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchaudio

from search.data.metadata import Metadata, read_metadata
from search.data.source import OFFICIAL_CLIPS, OFFICIAL_URL, resolve_source
from search.errors import UserError
from search.progress import Progress
from trainable import shards, storage
from trainable.audio import log_mel_files
from trainable.model.features import FeatureParams, LogMel
from trainable.protocol import FOLDS

# Part of the fingerprint: bump when the way audio becomes features changes.
CODE_VERSION = f"prepare/1 torchaudio/{torchaudio.__version__}"


@dataclass(frozen=True)
class PrepareResult:
    out: str
    n_clips: int
    seconds: float
    bytes: int
    skipped: bool
    folds: int = 0
    classes: int = 0
    shape: tuple[int, int] = (0, 0)
    storage_dtype: str = ""
    fingerprint: str = ""

    def summary(self) -> str:
        if self.skipped:
            return f"{self.out}: up to date ({self.n_clips} clips, fingerprint {self.fingerprint[:12]})"
        return (
            f"{self.out}: {self.n_clips} clips, {self.folds} folds, {self.classes} classes, "
            f"shape {self.shape[0]}x{self.shape[1]} {self.storage_dtype}, "
            f"{self.bytes / 1e6:.1f} MB ({self.bytes / max(self.n_clips, 1) / 1e3:.1f} kB/clip), "
            f"{self.seconds:.1f} s"
        )


def audio_digest(meta: Metadata) -> str:
    """SHA-256 over the metadata file and every clip's bytes (in CSV order): 2000 clips take ~0.2 s."""
    h = hashlib.sha256(meta.csv_path.read_bytes())
    for name, path in zip(meta.columns["filename"], meta.audio, strict=True):
        h.update(f"\0{name}\0{path.suffix}\0".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def fingerprint(audio_sha256: str, params: FeatureParams) -> str:
    blob = json.dumps(
        {"audio": audio_sha256, "params": params.to_dict(), "code": CODE_VERSION}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare(
    source: str | None,
    out: str | None,
    params: FeatureParams,
    workers: int = 2,
    force: bool = False,
    progress: bool = True,
) -> PrepareResult:
    """Prepare (or find up to date) the dataset at `out` from `source`.

    `source`: a local ESC-50 copy or an archive URL; None means $ESC50_SOURCE, else the official
    archive. `out`: a local path or URI; None means `data/shards/<params digest>`.
    """
    t0 = time.perf_counter()
    source = source or os.environ.get("ESC50_SOURCE") or OFFICIAL_URL
    src = resolve_source(source, progress=progress)
    meta = read_metadata(src.root)
    if src.official and len(meta) != OFFICIAL_CLIPS:
        raise UserError(f"{source}: the official archive must list {OFFICIAL_CLIPS} clips, found {len(meta)}")
    audio_sha = audio_digest(meta)
    fp = fingerprint(audio_sha, params)
    out = str(out or shards.default_location(params))

    existing = shards.read_manifest(out)
    if existing is not None:
        if existing.get("fingerprint") == fp and _intact(out, existing):
            result = _result(
                out, existing["n_clips"], existing["bytes"], True, len(existing["classes"]), params, fp, t0
            )
            if progress:
                print(result.summary(), file=sys.stderr)
            return result
        if not force and existing.get("fingerprint") != fp:
            raise UserError(
                f"{out} already holds a dataset {_difference(existing, params, audio_sha)}; "
                "use --force to replace it, or another --out"
            )
    _check_writable(out)

    spec = compute_features(list(meta.audio), params, workers=workers, progress=progress)
    info = {
        "fingerprint": fp,
        "audio_sha256": audio_sha,
        "archive_sha256": src.archive_sha256,
        "source": src.description,
        "code_version": CODE_VERSION,
    }
    nbytes = shards.write_dataset(out, meta.columns, spec, params, meta.classes, info)
    result = _result(out, len(meta), nbytes, False, len(meta.classes), params, fp, t0)
    if progress:
        print(result.summary(), file=sys.stderr)
    return result


def _result(
    out: str,
    n_clips: int,
    nbytes: int,
    skipped: bool,
    classes: int,
    params: FeatureParams,
    fp: str,
    t0: float,
) -> PrepareResult:
    return PrepareResult(
        out=out,
        n_clips=int(n_clips),
        seconds=time.perf_counter() - t0,
        bytes=int(nbytes),
        skipped=skipped,
        folds=len(FOLDS),
        classes=classes,
        shape=params.shape,
        storage_dtype=params.storage_dtype,
        fingerprint=fp,
    )


def _difference(manifest: dict, params: FeatureParams, audio_sha: str) -> str:
    try:
        old = FeatureParams.from_dict(manifest["params"])
    except (KeyError, TypeError, ValueError):
        return "of an unknown kind"
    diff = params.mismatch(old)
    if old.storage_dtype != params.storage_dtype:
        diff.append(f"storage_dtype: {params.storage_dtype!r} != {old.storage_dtype!r}")
    if diff:
        return "with other feature parameters (" + "; ".join(diff) + ")"
    if manifest.get("audio_sha256") != audio_sha:
        return "prepared from other audio"
    return "prepared by another version of this program"


def _intact(out: str, manifest: dict) -> bool:
    """Every shard the manifest lists is there with its size (a cheap listing, no reads)."""
    fs, root = storage.resolve(out)
    infos = fs.get_file_info([f"{root}/{e['file']}" for e in manifest["files"].values()])
    return all(i.size == e.get("bytes") for i, e in zip(infos, manifest["files"].values(), strict=True))


def _check_writable(out: str) -> None:
    """Fail before minutes of decoding when the output location cannot be written."""
    try:
        storage.probe_writable(out)
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise UserError(f"{out}: cannot write the output location: {e}") from None


# ---- features on a process pool --------------------------------------------------------------
_WORKER: dict[str, LogMel] = {}


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core; threads inside would only fight over them


def _chunk_features(paths: list[str], params_json: str) -> np.ndarray:
    logmel = _WORKER.get(params_json)
    if logmel is None:
        logmel = _WORKER[params_json] = LogMel(FeatureParams.from_json(params_json))
    return log_mel_files(paths, logmel.params, logmel)


def compute_features(
    paths: list[Path], params: FeatureParams, workers: int = 2, progress: bool = True, chunk: int = 0
) -> np.ndarray:
    """All clips -> (N, n_mels, n_frames) float32 dB, in chunks over `workers` processes."""
    n = len(paths)
    out = np.empty((n, *params.shape), dtype=np.float32)
    workers = max(1, min(int(workers), n))
    chunk = chunk or max(8, min(64, -(-n // (workers * 8))))
    starts = list(range(0, n, chunk))
    bar = Progress("decoding + log-mel", n, " clips", enabled=progress)
    key = params.to_json()
    names = [str(p) for p in paths]
    if workers == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # per-clip ops are small: extra threads only spin (5x slower under load)
        try:
            for s in starts:
                out[s : s + chunk] = _chunk_features(names[s : s + chunk], key)
                bar.update(min(chunk, n - s))
        finally:
            torch.set_num_threads(threads)
            bar.close()
        return out
    # No plain fork: the parent may hold Ray/gRPC/OpenMP threads. The fork server imports torch
    # once and forks clean workers from it, so a pool starts in ~1 s, and the next one at once.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker)
    try:
        futures = {pool.submit(_chunk_features, names[s : s + chunk], key): s for s in starts}
        for fut in cf.as_completed(futures):
            s = futures[fut]
            block = fut.result()
            out[s : s + len(block)] = block
            bar.update(len(block))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)
    return out
