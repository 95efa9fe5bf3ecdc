"""The package layers of spark_mcore (README "Layout"): each package imports only packages of
its own layer or below, same-layer imports never form a cycle, and the rollout engines and
the weight sync never import each other. Every import counts: module level, inside functions
and under `if TYPE_CHECKING:`. A violation names the file and the line."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "spark_mcore"

# unit -> layer (higher imports lower). A unit is a sub-package (`rollout`) or a top-level
# module (`runtime`); `config.loader` and `config.run` are units of their own: the loader is a
# leaf every component config uses, RunConfig composes every component config.
LAYERS: dict[str, int] = {
    "types": 0, "config.loader": 0, "config": 0, "config.accel": 0, "errors": 0,
    "algo": 1, "rewards": 1, "data": 1, "transport": 1, "models": 1, "distributed": 1, "sglang": 1,
    "metrics": 1,
    "trainer": 2, "weights": 2, "rollout": 2, "spark": 2, "checkpoint": 2, "eval": 2,
    "config.run": 3, "engines": 3, "runtime": 3, "train": 3, "cli": 3, "twin": 3, "plan": 3, "doctor": 3,
    "rollout_worker": 3,
}
LAYER_NAMES = ["leaves", "foundations", "components", "assembly and programs"]
# Same-layer pairs that must not import each other in either direction.
APART: set[frozenset[str]] = {frozenset({"rollout", "weights"})}


@dataclass(frozen=True)
class Edge:
    src: str  # importing unit
    dst: str  # imported unit
    where: str  # file:line


def unit_of(module: str, package: str) -> str | None:
    """`spark_mcore.rollout.hf_engine` -> "rollout"; None for modules outside `package`."""
    parts = module.split(".")
    if parts[0] != package or len(parts) == 1:
        return None
    if parts[1] == "config" and len(parts) > 2:
        return f"config.{parts[2]}"
    return parts[1]


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_pkg: bool) -> list[str]:
    """Absolute module names an import statement names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".")
            base = base if is_pkg else base[:-1]
            base = base[:len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        # `from pkg import sub` may name a submodule: count both the package and `pkg.sub`.
        return [prefix] + [f"{prefix}.{a.name}" for a in node.names]
    return []


def import_edges(root: Path) -> list[Edge]:
    """Every unit -> unit import under `root` (a package directory), lazy ones included."""
    package = root.name
    edges: list[Edge] = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        src = unit_of(module, package)
        if src is None:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            for name in _imported(node, module, path.name == "__init__.py"):
                dst = unit_of(name, package)
                if dst is not None and dst != src:
                    edges.append(Edge(src, dst, f"{path.relative_to(root.parent)}:{node.lineno}"))
    return edges


def violations(edges: list[Edge], layers: dict[str, int], apart: set[frozenset[str]]) -> list[str]:
    """Upward imports, imports between packages kept apart, unknown units, and package cycles."""
    out: list[str] = []
    for e in edges:
        for unit in (e.src, e.dst):
            if unit not in layers:
                out.append(f"{e.where}: package '{unit}' has no layer; add it to LAYERS and the README table")
        if e.src in layers and e.dst in layers and layers[e.dst] > layers[e.src]:
            out.append(f"{e.where}: {e.src} ({LAYER_NAMES[layers[e.src]]}) imports {e.dst} "
                       f"({LAYER_NAMES[layers[e.dst]]}), a higher layer")
        if frozenset({e.src, e.dst}) in apart:
            out.append(f"{e.where}: {e.src} imports {e.dst}; these two packages must not import each other")
    out += [f"package cycle {' -> '.join(c)}: {where}" for c, where in _cycles(edges)]
    return sorted(set(out))


def _cycles(edges: list[Edge]) -> list[tuple[list[str], str]]:
    """One cycle per strongly connected group of units, with the imports that close it."""
    graph: dict[str, dict[str, str]] = {}
    for e in edges:
        graph.setdefault(e.src, {}).setdefault(e.dst, e.where)
    found: list[tuple[list[str], str]] = []
    seen: set[frozenset[str]] = set()
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, {})):
                if nxt == start:
                    key = frozenset(path)
                    if key not in seen:
                        seen.add(key)
                        cyc = path + [start]
                        found.append((cyc, ", ".join(graph[a][b] for a, b in pairwise(cyc))))
                elif nxt not in path and nxt > start:
                    stack.append((nxt, path + [nxt]))
    return found


def test_spark_mcore_layers_hold() -> None:
    edges = import_edges(ROOT)
    assert edges, "no imports found: is ROOT right?"
    problems = violations(edges, LAYERS, APART)
    assert not problems, "layering broken:\n" + "\n".join(problems)


def test_every_package_has_a_layer() -> None:
    units = {unit_of(_module_name(p, ROOT), ROOT.name) for p in ROOT.rglob("*.py")} - {None}
    assert units <= set(LAYERS), f"units without a layer: {sorted(units - set(LAYERS))}"


def _shown(unit: str) -> str:
    """How the README names a unit: `rollout/`, `runtime.py`, `config/run.py`."""
    path = unit.replace(".", "/")
    return f"{path}/" if (ROOT / path).is_dir() else f"{path}.py"


def test_readme_layer_table_and_tree_match_the_package() -> None:
    """The README's layer table names every unit in the layer LAYERS gives it, and its folder
    tree lists every package and top-level module of spark_mcore."""
    readme = (ROOT.parent / "README.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2] for line in readme.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in LAYER_NAMES}
    assert set(rows) == set(LAYER_NAMES), f"README layer table rows: {sorted(rows)}"
    for unit, layer in LAYERS.items():
        if unit == "config":
            continue  # the config package's init only re-exports the loader
        assert f"`{_shown(unit)}`" in rows[LAYER_NAMES[layer]], \
            f"README layer table: `{_shown(unit)}` not under '{LAYER_NAMES[layer]}'"
    tree = readme[readme.index("## Layout"):].split("```")[1]
    listed = {line.split()[0] for line in tree.splitlines() if line.startswith("  ") and line.split()}
    present = {p.name + "/" for p in ROOT.iterdir() if (p / "__init__.py").is_file()} | \
              {p.name for p in ROOT.glob("*.py") if p.name != "__init__.py"}
    assert listed == present, f"README tree lists {sorted(listed - present)} that do not exist and misses " \
                              f"{sorted(present - listed)}"


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_catches_back_import_and_cycle(tmp_path: Path) -> None:
    """A synthetic tree: a foundation importing a component (lazily, in a function) and a
    TYPE_CHECKING import closing a cycle between two components are both reported."""
    root = tmp_path / "pkg"
    _write(root, {
        "__init__.py": "",
        "types.py": "X = 1\n",
        "algo/__init__.py": "",
        "algo/loss.py": "from pkg.types import X\n\ndef f():\n    from pkg.trainer.actor import A\n    return A\n",
        "trainer/__init__.py": "",
        "trainer/actor.py": "from pkg.algo import loss\nfrom pkg.eval import runner\nA = 1\n",
        "eval/__init__.py": "",
        "eval/runner.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.trainer import actor\n",
        "rollout/__init__.py": "",
        "rollout/engine.py": "from ..weights import sync\n",
        "weights/__init__.py": "",
        "weights/sync.py": "",
    })
    problems = violations(import_edges(root), LAYERS, APART)
    text = "\n".join(problems)
    assert "pkg/algo/loss.py:4: algo (foundations) imports trainer (components)" in text
    assert any(p.startswith("package cycle") and "pkg/eval/runner.py:3" in p and "pkg/trainer/actor.py:2" in p
               for p in problems), text
    assert "pkg/rollout/engine.py:1: rollout imports weights" in text
    clean = {p for p in problems if "algo" not in p and "cycle" not in p and "rollout" not in p}
    assert not clean, clean


@pytest.mark.parametrize("module,unit", [("spark_mcore.config.run", "config.run"), ("spark_mcore.types", "types"),
                                         ("spark_mcore.rollout.hf_engine", "rollout"), ("numpy", None)])
def test_unit_of(module: str, unit: str | None) -> None:
    assert unit_of(module, "spark_mcore") == unit
