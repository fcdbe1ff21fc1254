"""MLflow records of a search agree with Tune's: the same trials, the same per-epoch metrics, one parent
run with nested trial runs, the statuses; and the callback never logs anything twice."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from search.options import SearchOptions
from search.store import check_tracking, client, experiment_id
from search.tracking import MLflowTrialCallback, fail_search_run, open_search_run
from tests.fixtures.records import mlflow_runs
from trainable.config import TrainConfig


def tune_records(results_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Tune's own record of a search: trial id -> every result it reported (result.json)."""
    out = {}
    for d in sorted(results_dir.glob("trial_*")):
        lines = (d / "result.json").read_text().splitlines() if (d / "result.json").exists() else []
        out[d.name.removeprefix("trial_")] = [json.loads(x) for x in lines if x.strip()]
    return out


def assert_agree(
    uri: str, search: str, results_dir: Path, folds: tuple[int, ...], trials: set[str] | None = None
) -> dict[str, str]:
    """Tune's results and MLflow's runs describe the same search; returns {trial id: status}.

    `trials`: the trial ids of the search (default: every trial directory Tune wrote)."""
    c = client(uri)
    parent, runs = mlflow_runs(uri, search)
    records = tune_records(results_dir)
    if trials is not None:
        records = {k: v for k, v in records.items() if k in trials}
    assert set(runs) == set(records)
    statuses = {}
    for tid, results in records.items():
        run = runs[tid]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        config = results[-1]["config"]
        assert run.data.params == {k: str(v) for k, v in TrainConfig.from_dict(config).to_dict().items()}
        epochs = [r["epoch"] for r in results]
        assert epochs == sorted(set(epochs)), f"Tune reported an epoch twice: {epochs}"
        for key in ["cv_acc_mean", "cv_acc_std", "cv_loss_mean"] + [f"fold{k}_acc" for k in folds]:
            history = c.get_metric_history(run.info.run_id, key)
            got = sorted((m.step, m.value) for m in history)
            want = sorted((r["epoch"], pytest.approx(r[key])) for r in results)
            assert got == want, (tid, key, got, want)
        status = "completed" if epochs[-1] == config["epochs"] else "pruned"
        assert run.data.tags["esc50.status"] == status
        assert run.info.status == {"completed": "FINISHED", "pruned": "KILLED"}[status]
        ckpt = Path(run.data.tags["esc50.checkpoint"])
        meta = json.loads((ckpt / "meta.json").read_text())
        assert meta["epoch"] == epochs[-1] and meta["folds"] == list(folds)
        statuses[tid] = status
    return statuses


@pytest.mark.ray
def test_smoke_search_tune_and_mlflow_agree(smoke_search, tiny_shards: str, tmp_path: Path) -> None:
    # The session's smoke search (tests/fixtures/search_store.py: 3 trials, folds 1-2, 2 epochs,
    # concurrency 3, grace period 1), promoted once afterwards: promotion adds its own run and the
    # champion tags, and changes none of the records checked here.
    result, mlflow_uri = smoke_search.result, smoke_search.uri
    assert not result.interrupted and sum(result.counts.values()) == 3
    statuses = assert_agree(mlflow_uri, "agree", smoke_search.results_dir, (1, 2))
    assert result.counts["completed"] == sum(s == "completed" for s in statuses.values())

    # The parent: every option, the best result, the results table and the plots.
    parent, runs = mlflow_runs(mlflow_uri, "agree")
    assert parent.info.run_id == result.parent_run_id and parent.info.status == "FINISHED"
    for key in SearchOptions.__dataclass_fields__:
        assert key in parent.data.params, key
    assert parent.data.params["folds"] == "1,2" and parent.data.params["smoke"] == "True"
    assert parent.data.params["budget_fold_epochs"] == str(3 * 2 * 2)
    completed = [r for r in runs.values() if r.data.tags["esc50.status"] == "completed"]
    top = max(r.data.metrics["cv_acc_mean"] for r in completed)
    best = next(r for r in completed if r.info.run_id == result.best_run_id)  # the best is a completed trial
    # ...and of the completed trials at that score, the one Tune made first (trainable/protocol.py)
    assert sorted(int(r.data.tags["esc50.trial_number"]) for r in runs.values()) == [0, 1, 2]
    tied = [r for r in completed if r.data.metrics["cv_acc_mean"] == best.data.metrics["cv_acc_mean"]]
    assert best.data.tags["esc50.trial_number"] == min(
        (r.data.tags["esc50.trial_number"] for r in tied), key=int
    )
    assert best.data.metrics["cv_acc_mean"] == pytest.approx(top) == result.best_cv_acc_mean
    assert parent.data.metrics["best_cv_acc_mean"] == pytest.approx(top)
    assert result.best_run_id == parent.data.tags["esc50.best_run_id"]
    assert result.best_trial_id == best.data.tags["esc50.trial_id"] == parent.data.tags["esc50.best_trial_id"]
    assert result.best_checkpoint == best.data.tags["esc50.checkpoint"]
    assert parent.data.metrics["fold_epochs"] == result.fold_epochs

    c = client(mlflow_uri)
    names = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "esc50_search.json", "space", "plots"} <= names
    plots = {a.path for a in c.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in plots and "plots/intermediate_values.png" in plots
    table = list(csv.DictReader(open(c.download_artifacts(parent.info.run_id, "results.csv", str(tmp_path)))))
    assert {row["trial_id"] for row in table} == set(runs)
    assert {row["trial_id"]: row["status"] for row in table} == statuses
    assert {row["trial_id"]: row["mlflow_run_id"] for row in table} == {
        t: r.info.run_id for t, r in runs.items()
    }

    # The options are saved beside Tune's results too, resolved.
    saved = json.loads((smoke_search.results_dir / "esc50_search.json").read_text())
    assert saved["shards"] == tiny_shards and saved["concurrency"] == 3 and saved["trials"] == 3

    # BBC-CV of the completed trials beside the selected cv_acc_mean: metrics, summary
    m = parent.data.metrics
    assert m["bbc_cv_acc_lo"] <= m["bbc_cv_acc"] <= m["bbc_cv_acc_hi"]
    assert m["bbc_trials"] == len(completed) and result.bbc.n_trials == len(completed)
    assert m["bbc_cv_acc"] == pytest.approx(result.bbc.mean) and "BBC-CV" in result.summary()
    # ...from the out-of-fold predictions each completed trial keeps in its checkpoint and run
    from trainable.model.checkpoint import read_oof

    for r in completed:
        oof = read_oof(r.data.tags["esc50.checkpoint"])
        assert sorted(set(oof["fold"].tolist())) == [1, 2]
        acc = (oof["pred"] == oof["label"]).mean()  # folds of equal size: the pooled = the mean
        assert acc == pytest.approx(r.data.metrics["cv_acc_mean"], abs=1e-6)
        assert [a.path for a in c.list_artifacts(r.info.run_id, "oof")] == ["oof/oof.npz"]
    for r in runs.values():
        if r.data.tags["esc50.status"] != "completed":
            assert not c.list_artifacts(r.info.run_id, "oof")  # pruned: no final epoch

    # Provenance: the code and the data on the search run and on every trial run
    import subprocess

    from search.provenance import versions

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    fingerprint = json.loads((Path(tiny_shards) / "_manifest.json").read_text())["fingerprint"]
    for run in (parent, *runs.values()):
        run = c.get_run(run.info.run_id)
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == head and tags["esc50.git_dirty"] in ("true", "false")
        assert tags["esc50.version"] == versions()["esc50-search"]
        assert tags["esc50.torch_version"] and tags["esc50.ray_version"] and tags["esc50.optuna_version"]
        assert tags["esc50.mlflow_version"] == versions()["mlflow"]
        assert tags["esc50.fingerprint"] == fingerprint and json.loads(tags["esc50.features"])["n_mels"]
        (inp,) = run.inputs.dataset_inputs
        assert inp.dataset.name == "esc50-shards" and fingerprint.startswith(inp.dataset.digest)
        assert json.loads(inp.dataset.source)["uri"] == tiny_shards


# ---- the callback on its own: nothing twice, runs found again after a restart ------------------------


def _trial(tid: str, epochs: int = 2) -> SimpleNamespace:
    cfg = {"epochs": epochs, "lr": 0.01, "device": "cpu"}
    return SimpleNamespace(
        trial_id=tid, config=cfg, last_result={}, status="RUNNING", error_file=None, num_failures=0
    )


def _result(epoch: int) -> dict[str, Any]:
    return {"epoch": epoch, "training_iteration": epoch, "cv_acc_mean": 0.1 * epoch, "cv_acc_std": 0.0,
            "fold1_acc": 0.1 * epoch, "fold1_loss": 1.0, "time_total_s": 3.0, "config": {}}  # fmt: skip


def _finish_after_resume(cb: MLflowTrialCallback, trials: list) -> None:
    """The resumed driver runs every trial to its second and last epoch."""
    for t in trials:
        cb.on_trial_start(0, trials, t)
        cb.on_trial_result(0, trials, t, _result(2))
        t.last_result = _result(2)
        cb.on_trial_complete(0, trials, t)


def test_callback_logs_nothing_twice(mlflow_uri: str, tmp_path: Path) -> None:
    check_tracking(mlflow_uri)
    opts = SearchOptions(
        name="cb", shards=str(tmp_path), tracking_uri=mlflow_uri, storage=str(tmp_path)
    ).resolve()
    space = __import__("spaces").load_space("seed")
    parent = open_search_run(mlflow_uri, opts, space, {"trials": 1})
    cb = MLflowTrialCallback(mlflow_uri, parent.experiment_id, "cb", parent.run_id, (1,), ["lr"])
    cb.setup()
    t = _trial("t1")
    cb.on_trial_start(0, [t], t)
    cb.on_trial_result(0, [t], t, _result(1))
    cb.on_trial_result(
        0, [t], t, _result(1)
    )  # the same epoch again (a trial resumed from an older checkpoint)

    # The driver dies; Tune's pickled copy of the callback takes over in a new process.
    cb2 = pickle.loads(pickle.dumps(cb))
    assert cb2.__dict__.get("_client") is None
    cb2.setup()
    cb2.on_trial_start(0, [t], t)
    cb2.on_trial_result(0, [t], t, _result(1))
    cb2.on_trial_result(0, [t], t, _result(2))
    t.last_result = _result(2)
    cb2.on_trial_complete(0, [t], t)

    # A second Ctrl-C (KeyboardInterrupt out of Tune) ends the search run resumable, not failed.
    fail_search_run(mlflow_uri, parent.run_id, interrupted=True)
    run = client(mlflow_uri).get_run(parent.run_id)
    assert (run.info.status, run.data.tags["esc50.state"]) == ("KILLED", "interrupted")
    again = open_search_run(mlflow_uri, opts, space, {"trials": 1})
    assert again.resumed and again.run_id == parent.run_id
    assert client(mlflow_uri).get_run(parent.run_id).info.status == "RUNNING"
    _, runs = mlflow_runs(mlflow_uri, "cb")
    assert list(runs) == ["t1"]
    c = client(mlflow_uri)
    rid = runs["t1"].info.run_id
    assert [(m.step, m.value) for m in c.get_metric_history(rid, "cv_acc_mean")] == [(1, 0.1), (2, 0.2)]
    assert "time_total_s" not in c.get_run(rid).data.metrics  # only the trainable's metrics
    run = c.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["esc50.status"] == "completed"
    assert run.data.tags["esc50.sampled"] == "lr"
    assert experiment_id(c, "esc50", mlflow_uri) == parent.experiment_id


def _git_repo(path: Path) -> str:
    """A git checkout at `path` with one commit of its own; its commit."""
    import subprocess

    def git(*args: str) -> str:
        cmd = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t", *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()

    path.mkdir()
    git("init", "-q")
    (path / "f").write_text("other code")
    git("add", "f")
    git("commit", "-q", "-m", "other code")
    return git("rev-parse", "HEAD")


def test_a_resumed_callback_tags_the_resuming_code(
    mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tune pickles the callback into tuner.pkl; a search resumed by other code unpickles it. Its new
    trial runs carry the resuming code's commit, a run continued from before keeps its own commit
    and gets the resuming one as esc50.resumed_commit (as the search run does)."""
    from search.provenance import TAG_COMMIT, git_state

    check_tracking(mlflow_uri)
    opts = SearchOptions(
        name="rc", shards=str(tmp_path), tracking_uri=mlflow_uri, storage=str(tmp_path)
    ).resolve()
    parent = open_search_run(mlflow_uri, opts, __import__("spaces").load_space("seed"), {"trials": 2})
    first = git_state()[0]
    cb = MLflowTrialCallback(mlflow_uri, parent.experiment_id, "rc", parent.run_id, (1,), ["lr"])
    cb.setup()
    t1, t2 = _trial("t1"), _trial("t2")
    cb.on_trial_start(0, [t1], t1)
    cb.on_trial_result(0, [t1], t1, _result(1))
    saved = pickle.dumps(cb)  # Tune's tuner.pkl; then the driver dies

    monkeypatch.setenv("ESC50_GIT_DIR", str(tmp_path / "other"))  # the resuming code's checkout
    other = _git_repo(tmp_path / "other")
    assert other != first
    resumed = pickle.loads(saved)
    resumed.setup()
    _finish_after_resume(resumed, [t1, t2])

    _, runs = mlflow_runs(mlflow_uri, "rc")
    tags = {tid: run.data.tags for tid, run in runs.items()}
    assert tags["t1"][TAG_COMMIT] == first and tags["t1"]["esc50.resumed_commit"] == other
    assert tags["t2"][TAG_COMMIT] == other and "esc50.resumed_commit" not in tags["t2"]


class _FailsOnce:
    """A real MlflowClient whose `method` raises once, after (`after=True`: the store did the work and
    the answer was lost) or before doing it: the failures between creating a trial's run and logging
    to it that a tracking hook meets."""

    def __init__(self, real: Any, method: str, after: bool) -> None:
        self._real, self._method, self._after, self.failed = real, method, after, False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name != self._method or self.failed:
            return attr

        def flaky(*args: Any, **kwargs: Any) -> Any:
            self.failed = True
            if self._after:
                attr(*args, **kwargs)
            raise ConnectionError(f"injected: {name} failed")

        return flaky


@pytest.mark.parametrize(
    "method, after", [("log_batch", False), ("create_run", True), ("get_metric_history", False)]
)
def test_a_failure_after_creating_a_trial_run_never_makes_a_second_one(
    mlflow_uri: str, tmp_path: Path, method: str, after: bool
) -> None:
    """The hook fails between creating the run and logging to it; `_safe` retries it, the driver then
    dies and a resumed callback takes over: still one run per trial, with its params and every epoch."""
    check_tracking(mlflow_uri)
    opts = SearchOptions(
        name="flaky", shards=str(tmp_path), tracking_uri=mlflow_uri, storage=str(tmp_path)
    ).resolve()
    parent = open_search_run(mlflow_uri, opts, __import__("spaces").load_space("seed"), {"trials": 2})
    cb = MLflowTrialCallback(mlflow_uri, parent.experiment_id, "flaky", parent.run_id, (1,), ["lr"])
    cb.setup()
    t1, t2 = _trial("t1"), _trial("t2")
    flaky = _FailsOnce(client(mlflow_uri), method, after)
    cb._client = flaky
    cb.on_trial_start(0, [t1, t2], t1)  # fails once inside, retried by the hook wrapper
    assert flaky.failed
    cb.on_trial_result(0, [t1, t2], t1, _result(1))
    cb.on_trial_start(0, [t1, t2], t2)

    # A second failure of the same kind, then the driver dies before anything else is logged.
    cb._client = _FailsOnce(client(mlflow_uri), method, after)
    cb.on_trial_result(0, [t1, t2], t2, _result(1))
    resumed = pickle.loads(pickle.dumps(cb))
    resumed.setup()
    _finish_after_resume(resumed, [t1, t2])

    c = client(mlflow_uri)
    everything = c.search_runs([parent.experiment_id], "tags.`esc50.role` = 'trial'", run_view_type=3)
    assert sorted(r.data.tags["esc50.trial_id"] for r in everything) == ["t1", "t2"]  # deleted ones too
    _, runs = mlflow_runs(mlflow_uri, "flaky")
    for tid, run in runs.items():
        assert run.data.params["lr"] == "0.01" and run.info.status == "FINISHED", tid
        history = c.get_metric_history(run.info.run_id, "cv_acc_mean")
        assert sorted(m.step for m in history) == [1, 2], tid


def test_ui_is_local_and_light(mlflow_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from search.cli import main
    from search.ui import ui_command

    cmd = ui_command(mlflow_uri, 5123)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--workers") + 1] == "1"
    assert cmd[cmd.index("--backend-store-uri") + 1] == mlflow_uri and "server" in cmd
    with socket.socket() as s:  # a port already taken is a clear error, not a server crash
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["ui", "--tracking-uri", mlflow_uri, "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"esc50 ui: error: --port {port}: something already listens on 127.0.0.1:{port}; choose another --port"
    )
