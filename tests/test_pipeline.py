"""`esc50 main --smoke` (search/pipeline.py): the whole path on embedded defaults, then predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from search.cli import main
from search.store import client


@pytest.mark.ray
def test_main_smoke_prepares_searches_promotes_and_the_champion_predicts(
    ray_session: None, esc50_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # The embedded defaults are relative to the working directory: shards in ./data, Tune results in
    # ./runs, MLflow in ./mlflow.db. Run where they can be checked.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["main", "--smoke", "--source", str(esc50_tree), "--name", "main-1"]) == 0
    assert "esc50 main: done" in capsys.readouterr().out

    assert len(list((tmp_path / "data" / "shards").glob("*/_manifest.json"))) == 1
    assert (tmp_path / "runs" / "main-1" / "esc50_search.json").is_file()
    c = client(f"sqlite:///{tmp_path / 'mlflow.db'}", must_exist=True)
    champion = c.get_model_version_by_alias("esc50-cnn", "champion")
    assert str(champion.version) == "1"
    smoke = json.loads((tmp_path / "runs" / "main-1" / "esc50_search.json").read_text())
    assert (smoke["smoke"], smoke["trials"], smoke["epochs"]) == (True, 2, 2)

    clip = next(p for p in sorted((esc50_tree / "audio").iterdir()) if p.suffix == ".flac")
    capsys.readouterr()
    assert main(["predict", str(clip), "--json", "--top-k", "2"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert len(row["top"]) == 2 and row["top"][0]["label"]


def test_after_a_ctrl_c_main_names_the_steps_left() -> None:
    """Ctrl-C in the search: resume it, then promote. Ctrl-C in the promotion, after the search ended:
    only the promotion is left (a resume of a finished search would have nothing to do)."""
    from search.options import SearchOptions
    from search.pipeline import MainResult
    from search.tune import SearchResult

    fields = dict(experiment_name="esc50", experiment_id="1", parent_run_id="r", tracking_uri="sqlite:///m.db",
                  results_dir="runs/s", best_trial_id=None, best_cv_acc_mean=None, best_cv_acc_std=None,
                  best_checkpoint=None, best_run_id=None, counts={}, fold_epochs=0, seconds=0.0,
                  options=SearchOptions(name="s", storage="runs"))  # fmt: skip
    stopped = MainResult(None, SearchResult(name="s", interrupted=True, **fields), None, 1.0)  # type: ignore[arg-type]
    ended = MainResult(None, SearchResult(name="s", interrupted=False, **fields), None, 1.0)  # type: ignore[arg-type]
    promote = "esc50 promote --search s --tracking-uri sqlite:///m.db"
    assert stopped.next_commands() == f"esc50 search --resume s --storage runs && {promote}"
    assert ended.next_commands() == promote
