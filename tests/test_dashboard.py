"""`esc50 dashboard`: optuna-dashboard on 127.0.0.1 over the searches' stored studies
(search/study.py, search/ui.py). That a search's study agrees with Tune and MLflow is checked
on a real search in tests/test_search.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from search.study import storage_url


def test_the_study_lives_beside_the_tracking_store(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    assert storage_url(None, f"sqlite:///{db}", "runs") == f"sqlite:///{tmp_path / 'optuna.db'}"
    # a tracking server: beside Tune's local results; object-store results: only when named
    assert storage_url(None, "http://127.0.0.1:5000", str(tmp_path)) == f"sqlite:///{tmp_path / 'optuna.db'}"
    assert storage_url(None, "http://127.0.0.1:5000", "s3://bucket/tune") == ""
    assert storage_url("none", f"sqlite:///{db}", None) == ""
    assert storage_url(str(tmp_path / "s.db"), "http://x", None) == f"sqlite:///{tmp_path / 's.db'}"
    url = "postgresql://esc50@db.internal/optuna"
    assert storage_url(url, f"sqlite:///{db}", None) == url


def test_dashboard_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from search.cli import main

    assert main(["dashboard", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("esc50 dashboard: error: no Optuna studies at sqlite:///") and "\n" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_stored_study_on_loopback(tmp_path: Path) -> None:
    import optuna

    from search.ui import dashboard_command

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="dash", storage=url, direction="maximize")
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-2, log=True), n_trials=3)
    cmd = dashboard_command(url, 8123)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"

    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "search", "dashboard", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline, studies = time.monotonic() + 90, None
        while time.monotonic() < deadline and studies is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    studies = json.loads(r.read())["study_summaries"]
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.5)
        assert studies is not None, "the dashboard did not answer"
        (summary,) = studies
        assert summary["study_name"] == "dash"
        sid = summary["study_id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{sid}", timeout=10) as r:
            detail = json.loads(r.read())
        assert [t["state"] for t in detail["trials"]] == ["Complete"] * 3
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard/", timeout=10) as r:
            assert r.status == 200
    finally:
        proc.terminate()  # esc50 dashboard stops its server group on SIGTERM
        proc.wait(timeout=30)
