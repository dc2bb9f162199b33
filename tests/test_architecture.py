"""The seams between packages, read from the source (ast, nothing imported): the library's import graph has no
cycle; the pipeline imports nothing from lit/; the library never imports hydra; no entry-point script imports
another; no test module imports another."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO_ROOT

ROOT = Path(REPO_ROOT)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level imports count: they still bind the packages)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return out


def library_graph() -> dict[str, set[str]]:
    files = sorted((ROOT / "dalle2").rglob("*.py"))
    modules = {_module_name(f): f for f in files}
    graph = {}
    for name, path in modules.items():
        deps = {d for d in _imports(path) if d in modules and d != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of module-to-module imports, as a list that starts and ends at the same module, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v) :] + [v]
            if v not in state and (cycle := visit(v)):
                return cycle
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (cycle := visit(u)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"p": {"p.x"}, "p.x": {"p.y"}, "p.y": set()}) is None
    assert find_cycle({"p": {"p.x"}, "p.x": {"p"}}) == ["p", "p.x", "p"]


def test_library_import_graph_has_no_cycle():
    graph = library_graph()
    assert len(graph) > 40  # the walk saw the library
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_pipeline_and_plain_stages_import_nothing_from_lit():
    graph = library_graph()
    for name in (
        "dalle2.pipeline",
        "dalle2.stages",
        "dalle2.checkpoint",
        "dalle2.decoder.sampling",
        "dalle2.prior.sampling",
        "dalle2.serving.server",
    ):
        seen, todo = set(), [name]
        while todo:  # everything reachable, not only direct imports
            u = todo.pop()
            if u not in seen:
                seen.add(u)
                todo.extend(graph.get(u, ()))
        assert not [m for m in seen if m.startswith("dalle2.lit")], name


def test_library_never_imports_hydra():
    offenders = [
        str(f.relative_to(ROOT))
        for f in (ROOT / "dalle2").rglob("*.py")
        if any(m.split(".")[0] in ("hydra", "omegaconf") for m in _imports(f))
    ]
    assert offenders == []


@pytest.mark.parametrize("folder", ["train", "eval", "bench"])
def test_no_script_imports_another(folder):
    scripts = {f.stem for f in (ROOT / folder).glob("*.py")}
    for f in (ROOT / folder).glob("*.py"):
        bad = {m.split(".")[0] for m in _imports(f)} & (scripts - {f.stem})
        if folder == "bench":
            bad -= {"common"}  # bench/common.py is the benchmarks' shared helper module, not a script
        assert not bad, f"{f.name} imports {bad}"


def test_no_test_module_imports_another():
    tests = {f.stem for f in (ROOT / "tests").glob("test_*.py")}
    for f in (ROOT / "tests").rglob("*.py"):
        assert not ({m.split(".")[0] for m in _imports(f)} & tests), f.name
    # also the code of the scripts tests write and run (strings): no `from test_x import`
    for f in (ROOT / "tests").glob("test_*.py"):
        text = f.read_text()
        assert not any(f"from {t} import" in text or f"import {t}\n" in text for t in tests), f.name
