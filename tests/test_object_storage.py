"""Shards, Tune storage, checkpoints, resume and promotion on an S3 API (moto's server on loopback,
its own process): nothing below the HTTP API is mocked, and the product finds the endpoint and the
credentials only in the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).

The search drivers run as subprocesses that join the shared Ray session with --address, as a
driver on a cluster does: their trials get the AWS variables with the job (search/tune.py
STORAGE_ENV), not from the test's environment. The slowest test of the suite (see `slow`): a
search killed and resumed, and at the same time another whose S3 server (a second one) stops
answering for 20 s; run at once, the outage's idle seconds overlap the other search's work."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from search.release.promote import promote
from search.store import client
from tests.fixtures.records import create_store, mlflow_runs, trial_statuses
from tests.fixtures.services import S3Server, moto_server

pytestmark = [pytest.mark.ray, pytest.mark.slow]
OUTAGE_S = 20


def _driver(s3, uri: str, tmp_path: Path, *argv: str, log: str = "driver.log") -> subprocess.Popen:
    import ray

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3.env)
    create_store(uri)  # before the driver does, not at once with the polling of trial_statuses
    out = open(tmp_path / log, "a")
    cmd = [sys.executable, "-m", "search", "search", *argv, "--tracking-uri", uri]
    cmd += ["--address", ray.get_runtime_context().gcs_address, "-q"]
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)


def _wait(proc: subprocess.Popen, timeout: float, log: Path) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the search did not end in {timeout} s:\n{log.read_text()[-3000:]}")


def _check_search(uri: str, name: str, trials: int, s3, bucket: str) -> dict:
    """One run per trial, every one completed with each epoch once, its checkpoint in the bucket."""
    parent, runs = mlflow_runs(uri, name)  # asserts one parent and one run per trial
    assert parent.info.status == "FINISHED" and len(runs) == trials
    c = client(uri)
    keys = set(s3.keys(bucket))
    for tid, run in runs.items():
        assert run.data.tags["esc50.status"] == "completed", (tid, run.data.tags)
        assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "cv_acc_mean")) == [1, 2]
        ckpt = run.data.tags["esc50.checkpoint"]
        assert ckpt.startswith(f"s3://{bucket}/"), ckpt
        prefix = ckpt.removeprefix(f"s3://{bucket}/")
        assert {f"{prefix}/meta.json", f"{prefix}/fold_1.pt", f"{prefix}/fold_2.pt"} <= keys, prefix
        # after the search only the latest checkpoint of each trial is left (search/tune.py)
        trial_dir = prefix.rsplit("/", 1)[0]
        assert {
            k.split("/")[len(trial_dir.split("/"))] for k in keys if k.startswith(trial_dir + "/checkpoint_")
        } == {prefix.rsplit("/", 1)[1]}
    return runs


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    """One bucket for the module: each search keeps to its own prefix (tune/<name>/)."""
    name = f"esc50-object-storage-{os.getpid()}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def s3_shards(s3_server, bucket: str, esc50_tree: Path, tiny_params) -> str:
    """`esc50 prepare --out s3://...`, in this process, with the AWS variables set; once for the
    module (the searches only read the shards)."""
    from search.data.prepare import prepare

    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.env.items():
            mp.setenv(k, v)
        uri = f"s3://{bucket}/shards"
        prepare(str(esc50_tree), uri, tiny_params, workers=1, progress=False)
    return uri


@pytest.fixture(scope="module")
def outage_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A second S3 server, for the search whose server stops answering: its SIGSTOP must not stall
    the kill/resume search running at the same time on the first. Not waited for here: it starts
    while `s3_shards` prepares (the test lists it first)."""
    with moto_server(tmp_path_factory.mktemp("moto_outage") / "moto.log", wait=False) as server:
        yield server


def _copy_objects(src: S3Server, dst: S3Server, bucket: str, prefix: str) -> None:
    """The bucket's objects under `prefix`, from one server to the other (the prepared shards)."""
    a, b = src.client(), dst.client()
    b.create_bucket(Bucket=bucket)
    for key in src.keys(bucket, prefix):
        b.put_object(Bucket=bucket, Key=key, Body=a.get_object(Bucket=bucket, Key=key)["Body"].read())


def test_prepare_search_kill_resume_promote_and_an_outage_on_s3(
    outage_server, ray_session, s3_server, bucket: str, s3_shards: str, tmp_path: Path
) -> None:
    """Two searches at once on the shared Ray, each on its own S3 server: one killed (SIGKILL),
    resumed and promoted; one whose server stops answering for 20 s while its trial trains.
    Either one failing fails the test (the background one's failure is raised here)."""
    outage_server.wait_ready()
    _copy_objects(s3_server, outage_server, bucket, "shards/")
    (tmp_path / "outage").mkdir()
    (tmp_path / "kill").mkdir()
    kill_uri = f"sqlite:///{tmp_path / 'kill' / 'mlflow.db'}"
    with ThreadPoolExecutor(1) as pool:
        outage = pool.submit(_search_through_an_outage, outage_server, bucket, s3_shards, tmp_path / "outage")
        _kill_and_resume(s3_server, bucket, s3_shards, kill_uri, tmp_path / "kill")
        outage.result()  # re-raises its assertion failure
    # promote in this process only now: MLflow's fluent API follows one global tracking URI, which
    # the outage thread's polling (search.store.client) sets to its own store
    _promote_from_s3(s3_server, bucket, kill_uri)


def _kill_and_resume(
    s3_server: S3Server, bucket: str, s3_shards: str, mlflow_uri: str, tmp_path: Path
) -> None:
    """`esc50 prepare` wrote the shards to S3; a search on S3 is SIGKILLed after its first trial and
    resumed to the end."""
    keys = s3_server.keys(bucket, "shards/")
    assert sorted(k.rsplit("/", 1)[-1] for k in keys if k.endswith(".parquet")) == [
        f"fold-{k}.parquet" for k in (1, 2, 3, 4, 5)
    ]
    storage = f"s3://{bucket}/tune"
    argv = ["--smoke", "--name", "s3res", "--trials", "2", "--concurrency", "1", "--no-asha"]
    driver = _driver(s3_server, mlflow_uri, tmp_path, *argv, "--shards", s3_shards, "--storage", storage)
    try:
        deadline = time.monotonic() + 240
        while "completed" not in trial_statuses(mlflow_uri, "s3res").values():
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.3)
        driver.kill()  # SIGKILL: Tune's state is whatever it had synced to S3
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert any(k.endswith("tuner.pkl") for k in s3_server.keys(bucket, "tune/s3res/"))

    resumed = _driver(s3_server, mlflow_uri, tmp_path, "--resume", "s3res", "--storage", storage)
    assert _wait(resumed, 400, tmp_path / "driver.log") == 0, (tmp_path / "driver.log").read_text()[-3000:]
    _check_search(mlflow_uri, "s3res", 2, s3_server, bucket)


def _promote_from_s3(s3_server: S3Server, bucket: str, mlflow_uri: str) -> None:
    """promote: the checkpoint and the out-of-fold shards come from S3 (the variables, here too)."""
    for k, v in s3_server.env.items():
        os.environ[k] = v
    try:
        result = promote(search="s3res", tracking=mlflow_uri)
    finally:
        for k in s3_server.env:
            os.environ.pop(k, None)
    assert result.trial.checkpoint.startswith(f"s3://{bucket}/tune/s3res/")
    assert result.metrics["oof_clips"] == 16


def _search_through_an_outage(s3_server: S3Server, bucket: str, s3_shards: str, tmp_path: Path) -> None:
    """The S3 server stops answering (SIGSTOP: connections hang, objects kept) while the first trial
    trains. The search finishes, or fails and is resumed; then every trial has one run, each epoch
    once, and its checkpoint in the bucket."""
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = f"s3://{bucket}/tune"
    argv = ["--smoke", "--name", "s3fault", "--trials", "1", "--no-asha"]
    driver = _driver(s3_server, mlflow_uri, tmp_path, *argv, "--shards", s3_shards, "--storage", storage)
    log = tmp_path / "driver.log"
    try:
        deadline = time.monotonic() + 240
        while "running" not in trial_statuses(mlflow_uri, "s3fault").values():
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        s3_server.pause()
        try:
            time.sleep(OUTAGE_S)
        finally:
            s3_server.resume()
        code = _wait(driver, 400, log)
    finally:
        if driver.poll() is None:
            driver.kill()
    resumes = 0
    while code != 0 and resumes < 2:  # a clear error, then --resume
        print(f"\nthe search ended with {code}; its last lines:\n{log.read_text()[-1500:]}")
        resumes += 1
        code = _wait(
            _driver(s3_server, mlflow_uri, tmp_path, "--resume", "s3fault", "--storage", storage), 400, log
        )
    assert code == 0, log.read_text()[-3000:]
    _check_search(mlflow_uri, "s3fault", 1, s3_server, bucket)
    print(f"\nS3 outage of {OUTAGE_S} s: {resumes} resume(s) needed")
