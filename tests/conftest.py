"""Shared fixtures live in tests/fixtures/*; this file only registers them."""

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

pytest_plugins = [
    "tests.fixtures.audio",
    "tests.fixtures.services",
    "tests.fixtures.promoted",
    "tests.fixtures.search_store",
]
