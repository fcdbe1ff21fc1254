"""Storage locations: a local path or a URI pyarrow opens (file://, s3://, gs://, ...), and the few
things every layer does with one. The shards (trainable/shards.py), `esc50 prepare` and a search's
folder in --storage all go through here.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from trainable.errors import UserError

# Object stores make an object visible only when its upload completes: a single put is atomic.
_ATOMIC_PUT_FS = {"s3", "gcs"}


class LocationError(UserError):
    """A location pyarrow cannot open (an unknown scheme, a malformed URI)."""


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A local path or a URI -> (pyarrow filesystem, path in it); a local path is made absolute."""
    uri = str(uri)
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as e:
        raise LocationError(f"{uri}: cannot open this location: {e}") from None
    return fs, path.rstrip("/")


def join(root: str, *names: str) -> str:
    return posixpath.join(root, *names) if root else posixpath.join(*names)


def uri_of(fs: Any, path: str) -> str:
    """A path in a pyarrow filesystem as what `resolve` opens again: the path itself when local."""
    path = str(path)
    kind = getattr(fs, "type_name", "local")
    if kind in ("local", "mock", None) or "://" in path:
        return path
    scheme = {"gcs": "gs"}.get(kind, kind)
    return f"{scheme}://{path.lstrip('/')}"


def atomic_put(fs: pafs.FileSystem) -> bool:
    """Whether one upload to `fs` appears whole or not at all (no temp name needed)."""
    return fs.type_name in _ATOMIC_PUT_FS


def temp_name(path: str) -> str:
    """A hidden name beside `path` to write to before renaming into place."""
    return join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")


def atomic_write(fs: pafs.FileSystem, path: str, write: Any) -> None:
    """Call `write(stream)` so that `path` appears complete or not at all (temp + rename locally)."""
    if atomic_put(fs):
        with fs.open_output_stream(path) as out:
            write(out)
        return
    tmp = temp_name(path)
    try:
        with fs.open_output_stream(tmp) as out:
            write(out)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(uri: str) -> str:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(uri: str, text: str) -> None:
    """`text` at `uri`, written atomically; its folder is made when missing."""
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    atomic_write(fs, path, lambda out: out.write(text.encode()))


def probe_writable(uri: str) -> None:
    """Make the folder `uri` when missing and write and delete a small file there: fails (OSError,
    pyarrow's errors) where a long job would fail only at its end."""
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)
    probe = join(path, f".esc50-probe-{uuid.uuid4().hex[:8]}")
    with fs.open_output_stream(probe) as f:
        f.write(b"ok")
    fs.delete_file(probe)


def check_sqlite_folder(url: str, option: str) -> None:
    """A sqlite:/// URL's database folder must exist (SQLite would fail later, less clearly);
    UserError naming `option`. Other URLs pass."""
    if url.startswith("sqlite:///"):
        folder = os.path.dirname(url[len("sqlite:///") :]) or "."
        if not os.path.isdir(folder):
            raise UserError(f"{option} {url}: the folder {folder} does not exist")
