"""`esc50 ui`: the MLflow UI on 127.0.0.1 over the same store the searches log to; `esc50
dashboard`: optuna-dashboard on 127.0.0.1 over the searches' Optuna studies (search/study.py).

Light enough for a laptop: one server worker, bound to loopback. The store is the one `esc50
search` uses by default ($MLFLOW_TRACKING_URI, else ./mlflow.db), with its local artifacts.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys

from search.errors import UserError
from search.store import ROLE_SEARCH, TAG_CHAMPION, TAG_STATUS, TAG_VIEW_PREFIX, artifact_root, check_tracking
from search.store import tracking_uri as resolve_uri
from trainable.protocol import METRIC


def ui_command(uri: str, port: int = 5000, host: str = "127.0.0.1") -> list[str]:
    """The `mlflow server` command line for `uri` (a resolved tracking URI)."""
    exe = shutil.which("mlflow", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "mlflow"]
    cmd += ["server", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1"]
    root = artifact_root(uri)
    if root:
        cmd += ["--default-artifact-root", root]
    return cmd


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def run_ui(uri: str | None = None, port: int = 5000, host: str = "127.0.0.1") -> int:
    """Start the UI and wait for it (Ctrl-C stops it). Returns the server's exit status."""
    uri = resolve_uri(uri)
    if not (0 < int(port) < 65536):
        raise UserError(f"--port {port}: not a TCP port")
    if uri.startswith(("http://", "https://", "databricks")):
        raise UserError(f"--tracking-uri {uri}: that is a server already: open it in a browser")
    check_tracking(uri)
    mark_search_experiments(uri)
    if not _port_free(host, int(port)):
        raise UserError(f"--port {port}: something already listens on {host}:{port}; choose another --port")
    base = f"http://{host}:{port}"
    print(f"MLflow UI for {uri} at {base} (Ctrl-C to stop)", flush=True)
    for exp_id, name in search_experiments(uri):
        print(f"  experiment {name}, runs table: {runs_url(base, exp_id)}", flush=True)
    # MLflow's job runner off unless asked for: its GenAI jobs have no use in browsing searches,
    # and it starts a job process and a pool of huey consumers beside the server.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    return _serve(ui_command(uri, int(port), host), env)


# The runs table's columns are kept per browser; a shared view (an experiment tag MLflow's UI reads
# for `viewStateShareKey`) shows the search's columns on first open, without configuration.
VIEW_KEY = "esc50-runs"
VIEW_COLUMNS = [
    f"metrics.`{METRIC}`",  # a trial's mean over the folds (its last epoch)
    "metrics.`best_cv_acc_mean`",  # the search run's best trial
    "metrics.`bbc_cv_acc`",  # the search's bias-corrected estimate and its interval, where logged
    "metrics.`bbc_cv_acc_lo`",
    "metrics.`bbc_cv_acc_hi`",
    f"tags.`{TAG_STATUS}`",  # completed / pruned / failed
    f"tags.`{TAG_CHAMPION}`",  # the champion's version, on its trial and search runs
    "attributes.`Models`",
]


def runs_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table with the search's columns. MLflow 3.17's UI starts in its GenAI
    mode whatever the experiment's kind (a per-browser choice); this link opens model training."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"


def write_runs_view(c: object, experiment_id: str) -> None:
    """The shared view `runs_url` opens (rewritten each time: the columns may change with the code)."""
    import json

    view = {"selectedColumns": VIEW_COLUMNS, "orderByKey": "attributes.start_time", "orderByAsc": False}
    c.set_experiment_tag(experiment_id, f"{TAG_VIEW_PREFIX}{VIEW_KEY}", json.dumps(view))


def search_experiments(uri: str) -> list[tuple[str, str]]:
    """(id, name) of the experiments holding searches."""
    from search.store import TAG_ROLE, client

    c = client(uri)
    return [
        (e.experiment_id, e.name)
        for e in c.search_experiments()
        if c.search_runs([e.experiment_id], f"tags.`{TAG_ROLE}` = '{ROLE_SEARCH}'", max_results=1)
    ]


def mark_search_experiments(uri: str) -> None:
    """Experiments holding searches get the training-kind tag if they predate it (store.mark_training)
    and the runs-table view `runs_url` opens."""
    from search.store import client, mark_training

    c = client(uri)
    for exp_id, _ in search_experiments(uri):
        mark_training(c, c.get_experiment(exp_id))
        write_runs_view(c, exp_id)


def dashboard_command(url: str, port: int = 8080, host: str = "127.0.0.1") -> list[str]:
    """The `optuna-dashboard` command line for the storage `url`."""
    exe = shutil.which("optuna-dashboard", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "optuna_dashboard"]
    return cmd + [url, "--host", host, "--port", str(port)]


def run_dashboard(
    url: str | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    port: int = 8080,
    host: str = "127.0.0.1",
) -> int:
    """Start optuna-dashboard over the searches' study storage and wait for it (Ctrl-C stops it)."""
    from search.options import DEFAULT_STORAGE
    from search.study import open_storage, storage_url

    url = storage_url(url, resolve_uri(tracking_uri), storage or DEFAULT_STORAGE)
    if not url:
        raise UserError("no Optuna storage to show: pass --optuna-storage (the URL the search used)")
    if not (0 < int(port) < 65536):
        raise UserError(f"--port {port}: not a TCP port")
    if url.startswith("sqlite:///") and not os.path.exists(url[len("sqlite:///") :]):
        raise UserError(f"no Optuna studies at {url}: run `esc50 search` first, or pass --optuna-storage")
    open_storage(url)
    if not _port_free(host, int(port)):
        raise UserError(f"--port {port}: something already listens on {host}:{port}; choose another --port")
    print(f"Optuna dashboard for {url} at http://{host}:{port} (Ctrl-C to stop)", flush=True)
    return _serve(dashboard_command(url, int(port), host))


def _serve(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run a server command in its own process group until it ends, Ctrl-C or SIGTERM."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # its group: stopping it stops its workers

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)  # `kill` stops the server too, not only Ctrl-C
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (mlflow server + its uvicorn worker), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
