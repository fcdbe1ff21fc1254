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
from search.store import client, hide_mlflow_notices

DEFAULT_NAME = "esc50-cnn"
CHAMPION, PREVIOUS = "champion", "previous"
TAG_REPLACED = "esc50.replaced"  # on a version: the champion it replaced (for rollback)


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
    return version, previous


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
        c.set_model_version_tag(name, current, "esc50.rolled_back_from", "true")
    before = c.get_model_version(name, back).tags.get(TAG_REPLACED) or None
    if before and before != back and _version_exists(c, name, before):
        c.set_registered_model_alias(name, PREVIOUS, before)
    else:
        before = None
        c.delete_registered_model_alias(name, PREVIOUS)
    return back, before


def _version_exists(c: Any, name: str, version: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        c.get_model_version(name, version)
        return True
    except MlflowException:
        return False
