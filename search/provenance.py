"""Which code and which data made a run: tags for every search, trial and promotion run.

    tags = code_tags()                                  # commit, dirty flag, versions
    tags |= data_tags(fingerprint, features)            # the shards' fingerprint and features
    log_dataset(client, run_id, shards, fingerprint, features, n_clips)   # an MLflow dataset input

The commit goes under MLflow's standard tag `mlflow.source.git.commit`, which the UI shows on every
run. No Ray, no torch: versions come from the installed package metadata.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TAG_COMMIT = "mlflow.source.git.commit"  # MLflow's own tag: shown in the UI
TAG_DIRTY = "esc50.git_dirty"
TAG_VERSION = "esc50.version"
TAG_FINGERPRINT = "esc50.fingerprint"
TAG_FEATURES = "esc50.features"
PACKAGES = ("torch", "ray", "optuna", "mlflow")  # tagged esc50.<name>_version
DATASET_NAME = "esc50-shards"


@functools.cache
def git_state(where: str | None = None) -> tuple[str, bool | None]:
    """(commit, dirty) of the checkout this code runs from; ("", None) outside a git checkout."""
    root = where or str(Path(__file__).resolve().parent.parent)

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "", None
    return commit, dirty


def versions() -> dict[str, str]:
    """The installed versions of this package and of torch, Ray, Optuna and MLflow."""
    out = {}
    for name in ("esc50-search", *PACKAGES):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = ""
    return out


def code_tags() -> dict[str, str]:
    """The code version as run tags: commit, dirty flag, package and library versions."""
    commit, dirty = git_state(os.environ.get("ESC50_GIT_DIR"))
    v = versions()
    tags = {
        TAG_COMMIT: commit,
        TAG_DIRTY: "" if dirty is None else str(dirty).lower(),
        TAG_VERSION: v.pop("esc50-search"),
    }
    tags.update({f"esc50.{name}_version": version for name, version in v.items()})
    return tags


def data_tags(fingerprint: str | None, features: Mapping[str, Any] | None) -> dict[str, str]:
    """The shards' fingerprint and feature parameters as run tags."""
    return {
        TAG_FINGERPRINT: str(fingerprint or ""),
        TAG_FEATURES: json.dumps(dict(features or {}), sort_keys=True),
    }


def manifest_data(shards: str) -> tuple[str | None, dict[str, Any], int | None]:
    """(fingerprint, feature parameters, clips) of prepared shards, from their manifest."""
    from trainable.shards import read_manifest

    manifest = read_manifest(shards) or {}
    return manifest.get("fingerprint"), dict(manifest.get("params") or {}), manifest.get("n_clips")


def log_dataset(
    c: Any,
    run_id: str,
    shards: str,
    fingerprint: str | None,
    features: Mapping[str, Any] | None,
    n_clips: int | None = None,
    context: str = "training",
) -> None:
    """The shards as an MLflow dataset input of the run (the UI's Datasets column): name, digest
    (the fingerprint), source (the URI), schema (the feature parameters), profile (the clips)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source_type = shards.split("://", 1)[0] if "://" in shards else "local"
    dataset = Dataset(
        name=DATASET_NAME,
        digest=str(fingerprint or "")[:36] or "unknown",
        source_type=source_type,
        source=json.dumps({"uri": shards}),
        schema=json.dumps({"features": dict(features or {})}, sort_keys=True),
        profile=json.dumps({"n_clips": n_clips, "fingerprint": fingerprint}),
    )
    c.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])
