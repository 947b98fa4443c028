"""The code's layout: project modules import each other without cycles, no module uses another's
private names, every module imports on its own, and no library module outgrows one idea."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500  # a library module longer than this holds more than one idea, unless:
ONE_IDEA = {
    "jaxmodels.kernels.lstm_sequence": "the persistent LSTM kernel: its plan (what fits on chip), "
    "forward and backward kernels and their custom_vjp, which change together",
}


def _module_name(path: Path) -> str:
    """The import name of a project file: kernels/ is installed as jaxmodels.kernels."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":
        parts.insert(0, "jaxmodels")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


LIBRARY = {
    _module_name(p): p
    for folder in ("jaxmodels", "kernels")
    for p in sorted((ROOT / folder).rglob("*.py"))
}
SCRIPTS = {
    f"{p.parent.name}/{p.name}": p
    for folder in ("benchmarks", "experiments")
    for p in sorted((ROOT / folder).glob("*.py"))
}


def _imports(path: Path, name: str) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in ``path`` (module level and inside functions), relative
    imports resolved against ``name``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.append((module, [alias.name for alias in node.names]))
    return found


def _project_edges(path: Path, name: str) -> set[str]:
    """The library modules that ``path`` imports (``from jaxmodels import bench`` counts as
    jaxmodels.bench when that is a module, else as the package jaxmodels)."""
    edges = set()
    for module, names in _imports(path, name):
        if module not in LIBRARY:
            continue
        submodules = {f"{module}.{n}" for n in names} & LIBRARY.keys()
        edges |= submodules or {module}
        if len(submodules) < len(names):  # some names are attributes of the module itself
            edges.add(module)
    edges.discard(name)
    return edges


def test_import_graph_has_no_cycle():
    graph = {name: _project_edges(path, name) for name, path in LIBRARY.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_cycle_check_sees_a_cycle(tmp_path, monkeypatch):
    """The check above would fail on a cycle (here: a copy of the graph with one edge added)."""
    graph_edges = _project_edges(LIBRARY["jaxmodels.training.fit"], "jaxmodels.training.fit")
    assert (
        "jaxmodels.training.steps" in graph_edges and "jaxmodels.training.parallel" in graph_edges
    )
    fake = tmp_path / "steps.py"
    fake.write_text("from jaxmodels.training.fit import fit\n")
    monkeypatch.setitem(LIBRARY, "jaxmodels.training.steps", fake)
    with pytest.raises(pytest.fail.Exception, match=r"import cycle: .*jaxmodels\.train"):
        test_import_graph_has_no_cycle()


# The layers: what each unit (a subpackage, or a module at the package's top) may import besides
# itself. Model math sees only the kernels; training sees models and data, never the reverse;
# the front-ends over the models (nnx, interop, export) see only the models; results and compile
# targets stand alone; the commands and the CLI sit on top of everything.
MODELS = {"jaxmodels.nn", "jaxmodels.kernels"}
FILES = "jaxmodels.files"  # whole files or none: for any unit that writes the user's files
LAYERS = {
    FILES: set(),
    "jaxmodels.kernels": set(),
    "jaxmodels.data": set(),
    "jaxmodels.records": {FILES},
    "jaxmodels.arguments": set(),
    "jaxmodels.report": {"jaxmodels.records", FILES},
    "jaxmodels.targets": set(),
    "jaxmodels.nn": {"jaxmodels.kernels"},
    "jaxmodels": MODELS,  # the package's public names
    "jaxmodels.nnx": MODELS,
    "jaxmodels.export": MODELS,
    "jaxmodels.interop": {*MODELS, FILES},
    "jaxmodels.training": {*MODELS, "jaxmodels.data", FILES},
    "jaxmodels.bench": {*MODELS, "jaxmodels", "jaxmodels.records", FILES},
}
TOP = {"jaxmodels.commands", "jaxmodels.inputs", "jaxmodels.cli"}  # may import any unit


def _unit(name: str) -> str:
    """The layer a library module belongs to: its subpackage, or itself at the package's top."""
    return ".".join(name.split(".")[:2])


def test_every_module_has_a_layer():
    missing = sorted({_unit(n) for n in LIBRARY} - LAYERS.keys() - TOP)
    assert not missing, f"units without a place in LAYERS: {missing}"


@pytest.mark.parametrize("name", sorted(n for n in LIBRARY if _unit(n) not in TOP))
def test_imports_follow_the_layers(name):
    unit = _unit(name)
    upward = sorted(
        edge
        for edge in _project_edges(LIBRARY[name], name)
        if _unit(edge) != unit and _unit(edge) not in LAYERS.get(unit, set())
    )
    assert not upward, f"{name} ({unit}) imports outside its layer {sorted(LAYERS[unit])}: {upward}"


def test_the_layer_check_sees_an_upward_import(tmp_path, monkeypatch):
    """A model module that imported training would fail the check above."""
    fake = tmp_path / "cells.py"
    fake.write_text("from jaxmodels.training.fit import fit\n")
    monkeypatch.setitem(LIBRARY, "jaxmodels.nn.cells", fake)
    with pytest.raises(AssertionError, match=r"jaxmodels\.training\.fit"):
        test_imports_follow_the_layers("jaxmodels.nn.cells")


@pytest.mark.parametrize("where", [*sorted(LIBRARY), *sorted(SCRIPTS)])
def test_no_private_names_across_modules(where):
    """A name starting with one underscore belongs to its module: no ``from m import _x`` and no
    ``m._x`` on an imported project module, in the library, the benchmarks or the experiments."""
    path = LIBRARY.get(where) or SCRIPTS[where]
    name = where if where in LIBRARY else "__main__"
    aliases, offences = {}, []
    for module, names in _imports(path, name):
        if not module.startswith("jaxmodels"):
            continue
        offences += [f"from {module} import {n}" for n in names if _private(n)]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxmodels"):
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("jaxmodels"):
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
        ):
            offences.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    assert not offences, f"{where} uses private names of other modules: {offences}"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_library_modules_stay_small(name):
    lines = len(LIBRARY[name].read_text().splitlines())
    if name in ONE_IDEA:
        pytest.skip(f"{lines} lines, one idea: {ONE_IDEA[name]}")
    assert lines <= MAX_LINES, f"{name} has {lines} lines (> {MAX_LINES}): split it by idea"


# Third-party packages the library imports, loaded once in the parent interpreter; each library
# module is then imported first in a child forked from it, so that a cycle among the project's own
# modules still fails, without importing jax and flax afresh for every module.
THIRD_PARTY = ("numpy", "jax", "jax.numpy", "flax.linen", "optax")
_IMPORT_EACH_ALONE = """
import importlib, os, sys
for name in sys.argv[1].split(","):
    importlib.import_module(name)
preloaded = sorted(n for n in sys.modules if n.split(".")[0] == "jaxmodels")
assert not preloaded, f"the third-party preload imported {preloaded}"
for name in sys.argv[2:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException as e:
            print(f"{name}: {type(e).__name__}: {e}", flush=True)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        print(f"{name}: the child died of signal {os.WTERMSIG(status)}", flush=True)
"""


def test_every_module_imports_on_its_own():
    """Each library module imported first, in a child forked from an interpreter that has imported
    only the third-party packages (an import cycle that the static graph could miss fails here)."""
    run = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH_ALONE, ",".join(THIRD_PARTY), *sorted(LIBRARY)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    failed = run.stdout.strip()
    assert not failed, failed
