"""search/store.py: the Ray-free MLflow side (client, quoting), and who can start without Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from search.errors import UserError
from search.store import client, filter_literal, search_runs

ROOT = Path(__file__).resolve().parents[1]


def test_promote_predict_and_ui_start_without_importing_ray() -> None:
    # `esc50 predict` on one clip should not pay Ray's import (about a second here).
    code = "import sys, search.cli, search.release.predict, search.release.promote, search.ui; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_missing_sqlite_store_is_an_error_only_when_it_must_exist(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'none.db'}"
    with pytest.raises(UserError, match="no MLflow store"):
        client(uri, must_exist=True)
    assert not (tmp_path / "none.db").exists()


def test_filter_literal_finds_names_with_quotes_and_backslashes(tmp_path: Path) -> None:
    c = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.create_experiment("e", artifact_location=str(tmp_path / "art"))
    odd = "it's a \\ name"
    for name in (odd, "plain"):
        run = c.create_run(exp, tags={"esc50.role": "trial", "esc50.search": name})
        c.set_terminated(run.info.run_id)
    assert filter_literal("a'b") == '"a\'b"'
    found = search_runs(c, exp, odd, "trial")
    assert [r.data.tags["esc50.search"] for r in found] == [odd]
    with pytest.raises(UserError, match="both kinds of quotes"):
        filter_literal("""a'b"c""")
