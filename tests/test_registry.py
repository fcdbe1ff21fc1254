"""The registry's two aliases: a promotion moves `champion` to the new version and `previous` to the
one it replaced; a rollback moves them back one step at a time (search/release/champion.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from search.cli import main
from search.errors import UserError
from search.release.champion import CHAMPION, PREVIOUS, rollback
from search.release.promote import promote
from tests.fixtures.promoted import copy_checkpoint, log_search
from tests.test_promote import _aliases, _trial


def _champion_runs(uri: str) -> dict[tuple[str, str], str]:
    """(search, role) -> the `esc50.champion` tag, for the runs that carry it."""
    from search.store import client

    c = client(uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(exps, "tags.`esc50.champion` LIKE 'esc50-cnn%'")
    return {
        (r.data.tags["esc50.search"], r.data.tags["esc50.role"]): r.data.tags["esc50.champion"] for r in runs
    }


def test_second_promote_moves_champion_sets_previous_and_rollback_restores(
    trained_checkpoint, mlflow_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shards, art = trained_checkpoint.shards, tmp_path / "artifacts"
    log_search(mlflow_uri, "first", [_trial(trained_checkpoint.path, 0.8)], shards, art)
    log_search(
        mlflow_uri,
        "second",
        [_trial(copy_checkpoint(trained_checkpoint, tmp_path / "c2"), 0.85)],
        shards,
        art,
    )
    log_search(
        mlflow_uri, "third", [_trial(copy_checkpoint(trained_checkpoint, tmp_path / "c3"), 0.9)], shards, art
    )
    args = ["promote", "--tracking-uri", mlflow_uri, "--search"]

    assert main([*args, "first"]) == 0
    assert main([*args, "second"]) == 0
    assert _aliases(mlflow_uri) == {CHAMPION: "2", PREVIOUS: "1"}
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("esc50-cnn v2 is champion (search second") and out[-1].endswith("previous: v1")
    assert promote(search="third", tracking=mlflow_uri).previous == "2"
    assert _aliases(mlflow_uri) == {CHAMPION: "3", PREVIOUS: "2"}
    # the runs table shows the champion: its trial run and search run carry the tag, no other run
    assert _champion_runs(mlflow_uri) == {
        ("third", "search"): "esc50-cnn v3",
        ("third", "trial"): "esc50-cnn v3",
    }

    assert main(["promote", "--rollback", "--tracking-uri", mlflow_uri]) == 0
    assert capsys.readouterr().out.strip() == "esc50-cnn: champion is v2, previous is v1"
    assert _aliases(mlflow_uri) == {CHAMPION: "2", PREVIOUS: "1"}
    assert _champion_runs(mlflow_uri) == {
        ("second", "search"): "esc50-cnn v2",
        ("second", "trial"): "esc50-cnn v2",
    }
    assert rollback(mlflow_uri) == ("1", None)
    assert _aliases(mlflow_uri) == {CHAMPION: "1"}
    with pytest.raises(UserError, match="no 'previous' version"):
        rollback(mlflow_uri)
    # Without --search, the most recent search is promoted.
    assert promote(tracking=mlflow_uri).trial.search == "third"
