"""The import structure of ``defend/`` and ``attacks/`` stays layered.

The graph is read from the source with :mod:`ast` (nothing is imported but the two lazy package ``__init__``
modules, which load no torch): every ``import`` / ``from ... import`` statement counts, at module level or inside a
function, relative ones resolved against their package; only ``if TYPE_CHECKING:`` blocks are left out, as they never
run.  An edge ``A -> B`` means "running A (or calling a function of A) imports B".  How package ``__init__`` modules
enter the graph, so that it matches what Python does:

* ``import a.b.c`` / ``from a.b.c import x`` from a module outside package ``a.b`` also runs ``a.b/__init__``:
  edges go to ``a.b.c`` and to every enclosing package the importer is not itself inside (a module's own
  packages are already loaded before it runs, and a package ``__init__`` importing its own submodules to build its
  namespace is not a circle).
* ``from pkg import name`` where ``pkg.name`` is a submodule is an edge to that submodule.
* ``defend/__init__.py`` and ``defend/evaluate/__init__.py`` re-export names lazily through a ``_WHERE`` dict
  (PEP 562): the ``__init__`` itself imports nothing, but ``from defend.evaluate import evaluate_system`` imports
  ``defend.evaluate.run`` the moment it runs, so such an import is an edge to the module ``_WHERE`` names.

Asserted: (a) nothing under ``defend.evaluate`` imports ``defend.experiments``, directly or through the modules it
imports (experiments sit above evaluate: the scorecard runs cards; what both share lives below both, e.g.
:mod:`defend.typed_config`, :mod:`defend.attack_options`, :mod:`defend.inputs`, :mod:`defend.trainer`,
:mod:`defend.tables`); (b) the graph of ``defend/`` and ``attacks/`` has no cycle, lazy imports included (the cycle is printed if one
appears); (c) ``attacks/`` never
imports ``defend`` or Lightning.
"""
from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAZY_PACKAGES = ("defend", "defend.evaluate")


def _module_files(package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ``package`` (``__init__`` named as the package)."""
    files = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree`` at any depth, except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                yield from _import_nodes(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _import_nodes(node)


def _imported_names(module: str, is_package: bool, tree: ast.AST) -> Iterator[str]:
    """Dotted names ``module`` imports: ``import a.b`` gives ``a.b``; ``from a import x`` gives ``a`` and ``a.x``
    (the latter only matters when ``a.x`` is a module)."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
            continue
        base = here[:len(here) - node.level + 1] if node.level else []
        source = ".".join(base + ([node.module] if node.module else []))
        yield source
        yield from (f"{source}.{alias.name}" for alias in node.names if alias.name != "*")


def _lazy_exports() -> dict[str, str]:
    """``package.name`` -> the module a lazy ``__init__`` imports when ``name`` is first read."""
    exports = {}
    for package in LAZY_PACKAGES:
        where = importlib.import_module(package)._WHERE
        for name, place in where.items():
            target = place or f".{name}"
            exports[f"{package}.{name}"] = importlib.util.resolve_name(target, package)
    return exports


def _targets(importer: str, name: str, known: set[str], lazy: dict[str, str]) -> Iterator[str]:
    """Modules of ``known`` that importing ``name`` from ``importer`` runs."""
    name = lazy.get(name, name)
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        target = ".".join(parts[:i])
        inside = importer == target or importer.startswith(target + ".")
        if target in known and not (inside and i < len(parts)) and target != importer:
            yield target


def import_graph(packages: tuple[str, ...] = ("defend", "attacks")) -> dict[str, set[str]]:
    """Module -> the first-party modules it imports (see the module docstring for the rules)."""
    files = {name: path for package in packages for name, path in _module_files(package).items()}
    known, lazy = set(files), _lazy_exports()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        names = _imported_names(module, path.name == "__init__.py", tree)
        graph[module] = {t for name in names for t in _targets(module, name, known, lazy)}
    return graph


def all_imports(package: str) -> dict[str, set[str]]:
    """Module of ``package`` -> every top-level package name it imports (third-party included)."""
    result = {}
    for module, path in _module_files(package).items():
        tree = ast.parse(path.read_text(), str(path))
        names = _imported_names(module, path.name == "__init__.py", tree)
        result[module] = {name.split(".")[0] for name in names}
    return result


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_reader_counts_nested_relative_and_lazy_imports_but_not_type_checking_ones():
    """The reader is not blind: an import inside a function, a relative one (``..``), a ``from pkg import module``
    and a lazily re-exported name all count; an ``if TYPE_CHECKING:`` import does not."""
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..hidden import X\n"
              "def f():\n    from ..inputs import take_split\n    from . import card\n")
    names = set(_imported_names("defend.evaluate.x", False, ast.parse(source)))
    assert {"defend.inputs", "defend.inputs.take_split", "defend.evaluate.card"} <= names
    assert not any("hidden" in n for n in names)
    known, lazy = set(_module_files("defend")), _lazy_exports()
    assert set(_targets("defend.experiments.x", "defend.evaluate.evaluate_system", known, lazy)) == {
        "defend.evaluate", "defend.evaluate.run"}  # the lazy name runs defend/evaluate/run.py
    assert set(_targets("defend.evaluate.x", "defend.evaluate.card", known, lazy)) == {"defend.evaluate.card"}
    graph = import_graph()
    assert "defend.evaluate.run" in graph["defend.evaluate.cli"]  # `from .run import ...` inside main()
    assert {"defend.data", "defend.data.base"} <= graph["defend.evaluate.measure"]  # the package __init__ runs too
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"b"}}) is None


def test_evaluate_never_imports_experiments():
    """Not directly, not lazily, not through any module it imports (experiments sit above evaluate)."""
    graph = import_graph()
    bad = sorted(f"{m} -> {t}" for m in graph if m == "defend.evaluate" or m.startswith("defend.evaluate.")
                 for t in _reachable(graph, m) if t == "defend.experiments" or t.startswith("defend.experiments."))
    assert not bad, "defend.evaluate must not import defend.experiments: " + "; ".join(bad)


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_attacks_never_imports_defend_or_lightning():
    bad = sorted(f"{m} imports {name}" for m, names in all_imports("attacks").items()
                 for name in names & {"defend", "lightning", "pytorch_lightning"})
    assert not bad, "attacks/ must stay pure PyTorch: " + "; ".join(bad)


def test_every_experiment_config_still_builds_its_option_groups():
    """The shared plumbing moved below experiments/ (AttackSections is a second base of three experiment configs):
    every registered experiment's default config parses into its dataclasses, not into plain dicts (jsonargparse
    resolves postponed annotations only along a dataclass's first-base chain)."""
    import dataclasses
    import typing
    import warnings

    from defend.experiments.config import EXPERIMENTS
    from defend.experiments.runner import load_experiments
    from defend.typed_config import parse_typed

    load_experiments()
    untyped = []
    for name in EXPERIMENTS:
        cls = EXPERIMENTS.get(name).config
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jsonargparse's round-trip notes on Count values
            cfg, _ = parse_typed(cls, {"experiment": name})
        hints = typing.get_type_hints(cls)
        untyped += [f"{name}.{f.name}" for f in dataclasses.fields(cfg)
                    if dataclasses.is_dataclass(hints[f.name]) and not isinstance(getattr(cfg, f.name), hints[f.name])]
    assert "attacks" in EXPERIMENTS and not untyped, f"option groups left as dicts: {untyped}"
