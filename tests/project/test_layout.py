"""The shape of the source tree: no import cycles, the floor of each dependency, files of one thing."""
from __future__ import annotations

import ast
import importlib.metadata
import inspect
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "transferkit"
PYPROJECT = SRC.parents[1] / "pyproject.toml"


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        mod = ".".join(("transferkit", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transferkit"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("transferkit"))
        graph[mod] = deps
    return graph


def test_no_import_cycle_and_imports_point_one_way():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            if d == "transferkit" or d not in graph:
                continue
            assert state.get(d) != 1, f"import cycle: {' -> '.join(stack + [m, d])}"
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
    for m, deps in graph.items():
        if m.startswith(("transferkit.backbones", "transferkit.augment")):
            assert not {d for d in deps if d.startswith(("transferkit.pipelines", "transferkit.cli"))}, m
        if m.startswith("transferkit.pipelines"):
            assert not {d for d in deps if d.startswith("transferkit.cli")}, m


def test_no_source_file_over_about_400_lines_without_a_reason_at_its_top():
    long = [p for p in SRC.rglob("*.py") if len(p.read_text().splitlines()) > 450
            and "lines:" not in "\n".join(p.read_text().splitlines()[:15])]
    assert not long, f"split these, or say at their top why they are long (a 'lines:' note): {long}"


def test_lightning_floor_is_the_first_release_with_the_api_the_code_calls():
    import pytorch_lightning as pl

    floor = re.search(r'"pytorch-lightning>=([\d.]+)"', PYPROJECT.read_text()).group(1)
    assert floor == "2.6"
    installed = tuple(int(x) for x in importlib.metadata.version("pytorch-lightning").split(".")[:2])
    assert installed >= (2, 6)
    assert "weights_only" in inspect.signature(pl.Trainer.fit).parameters
    assert "weights_only" in inspect.signature(pl.Trainer.save_checkpoint).parameters


def test_test_modules_have_unique_basenames():
    # tests/ has no __init__.py: pytest imports each module by its basename, so two of one name
    # stop the whole collection.
    from collections import Counter

    names = Counter(p.name for p in (SRC.parents[1] / "tests").rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1]
