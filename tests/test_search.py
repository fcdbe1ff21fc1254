"""`esc50 search`: a user's space file drives a real search in which ASHA stops a bad trial early, and
every mistake a user can make in the options is one clear line (exit 2) before any trial starts."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from search.cli import main
from search.errors import UserError
from search.options import SearchOptions
from search.tune import run_search

# The first trial learns; the second has a learning rate of ~0 and so stays at 0% (its 50-way head
# never predicts the 4 classes of the tiny data): with one trial at a time, grace period 1 and
# reduction factor 2, ASHA must stop it at epoch 1. The third cannot run at all (6 stages halve the
# 16 mel bins of the tiny data to nothing): a failed trial.
ASHA_SPACE = """
    def space(trial):
        trial.suggest_float("weight_decay", 0.0, 1e-4)
        return {
            "arch": "cnn", "width": 8, "depth": 6 if trial.number == 2 else 2, "dropout": 0.0,
            "batch_size": 4, "optimizer": "adamw", "lr": 1e-2 if trial.number == 0 else 1e-9,
            "schedule": "constant", "warmup_epochs": 0.0, "epochs": 2, "device": "cpu",
        }
"""


def _trial_epochs(results_dir: Path) -> dict[str, list[int]]:
    """Tune's own record: trial id -> the `epoch` of every result, from each trial's result.json."""
    out = {}
    for d in sorted(results_dir.glob("trial_*")):
        text = (d / "result.json").read_text() if (d / "result.json").exists() else ""
        lines = [json.loads(x) for x in text.splitlines() if x.strip()]
        out[d.name.removeprefix("trial_")] = [r["epoch"] for r in lines]
    return out


@pytest.mark.ray
def test_user_space_file_and_asha_stops_a_bad_trial(
    ray_session: None, tiny_shards: str, mlflow_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    space = tmp_path / "asha_space.py"
    space.write_text(textwrap.dedent(ASHA_SPACE))
    storage = tmp_path / "runs"
    rc = main(
        ["search", "--space", str(space), "--shards", tiny_shards, "--storage", str(storage),
         "--tracking-uri", mlflow_uri, "--name", "asha", "--trials", "3", "--folds", "1,2",
         "--cpus-per-fold", "0.5", "--concurrency", "1", "--grace-period", "1", "--reduction-factor", "2",
         "--max-failures", "0"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "search asha finished: 1 completed, 1 pruned, 1 failed" in out
    assert "rank" in out and "weight_decay" in out  # the ranked summary with the sampled parameter
    # The default progress: one line per trial event and a line for the search, no Tune table.
    events = [line.split("] ", 1)[1] for line in out.splitlines() if line.startswith("[")]
    assert sum(e.startswith("trial ") and " started (" in e for e in events) == 3, events
    assert sum("completed 2 epochs: cv_acc_mean" in e for e in events) == 1, events
    assert sum("pruned at epoch 1/2 (ASHA)" in e for e in events) == 1, events
    assert sum("failed after 0 epoch(s): RuntimeError" in e for e in events) == 1, events
    assert events[-1].startswith("search asha: 3/3 trials done (1 completed, 1 pruned, 1 failed)"), events
    assert "Trial name" not in out and "Trial status" not in out and "Current time" not in out

    epochs = _trial_epochs(storage / "asha")
    assert sorted(epochs.values()) == [[], [1], [1, 2]], epochs  # stopped after epoch 1; failed at once

    c = MlflowClient(mlflow_uri)
    runs = c.search_runs([c.get_experiment_by_name("esc50").experiment_id], "tags.`esc50.role` = 'trial'")
    by_trial = {r.data.tags["esc50.trial_id"]: r for r in runs}
    assert set(by_trial) == set(epochs)
    kind = c.get_experiment_by_name("esc50").tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"  # the UI opens it as model training
    expect = {2: ("completed", "FINISHED"), 1: ("pruned", "KILLED"), 0: ("failed", "FAILED")}
    for tid, seen in epochs.items():
        run = by_trial[tid]
        assert (run.data.tags["esc50.status"], run.info.status) == expect[len(seen)]
        assert [m.step for m in c.get_metric_history(run.info.run_id, "cv_acc_mean")] == seen
        assert float(run.data.params["lr"]) == (1e-2 if len(seen) == 2 else 1e-9)
        if not seen:
            assert "Output size is too small" in run.data.tags["esc50.error"]
    parent = c.search_runs([runs[0].info.experiment_id], "tags.`esc50.role` = 'search'")[0]
    assert parent.data.params["space"] == str(space)
    assert [parent.data.tags["esc50.best_trial_id"]] == [t for t, s in epochs.items() if s == [1, 2]]
    assert (
        "def space(trial)"
        in Path(c.download_artifacts(parent.info.run_id, "space/space.py", str(tmp_path))).read_text()
    )

    # The Optuna study is stored beside mlflow.db and agrees with Tune and MLflow: the same trials,
    # states (pruned included) and values (search/study.py).
    import optuna

    study = optuna.load_study(study_name="asha", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    by_tune = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert len(study.trials) == len(by_tune) == len(epochs) and set(by_tune) == set(epochs)
    optuna_state = {"completed": "COMPLETE", "pruned": "PRUNED", "failed": "FAIL"}
    for tid, run in by_trial.items():
        trial, history = by_tune[tid], c.get_metric_history(run.info.run_id, "cv_acc_mean")
        assert trial.state.name == optuna_state[run.data.tags["esc50.status"]]
        assert trial.value == (history[-1].value if history else None)
        assert trial.intermediate_values == {m.step: m.value for m in history}


# ---- clear errors before anything starts -----------------------------------------------------------


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and err.startswith("esc50 search: error: "), err
    return err


@pytest.fixture
def base(tiny_shards: str, mlflow_uri: str, tmp_path: Path) -> list[str]:
    return ["search", "--smoke", "--shards", tiny_shards, "--tracking-uri", mlflow_uri,
            "--storage", str(tmp_path / "runs"), "-q"]  # fmt: skip


def test_bad_space_name(base: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(base + ["--space", "defualt"], capsys)
    assert "--space 'defualt': no such space; named spaces: seed, default, cpu, augment, regularize" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--trials", "three"], "--trials 'three': not an integer"),
        (["--trials", "0"], "--trials 0: must be an integer > 0"),
        (["--folds", "1,7"], "--folds '1,7': folds are among 1,2,3,4,5"),
        (["--sampler", "grid"], "--sampler 'grid': not one of tpe, random, cmaes"),
        (["--cpus-per-fold", "-1"], "--cpus-per-fold -1.0: must be a number > 0"),
        (["--reduction-factor", "1"], "--reduction-factor 1.0: must be > 1"),
        (["--name", "../x"], "--name '../x': use letters, digits"),
        (["--shards", "/nonexistent/shards"], "--shards /nonexistent/shards: not a prepared dataset"),
    ],
)
def test_bad_option(
    base: list[str], extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in _error(base + extra, capsys)


def test_unreachable_tracking_uri(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    err = _error(base + ["--tracking-uri", "http://127.0.0.1:9"], capsys)
    assert "--tracking-uri http://127.0.0.1:9: cannot use this tracking store" in err
    err = _error(base + ["--tracking-uri", f"sqlite:///{tmp_path}/no/such/dir/mlflow.db"], capsys)
    assert "does not exist" in err


def test_bad_storage(base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    err = _error(base + ["--storage", str(blocker / "runs")], capsys)
    assert f"--storage {blocker / 'runs'}: cannot write there" in err
    err = _error(base + ["--storage", "nosuchscheme://bucket/runs"], capsys)
    assert "--storage nosuchscheme://bucket/runs" in err


def test_resume_unknown_search(base: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(base + ["--resume", "never-ran"], capsys)
    assert "--resume never-ran: no search 'never-ran'" in err


def test_resume_refuses_shards_of_another_fingerprint_unless_forced(
    base: list[str], tiny_shards: str, mlflow_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The search "moved" started on shards with another fingerprint (its esc50_data.json says so)."""
    from search.experiment import DATA_FILE, shards_record

    opts = SearchOptions(
        name="moved", smoke=True, shards=tiny_shards, tracking_uri=mlflow_uri, storage=str(tmp_path / "runs")
    ).resolve()
    saved = tmp_path / "runs" / "moved"
    saved.mkdir(parents=True)
    (saved / "esc50_search.json").write_text(opts.to_json())
    (saved / "tuner.pkl").write_bytes(b"")  # a search that started
    (saved / DATA_FILE).write_text(json.dumps({"fingerprint": "0123abcd", "shards": tiny_shards}))
    err = _error(base + ["--resume", "moved"], capsys)
    assert f"--resume moved: the shards at {tiny_shards} have fingerprint " in err
    assert "the search started with 0123abcd" in err and "--force" in err
    # --force goes on with the shards as they are now (the record the new trials carry)
    now = shards_record(opts, resume=True, force=True)
    manifest = json.loads((Path(tiny_shards) / "_manifest.json").read_text())
    assert now["fingerprint"] == manifest["fingerprint"] != "0123abcd"
    # the same fingerprint resumes without --force; --force alone is not a resume
    (saved / DATA_FILE).write_text(json.dumps({"fingerprint": manifest["fingerprint"]}))
    assert shards_record(opts, resume=True, force=False)["fingerprint"] == manifest["fingerprint"]
    assert "--force: only with --resume" in _error(base + ["--force"], capsys)


def test_run_search_rejects_a_name_in_use(tiny_shards: str, mlflow_uri: str, tmp_path: Path) -> None:
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "tuner.pkl").write_bytes(b"")
    opts = SearchOptions(
        name="taken", smoke=True, shards=tiny_shards, tracking_uri=mlflow_uri, storage=str(tmp_path / "runs")
    )
    with pytest.raises(UserError, match="--name taken: a search of that name exists .* --resume taken"):
        run_search(opts)


def test_searcher_tells_optuna_which_trials_asha_stopped() -> None:
    """A trial stopped early is PRUNED for TPE (ranked below finished trials), with its last value."""
    import optuna

    from search.searcher import EarlyStopAwareOptunaSearch
    from spaces import load_space

    space = load_space("regularize", {"epochs": 4})
    s = EarlyStopAwareOptunaSearch(
        space=space, metric="cv_acc_mean", mode="max", sampler=optuna.samplers.TPESampler(seed=0)
    )
    assert s.suggest("done")["epochs"] == 4 and s.suggest("stopped")["epochs"] == 4
    s.on_trial_result("done", {"cv_acc_mean": 0.1, "training_iteration": 1, "epoch": 1})
    s.on_trial_complete("done", {"cv_acc_mean": 0.3, "training_iteration": 4, "epoch": 4})
    s.on_trial_complete("stopped", {"cv_acc_mean": 0.05, "training_iteration": 1, "epoch": 1})
    states = [(t.state.name, t.value, t.intermediate_values) for t in s._ot_study.trials]
    assert states == [("COMPLETE", 0.3, {1: 0.1, 4: 0.3}), ("PRUNED", 0.05, {1: 0.05})]


def test_stored_study_ignores_a_replayed_result_of_a_finished_trial(tmp_path: Path) -> None:
    """After a killed driver, Tune's saved state can lag the stored study: the resumed search
    replays results of a trial the study already saw complete. The first record stands."""
    from search.options import SearchOptions
    from search.searcher import make_searcher
    from spaces import load_space

    opts = SearchOptions(
        name="replay", space="regularize", optuna_storage=f"sqlite:///{tmp_path / 'optuna.db'}"
    )
    s = make_searcher(load_space("regularize", {"epochs": 2}), opts)
    s.suggest("t1")
    s.on_trial_result("t1", {"cv_acc_mean": 0.1, "training_iteration": 1, "epoch": 1})
    s.on_trial_complete("t1", {"cv_acc_mean": 0.3, "training_iteration": 2, "epoch": 2})
    s._completed_trials.discard("t1")  # as Tune restores it: the searcher state saved before the end
    s.on_trial_result("t1", {"cv_acc_mean": 0.9, "training_iteration": 3, "epoch": 2})  # replayed, a step on
    (t,) = s._ot_study.trials
    assert (t.state.name, t.value, t.intermediate_values) == ("COMPLETE", 0.3, {1: 0.1, 2: 0.3})


def test_resumed_searcher_fails_the_stored_trials_tune_never_saved(tmp_path: Path) -> None:
    """A driver killed after asking Optuna for a trial and before Tune saved it: on resume (Tune
    restores the searcher from its saved state) that trial, RUNNING in optuna.db, is told FAIL;
    the trials the saved state knows go on."""
    import optuna

    from search.options import SearchOptions
    from search.searcher import EarlyStopAwareOptunaSearch, make_searcher
    from search.study import LOST_ATTR, open_storage
    from spaces import load_space

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = load_space("regularize", {"epochs": 2})
    s = make_searcher(space, SearchOptions(name="lost", space="regularize", optuna_storage=url))
    s.suggest("t1")
    s.save(str(tmp_path / "searcher.pkl"))  # Tune saves its state...
    s.suggest("t2")  # ...the driver asks for one more trial and is killed before the next save

    resumed = EarlyStopAwareOptunaSearch(
        space=space, metric="cv_acc_mean", mode="max", storage=open_storage(url), study_name="lost"
    )
    resumed.restore(str(tmp_path / "searcher.pkl"))
    resumed.on_trial_complete("t1", {"cv_acc_mean": 0.3, "training_iteration": 2, "epoch": 2})
    t1, t2 = optuna.load_study(study_name="lost", storage=url).trials
    assert (t1.user_attrs["tune_trial_id"], t1.state.name, t1.value) == ("t1", "COMPLETE", 0.3)
    assert (t2.user_attrs["tune_trial_id"], t2.state.name) == ("t2", "FAIL") and LOST_ATTR in t2.user_attrs
    resumed.restore(str(tmp_path / "searcher.pkl"))  # a second resume: nothing left to fail
    assert [t.state.name for t in optuna.load_study(study_name="lost", storage=url).trials] == [
        "COMPLETE",
        "FAIL",
    ]
