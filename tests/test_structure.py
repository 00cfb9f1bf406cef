"""The package's shape: no import circles between our modules (counting imports inside functions
too, which is where the old chain <-> stages.responses circle hid), and one Stage declaration per
stage module, listed by the registry. Reads the source; imports nothing heavy."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
PACKAGE = Path(__file__).resolve().parents[1] / "scalequest_ray"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            submodules = {f"{target}.{a.name}" for a in node.names} & modules.keys()
            # `from . import x` of a module x depends on x, not on the package being imported
            deps |= submodules or ({target} & modules.keys())
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def test_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles():
    graph = import_graph()
    assert "scalequest_ray.stages.responses" in graph["scalequest_ray.stages.difficulty_labels"]
    assert find_cycle(graph) is None


def test_lower_modules_import_no_stage():
    graph = import_graph()
    for low in ("columns", "stage", "storage", "chain", "runner", "engine", "config"):
        assert not any(d.startswith("scalequest_ray.stages") for d in graph[f"scalequest_ray.{low}"]), low


def test_every_stage_module_declares_its_stage_in_the_registry():
    from scalequest_ray.config import CHAIN
    from scalequest_ray.stage import Stage
    from scalequest_ray.stages import registry

    specs = registry()
    modules = {p.stem for p in (PACKAGE / "stages").glob("*.py") if p.stem != "__init__"}
    assert set(specs) == modules and all(isinstance(s, Stage) for s in specs.values())
    assert set(CHAIN) <= set(specs)
    # resume ids as the failure tests rely on them
    assert {n: s.resume_id for n, s in specs.items() if s.resume_id} == {
        "questions": "id", "language": "query_id", "solvability": "query_id",
        "responses": "request_no", "reward": "response_id"}
    # only a stage that numbers its rows itself resumes over a user's file (ids there may repeat)
    assert {n for n, s in specs.items() if s.resume_id_made_here} == {"responses"}
