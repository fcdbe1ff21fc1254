"""`mlflow models serve -m models:/esc50-cnn@champion` on loopback: class names for waveforms, and
what a request may not do (trainable/model/serving.py): read files outside the audio directory, tell
files apart by their errors, or send more records or longer audio than the limits."""

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
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from trainable.audio import decode
from trainable.model.serving import PATH_REFUSED, PATHS_OFF

STARTUP_S = 240  # a cold start imports torch and mlflow's server on a busy 2-core box
LIMITS = {
    "ESC50_SERVE_MAX_RECORDS": "3",
    "ESC50_SERVE_MAX_SECONDS": "12",
    "ESC50_SERVE_MAX_SAMPLES": "300000",
}


def _error(body: dict) -> str:
    """The model's own message: the scoring server prefixes it with the input it was given."""
    return body.get("message", "").split("Error: ", 1)[-1]


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


def _start(uri: str, cwd: Path, extra_env: dict[str, str]) -> tuple[subprocess.Popen, str, Path]:
    port = _free_port()
    bin_dir = Path(sys.executable).parent  # mlflow starts `uvicorn` from PATH: the venv's, as when activated
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESC50_SERVE_")}
    env.update(
        MLFLOW_TRACKING_URI=uri, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", **extra_env
    )
    cwd.mkdir(parents=True, exist_ok=True)
    log_path = cwd / "serve.log"
    proc = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", "models:/esc50-cnn@champion"]
        + ["--host", "127.0.0.1", "--port", str(port), "--env-manager", "local", "--workers", "1"],
        cwd=cwd,
        env=env,
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{port}", log_path


def _wait(proc: subprocess.Popen, base: str, log_path: Path, deadline: float) -> None:
    while True:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(
                f"mlflow models serve did not answer /ping in {STARTUP_S} s:\n{log_path.read_text()[-4000:]}"
            )
        time.sleep(0.25)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def audio_dir(new_clips, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The served directory: a clip, a long clip, a text file, a FIFO, a sub-directory, and symlinks
    to a clip outside it and to /etc/passwd; beside it, outside, a clip of the same class."""
    root = tmp_path_factory.mktemp("serve")
    inside, outside = root / "audio", root / "outside"
    inside.mkdir()
    outside.mkdir()
    path, _ = new_clips[2]
    wave, rate = decode(path)
    sf.write(inside / "clip.wav", wave, rate)
    sf.write(outside / "secret.wav", wave, rate)
    t = np.arange(13 * 8000) / 8000  # 13 s at 8 kHz: over the 12 s limit, under the samples one
    sf.write(inside / "long.wav", (0.3 * np.sin(2 * np.pi * 500 * t)).astype(np.float32), 8000)
    (inside / "notes.txt").write_text("not audio\n")
    (inside / "empty.wav").write_bytes(b"")
    (inside / "sub").mkdir()
    os.mkfifo(inside / "pipe.wav")
    (inside / "escape.wav").symlink_to(outside / "secret.wav")
    (inside / "passwd.wav").symlink_to("/etc/passwd")
    return inside


@pytest.fixture(scope="module")
def servers(promoted, audio_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Two servers of the champion, started side by side (startup is the slow part): `dir` with
    ESC50_SERVE_AUDIO_DIR and small limits, `plain` with the defaults (path records off)."""
    work = tmp_path_factory.mktemp("servers")
    started = {
        "dir": _start(promoted.uri, work / "dir", {"ESC50_SERVE_AUDIO_DIR": str(audio_dir), **LIMITS}),
        "plain": _start(promoted.uri, work / "plain", {}),
    }
    try:
        deadline = time.monotonic() + STARTUP_S
        for proc, base, log_path in started.values():
            _wait(proc, base, log_path, deadline)
        yield {name: base for name, (_, base, _) in started.items()}
    finally:
        for proc, _, _ in started.values():
            _stop(proc)


def test_serving_answers_with_class_names_on_loopback(servers, new_clips) -> None:
    path, category = new_clips[2]
    wave, rate = decode(path)
    record = {"waveform": wave.tolist(), "sample_rate": rate}
    status, body = _post(
        f"{servers['plain']}/invocations", {"dataframe_records": [record, record], "params": {"top_k": 2}}
    )
    assert status == 200, body
    preds = body["predictions"]
    assert [p["label"] for p in preds] == [category, category]
    assert len(preds[0]["top_labels"]) == 2 and preds[0]["top_labels"][0] == category
    assert preds[0]["silent"] is False and preds[0]["windows"] == 1

    # a silent clip gets the defined answer; a bad request a 400 with a message, not a traceback
    status, body = _post(
        f"{servers['plain']}/invocations",
        {"dataframe_records": [{"waveform": [0.0] * 800, "sample_rate": 8000}]},
    )
    assert (
        status == 200 and body["predictions"][0]["silent"] is True and body["predictions"][0]["label"] is None
    )
    status, body = _post(
        f"{servers['plain']}/invocations", {"dataframe_records": [{"waveform": [0.1, 0.2], "sample_rate": 0}]}
    )
    assert status == 400 and "sample_rate must be a positive integer" in body["message"]


def test_path_records_are_off_without_an_audio_directory(servers, audio_dir: Path) -> None:
    for path in (str(audio_dir / "clip.wav"), "/etc/passwd", "/no/such/file.wav"):
        status, body = _post(f"{servers['plain']}/invocations", {"dataframe_records": [{"path": path}]})
        assert status == 400 and _error(body) == PATHS_OFF, (path, body)


def test_path_records_read_only_audio_inside_the_directory(servers, audio_dir: Path, new_clips) -> None:
    url = f"{servers['dir']}/invocations"
    category = new_clips[2][1]
    for path in ("clip.wav", str(audio_dir / "clip.wav"), "sub/../clip.wav"):
        status, body = _post(url, {"dataframe_records": [{"path": path}]})
        assert status == 200 and body["predictions"][0]["label"] == category, (path, body)

    # Missing, outside (by "..", absolute, or a symlink), not a regular file, not audio, empty:
    # one message for all, so that the answers cannot tell files on the host apart.
    refused = [
        "missing.wav",
        "/no/such/file.wav",
        "../outside/secret.wav",
        str(audio_dir.parent / "outside" / "secret.wav"),
        "/etc/passwd",
        "/etc/hostname",
        "escape.wav",
        "passwd.wav",
        "notes.txt",
        "empty.wav",
        "sub",
        "pipe.wav",
        "clip.wav\x00.txt",
    ]
    messages = set()
    for path in refused:
        status, body = _post(url, {"dataframe_records": [{"path": path}]})
        assert status == 400, (path, body)
        messages.add(_error(body))
    assert messages == {f"row 0: {PATH_REFUSED}"}


def test_requests_over_the_limits_are_400(servers) -> None:
    url = f"{servers['dir']}/invocations"
    tone = (0.3 * np.sin(np.arange(8000) / 5)).astype(np.float32).tolist()  # 1 s at 8 kHz
    cases = {
        "4 records in one request; the limit is 3": [{"waveform": tone, "sample_rate": 8000}] * 4,
        "13.0 s of audio; the limit is 12 s": [{"waveform": tone * 13, "sample_rate": 8000}],
        "300001 samples; the limit is 300000": [{"waveform": [0.1] * 300001, "sample_rate": 48000}],
        "sample_rate 1000000 is above the limit 192000": [{"waveform": tone, "sample_rate": 1000000}],
    }
    for expected, records in cases.items():
        status, body = _post(url, {"dataframe_records": records})
        assert status == 400 and expected in _error(body), (expected, body)
    status, body = _post(url, {"dataframe_records": [{"path": "long.wav"}]})  # files are held to them too
    assert status == 400 and "13.0 s of audio; the limit is 12 s" in _error(body), body
    # at the limits: fine
    status, body = _post(url, {"dataframe_records": [{"waveform": tone * 12, "sample_rate": 8000}] * 3})
    assert status == 200 and len(body["predictions"]) == 3, body


def test_serving_settings_are_checked_when_the_model_loads(tmp_path: Path) -> None:
    """A bad setting fails the server's start (the model's load), naming the variable."""
    from trainable.model.serving import ServePolicy

    policy = ServePolicy.from_env({})
    assert policy.audio_dir is None and (policy.max_records, policy.max_seconds) == (64, 60.0)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert (
        ServePolicy.from_env({"ESC50_SERVE_AUDIO_DIR": str(tmp_path / "link")}).audio_dir == tmp_path / "real"
    )
    bad = {
        "ESC50_SERVE_AUDIO_DIR": (str(tmp_path / "missing"), "not a directory"),
        "ESC50_SERVE_MAX_RECORDS": ("many", "not a number"),
        "ESC50_SERVE_MAX_SECONDS": ("0", "must be positive"),
        "ESC50_SERVE_MAX_SAMPLES": ("-5", "must be positive"),
    }
    for name, (value, message) in bad.items():
        with pytest.raises(ValueError, match=f"{name}={value!r}: {message}"):
            ServePolicy.from_env({name: value})
