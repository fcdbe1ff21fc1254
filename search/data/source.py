"""Where the audio comes from: a local ESC-50 copy, a .zip archive, or an archive URL.

URLs (the official archive by default) are streamed into a cache directory ($ESC50_CACHE, else
~/.cache/esc50) as `<name>.part`, resumed with an HTTP Range request when a transfer breaks off,
checked for completeness (Content-Length / Content-Range total, a readable zip directory), then
extracted once per archive SHA-256 (CRC-checked by zipfile) into `esc50-<sha>/`. What cannot be known
offline (that it is the genuine release) is recorded instead: the archive's SHA-256 goes into the
shard metadata, so a changed download is noticed.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import urllib.error
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from search.data.metadata import CSV_PATH
from search.errors import UserError
from search.progress import Progress

OFFICIAL_URL = "https://github.com/karoldvl/ESC-50/archive/master.zip"
OFFICIAL_CLIPS = 2000
CHUNK = 1 << 20
TIMEOUT_S = 60


@dataclass(frozen=True)
class Source:
    root: Path  # directory holding meta/esc50.csv and audio/
    description: str
    archive_sha256: str | None = None
    official: bool = False


def cache_dir() -> Path:
    base = os.environ.get("ESC50_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "esc50"
    )
    return Path(base)


def resolve_source(source: str, progress: bool = True) -> Source:
    """A local directory, a local .zip, or an http(s)/file URL -> a directory in ESC-50 layout."""
    official = source == OFFICIAL_URL
    if re.match(r"https?://", source):
        archive = download(source, cache_dir(), progress=progress)
    else:
        path = Path(source[len("file://") :] if source.startswith("file://") else source).expanduser()
        if path.is_dir():
            return Source(root=_layout_root(path, source), description=str(path.resolve()))
        if not path.is_file():
            raise UserError(f"{source}: not a directory in ESC-50 layout (meta/esc50.csv, audio/) or a .zip")
        archive = path
    sha = file_sha256(archive)
    root = extract(archive, sha, cache_dir(), source)
    return Source(root=root, description=source, archive_sha256=sha, official=official)


def _layout_root(path: Path, source: str) -> Path:
    """`path` itself, or its only subdirectory holding meta/esc50.csv (an unpacked archive)."""
    if (path / CSV_PATH).is_file():
        return path.resolve()
    inner = [p for p in path.iterdir() if (p / CSV_PATH).is_file()]
    return inner[0].resolve() if len(inner) == 1 else path.resolve()  # read_metadata names what is missing


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


# ---- download ------------------------------------------------------------------------------------
def download(url: str, cache: Path, progress: bool = True) -> Path:
    """Stream `url` into the cache, resuming a previous partial transfer; returns the complete file."""
    cache.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(url.encode()).hexdigest()[:12] + "-" + (PurePosixPath(url).name or "archive.zip")
    final, part, state_file = cache / name, cache / (name + ".part"), cache / (name + ".part.json")
    if final.is_file():
        return final
    have = part.stat().st_size if part.is_file() else 0
    state = json.loads(state_file.read_text()) if have and state_file.is_file() else {}
    headers = {"User-Agent": "esc50-search"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if state.get("etag") or state.get("last_modified"):  # resume only the same version
            headers["If-Range"] = state.get("etag") or state["last_modified"]
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part may be complete
            return _finish(part, final, state_file, state.get("total"), url)
        raise UserError(f"{url}: download failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"{url}: cannot download: {getattr(e, 'reason', e)}") from None
    with resp:
        if resp.status == 206 and have:
            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                raise UserError(
                    f"{url}: bad Content-Range {resp.headers.get('Content-Range')!r} for a resume"
                )
            total = None if m.group(2) == "*" else int(m.group(2))
        else:  # 200: a fresh transfer (the server ignored the Range, or the file changed)
            have = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length else None
        state = {
            "url": url,
            "total": total,
            "etag": resp.headers.get("ETag"),
            "last_modified": resp.headers.get("Last-Modified"),
        }
        state_file.write_text(json.dumps(state))
        bar = Progress(f"downloading {url}", total or 0, "B", enabled=progress)
        bar.update(have)
        try:
            with open(part, "ab" if have else "wb") as f:
                while block := resp.read(CHUNK):
                    f.write(block)
                    bar.update(len(block))
        except (OSError, http.client.HTTPException) as e:  # timeouts, dropped connections
            got = part.stat().st_size if part.exists() else 0
            raise UserError(
                f"{url}: download interrupted after {got / 1e6:.1f} MB ({e}); run again to resume"
            ) from None
        finally:
            bar.close()
    return _finish(part, final, state_file, total, url)


def _finish(part: Path, final: Path, state_file: Path, total: int | None, url: str) -> Path:
    size = part.stat().st_size
    if total is not None and size != total:
        raise UserError(f"{url}: incomplete download: {size} of {total} bytes; run again to resume")
    if not zipfile.is_zipfile(part):
        part.unlink()
        state_file.unlink(missing_ok=True)
        raise UserError(f"{url}: the downloaded file is not a complete zip archive (removed; run again)")
    part.rename(final)
    state_file.unlink(missing_ok=True)
    return final


# ---- extraction ----------------------------------------------------------------------------------
def extract(archive: Path, sha: str, cache: Path, source: str) -> Path:
    """Unpack meta/esc50.csv and audio/ of `archive` once per content hash; returns the layout root."""
    target = cache / f"esc50-{sha[:16]}"
    if (target / CSV_PATH).is_file():
        return target
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{source}: not a readable zip archive: {e}") from None
    with zf:
        names = zf.namelist()
        csvs = [n for n in names if n == "meta/esc50.csv" or n.endswith("/meta/esc50.csv")]
        if not csvs:
            raise UserError(f"{source}: the archive has no meta/esc50.csv (not an ESC-50 archive)")
        prefix = min(csvs, key=len)[: -len("meta/esc50.csv")]
        wanted = [
            n
            for n in names
            if n.startswith(prefix)
            and (n == prefix + "meta/esc50.csv" or n.startswith(prefix + "audio/"))
            and not n.endswith("/")
            and ".." not in PurePosixPath(n).parts
        ]
        if not any(n.startswith(prefix + "audio/") for n in wanted):
            raise UserError(f"{source}: the archive has no audio/ directory beside meta/")
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".extract-{uuid.uuid4().hex[:12]}"
        try:
            for n in wanted:
                dest = tmp / n[len(prefix) :]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(n) as src, open(dest, "wb") as out:  # zipfile checks each member's CRC
                    shutil.copyfileobj(src, out, CHUNK)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise UserError(f"{source}: corrupt archive ({e})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
