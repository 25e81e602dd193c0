"""The layering stays true: an ast walk over every module's imports (deferred ones included).

The distribution installs three import names, ``featstore``, ``mil`` and ``analysis``; inside them
the floors of the tower are module prefixes (the longest prefix decides a module's floor):

    featstore.core < featstore < analysis < mil < {mil.patches, mil.seg} < mil.study < featstore.cli

A module imports only its own floor or floors below it, and the tasks of one floor (patches, seg)
never import each other. The terminal UI (featstore.core.ui) is for command modules only; mil and
analysis read stores through featstore's public read API, never through the extractor or the
store writer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("featstore", "mil", "analysis")
#: floors, bottom first; several prefixes on one floor are siblings that must not import each other
FLOORS: tuple[tuple[str, ...], ...] = (
    ("featstore.core",), ("featstore",), ("analysis",), ("mil",), ("mil.patches", "mil.seg"),
    ("mil.study",), ("featstore.cli",),
)
RANK = {prefix: i for i, floor in enumerate(FLOORS) for prefix in floor}
UI = "featstore.core.ui"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = path
    return mods


MODULES = _modules()


def _imports(path: Path, name: str) -> list[tuple[int, str, bool]]:
    """(line, imported module, at module level) for every import in *path*."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(n) for n in tree.body}
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target, id(node) in top))
            out += [(node.lineno, f"{target}.{a.name}", id(node) in top) for a in node.names
                    if f"{target}.{a.name}" in MODULES]
    return out


def _layer(module: str) -> str | None:
    """The floor prefix of *module* (longest match), None for modules outside the toolkit."""
    found = [p for p in RANK if module == p or module.startswith(p + ".")]
    return max(found, key=len) if found else None


def _is_command_module(name: str) -> bool:
    return name == "featstore.cli" or ".commands" in f".{name}" or name == "mil.study.commands"


def test_every_package_is_found():
    for prefix in RANK:
        assert prefix in MODULES, f"{prefix} not found under {ROOT}"


def _upward(own: str, target: str) -> bool:
    if own is None or target is None:
        return False
    return RANK[target] > RANK[own] or (RANK[target] == RANK[own] and target != own)


def test_imports_only_point_downward():
    bad = []
    for name, path in MODULES.items():
        own = _layer(name)
        for line, target, _ in _imports(path, name):
            layer = _layer(target)
            if _upward(own, layer):
                bad.append(f"{path.relative_to(ROOT)}:{line} ({own}) imports {target} ({layer})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_the_floors_catch_an_upward_and_a_sideways_import(tmp_path):
    """The checker itself: featstore.core importing featstore, featstore importing its CLI and
    mil.seg importing mil.patches are each flagged; mil importing featstore.core is not."""
    assert _upward(_layer("featstore.core.fit"), _layer("featstore.tiling"))
    assert _upward(_layer("featstore.extract"), _layer("featstore.cli"))
    assert _upward(_layer("analysis.cka"), _layer("mil.run"))
    assert _upward(_layer("mil.seg.run"), _layer("mil.patches.run"))
    assert not _upward(_layer("mil.train"), _layer("featstore.core.fit"))
    assert not _upward(_layer("mil.study.study"), _layer("mil.seg.run"))


def test_ui_is_imported_only_by_commands():
    bad = [f"{path.relative_to(ROOT)}:{line} imports {target}"
           for name, path in MODULES.items() if not _is_command_module(name)
           for line, target, _ in _imports(path, name) if target == UI or target.startswith(UI + ".")]
    assert not bad, "library code imports the terminal UI:\n" + "\n".join(bad)


def test_library_code_does_not_import_commands():
    bad = [f"{path.relative_to(ROOT)}:{line} imports {target}"
           for name, path in MODULES.items() if not _is_command_module(name)
           for line, target, _ in _imports(path, name) if _is_command_module(target) and _layer(target)]
    assert not bad, "library code imports command code:\n" + "\n".join(bad)


@pytest.mark.parametrize("pkg", ["mil", "analysis"])
def test_readers_use_the_public_read_api(pkg):
    private = ("featstore.extract", "featstore.store.writer", "featstore.distributed", "featstore.h5io")
    bad = [f"{path.relative_to(ROOT)}:{line} imports {target}"
           for name, path in MODULES.items() if _layer(name) == pkg and not _is_command_module(name)
           for line, target, _ in _imports(path, name) if target.startswith(private)]
    assert not bad, f"{pkg} reaches past featstore's read API:\n" + "\n".join(bad)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of *graph* (module -> modules it imports), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


@pytest.mark.parametrize("deferred", [False, True], ids=["module-level", "deferred-too"])
def test_no_import_cycle(deferred):
    """No cycle among module-level imports; and none either when imports inside functions count
    (a deferred import that closes a circle hides a design knot: the study report once imported
    the study that imported it, the store reader the writer that subclasses it)."""
    graph = {name: {t for _, t, top in _imports(path, name) if (top or deferred) and t in MODULES and t != name}
             for name, path in MODULES.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_a_deferred_circle():
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_is_longer_than_80_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def test_the_walk_sees_deferred_imports(tmp_path):
    """The checker itself: an import inside a function body counts, and a relative import resolves."""
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from analysis import cka\n\nfrom . import x\n")
    found = {t for _, t, _ in _imports(p, "mil.m")}
    assert "analysis" in found and "mil" in found


def test_pyflakes_is_clean():
    """No unused import, undefined name or shadowed variable anywhere (pyflakes, as CI runs it)."""
    import io

    from pyflakes.api import checkPath
    from pyflakes.reporter import Reporter

    out, err = io.StringIO(), io.StringIO()
    paths = list(MODULES.values()) + sorted((ROOT / "tests").rglob("*.py")) + \
        sorted((ROOT / "benchmarks").rglob("*.py"))
    warnings = sum(checkPath(str(p), Reporter(out, err)) for p in paths)
    assert warnings == 0, out.getvalue() + err.getvalue()


def test_building_the_cli_imports_no_torch():
    """`featstore ls BIG_STORE` must not pay torch's import (seconds): the commands' option
    declarations (configs) live apart from the training code, which is imported on first use."""
    import subprocess
    import sys

    code = "import sys, featstore.cli; heavy = sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules); print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_no_library_module_touches_the_process_wide_matplotlib_state():
    """Every picture is an Agg-bound Figure from featstore.core.plotting: no module imports pyplot
    or calls matplotlib.use (either would change a notebook's backend behind the user's back)."""
    bad = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [f"{node.module}.{a.name}" for a in node.names] + [node.module or ""]
                if any(n.startswith("matplotlib.pyplot") for n in names):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports pyplot")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "use" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "matplotlib":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} calls matplotlib.use")
    assert not bad, "\n".join(bad)
