"""search/data/metadata.py: every bad ESC-50 copy fails before decoding, naming the file and CSV line."""

from __future__ import annotations

import re

import numpy as np
import pytest

from search.data.metadata import MetadataError, read_metadata
from tests.fixtures.audio import copy_tree, read_rows, write_rows


@pytest.fixture
def tree(esc50_tree, tmp_path):
    return copy_tree(esc50_tree, tmp_path / "copy")


def test_reads_typed_columns_and_classes(esc50_tree):
    meta = read_metadata(esc50_tree)
    rows = read_rows(esc50_tree)
    assert len(meta) == len(rows) == 40
    assert list(meta.columns) == ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
    assert meta.columns["fold"].dtype == np.int64 and meta.columns["esc10"].dtype == bool
    assert meta.columns["filename"] == [r["filename"] for r in rows]
    assert meta.classes == ("low_hum", "mid_tone", "high_beep", "whistle")
    # the CSV says .wav; the file found is the stem with whatever extension exists
    assert [p.stem for p in meta.audio] == [r["filename"][:-4] for r in rows]
    assert {p.suffix for p in meta.audio} == {".wav", ".flac", ".ogg"}


def test_esc10_column_is_optional(tree):
    rows = read_rows(tree)
    write_rows(tree, rows, header=["filename", "fold", "target", "category", "src_file", "take"])
    assert "esc10" not in read_metadata(tree).columns


def test_listed_extension_wins_over_others(tree):
    audio = read_metadata(tree).audio
    i = next(i for i, p in enumerate(audio) if p.suffix != ".wav")
    (tree / "audio" / f"{audio[i].stem}.wav").write_bytes(audio[i].read_bytes())
    assert read_metadata(tree).audio[i].suffix == ".wav"


def edit(tree, change):
    rows = read_rows(tree)
    change(rows)
    write_rows(tree, rows)


def test_missing_column(tree):
    write_rows(tree, read_rows(tree), header=["filename", "fold", "target", "category", "take"])
    with pytest.raises(MetadataError, match=r"esc50\.csv: missing column\(s\) \['src_file'\]"):
        read_metadata(tree)


def test_fold_6(tree):
    edit(tree, lambda rows: rows[4].update(fold="6"))
    with pytest.raises(MetadataError, match=r"esc50\.csv: line 6: fold '6' is not one of 1\.\.5"):
        read_metadata(tree)


def test_fold_missing(tree):
    write_rows(tree, [r for r in read_rows(tree) if r["fold"] != "3"])
    with pytest.raises(MetadataError, match=r"folds must be exactly 1\.\.5, found \[1, 2, 4, 5\]"):
        read_metadata(tree)


def test_target_out_of_range(tree):
    edit(tree, lambda rows: rows[0].update(target="50"))
    with pytest.raises(MetadataError, match=r"line 2: target '50' is not an integer in 0\.\.49"):
        read_metadata(tree)


def test_target_category_mismatch(tree):
    def rename(rows):
        rows[9]["category"] = "not_a_hum"  # target 0 is low_hum on line 2

    edit(tree, rename)
    rows = read_rows(tree)
    assert rows[9]["target"] == "0"
    with pytest.raises(MetadataError, match=r"line 11: target 0 is 'not_a_hum' here but 'low_hum' on line 2"):
        read_metadata(tree)


def test_category_with_two_targets(tree):
    edit(tree, lambda rows: rows[2].update(category="low_hum"))  # target 1 renamed to target 0's category
    with pytest.raises(
        MetadataError, match=r"line 4: target 1 is 'low_hum' here but 'mid_tone'|category 'low_hum'"
    ):
        read_metadata(tree)


def test_src_file_split_across_folds(tree):
    rows = read_rows(tree)
    fold2 = next(i for i, r in enumerate(rows) if r["fold"] == "2" and r["target"] == rows[0]["target"])
    rows[fold2]["src_file"] = rows[0]["src_file"]
    write_rows(tree, rows)
    pattern = rf"line {fold2 + 2}: src_file '{rows[0]['src_file']}' \(target 0\) is in fold 2 here but fold 1 on line 2"
    with pytest.raises(MetadataError, match=pattern):
        read_metadata(tree)


def test_src_file_shared_by_two_classes_may_span_folds(tree):
    # as in the official release (e.g. src_file 131943: clock_tick fold 2, clock_alarm fold 3)
    rows = read_rows(tree)
    other = next(i for i, r in enumerate(rows) if r["fold"] == "2" and r["target"] == "1")
    rows[other]["src_file"] = rows[0]["src_file"]
    write_rows(tree, rows)
    read_metadata(tree)


def test_duplicate_filename(tree):
    edit(tree, lambda rows: rows.append(dict(rows[0])))
    with pytest.raises(MetadataError, match=r"line 42: filename '1-101000-A-0.wav' already listed on line 2"):
        read_metadata(tree)


def test_missing_clip(tree):
    victim = read_metadata(tree).audio[7]
    victim.unlink()
    with pytest.raises(
        MetadataError, match=rf"1 clip\(s\) not found: line 9: {re.escape(victim.stem)}\.\{{wav,flac,ogg\}}"
    ):
        read_metadata(tree)


def test_empty_audio_file(tree):
    victim = read_metadata(tree).audio[3]
    victim.write_bytes(b"")
    with pytest.raises(MetadataError, match=rf"line 5: .*{re.escape(victim.name)} is empty"):
        read_metadata(tree)


def test_missing_csv_and_audio_dir(tmp_path, tree):
    with pytest.raises(MetadataError, match=r"meta/esc50\.csv: not found"):
        read_metadata(tmp_path)
    for p in (tree / "audio").iterdir():
        p.unlink()
    (tree / "audio").rmdir()
    with pytest.raises(MetadataError, match=r"audio: audio directory not found"):
        read_metadata(tree)


def test_many_problems_are_summarized_on_one_line(tree):
    edit(tree, lambda rows: [r.update(fold="7") for r in rows])
    with pytest.raises(MetadataError) as e:
        read_metadata(tree)
    assert "\n" not in str(e.value) and "(and 37 more)" in str(e.value)
