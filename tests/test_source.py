"""search/data/source.py: archives and downloads, offline (a zip of the synthetic tree on a loopback server)."""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from search.data import source as src
from search.data.prepare import prepare
from search.errors import UserError
from trainable.shards import load_shards, read_manifest


def zip_tree(tree: Path, dest: Path, prefix: str = "ESC-50-master/") -> Path:
    """The official archive's shape: one top folder with meta/, audio/ and other files."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(prefix + "README.md", "synthetic ESC-50\n")
        for p in sorted(tree.rglob("*")):
            if p.is_file():
                zf.write(p, prefix + str(p.relative_to(tree)))
    return dest


class Server:
    """A loopback HTTP server for one file with Range support and knobs to misbehave."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.cut_after: int | None = None  # drop the connection after this many body bytes
        self.ignore_range = False
        self.lie_length: int | None = None  # announce this Content-Length instead
        self.requests: list[dict[str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append(dict(self.headers))
                data, start = outer.payload, 0
                m = re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if m and not outer.ignore_range:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(outer.lie_length or len(body)))
                self.send_header("ETag", '"v1"')
                self.end_headers()
                if outer.cut_after is not None:
                    body, outer.cut_after = body[: outer.cut_after], None
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/master.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def archive(esc50_tree, tmp_path_factory) -> Path:
    return zip_tree(esc50_tree, tmp_path_factory.mktemp("zip") / "master.zip")


@pytest.fixture
def server(archive) -> Iterator[Server]:
    s = Server(archive.read_bytes())
    yield s
    s.close()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ESC50_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(src, "CHUNK", 64 * 1024)  # several reads per transfer, so a cut lands mid-way
    return tmp_path / "cache"


def test_interrupted_download_resumes_with_range(server, archive, tiny_params, tmp_path, cache):
    server.cut_after = len(server.payload) // 3
    with pytest.raises(
        UserError, match=r"download (interrupted|failed).*run again to resume|incomplete download"
    ):
        prepare(server.url, str(tmp_path / "ds"), tiny_params, workers=1, progress=False)
    parts = list(cache.glob("*.part"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size < len(server.payload)
    have = parts[0].stat().st_size

    result = prepare(server.url, str(tmp_path / "ds"), tiny_params, workers=1, progress=False)
    assert server.requests[-1]["Range"] == f"bytes={have}-" and server.requests[-1]["If-Range"] == '"v1"'
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert read_manifest(result.out)["archive_sha256"] == sha
    assert len(load_shards(result.out)) == 40
    assert not list(cache.glob("*.part*"))  # the complete archive is kept, the part is gone


def test_archive_gives_the_same_dataset_as_the_directory(server, esc50_tree, tiny_params, tmp_path):
    out = str(tmp_path / "ds")
    prepare(str(esc50_tree), out, tiny_params, workers=1, progress=False)
    # same audio and parameters: the fingerprint matches, nothing to do
    assert prepare(server.url, out, tiny_params, workers=1, progress=False).skipped
    # and the cached download and extraction are reused without a request
    n = len(server.requests)
    assert prepare(server.url, out, tiny_params, workers=1, progress=False).skipped
    assert len(server.requests) == n


def test_server_without_range_restarts(server, cache):
    server.cut_after = 5000
    with pytest.raises(UserError):
        src.download(server.url, cache, progress=False)
    server.ignore_range = True
    path = src.download(server.url, cache, progress=False)
    assert path.read_bytes() == server.payload


def test_short_transfer_is_detected(server, cache):
    server.lie_length = len(server.payload) + 1000
    with pytest.raises(UserError, match=r"(incomplete download|interrupted)"):
        src.download(server.url, cache, progress=False)
    assert not list(cache.glob("*.zip"))


def test_not_a_zip_is_rejected(server, cache):
    server.payload = b"<html>not found</html>"
    with pytest.raises(UserError, match="not a complete zip archive"):
        src.download(server.url, cache, progress=False)


def test_unreachable_url(cache):
    with pytest.raises(UserError, match="cannot download"):
        src.download("http://127.0.0.1:9/master.zip", cache, progress=False)


def test_local_zip_and_file_url(archive, tmp_path, tiny_params):
    a = src.resolve_source(str(archive), progress=False)
    b = src.resolve_source("file://" + str(archive), progress=False)
    assert a.root == b.root and (a.root / "meta" / "esc50.csv").is_file()
    assert a.archive_sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert not (a.root / "README.md").exists()  # only meta/ and audio/ are unpacked


def test_archive_without_meta(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("x/audio/1-1-A-0.wav", b"RIFF")
    with pytest.raises(UserError, match="no meta/esc50.csv"):
        src.resolve_source(str(bad), progress=False)


def test_unpacked_archive_directory(esc50_tree, tmp_path):
    # a user who unzipped the archive themselves points at the folder holding ESC-50-master/
    outer = tmp_path / "unzipped"
    with zipfile.ZipFile(zip_tree(esc50_tree, tmp_path / "a.zip")) as zf:
        zf.extractall(outer)
    assert src.resolve_source(str(outer), progress=False).root == (outer / "ESC-50-master").resolve()


def test_official_url_is_the_default(monkeypatch):
    monkeypatch.delenv("ESC50_SOURCE", raising=False)
    seen = []
    monkeypatch.setattr("search.data.prepare.resolve_source", lambda s, progress: seen.append(s) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        prepare(None, None, src_params(), progress=False)
    assert seen == [src.OFFICIAL_URL]


def src_params():
    from trainable.model.features import FeatureParams

    return FeatureParams()
