"""search/data/prepare.py and `esc50 prepare`: values, metadata round trip, idempotence, atomicity, errors."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from search.cli import main
from search.data import prepare as prep
from search.errors import UserError
from tests.fixtures.audio import copy_tree, read_rows
from tests.test_audio import reference_logmel
from trainable import shards
from trainable.audio import AudioError
from trainable.shards import MANIFEST, load_shards


def listing(uri) -> list[str]:
    return sorted(os.listdir(uri)) if os.path.isdir(uri) else []


@pytest.fixture(scope="module")
def float32_shards(esc50_tree, tiny_params, tmp_path_factory):
    params = dataclasses.replace(tiny_params, storage_dtype="float32")
    out = str(tmp_path_factory.mktemp("f32") / "ds")
    prep.prepare(str(esc50_tree), out, params, workers=1, progress=False)
    return out, params


def test_values_match_direct_torchaudio(esc50_tree, float32_shards):
    out, params = float32_shards
    data = load_shards(out, expect=params)
    audio = {p.stem: p for p in (esc50_tree / "audio").iterdir()}
    assert data.x.shape == (40, 1, 16, 157)
    for x, name in list(zip(data.x, data.filenames, strict=True))[:12]:  # all format/rate/channel mixes
        ref = reference_logmel(audio[name[:-4]], params).numpy()
        np.testing.assert_allclose(x[0].numpy(), ref, atol=1e-3, rtol=0)


def test_metadata_round_trip(esc50_tree, float32_shards):
    out, _ = float32_shards
    rows = read_rows(esc50_tree)
    table = pq.read_table([f"{out}/{shards.shard_name(f)}" for f in range(1, 6)][0])
    assert table.column_names == [
        "filename",
        "fold",
        "target",
        "category",
        "esc10",
        "src_file",
        "take",
        "logmel",
    ]
    back = []
    for f in range(1, 6):
        back += pq.read_table(f"{out}/{shards.shard_name(f)}", columns=table.column_names[:-1]).to_pylist()
    expected = [
        {**r, "fold": int(r["fold"]), "target": int(r["target"]), "esc10": r["esc10"] == "True"} for r in rows
    ]
    assert back == expected  # every column, every row, in CSV order within each fold
    meta = shards.read_manifest(out)
    assert meta["n_clips"] == 40 and meta["classes"] == ["low_hum", "mid_tone", "high_beep", "whistle"]
    assert len(meta["fingerprint"]) == 64 and meta["archive_sha256"] is None


def test_tiny_shards_fixture(tiny_shards, tiny_params):
    data = load_shards(tiny_shards, expect=tiny_params)
    assert data.x.shape == (40, 1, *tiny_params.shape) and data.params == tiny_params
    assert sorted(data.y.unique().tolist()) == [0, 1, 2, 3]
    assert np.bincount(data.fold.numpy()).tolist() == [0, 8, 8, 8, 8, 8]


def test_storage_dtypes_agree_and_two_workers_match_one(esc50_tree, tiny_params, float32_shards, tmp_path):
    ref = load_shards(float32_shards[0]).x
    f16 = dataclasses.replace(tiny_params, storage_dtype="float16")
    u8 = dataclasses.replace(tiny_params, storage_dtype="uint8")
    a = prep.prepare(str(esc50_tree), str(tmp_path / "f16"), f16, workers=2, progress=False)
    b = prep.prepare(str(esc50_tree), str(tmp_path / "u8"), u8, workers=1, progress=False)
    assert b.bytes < a.bytes
    np.testing.assert_allclose(load_shards(a.out).x, ref, atol=0.05, rtol=1e-3)
    scale = shards.read_manifest(b.out)["quant"]["scale"]
    np.testing.assert_allclose(load_shards(b.out).x, ref, atol=scale / 2 + 1e-4, rtol=0)


def test_idempotent(esc50_tree, tiny_params, tmp_path, capsys):
    out = str(tmp_path / "ds")
    first = prep.prepare(str(esc50_tree), out, tiny_params, workers=1, progress=True)
    assert not first.skipped and first.n_clips == 40 and first.folds == 5 and first.classes == 4
    assert "40 clips, 5 folds, 4 classes, shape 16x157 float16" in capsys.readouterr().err
    stamps = {n: os.stat(f"{out}/{n}").st_mtime_ns for n in listing(out)}
    again = prep.prepare(str(esc50_tree), out, tiny_params, workers=1, progress=True)
    assert again.skipped and again.n_clips == 40 and again.bytes == first.bytes
    assert "up to date" in capsys.readouterr().err
    assert {n: os.stat(f"{out}/{n}").st_mtime_ns for n in listing(out)} == stamps


def test_other_params_need_force_or_other_dir(esc50_tree, tiny_params, tmp_path):
    out = str(tmp_path / "ds")
    prep.prepare(str(esc50_tree), out, tiny_params, workers=1, progress=False)
    other = dataclasses.replace(tiny_params, n_mels=8)
    with pytest.raises(
        UserError, match=r"already holds a dataset with other feature parameters \(n_mels: 8 != 16\).*--force"
    ):
        prep.prepare(str(esc50_tree), out, other, workers=1, progress=False)
    assert load_shards(out).params == tiny_params  # untouched
    forced = prep.prepare(str(esc50_tree), out, other, workers=1, force=True, progress=False)
    assert not forced.skipped and load_shards(out, expect=other).x.shape[2] == 8


def test_changed_audio_is_noticed(esc50_tree, tiny_params, tmp_path):
    tree = copy_tree(esc50_tree, tmp_path / "tree")
    out = str(tmp_path / "ds")
    prep.prepare(str(tree), out, tiny_params, workers=1, progress=False)
    victim = next((tree / "audio").glob("*.wav"))
    data = bytearray(victim.read_bytes())
    data[-2:] = b"\x10\x10"
    victim.write_bytes(bytes(data))
    with pytest.raises(UserError, match="prepared from other audio"):
        prep.prepare(str(tree), out, tiny_params, workers=1, progress=False)


def test_default_out_depends_on_params(tiny_params, monkeypatch, tmp_path, esc50_tree):
    monkeypatch.chdir(tmp_path)
    r = prep.prepare(str(esc50_tree), None, tiny_params, workers=1, progress=False)
    assert r.out == os.path.join("data", "shards", tiny_params.digest())
    assert shards.default_location(dataclasses.replace(tiny_params, storage_dtype="uint8")) != r.out
    assert os.path.isfile(os.path.join(r.out, MANIFEST))


def test_source_from_environment(tiny_params, monkeypatch, tmp_path, esc50_tree):
    monkeypatch.setenv("ESC50_SOURCE", str(esc50_tree))
    assert prep.prepare(None, str(tmp_path / "ds"), tiny_params, workers=1, progress=False).n_clips == 40


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_clip_found_late_leaves_nothing(esc50_tree, tiny_params, tmp_path, workers):
    tree = copy_tree(esc50_tree, tmp_path / "tree")
    last = sorted((tree / "audio").iterdir())[-1]
    last.write_bytes(b"RIFF" + os.urandom(3000))  # passes validation (present, non-empty); fails decoding
    out = tmp_path / "ds"
    with pytest.raises(AudioError, match=rf"{last.name}: cannot decode audio"):
        prep.prepare(str(tree), str(out), tiny_params, workers=workers, progress=False)
    assert listing(out) == []  # no shard, no temp file, no manifest


def test_failure_while_writing_leaves_no_shard(esc50_tree, tiny_params, tmp_path, monkeypatch):
    real = shards._write_parquet
    calls = []

    def flaky(fs, path, table):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real(fs, path, table)

    monkeypatch.setattr(shards, "_write_parquet", flaky)
    out = tmp_path / "ds"
    with pytest.raises(OSError, match="disk full"):
        prep.prepare(str(esc50_tree), str(out), tiny_params, workers=1, progress=False)
    assert listing(out) == []
    with pytest.raises(shards.ShardError, match="no _manifest.json"):
        load_shards(str(out))


def test_unwritable_output_fails_before_decoding(esc50_tree, tiny_params, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setattr(
        prep, "compute_features", lambda *a, **k: pytest.fail("decoded before checking --out")
    )
    with pytest.raises(UserError, match=r"file/ds: cannot write the output location"):
        prep.prepare(str(esc50_tree), str(tmp_path / "file" / "ds"), tiny_params, workers=1, progress=False)


def test_unreadable_output_location(esc50_tree, tiny_params, tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / MANIFEST).mkdir()  # something that cannot be read as a manifest
    with pytest.raises(UserError, match=r"_manifest\.json"):
        prep.prepare(str(esc50_tree), str(out), tiny_params, workers=1, progress=False)


def test_bad_source(tmp_path, tiny_params):
    with pytest.raises(UserError, match="nowhere: not a directory in ESC-50 layout"):
        prep.prepare(str(tmp_path / "nowhere"), str(tmp_path / "ds"), tiny_params, progress=False)


# ---- CLI ---------------------------------------------------------------------------------------
def cli(*args: str) -> list[str]:
    return ["prepare", *args, "--sample-rate", "8000", "--n-fft", "256", "--hop", "256", "--n-mels", "16"]


def test_cli_prepares_and_summarizes(esc50_tree, tmp_path, capsys):
    out = tmp_path / "ds"
    assert (
        main(cli("--source", str(esc50_tree), "--out", str(out), "--workers", "1", "--dtype", "uint8")) == 0
    )
    err = capsys.readouterr().err
    assert "40 clips, 5 folds, 4 classes, shape 16x157 uint8" in err
    assert load_shards(str(out)).params.storage_dtype == "uint8"
    assert main(cli("--source", str(esc50_tree), "--out", str(out), "--dtype", "uint8")) == 0
    assert "up to date" in capsys.readouterr().err


def test_cli_bad_input_exits_2_with_one_line(esc50_tree, tmp_path, capsys):
    tree = copy_tree(esc50_tree, tmp_path / "tree")
    rows = (tree / "meta" / "esc50.csv").read_text().splitlines()
    rows[3] = rows[3].replace(",1,", ",6,", 1)
    (tree / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    assert main(cli("--source", str(tree), "--out", str(tmp_path / "ds"))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (
        err.startswith("esc50 prepare: error: ") and "esc50.csv: line 4: fold '6' is not one of 1..5" in err
    )


def test_cli_bad_feature_option_exits_2(tmp_path, capsys):
    assert main(["prepare", "--out", str(tmp_path / "ds"), "--hop", "4096"]) == 2
    assert "hop_length must be <= n_fft" in capsys.readouterr().err


def test_damaged_dataset_with_same_fingerprint_is_rebuilt(esc50_tree, tiny_params, tmp_path):
    out = str(tmp_path / "ds")
    prep.prepare(str(esc50_tree), out, tiny_params, workers=1, progress=False)
    os.unlink(f"{out}/{shards.shard_name(2)}")
    again = prep.prepare(str(esc50_tree), out, tiny_params, workers=1, progress=False)
    assert not again.skipped and len(load_shards(out)) == 40
