"""`esc50 ui` in a real browser (headless Chromium from the system's package manager, driven by
Playwright): over the store of a smoke search and a promotion, the runs table shows the search
with its trials nested, a trial's page charts its per-epoch metrics (the mean and each fold), and
the registered model shows its `champion` alias. Skips only where no Chromium is installed
(`.ci/run` installs it where it can)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if os.path.exists(p)), None)
# Flags for a root user in a container, and no traffic beyond loopback.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def promoted_store(ray_session: None, tiny_shards: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A smoke search (2 trials) and its best trial promoted, in a fresh store."""
    from search.options import SearchOptions
    from search.release.promote import promote
    from search.tune import run_search

    d = tmp_path_factory.mktemp("ui_store")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    result = run_search(
        SearchOptions(name="ui-smoke", smoke=True, trials=2, folds=(1, 2), shards=tiny_shards,
                      tracking_uri=uri, storage=str(d / "runs"), verbose=0)
    )  # fmt: skip
    promotion = promote(search="ui-smoke", tracking=uri)
    return {"uri": uri, "result": result, "version": promotion.version}


@pytest.fixture(scope="module")
def ui(promoted_store: dict) -> Iterator[str]:
    """`esc50 ui` on a free loopback port; its base URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "search", "ui", "--tracking-uri", promoted_store["uri"], "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # mlflow server starts in seconds, a minute on a busy box
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=5):
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "esc50 ui did not answer"
                time.sleep(1)
        yield base
    finally:
        proc.terminate()  # esc50 ui stops the server's process group on SIGTERM
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def page(ui: str) -> Iterator:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="esc50_chromium_"),  # a fresh profile
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 2200, "height": 900},  # every column of the view in sight
        )
        ctx.set_default_timeout(90_000)
        try:
            yield ctx.new_page()
        finally:
            ctx.close()


def test_runs_table_nests_the_trials_under_the_search(page, ui: str, promoted_store: dict) -> None:
    from search.ui import runs_url

    result = promoted_store["result"]
    page.goto(runs_url(ui, result.experiment_id), wait_until="domcontentloaded")
    page.get_by_text("ui-smoke", exact=True).first.wait_for()
    assert "/runs" in page.url  # the experiment opens on the runs table, not GenAI's overview
    trials = [f"trial_{r.trial_id}" for r in result.rows]
    assert page.get_by_text(trials[0], exact=True).count() == 0  # nested: hidden until expanded
    # the search run's expander, in its run-name cell
    page.locator("button[data-component-id$='runnamecellrenderer.tsx_46']").first.click()
    for name in trials:
        page.get_by_text(name, exact=True).first.wait_for()
    # the promotion's run shows the registered version in the Models column
    page.get_by_text(f"v{promoted_store['version']}", exact=True).first.wait_for()
    # without configuring anything: the search's columns, and the champion on its runs
    for column in ("cv_acc_mean", "esc50.status", "esc50.champion"):
        page.get_by_text(column, exact=True).first.wait_for()
    champion = f"esc50-cnn v{promoted_store['version']}"
    assert page.get_by_text(champion, exact=True).count() >= 2  # the search run and the best trial
    assert page.get_by_text("completed", exact=True).count() >= 1  # a trial's status


def test_trial_page_charts_the_mean_and_each_fold(page, ui: str, promoted_store: dict) -> None:
    result = promoted_store["result"]
    rid = result.best_run_id
    page.goto(
        f"{ui}/#/experiments/{result.experiment_id}/runs/{rid}/model-metrics?workflowType=machine_learning",
        wait_until="domcontentloaded",
    )
    page.get_by_text("cv_acc_mean", exact=True).first.wait_for()  # a chart per metric, step = epoch
    page.locator("canvas, svg.main-svg, .js-plotly-plot").first.wait_for()
    search = page.get_by_placeholder("Search metric charts")
    for metric in ("fold1_acc", "fold2_acc"):  # charts further down render when shown: filter to them
        search.fill(metric)
        page.get_by_text(metric, exact=True).first.wait_for()


def test_registered_model_shows_the_champion_alias(page, ui: str, promoted_store: dict) -> None:
    page.goto(f"{ui}/#/models/esc50-cnn?workflowType=machine_learning", wait_until="domcontentloaded")
    page.get_by_text(f"Version {promoted_store['version']}", exact=False).first.wait_for()
    page.get_by_text("champion").first.wait_for()


def test_screenshots_are_pngs(tmp_path: Path) -> None:
    """The README's screenshots exist and are small PNGs (docs/)."""
    for name in ("ui_runs.png", "ui_trial.png"):
        data = (Path(__file__).resolve().parent.parent / "docs" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 400_000, name
