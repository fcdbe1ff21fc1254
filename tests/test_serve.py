"""`mlflow models serve -m models:/esc50-cnn@champion` on loopback answers with class names."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from trainable.audio import decode

STARTUP_S = 240  # a cold start imports torch and mlflow's server on a busy 2-core box


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def server(promoted, tmp_path: Path):
    """The champion served on 127.0.0.1:<free port>; stopped (its whole process group) afterwards."""
    port = _free_port()
    bin_dir = Path(sys.executable).parent  # mlflow starts `uvicorn` from PATH: the venv's, as when activated
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": promoted.uri,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [
            str(bin_dir / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/esc50-cnn@champion",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--env-manager",
            "local",
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log.read()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(
                    f"mlflow models serve did not answer /ping within {STARTUP_S} s:\n{log.read()[-4000:]}"
                )
            time.sleep(1.0)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log.close()


def test_serving_answers_with_class_names_on_loopback(server: str, new_clips) -> None:
    path, category = new_clips[2]
    wave, rate = decode(path)
    record = {"waveform": wave.tolist(), "sample_rate": rate}
    status, body = _post(
        f"{server}/invocations", {"dataframe_records": [record, record], "params": {"top_k": 2}}
    )
    assert status == 200, body
    preds = body["predictions"]
    assert [p["label"] for p in preds] == [category, category]
    assert len(preds[0]["top_labels"]) == 2 and preds[0]["top_labels"][0] == category
    assert preds[0]["silent"] is False and preds[0]["windows"] == 1

    # a file on the serving host, by path (a request holds either waveforms or paths)
    status, body = _post(f"{server}/invocations", {"dataframe_records": [{"path": str(path)}]})
    assert status == 200 and body["predictions"][0]["label"] == category, body

    # a silent clip gets the defined answer; a bad request a 400 with a message, not a traceback
    status, body = _post(
        f"{server}/invocations", {"dataframe_records": [{"waveform": [0.0] * 800, "sample_rate": 8000}]}
    )
    assert (
        status == 200 and body["predictions"][0]["silent"] is True and body["predictions"][0]["label"] is None
    )
    status, body = _post(
        f"{server}/invocations", {"dataframe_records": [{"waveform": [0.1, 0.2], "sample_rate": 0}]}
    )
    assert status == 400 and "sample_rate must be a positive integer" in body["message"]
