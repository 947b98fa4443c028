"""The documentation's examples run: every ```python block of README.md and docs/**/*.md (each
page's blocks in order, in one namespace, in a fresh working folder), the docstrings' examples as
doctests (every module of jaxmodels and jaxmodels.kernels), and every `jaxmodels ...` command line
of a ```bash block parsed by the CLI's own parser, so a renamed option fails here.

A block that cannot run on a CPU in seconds is marked, on the line before its fence,
``<!-- not-run: reason -->`` (the reason is required); one that needs an optional package
``<!-- requires: package -->``, skipped without it. The Sphinx build itself runs in CI
(`.ci/run`), not here."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
import re
import shlex
from pathlib import Path

import jax
import pytest

import jaxmodels
import jaxmodels.kernels
from jaxmodels.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PAGES = [p for p in PAGES if "_build" not in p.relative_to(ROOT).parts]

_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
_MARKER = re.compile(r"^<!--\s*(not-run|requires):\s*(.*?)\s*-->$")


def blocks(page: Path) -> list[tuple[str, str, int, tuple[str, str] | None]]:
    """(language, code, line number, marker) of each fenced block of ``page``; marker is the
    (kind, text) of a ``<!-- not-run: ... -->`` or ``<!-- requires: ... -->`` line right before
    the fence."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, language, start = match.group(1), match.group(2), i
        j = i + 1
        while j < len(lines) and not lines[j].startswith(fence):
            j += 1
        before = lines[start - 1].strip() if start else ""
        marker = _MARKER.match(before)
        found.append(
            (language, "\n".join(lines[start + 1 : j]), start + 1, marker and marker.groups())
        )
        i = j + 1
    return found


@pytest.fixture(autouse=True)
def _users_config():
    """JAX's default promotion rules, as a reader runs the examples (conftest.py makes the rest
    of the suite strict), e.g. Keras' own LSTM broadcasts implicitly."""
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        yield


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


PYTHON_PAGES = [p for p in PAGES if any(lang == "python" for lang, *_ in blocks(p))]


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=_name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files a page writes ("runs/...") land here
    namespace: dict = {"__name__": f"docs:{_name(page)}"}
    skipped = []
    for language, code, line, marker in blocks(page):
        if language != "python":
            continue
        if marker and marker[0] == "not-run":
            assert marker[1], f"{_name(page)}:{line}: a not-run block must say why"
            skipped.append(f"line {line}: {marker[1]}")
            continue
        if marker and marker[0] == "requires":
            missing = [m for m in marker[1].split() if importlib.util.find_spec(m) is None]
            if missing:
                skipped.append(f"line {line}: needs {', '.join(missing)}")
                continue
        try:
            exec(compile(code, f"{_name(page)}:{line}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(
                f"{_name(page)}, the block at line {line} failed: {err!r}"
            ) from err
    if skipped:
        pytest.skip(f"{len(skipped)} block(s) not run: " + "; ".join(skipped))


def _modules() -> list[str]:
    names = []
    for package in (jaxmodels, jaxmodels.kernels):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            names.append(info.name)
    return sorted(set(names))


def test_docstring_examples_run(tmp_path, monkeypatch):
    """Every ``>>>`` example of every module's docstrings, in a fresh working folder."""
    monkeypatch.chdir(tmp_path)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    examples = 0
    for name in _modules():
        module = importlib.import_module(name)
        for test in finder.find(module):
            if test.examples:
                runner.run(test)
                examples += len(test.examples)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed"
    assert examples >= 40, f"expected the docstrings' examples, found {examples}"


def _command_lines() -> list[tuple[str, list[str]]]:
    """(where, argv) of every `jaxmodels ...` command in a bash block of the pages."""
    found = []
    for page in PAGES:
        for language, code, line, _ in blocks(page):
            if language not in ("bash", "sh", "console", "shell"):
                continue
            for offset, text in enumerate(code.splitlines()):
                words = shlex.split(text, comments=True)
                command: list[str] = []
                for word in [*words, "&&"]:
                    if word in ("&&", "||", ";", "|"):
                        if command and command[0] == "jaxmodels":
                            found.append((f"{_name(page)}:{line + 1 + offset}", command[1:]))
                        command = []
                    else:
                        command.append(word)
    return found


def test_cli_lines_parse():
    lines = _command_lines()
    assert len(lines) >= 20, lines
    parser = build_parser()
    for where, argv in lines:
        try:
            parser.parse_args(argv)
        except SystemExit as exit_:
            assert exit_.code == 0, f"{where}: `jaxmodels {shlex.join(argv)}` does not parse"


def test_marked_blocks_say_why():
    for page in PAGES:
        for _, _, line, marker in blocks(page):
            if marker:
                assert marker[1], f"{_name(page)}:{line}: a marker needs its reason or package"
