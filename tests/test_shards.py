"""trainable/shards.py: write/read round trip, storage dtypes, and clear errors on bad datasets."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from trainable.model.features import FeatureParams
from trainable.shards import MANIFEST, ShardError, load_shards, read_manifest, shard_name, write_dataset

P = FeatureParams(sample_rate=8000, n_fft=256, hop_length=256, n_mels=16)


def synthetic(n=20, params=P, seed=0):
    rng = np.random.default_rng(seed)
    spec = rng.uniform(-80, 20, size=(n, *params.shape)).astype(np.float32)
    columns = {
        "filename": [f"{i % 5 + 1}-{i}-A-{i % 3}.wav" for i in range(n)],
        "fold": np.arange(n) % 5 + 1,
        "target": np.arange(n) % 3,
        "category": [("a", "b", "c")[i % 3] for i in range(n)],
    }
    return columns, spec


def write(tmp_path, dtype="float32", n=20):
    params = FeatureParams(**{**P.to_dict(), "storage_dtype": dtype})
    columns, spec = synthetic(n, params)
    uri = str(tmp_path / f"ds-{dtype}")
    write_dataset(uri, columns, spec, params, ("a", "b", "c"), {"fingerprint": "f" * 64})
    return uri, columns, spec


@pytest.mark.parametrize("dtype,atol", [("float32", 0.0), ("float16", 0.02), ("uint8", 100 / 255 / 2 + 1e-4)])
def test_round_trip_per_storage_dtype(tmp_path, dtype, atol):
    uri, columns, spec = write(tmp_path, dtype)
    data = load_shards(uri, expect=P)
    order = np.argsort(columns["fold"], kind="stable")  # shards come back fold by fold
    assert data.x.shape == (20, 1, *P.shape) and data.x.dtype == torch.float32 and data.x.is_contiguous()
    np.testing.assert_allclose(
        data.x[:, 0].numpy(), spec[order], atol=atol, rtol=1e-3 if dtype == "float16" else 0
    )
    assert data.y.tolist() == columns["target"][order].tolist()
    assert data.fold.tolist() == sorted(columns["fold"].tolist())
    assert data.filenames == tuple(np.asarray(columns["filename"])[order])
    assert data.classes == ("a", "b", "c") and data.num_classes == 3
    assert data.params.storage_dtype == dtype and data.info["fingerprint"] == "f" * 64


def test_uint8_is_a_quarter_of_float32(tmp_path):
    sizes = {d: read_manifest(write(tmp_path, d, n=50)[0])["bytes"] for d in ("float32", "float16", "uint8")}
    assert sizes["uint8"] < sizes["float16"] < sizes["float32"]
    assert sizes["uint8"] < 0.35 * sizes["float32"]


def test_subset_of_folds_and_select(tmp_path):
    uri, _, _ = write(tmp_path)
    sub = load_shards(uri, folds=[4, 2])
    assert sorted(set(sub.fold.tolist())) == [2, 4] and len(sub) == 8
    full = load_shards(uri)
    torch.testing.assert_close(full.select([2, 4]).x, sub.x)
    assert full.select([2, 4]).filenames == sub.filenames


def test_file_uri(tmp_path):
    uri, _, _ = write(tmp_path)
    assert len(load_shards("file://" + uri)) == 20


def test_many_row_groups_decode_like_one(tmp_path):
    uri, _, spec = write(tmp_path)
    path = f"{uri}/{shard_name(1)}"
    table = pq.read_table(path)
    pq.write_table(table, path, row_group_size=1)  # 4 one-row chunks, same metadata
    assert pq.ParquetFile(path).num_row_groups == 4
    np.testing.assert_array_equal(load_shards(uri, folds=[1]).x[:, 0].numpy(), spec[0::5])


def test_expect_mismatch_lists_every_parameter(tmp_path):
    uri, _, _ = write(tmp_path)
    other = FeatureParams(sample_rate=16000, n_fft=256, hop_length=256, n_mels=32)
    with pytest.raises(
        ShardError, match=r"other feature parameters.*sample_rate: 16000 != 8000.*n_mels: 32 != 16"
    ):
        load_shards(uri, expect=other)
    # the storage dtype is not a mismatch: it changes precision, not the features
    load_shards(uri, expect=FeatureParams(**{**P.to_dict(), "storage_dtype": "uint8"}))


def test_not_prepared_or_unfinished(tmp_path):
    with pytest.raises(ShardError, match=r"no _manifest\.json"):
        load_shards(str(tmp_path / "nowhere"))
    uri, _, _ = write(tmp_path)
    (tmp_path / "ds-float32" / MANIFEST).unlink()
    with pytest.raises(ShardError, match=r"ds-float32: no _manifest\.json: .* did not finish"):
        load_shards(uri)


def test_missing_fold(tmp_path):
    uri, _, _ = write(tmp_path)
    with pytest.raises(ShardError, match=r"no shard for fold\(s\) \[6\]"):
        load_shards(uri, folds=[1, 6])
    (tmp_path / "ds-float32" / shard_name(3)).unlink()
    with pytest.raises(ShardError, match=r"fold-3\.parquet: shard file is missing"):
        load_shards(uri)


def test_truncated_parquet_names_the_file(tmp_path):
    uri, _, _ = write(tmp_path)
    path = tmp_path / "ds-float32" / shard_name(2)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ShardError, match=r"fold-2\.parquet: not a readable Parquet shard"):
        load_shards(uri)
    load_shards(uri, folds=[1, 3])  # the other folds still load


def test_parquet_without_metadata(tmp_path):
    uri, _, _ = write(tmp_path)
    path = tmp_path / "ds-float32" / shard_name(1)
    pq.write_table(pq.read_table(path).replace_schema_metadata(None), path)
    with pytest.raises(ShardError, match=r"fold-1\.parquet: no esc50 metadata"):
        load_shards(uri)


def test_wrong_shape(tmp_path):
    uri, _, _ = write(tmp_path)
    manifest = read_manifest(uri)
    manifest["params"]["n_mels"] = 8  # manifest and shard metadata both say 8 mels; data has 16
    (tmp_path / "ds-float32" / MANIFEST).write_text(json.dumps(manifest))
    path = tmp_path / "ds-float32" / shard_name(1)
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"esc50"])
    meta["params"]["n_mels"] = 8
    pq.write_table(table.replace_schema_metadata({b"esc50": json.dumps(meta)}), path)
    with pytest.raises(
        ShardError,
        match=r"fold-1\.parquet: column 'logmel' is fixed_size_binary\[10048\], expected fixed_size_binary\[5024\]",
    ):
        load_shards(uri, folds=[1])


def test_shard_from_another_preparation(tmp_path):
    a, _, _ = write(tmp_path / "a")
    b = str(tmp_path / "b")
    columns, spec = synthetic(20, P, seed=1)
    write_dataset(b, columns, spec, P, ("a", "b", "c"), {"fingerprint": "0" * 64})
    shutil.copy(f"{b}/{shard_name(4)}", f"{a}/{shard_name(4)}")
    with pytest.raises(ShardError, match=r"fold-4\.parquet: fingerprint differs from the manifest"):
        load_shards(a)


def test_corrupt_manifest(tmp_path):
    uri, _, _ = write(tmp_path)
    (tmp_path / "ds-float32" / MANIFEST).write_text("{not json")
    with pytest.raises(ShardError, match=r"_manifest\.json: corrupt manifest"):
        load_shards(uri)


def test_rewrite_replaces_and_leaves_no_temp_files(tmp_path):
    uri, _, _ = write(tmp_path)
    columns, spec = synthetic(20, P, seed=5)
    write_dataset(uri, columns, spec, P, ("a", "b", "c"), {"fingerprint": "e" * 64})
    assert sorted(p.name for p in (tmp_path / "ds-float32").iterdir()) == [MANIFEST] + [
        shard_name(f) for f in range(1, 6)
    ]
    assert load_shards(uri).info["fingerprint"] == "e" * 64
