"""ESC-50 metadata: read `meta/esc50.csv`, validate it, and find every clip's audio file.

All of this runs before any audio is decoded, so a bad copy fails in a second, not after minutes,
and every error names the file and the CSV line at fault.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from search.errors import UserError
from trainable.audio import AUDIO_EXTENSIONS
from trainable.protocol import FOLDS

CSV_PATH = Path("meta") / "esc50.csv"
AUDIO_DIR = "audio"
REQUIRED = ("filename", "fold", "target", "category", "src_file", "take")
MAX_TARGET = 49
_SHOWN = 3  # problems named in one error message


class MetadataError(UserError):
    """The metadata or the audio directory does not describe a usable ESC-50 copy."""


@dataclass(frozen=True)
class Metadata:
    """Validated metadata in CSV order; `columns` are typed (fold/target int64, esc10 bool, rest str)."""

    csv_path: Path
    columns: dict[str, Any]
    classes: tuple[str, ...]  # category per target 0..K-1
    audio: tuple[Path, ...]  # the audio file of each row

    def __len__(self) -> int:
        return len(self.audio)


def _fail(where: str, problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        raise MetadataError(f"{where}: " + "; ".join(problems[:_SHOWN]) + more)


def _int(value: str) -> int | None:
    try:
        return int(value.strip())
    except ValueError:
        return None


def read_metadata(root: str | Path) -> Metadata:
    """Read and validate `<root>/meta/esc50.csv` and locate `<root>/audio/<stem>.{wav,flac,ogg}`."""
    root = Path(root)
    path = root / CSV_PATH
    if not path.is_file():
        raise MetadataError(f"{path}: not found (expected an ESC-50 copy with meta/esc50.csv and audio/)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = [(reader.line_num, r) for r in reader if any(cell.strip() for cell in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MetadataError(f"{path}: cannot read: {e}") from None
    if not header:
        raise MetadataError(f"{path}: empty file")
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise MetadataError(f"{path}: missing column(s) {missing}; the header is {header}")
    if not rows:
        raise MetadataError(f"{path}: no clips listed")
    col = {name: i for i, name in enumerate(header)}

    problems: list[str] = []
    values: dict[str, list[str]] = {h: [] for h in header}
    folds, targets, lines = [], [], []
    seen: dict[str, int] = {}
    for line, r in rows:
        if len(r) != len(header):
            problems.append(f"line {line}: {len(r)} fields, the header has {len(header)}")
            continue
        cells = {h: r[i].strip() for h, i in col.items()}
        fold, target = _int(cells["fold"]), _int(cells["target"])
        if fold not in FOLDS:
            problems.append(f"line {line}: fold {cells['fold']!r} is not one of 1..5")
        if target is None or not 0 <= target <= MAX_TARGET:
            problems.append(f"line {line}: target {cells['target']!r} is not an integer in 0..{MAX_TARGET}")
        name = cells["filename"]
        if not name:
            problems.append(f"line {line}: empty filename")
        elif name in seen:
            problems.append(f"line {line}: filename {name!r} already listed on line {seen[name]}")
        seen.setdefault(name, line)
        if "esc10" in cells and cells["esc10"].lower() not in ("true", "false"):
            problems.append(f"line {line}: esc10 {cells['esc10']!r} is not True or False")
        for h in header:
            values[h].append(cells[h])
        folds.append(fold)
        targets.append(target)
        lines.append(line)
    _fail(str(path), problems)

    present = sorted(set(folds))
    if present != list(FOLDS):
        problems.append(f"folds must be exactly 1..5, found {present}")
    # target <-> category, both ways
    category_of: dict[int, tuple[str, int]] = {}
    target_of: dict[str, tuple[int, int]] = {}
    for line, t, c in zip(lines, targets, values["category"], strict=True):
        if t in category_of and category_of[t][0] != c:
            first = category_of[t]
            problems.append(f"line {line}: target {t} is {c!r} here but {first[0]!r} on line {first[1]}")
        elif c in target_of and target_of[c][0] != t:
            first = target_of[c]
            problems.append(
                f"line {line}: category {c!r} has target {t} here but {first[0]} on line {first[1]}"
            )
        category_of.setdefault(t, (c, line))
        target_of.setdefault(c, (t, line))
    gaps = sorted(set(range(max(category_of) + 1)) - set(category_of))
    if gaps:
        problems.append(f"targets must be 0..{max(category_of)} without gaps; no clips for target(s) {gaps}")
    # Takes of one source recording must share a fold, or validation leaks into training. The
    # official release files 5 recordings under two classes each, in different folds (e.g.
    # src_file 131943: clock_tick in fold 2, clock_alarm in fold 3), so the rule is per class.
    fold_of_src: dict[tuple[str, int], tuple[int, int]] = {}
    for line, s, t, f in zip(lines, values["src_file"], targets, folds, strict=True):
        first = fold_of_src.setdefault((s, t), (f, line))
        if first[0] != f:
            problems.append(
                f"line {line}: src_file {s!r} (target {t}) is in fold {f} here but fold {first[0]} "
                f"on line {first[1]}"
            )
    _fail(str(path), problems)

    audio = _find_audio(root / AUDIO_DIR, values["filename"], lines)
    columns: dict[str, Any] = {}
    for h in header:
        if h in ("fold", "target"):
            columns[h] = np.asarray(folds if h == "fold" else targets, dtype=np.int64)
        elif h == "esc10":
            columns[h] = np.asarray([v.lower() == "true" for v in values[h]], dtype=bool)
        else:
            columns[h] = values[h]
    classes = tuple(category_of[t][0] for t in range(len(category_of)))
    return Metadata(csv_path=path, columns=columns, classes=classes, audio=tuple(audio))


def _find_audio(audio_dir: Path, filenames: list[str], lines: list[int]) -> list[Path]:
    """Each clip by its filename's stem with any audio extension; the listed extension wins."""
    if not audio_dir.is_dir():
        raise MetadataError(f"{audio_dir}: audio directory not found")
    by_stem: dict[str, dict[str, str]] = {}
    with os.scandir(audio_dir) as it:
        for entry in it:
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() in AUDIO_EXTENSIONS:
                by_stem.setdefault(stem, {})[ext.lower()] = entry.name
    found, missing, empty = [], [], []
    for name, line in zip(filenames, lines, strict=True):
        stem, ext = os.path.splitext(name)
        options = by_stem.get(stem, {})
        pick = options.get(ext.lower()) or next((options[e] for e in AUDIO_EXTENSIONS if e in options), None)
        if pick is None:
            missing.append(f"line {line}: {stem}.{{wav,flac,ogg}}")
            continue
        p = audio_dir / pick
        try:
            if p.stat().st_size == 0:
                empty.append(f"line {line}: {p} is empty")
        except OSError as e:
            empty.append(f"line {line}: {p}: {e.strerror}")
        found.append(p)
    if missing:
        _fail(f"{audio_dir}: {len(missing)} clip(s) not found", missing)
    _fail(f"{audio_dir}: unusable audio file(s)", empty)
    return found
