"""Imports run one way: trainable <- spaces <- search, and inside search/ from a stage down to the
layers below it (the MLflow tracking layer depends on nothing above it); no import cycle, not even
one hidden under TYPE_CHECKING or inside a function. Read from the source with `ast`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("trainable", "spaces", "search")

# Lowest first. A module may import its own layer and the layers before it, never one after it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("trainable", ("trainable",)),
    ("spaces", ("spaces",)),
    (
        "search foundation",
        ("search.errors", "search.interrupt", "search.progress", "search.bbc", "search.study"),
    ),
    ("tracking", ("search.provenance", "search.store", "search.tracking")),
    ("data", ("search.data",)),
    ("search options", ("search.options", "search.sampler", "search.concurrency")),
    (
        "search parts",
        ("search.cluster", "search.experiment", "search.searcher", "search.report", "search.tune_progress"),
    ),
    ("search", ("search.tune",)),
    ("release", ("search.release",)),
    ("commands", ("search.ui", "search.pipeline", "search.cli", "search.__main__", "search")),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file (top level, functions, TYPE_CHECKING)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            # `from pkg import module` names a module; `from module import name` names the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _rank(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank is None:
        pytest.fail(f"{module} is in no layer: add it to tests/test_layers.py LAYERS")
    return rank


def test_every_import_runs_down_the_layers() -> None:
    upward = []
    for module, imported in sorted(_graph().items()):
        for dep in sorted(imported):
            if _rank(dep) > _rank(module):
                upward.append(
                    f"{module} ({LAYERS[_rank(module)][0]}) imports {dep} ({LAYERS[_rank(dep)][0]})"
                )
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append([*path[path.index(d) :], d])
            elif d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_what_it_must() -> None:
    """The checks would catch an upward import and a cycle: relative, function-level and
    TYPE_CHECKING imports are all read."""
    graph = _graph()
    assert "trainable.model.checkpoint" in graph["trainable.model.ensemble"]  # `from .checkpoint import ...`
    assert "trainable.cv" in graph["search.tune"]  # imported inside a function
    assert "search.store" in graph["search.tracking"]
    assert _rank("search.tune") > _rank("search.store") > _rank("trainable.cv")


def test_the_shipped_model_imports_only_itself() -> None:
    """trainable/model/ is copied whole into every promoted model (search/release/promote.py), where
    the rest of the project is not installed: it may import nothing of the project outside itself."""
    outside = [
        f"{m} imports {d}"
        for m, imported in sorted(_graph().items())
        if m.startswith("trainable.model")
        for d in sorted(imported)
        if not d.startswith("trainable.model") and d != "trainable"
    ]
    assert not outside, "\n".join(outside)


TRACKING_LAYER = {"search.store", "search.provenance", "search.tracking"}
_TAG = re.compile(r"(?<![\w/])esc50\.(?!csv\b)[a-z_]+")


def test_tag_names_are_spelled_only_in_the_tracking_layer() -> None:
    """Every `esc50.*` MLflow tag name is a constant of search/store.py (or provenance.py); other
    modules use the constant, so a renamed tag cannot leave a reader behind."""
    found = []
    for name, path in sorted(_modules().items()):
        if name in TRACKING_LAYER:
            continue
        tree = ast.parse(path.read_text())
        docs = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
            if isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)
        }  # prose may name a tag
        for node in ast.walk(tree):
            if id(node) in docs:
                continue
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _TAG.search(node.value):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "\n".join(found)
