"""The package's floors: imports point one way, cli -> bench -> batch, sweep -> core ->
engine, imaging, models (bench measures the batch and the sweep), and no module imports
itself back through others (no import circle)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "pisa_cli"
SHARED = {"options", "errors", "fsutil", "__init__", "__main__"}
"""Leaf modules at the root that every floor may use (they import no floor)."""
FLOORS = {
    "cli": 4,
    "bench": 3,
    "batch": 2,
    "sweep": 2,
    "core": 1,
    "engine": 0,
    "imaging": 0,
    "models": 0,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every pisa_cli module ``path`` imports, at the top or inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("pisa_cli")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pisa_cli"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in modules}


def floor_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_point_down_the_floors():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        here = module_name(path)
        mine = floor_of(here)
        for target in imports(path):
            theirs = floor_of(target)
            if theirs == mine or theirs in SHARED or mine in ("__init__", "__main__"):
                continue
            if mine in SHARED:
                wrong.append(f"{here} -> {target} (a shared leaf imports a floor)")
            elif FLOORS[theirs] >= FLOORS[mine]:
                wrong.append(f"{here} -> {target}")
    assert wrong == [], "\n".join(sorted(wrong))


def test_no_import_circle():
    graph = {module_name(path): imports(path) for path in PACKAGE.rglob("*.py")}
    for node in graph:  # a package imports its own modules (re-exports); not a circle
        graph[node] = {t for t in graph[node] if not t.startswith(node + ".")}
    circles = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                circles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert circles == [], "\n".join(circles)


def test_the_checks_see_a_circle_and_a_wrong_way_import(tmp_path, monkeypatch):
    """The two tests above fail on a package that breaks their rules."""
    import pytest

    fake = tmp_path / "pisa_cli"
    for name, text in {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/a.py": "from pisa_cli.cli import b\n",
        "cli/__init__.py": "",
        "cli/b.py": "def f():\n    from pisa_cli.core import a\n",
    }.items():
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text(text)
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    with pytest.raises(AssertionError, match=r"pisa_cli\.core\.a -> pisa_cli\.cli"):
        test_imports_point_down_the_floors()
    with pytest.raises(
        AssertionError, match=r"pisa_cli\.cli\.b -> pisa_cli\.core\.a -> pisa_cli\.cli\.b"
    ):
        test_no_import_circle()


def _declared(kind: type) -> dict[str, list[str]]:
    """Module-level definitions of ``kind`` (ast.ClassDef, ast.FunctionDef) by name: the
    modules that define each."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, kind):
                found.setdefault(node.name, []).append(module_name(path))  # type: ignore[attr-defined]
    return found


def test_each_protocol_is_declared_once():
    """One Display, one Result: a second protocol of the same name drifts from the first."""
    protocols = {
        node.name
        for path in PACKAGE.rglob("*.py")
        for node in ast.parse(path.read_text(encoding="utf-8")).body
        if isinstance(node, ast.ClassDef)
        and any(getattr(base, "id", "") == "Protocol" for base in node.bases)
    }
    classes = _declared(ast.ClassDef)
    twice = {name: classes[name] for name in protocols if len(classes[name]) > 1}
    assert twice == {}


def test_each_public_function_name_is_declared_once():
    """A name says what its function does: two module-level functions of one name (two
    ``write_report``, two ``random_pipeline``...) are two things a reader confuses."""
    twice = {
        name: modules
        for name, modules in _declared(ast.FunctionDef).items()
        if len(modules) > 1 and not name.startswith("_")
    }
    assert twice == {}


def test_the_pipeline_keeps_the_stage_api_and_its_models_the_raw_calls():
    """``PisaPipeline`` holds a ``core.models.Models`` for the raw model calls (it had 27
    methods mixing both): its own methods are the stage API, a handful."""
    tree = ast.parse((PACKAGE / "core" / "pipeline.py").read_text(encoding="utf-8"))
    pipeline = next(n for n in tree.body if getattr(n, "name", "") == "PisaPipeline")
    methods = {n.name for n in pipeline.body if isinstance(n, ast.FunctionDef)}  # type: ignore[attr-defined]
    raw = {"embed", "encode", "generator", "pad", "predict", "step", "decode", "vae_for"}
    assert methods & raw == set() and len(methods) <= 14, sorted(methods)
