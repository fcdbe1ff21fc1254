"""The registered model's versions and its two aliases: `champion`, what `esc50 predict` and
`models:/esc50-cnn@champion` load, and `previous`, what `esc50 promote --rollback` brings back.

    version, previous = register_champion(c, name, model_uri, tags, description)
    champion, previous = rollback(tracking, name)

Each version is tagged with the champion it replaced (`esc50.replaced`), so that a rollback can
move `previous` one more step back.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from typing import Any

from search.errors import UserError
from search.store import (
    TAG_CHAMPION,
    TAG_REGISTERED,
    TAG_REPLACED,
    TAG_ROLLED_BACK,
    TAG_TRIAL_RUN,
    all_runs,
    client,
    filter_literal,
    hide_mlflow_notices,
)

DEFAULT_NAME = "esc50-cnn"
CHAMPION, PREVIOUS = "champion", "previous"


def alias_version(c: Any, name: str, alias: str) -> str | None:
    """The version `alias` points at; None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def register_champion(
    c: Any, name: str, model_uri: str, tags: Mapping[str, str], description: str
) -> tuple[str, str | None]:
    """`model_uri` as a new version of `name` with `tags` and `description`, made `champion`; the
    version that was champion becomes `previous`. Returns (version, previous)."""
    import mlflow

    previous = alias_version(c, name, CHAMPION)
    tags = {**tags, TAG_REPLACED: previous or ""}
    with hide_mlflow_notices(), contextlib.redirect_stderr(io.StringIO()):  # its "Created version" prints
        version = str(mlflow.register_model(model_uri, name, tags=tags).version)
    c.update_model_version(name, version, description=description)
    c.set_registered_model_alias(name, CHAMPION, version)
    if previous and previous != version:
        c.set_registered_model_alias(name, PREVIOUS, previous)
    mark_champion_runs(c, name)
    return version, previous


def _source_runs(c: Any, name: str, version: str) -> tuple[str | None, str | None]:
    """(the trial run `version` was made from, that trial's search run), None where unknown."""
    from search.store import TAG_PARENT

    trial = c.get_model_version(name, version).tags.get(TAG_TRIAL_RUN)
    if not trial:
        return None, None
    try:
        return trial, c.get_run(trial).data.tags.get(TAG_PARENT)
    except Exception:  # the run was deleted: nothing to mark
        return None, None


def mark_champion_runs(c: Any, name: str = DEFAULT_NAME) -> None:
    """Put `esc50.champion` on the champion's trial and search runs and take it off every other run
    (a courtesy for the UI: a store that cannot be tagged keeps a correct registry)."""
    try:
        champion = alias_version(c, name, CHAMPION)
        label = f"{name} v{champion}"
        trial, search = _source_runs(c, name, champion) if champion else (None, None)
        if trial:
            c.set_tag(trial, TAG_REGISTERED, label)
        want = {r for r in (trial, search) if r}
        exps = [e.experiment_id for e in c.search_experiments()]
        flt = f"tags.`{TAG_CHAMPION}` LIKE {filter_literal(name + ' v%')}"
        for run in all_runs(c, exps, flt):
            if run.info.run_id not in want:
                c.delete_tag(run.info.run_id, TAG_CHAMPION)
        for rid in want:
            c.set_tag(rid, TAG_CHAMPION, label)
    except Exception as e:  # MlflowException, a run deleted meanwhile
        import logging

        logging.getLogger(__name__).warning("could not tag the champion's runs: %s", e)


def rollback(tracking: str | None = None, name: str = DEFAULT_NAME) -> tuple[str, str | None]:
    """Move `champion` back to `previous`; `previous` moves to the version that one had replaced
    (or is cleared). Returns (new champion, new previous)."""
    from mlflow.exceptions import MlflowException

    c = client(tracking, must_exist=True)
    try:
        c.get_registered_model(name)
    except MlflowException:
        raise UserError(f"no registered model {name!r} in {c.tracking_uri}") from None
    current = alias_version(c, name, CHAMPION)
    back = alias_version(c, name, PREVIOUS)
    if back is None:
        raise UserError(f"{name} has no {PREVIOUS!r} version to roll back to (champion: v{current})")
    c.set_registered_model_alias(name, CHAMPION, back)
    if current:
        c.set_model_version_tag(name, current, TAG_ROLLED_BACK, "true")
    before = c.get_model_version(name, back).tags.get(TAG_REPLACED) or None
    if before and before != back and _version_exists(c, name, before):
        c.set_registered_model_alias(name, PREVIOUS, before)
    else:
        before = None
        c.delete_registered_model_alias(name, PREVIOUS)
    mark_champion_runs(c, name)
    return back, before


def _version_exists(c: Any, name: str, version: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        c.get_model_version(name, version)
        return True
    except MlflowException:
        return False
