"""The package's layers point one way: no module imports a module of a higher layer.

Layers, low to high (a module may import its own layer and any lower one):

0. leaf helpers: modules that import nothing else of fm_engine (``fm_engine._env``, ``fm_engine._sizes``,
   ``fm_engine._device``, ``fm_engine._alloc``); the test checks that they stay leaves;
1. the kernels: ``fm_engine.kernels`` (the top-level ``kernels/`` folder) and the CUDA extension ``fm_engine._C``;
2. ``fm_engine.ops``;
3. ``fm_engine.nn``;
4. ``fm_engine.ssl`` (the generic objectives);
5. ``fm_engine.models``;
6. the programs: ``fm_engine.train``, ``fm_engine.cli``, ``fm_engine.__main__``, ``fm_engine.tune``,
   ``fm_engine.benchmarks`` (the top-level ``benchmarks/`` folder), and the package ``fm_engine`` itself
   (its ``__init__`` imports the models, so ``from fm_engine import use_backend`` counts as an import of it).

Modules outside that list (``fm_engine.data``, ``fm_engine.testing``, ``fm_engine.augment``, ...) have no layer
of their own; ``fm_engine.data`` imports none of nn, ssl, models. Imports are read with ``ast`` from every
``.py`` under ``fm_engine/``, ``kernels/`` and ``benchmarks/``, at module level and inside functions alike.

:data:`KNOWN` lists the upward imports that remain, each with its reason; the test fails on any other, and
on a KNOWN entry that no longer occurs, so the list only shrinks.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it is installed as (setup.py's package_dir)
FOLDERS = {"fm_engine": "fm_engine", "kernels": "fm_engine.kernels", "benchmarks": "fm_engine.benchmarks"}

LEAVES = ("fm_engine._env", "fm_engine._sizes", "fm_engine._device", "fm_engine._alloc")
LAYERS = [  # (layer, its modules by prefix): lowest first
    ("leaf", LEAVES),
    ("kernels", ("fm_engine.kernels", "fm_engine._C")),
    ("ops", ("fm_engine.ops",)),
    ("nn", ("fm_engine.nn",)),
    ("ssl", ("fm_engine.ssl",)),
    ("models", ("fm_engine.models",)),
    (
        "programs",
        ("fm_engine.train", "fm_engine.cli", "fm_engine.__main__", "fm_engine.tune", "fm_engine.benchmarks"),
    ),
]
PACKAGE = "fm_engine"  # the package itself: its __init__ imports nn, ops and models
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}
# modules with no layer that must not import the listed layers
BARRED = {"fm_engine.data": ("nn", "ssl", "models", "programs")}

# (importing module, imported module): why the upward import is still there. Remove an entry when it is fixed.
# none left: an entry (importer, imported) -> reason may stand here only while a fix is under way
KNOWN: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _files() -> dict[str, Path]:
    return {_module_name(p): p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))}


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The fm_engine modules that ``path`` (module ``name``) imports anywhere in its text."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:  # from X import y: the submodule X.y when there is one, else X
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func  # importlib.import_module("fm_engine.x") with a literal name
            if isinstance(func, ast.Attribute) and func.attr == "import_module" and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def _layer(module: str) -> str | None:
    if module == PACKAGE:
        return "programs"
    for layer, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    return None


@functools.cache
def _violations() -> dict[tuple[str, str], str]:
    files = _files()
    modules = {*files, "fm_engine._C"}  # the extension is a built module, not a .py file
    out: dict[tuple[str, str], str] = {}
    for name, path in files.items():
        own = _layer(name)
        for target in _imports(name, path, modules):
            if target == name:
                continue
            theirs = _layer(target)
            if theirs is None:
                if own == "leaf":
                    out[(name, target)] = f"leaf {name} imports {target}"
                continue
            barred = next((b for prefix, b in BARRED.items() if name == prefix or name.startswith(prefix + ".")), ())
            if theirs in barred:
                out[(name, target)] = f"{name} must not import {theirs} ({target})"
            elif own is not None and RANK[theirs] > RANK[own]:
                out[(name, target)] = f"{name} ({own}) imports {target} ({theirs})"
    return out


def test_the_graph_is_read() -> None:
    """The parser sees the imports it must see (so an empty violation list means something)."""
    files = _files()
    modules = set(files)
    assert "fm_engine.kernels.window_attention._launch" in modules and "fm_engine.benchmarks.harness" in modules
    assert "fm_engine._env" in _imports("fm_engine._device", files["fm_engine._device"], modules)
    launch = _imports("fm_engine.kernels.window_attention", files["fm_engine.kernels.window_attention"], modules)
    assert "fm_engine.kernels.window_attention._launch" in launch  # a relative import, resolved
    assert "fm_engine.ops._evidence" in _imports("fm_engine.ops._dispatch", files["fm_engine.ops._dispatch"], modules)
    report = _imports("fm_engine.benchmarks.kernel_report", files["fm_engine.benchmarks.kernel_report"], modules)
    assert {"fm_engine.kernels", "fm_engine._device"} <= report  # import_module("..."), and a function-level import


def test_no_module_imports_upward() -> None:
    found = _violations()
    new = {k: v for k, v in found.items() if k not in KNOWN}
    assert not new, "upward imports:\n" + "\n".join(sorted(new.values()))


def test_known_upward_imports_still_occur() -> None:
    """A KNOWN entry that no longer occurs is stale: delete it, so the list only shrinks."""
    found = _violations()
    stale = [entry for entry in sorted(KNOWN) if entry not in found]
    assert not stale, f"{stale} no longer occur: remove them from KNOWN"
