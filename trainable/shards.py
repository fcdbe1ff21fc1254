"""Parquet log-mel shards: one file per fold, written atomically, read into tensors without row loops.

A dataset is a directory or object-store prefix (local path, ``file://``, ``s3://``, ``gs://``):

    fold-1.parquet ... fold-5.parquet   metadata columns + ``logmel`` (fixed-size binary per clip)
    _manifest.json                      written last: files, rows, fingerprint, params

Each shard's Parquet schema metadata (key ``esc50``) holds the feature parameters, the fingerprint of
the audio and parameters, the storage dtype and, for ``uint8``, the dataset's dB scale and offset.
A dataset without ``_manifest.json`` is unfinished and is never read.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from trainable.errors import UserError
from trainable.model.features import FeatureParams
from trainable.storage import atomic_put, atomic_write, join, resolve, temp_name

FORMAT = 1
META_KEY = b"esc50"
MANIFEST = "_manifest.json"
SPEC_COLUMN = "logmel"
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}


class ShardError(UserError):
    """A dataset that is missing, unfinished, corrupt, or computed with other feature parameters."""


def shard_name(fold: int) -> str:
    return f"fold-{int(fold)}.parquet"


def default_location(params: FeatureParams) -> str:
    """Where `esc50 prepare` writes, and a search reads, shards of `params` when not told: one
    directory per set of feature parameters."""
    return posixpath.join("data", "shards", params.digest())


def read_manifest(uri: str) -> dict[str, Any] | None:
    """The dataset's manifest, or None when there is none (not prepared, or unfinished)."""
    fs, root = resolve(uri)
    path = join(root, MANIFEST)
    try:
        with fs.open_input_stream(path) as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raise ShardError(f"{uri}/{MANIFEST}: cannot read: {e}") from None
    try:
        manifest = json.loads(raw)
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError(f"unsupported format {manifest.get('format')!r}")
        return manifest
    except (ValueError, AttributeError) as e:
        raise ShardError(f"{uri}/{MANIFEST}: corrupt manifest: {e}") from None


# ---- storage encodings -----------------------------------------------------------------------
def quantization(spec: np.ndarray) -> dict[str, float]:
    """Per-dataset scale/offset mapping the dB range of `spec` onto 0..255."""
    lo, hi = float(spec.min()), float(spec.max())
    return {"offset": lo, "scale": (hi - lo) / 255.0 if hi > lo else 1.0}


def encode(spec: np.ndarray, dtype: str, quant: Mapping[str, float] | None = None) -> np.ndarray:
    """(N, mels, frames) float dB -> the storage dtype (C-contiguous)."""
    if dtype == "uint8":
        assert quant is not None, "uint8 storage needs a scale/offset"
        q = np.rint((spec - quant["offset"]) / quant["scale"])
        return np.clip(q, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(spec, dtype=NP_DTYPES[dtype])


def _binary_column(stored: np.ndarray) -> pa.FixedSizeBinaryArray:
    width = int(np.prod(stored.shape[1:])) * stored.itemsize
    buf = pa.py_buffer(np.ascontiguousarray(stored))  # zero-copy: the column is the array's bytes
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(stored), [None, buf])


# ---- writing ---------------------------------------------------------------------------------
def write_dataset(
    uri: str,
    columns: Mapping[str, Sequence[Any] | np.ndarray],
    spec: np.ndarray,
    params: FeatureParams,
    classes: Sequence[str],
    info: Mapping[str, Any],
) -> int:
    """Write one shard per fold and then the manifest; returns the bytes written.

    `columns` are the metadata columns (must include ``fold`` and ``target``), one entry per clip,
    aligned with `spec` (N, n_mels, n_frames) float32 dB. `info` (fingerprint, sources) goes into
    every shard's metadata and the manifest. An existing manifest is removed first. Locally every
    shard is written under a temp name and renamed into place only when all are complete; on an
    object store each shard is one put, which appears whole or not at all. The manifest comes last,
    so a failure leaves no partial shard and no manifest.
    """
    if spec.shape[1:] != params.shape:
        raise ValueError(f"spectrogram shape {spec.shape[1:]} != params shape {params.shape}")
    fs, root = resolve(uri)
    fs.create_dir(root, recursive=True)
    quant = quantization(spec) if params.storage_dtype == "uint8" else None
    stored = encode(spec, params.storage_dtype, quant)
    folds = np.asarray(columns["fold"], dtype=np.int64)
    base_meta = {
        "format": FORMAT,
        "params": params.to_dict(),
        "shape": list(params.shape),
        "storage_dtype": params.storage_dtype,
        "quant": quant,
        "classes": list(classes),
        **info,
    }
    table_columns = {k: _column(v) for k, v in columns.items()}
    # The old manifest goes first: from here on the directory is an unfinished dataset.
    if fs.get_file_info(join(root, MANIFEST)).type != pafs.FileType.NotFound:
        fs.delete_file(join(root, MANIFEST))
    direct = atomic_put(fs)
    staged: list[tuple[str, str, int, int]] = []  # (temp, final, fold, rows)
    try:
        for fold in sorted(set(folds.tolist())):
            idx = np.flatnonzero(folds == fold)
            arrays = {k: col.take(pa.array(idx)) for k, col in table_columns.items()}
            arrays[SPEC_COLUMN] = _binary_column(stored[idx])
            meta = json.dumps({**base_meta, "fold": fold}).encode()
            table = pa.table(arrays).replace_schema_metadata({META_KEY: meta})
            final = join(root, shard_name(fold))
            tmp = final if direct else temp_name(final)
            staged.append((tmp, final, fold, len(idx)))
            _write_parquet(fs, tmp, table)
        for tmp, final, _, _ in staged:
            if tmp != final:
                fs.move(tmp, final)
    except BaseException:
        for tmp, final, _, _ in staged:
            if tmp != final:
                try:
                    fs.delete_file(tmp)
                except OSError:
                    pass
        raise
    files = {str(fold): {"file": shard_name(fold), "rows": rows} for _, _, fold, rows in staged}
    total = 0
    for entry in files.values():
        entry["bytes"] = fs.get_file_info(join(root, entry["file"])).size
        total += entry["bytes"]
    manifest = {**base_meta, "files": files, "n_clips": int(len(folds)), "bytes": total}
    atomic_write(fs, join(root, MANIFEST), lambda out: out.write(json.dumps(manifest, indent=1).encode()))
    return total


def _column(values: Sequence[Any] | np.ndarray) -> pa.Array:
    return values if isinstance(values, pa.Array) else pa.array(values)


def _write_parquet(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    # The spectrogram column is dense numbers: dictionary encoding only wastes time on it.
    meta_cols = [c for c in table.column_names if c != SPEC_COLUMN]
    with fs.open_output_stream(path) as out:
        pq.write_table(
            table,
            out,
            compression="zstd",
            compression_level=1,
            use_dictionary=meta_cols,
            write_statistics=meta_cols,
        )


# ---- reading ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FoldData:
    """Clips of some folds, ready for training: ``x`` (N, 1, n_mels, n_frames) float32 dB."""

    x: torch.Tensor
    y: torch.Tensor  # (N,) int64 class index (the `target` column)
    fold: torch.Tensor  # (N,) int64 official fold, 1..5
    params: FeatureParams
    classes: tuple[str, ...]  # category name per target index
    filenames: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)  # fingerprint and sources from the manifest

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def select(self, folds: Iterable[int]) -> FoldData:
        """The clips of `folds` (one index operation per tensor)."""
        mask = torch.isin(self.fold, torch.as_tensor(list(folds), dtype=torch.int64))
        idx = torch.nonzero(mask).squeeze(1)
        names = tuple(self.filenames[i] for i in idx.tolist()) if self.filenames else ()
        return FoldData(self.x[idx], self.y[idx], self.fold[idx], self.params, self.classes, names, self.info)


def load_shards(
    uri: str, folds: Iterable[int] | None = None, expect: FeatureParams | None = None
) -> FoldData:
    """Load `folds` (default: all) of a prepared dataset into one contiguous float32 tensor.

    Raises ShardError naming the dataset or file when it is unfinished, corrupt, or when its
    feature parameters differ from `expect` (listing every difference).
    """
    manifest = read_manifest(uri)
    if manifest is None:
        raise ShardError(
            f"{uri}: no {MANIFEST}: not a prepared dataset, or its preparation did not finish "
            "(run `esc50 prepare`)"
        )
    try:
        params = FeatureParams.from_dict(manifest["params"])
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{uri}/{MANIFEST}: bad feature parameters: {e}") from None
    if expect is not None:
        diff = expect.mismatch(params)
        if diff:
            raise ShardError(
                f"{uri}: shards were computed with other feature parameters than expected: " + "; ".join(diff)
            )
    available = sorted(int(k) for k in manifest["files"])
    wanted = available if folds is None else sorted({int(f) for f in folds})
    missing = [f for f in wanted if f not in available]
    if missing:
        raise ShardError(f"{uri}: no shard for fold(s) {missing}; the dataset has folds {available}")

    fs, root = resolve(uri)
    tables = [_read_shard(fs, root, uri, manifest, f, params) for f in wanted]
    n = sum(t.num_rows for t, _ in tables)
    x = torch.empty((n, 1, *params.shape), dtype=torch.float32)
    flat = x.view(n, -1).numpy()
    start = 0
    targets, fold_ids, names = [], [], []
    for table, meta in tables:
        rows = table.num_rows
        _decode_into(flat[start : start + rows], table.column(SPEC_COLUMN), meta)
        targets.append(table.column("target").to_numpy())
        fold_ids.append(table.column("fold").to_numpy())
        names.extend(table.column("filename").to_pylist())
        start += rows
    info = {k: manifest.get(k) for k in ("fingerprint", "audio_sha256", "archive_sha256", "source")}
    return FoldData(
        x=x,
        y=torch.from_numpy(np.concatenate(targets).astype(np.int64)),
        fold=torch.from_numpy(np.concatenate(fold_ids).astype(np.int64)),
        params=params,
        classes=tuple(manifest["classes"]),
        filenames=tuple(names),
        info=info,
    )


def _read_shard(
    fs: pafs.FileSystem, root: str, uri: str, manifest: dict[str, Any], fold: int, params: FeatureParams
) -> tuple[pa.Table, dict[str, Any]]:
    entry = manifest["files"][str(fold)]
    path = join(root, entry["file"])
    where = f"{uri.rstrip('/')}/{entry['file']}"
    try:
        with fs.open_input_file(path) as f:
            table = pq.read_table(f)
    except FileNotFoundError:
        raise ShardError(f"{where}: shard file is missing") from None
    except (pa.ArrowException, OSError) as e:
        raise ShardError(f"{where}: not a readable Parquet shard: {e}") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ShardError(f"{where}: no esc50 metadata in the Parquet schema (not written by esc50 prepare)")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise ShardError(f"{where}: corrupt esc50 metadata: {e}") from None
    problems = []
    if meta.get("fingerprint") != manifest.get("fingerprint"):
        problems.append("fingerprint differs from the manifest (shard from another preparation)")
    if meta.get("params") != manifest["params"]:
        problems.append("feature parameters differ from the manifest")
    if meta.get("fold") != fold:
        problems.append(f"holds fold {meta.get('fold')!r}, expected {fold}")
    if table.num_rows != entry.get("rows"):
        problems.append(f"has {table.num_rows} rows, the manifest says {entry.get('rows')}")
    for col in ("filename", "fold", "target", SPEC_COLUMN):
        if col not in table.column_names:
            problems.append(f"no column {col!r}")
    if not problems:
        dtype = NP_DTYPES.get(meta.get("storage_dtype"))
        want_width = int(np.prod(params.shape)) * (dtype().itemsize if dtype else 0)
        typ = table.schema.field(SPEC_COLUMN).type
        if dtype is None:
            problems.append(f"unknown storage dtype {meta.get('storage_dtype')!r}")
        elif not pa.types.is_fixed_size_binary(typ) or typ.byte_width != want_width:
            problems.append(f"column {SPEC_COLUMN!r} is {typ}, expected fixed_size_binary[{want_width}]")
        elif table.column(SPEC_COLUMN).null_count:
            problems.append(f"column {SPEC_COLUMN!r} has missing values")
        elif meta.get("storage_dtype") == "uint8" and not meta.get("quant"):
            problems.append("uint8 shard without scale/offset")
    if problems:
        raise ShardError(f"{where}: " + "; ".join(problems))
    return table, meta


def _decode_into(out: np.ndarray, column: pa.ChunkedArray, meta: dict[str, Any]) -> None:
    """Fixed-size binary chunks -> rows of `out` (float32), one vectorized pass per chunk."""
    dtype = NP_DTYPES[meta["storage_dtype"]]
    per_row = out.shape[1]
    start = 0
    for chunk in column.chunks:
        rows = len(chunk)
        buf = chunk.buffers()[1]
        view = np.frombuffer(
            buf, dtype=dtype, count=rows * per_row, offset=chunk.offset * chunk.type.byte_width
        )
        dst = out[start : start + rows]
        if dtype is np.uint8:
            q = meta["quant"]
            np.multiply(view.reshape(rows, per_row), np.float32(q["scale"]), out=dst, dtype=np.float32)
            dst += np.float32(q["offset"])
        else:
            dst[...] = view.reshape(rows, per_row)
        start += rows
