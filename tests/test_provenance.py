"""search/provenance.py: the code version outside a git checkout, and the dataset input MLflow
keeps for a run (its digest is the shards' fingerprint)."""

from __future__ import annotations

import json
from pathlib import Path

from search.provenance import DATASET_NAME, code_tags, data_tags, git_state, log_dataset


def test_outside_a_git_checkout_the_commit_is_empty(tmp_path: Path) -> None:
    assert git_state(str(tmp_path)) == ("", None)
    commit, dirty = git_state()  # this checkout
    assert len(commit) == 40 and dirty in (True, False)
    tags = code_tags()
    assert tags["mlflow.source.git.commit"] == commit
    assert set(tags) >= {"esc50.git_dirty", "esc50.version", "esc50.torch_version", "esc50.ray_version"}
    assert data_tags(None, None) == {"esc50.fingerprint": "", "esc50.features": "{}"}


def test_dataset_input_of_a_run(mlflow_uri: str) -> None:
    from search.store import client, experiment_id

    c = client(mlflow_uri)
    run = c.create_run(experiment_id(c, "esc50", mlflow_uri))
    log_dataset(c, run.info.run_id, "s3://bucket/shards", "f" * 64, {"n_mels": 64}, 2000)
    c.set_terminated(run.info.run_id)
    (inp,) = c.get_run(run.info.run_id).inputs.dataset_inputs
    d = inp.dataset
    assert (d.name, d.digest, d.source_type) == (DATASET_NAME, "f" * 36, "s3")
    assert json.loads(d.schema) == {"features": {"n_mels": 64}}
    assert json.loads(d.profile)["n_clips"] == 2000 and json.loads(d.source)["uri"] == "s3://bucket/shards"
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "training"}
