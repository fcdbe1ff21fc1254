"""The tracking server as cluster.yaml runs it: `mlflow server --app-name basic-auth` (on loopback
here, with a temp auth DB). A smoke search and a promotion authenticate through MLflow's standard
variables (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD); without them, or with a wrong
password, every request is refused (401), and the search says so before any trial starts."""

from __future__ import annotations

import base64
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from search.cli import main
from search.cluster import STORAGE_ENV
from search.errors import UserError
from search.options import SearchOptions
from search.release.promote import promote
from search.tune import run_search

STARTUP_S = 180


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str, user: str | None = None, password: str | None = None) -> int:
    req = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@dataclass(frozen=True)
class AuthServer:
    url: str
    password: str  # the admin's
    bucket: str  # the artifacts'
    proc: subprocess.Popen
    log: Path

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while _ping(self.url) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server (basic-auth) did not start:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.25)


# Listed first by the test and not waited for here: the server's start (imports, two SQLite
# migrations: tens of seconds on 2 cores) overlaps the fixtures set up after it (the clips, and Ray
# and the tiny shards when this file runs alone); the test waits for it with `wait_ready()`.
@pytest.fixture(scope="module")
def auth_server(s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    """A basic-auth tracking server on 127.0.0.1, still starting, configured like the head's:
    default_permission NO_PERMISSIONS, users in SQLite, the admin password from the env, artifacts
    in an S3 bucket (moto on loopback; the standard AWS variables)."""
    root = tmp_path_factory.mktemp("auth_server")
    bucket = "esc50-mlartifacts"
    s3_server.client().create_bucket(Bucket=bucket)
    password = secrets.token_urlsafe(24)
    ini = root / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n"
    )
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "AWS_"))},
        **s3_server.env,
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(24),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = root / "server.log"
    proc = subprocess.Popen(
        [str(bin_dir / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1"]
        + ["--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
        + ["--artifacts-destination", f"s3://{bucket}/mlartifacts"],
        cwd=root,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield AuthServer(f"http://127.0.0.1:{port}", password, bucket, proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)  # nothing to save: the test is over
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def _ping(url: str) -> int | None:
    try:
        return _status(f"{url}/health")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@pytest.mark.ray
def test_search_and_promote_authenticate_and_anonymous_requests_are_refused(
    auth_server: AuthServer,
    ray_session,
    s3_server,
    tiny_shards: str,
    new_clips,
    tmp_path: Path,
    monkeypatch,
    capsys,
) -> None:
    auth_server.wait_ready()
    url, password, bucket = auth_server.url, auth_server.password, auth_server.bucket
    api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(api) == 401  # no credentials
    assert _status(api, "admin", "wrong") == 401
    assert _status(api, "admin", password) == 200
    assert _status(f"{url}/ajax-api/2.0/mlflow/registered-models/search") == 401

    opts = SearchOptions(
        name="auth-smoke",
        smoke=True,
        trials=1,
        shards=tiny_shards,
        storage=str(tmp_path / "runs"),
        tracking_uri=url,
        verbose=0,
    )
    # Without the login the search stops before any trial, naming the store.
    for k in STORAGE_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(UserError, match=rf"--tracking-uri {url}: cannot use this tracking store"):
        run_search(opts)

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    search = run_search(opts)
    assert search.counts["completed"] == 1
    result = promote(search="auth-smoke", tracking=url)  # model artifacts go through the server
    assert result.version == "1"
    # ... into the bucket, as on the cluster (the client itself has no AWS variables)
    assert not set(STORAGE_ENV) & set(os.environ)
    keys = s3_server.keys(bucket, "mlartifacts/")
    assert any(k.endswith("/pyfunc_entry.py") for k in keys) and any(k.endswith("/fold_1.pt") for k in keys)
    clip, category = new_clips[0]
    assert main(["predict", str(clip), "--tracking-uri", url, "--json"]) == 0
    assert '"label"' in capsys.readouterr().out

    # the same commands without the login are refused
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(Exception, match="401|nauthorized|credentials"):
        promote(search="auth-smoke", tracking=url)
