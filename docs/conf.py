"""Sphinx configuration: MyST pages, autodoc + napoleon (Google style) API reference, furo theme.

Build (from the repository root; CI runs exactly this):

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The check at the end of this file makes the build fail (a warning, under -W) on a public name of
``API_MODULES`` that has no docstring, or that no page of the API reference documents.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re

from sphinx.util import logging

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # import the library without looking for devices

project = "jaxmodels"
author = "jaxmodels contributors"
copyright = "the jaxmodels contributors, Apache-2.0"  # Sphinx's name

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# MyST: $...$ and $$...$$ math (MathJax), \begin{align} blocks, ::: fences, heading anchors.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc: members in source order, signatures with their annotations in the description.
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = "jaxmodels"
html_static_path: list[str] = []
pygments_style = "sphinx"
pygments_dark_style = "monokai"

# ---------------------------------------------------------------------------------------------
# Every public name documented, each with a docstring

# The modules of the API reference. A public name is what a module's __all__ lists, or else each
# function and class it defines whose name has no leading underscore; with a class, each public
# method and property it defines.
API_MODULES = [
    "jaxmodels",
    "jaxmodels.nn.models",
    "jaxmodels.nn.checks",
    "jaxmodels.nnx",
    "jaxmodels.interop.pytorch",
    "jaxmodels.interop.keras",
    "jaxmodels.interop.cudnn",
    "jaxmodels.interop.safetensors",
    "jaxmodels.export",
    "jaxmodels.targets",
    "jaxmodels.kernels.common",
    "jaxmodels.kernels.lstm_cpu",
    "jaxmodels.kernels.dense",
    "jaxmodels.kernels.lstm_cell",
    "jaxmodels.kernels.lstm_stepwise",
    "jaxmodels.kernels.lstm_sequence",
    "jaxmodels.kernels.lstm_grid",
    "jaxmodels.kernels.grid",
    "jaxmodels.training.fit",
    "jaxmodels.training.evaluate",
    "jaxmodels.training.steps",
    "jaxmodels.training.optim",
    "jaxmodels.training.parallel",
    "jaxmodels.training.batches",
    "jaxmodels.training.checkpoint",
    "jaxmodels.data.datasets",
    "jaxmodels.data.mnist",
    "jaxmodels.data.synthetic",
    "jaxmodels.files",
]

# Packages every module of which is public: a module added there and missing above is a warning.
WHOLE_PACKAGES = ["jaxmodels.kernels", "jaxmodels.interop"]

# Members autodoc's ``:members:`` skips by design, which the check skips too.
_SKIP_MEMBERS = {"jaxmodels.nn.models.Model.name", "jaxmodels.nn.models.Model.task"}

logger = logging.getLogger("jaxmodels.docs")


def public_names(module_name: str) -> dict[str, object]:
    """Qualified public name -> object, for one module of API_MODULES (see above)."""
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    found: dict[str, object] = {module_name: module}
    for name in names if names is not None else sorted(vars(module)):
        obj = getattr(module, name)
        routine = inspect.isfunction(obj) or hasattr(obj, "__wrapped__")  # functools.cache too
        if name.startswith("_") or not (routine or inspect.isclass(obj)):
            continue
        if names is None and getattr(obj, "__module__", None) != module_name:
            continue  # imported from elsewhere: documented where it is defined
        qualified = f"{module_name}.{name}"
        found[qualified] = obj
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                func = (
                    value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                )
                if attr.startswith("_") or not inspect.isfunction(func):
                    continue
                if not func.__qualname__.startswith(obj.__qualname__ + "."):
                    continue  # generated (dataclass, NamedTuple), not written in the class
                found[f"{qualified}.{attr}"] = func
    return found


def canonical(obj: object, name: str) -> str:
    """Where an object is defined (module.qualname): a name re-exported by ``jaxmodels`` is
    documented once, under either name."""
    func = obj.fget if isinstance(obj, property) else getattr(obj, "__func__", obj)
    if inspect.ismodule(func):
        return func.__name__
    module, qualname = getattr(func, "__module__", None), getattr(func, "__qualname__", None)
    return f"{module}.{qualname}" if module and qualname else name


def _record(app, what, name, obj, options, lines):
    """autodoc-process-docstring: remember each documented object, per page."""
    env = app.env
    if not hasattr(env, "jaxmodels_documented"):
        env.jaxmodels_documented = {}
    env.jaxmodels_documented.setdefault(env.docname, set()).add(canonical(obj, name))


def _purge(app, env, docname):
    getattr(env, "jaxmodels_documented", {}).pop(docname, None)


def _merge(app, env, docnames, other):
    env.jaxmodels_documented = getattr(env, "jaxmodels_documented", {})
    env.jaxmodels_documented.update(getattr(other, "jaxmodels_documented", {}))


def _check_public_names(app, env):
    """env-check-consistency: a warning (an error under -W) per public name without a docstring
    or without a place in the API reference."""
    documented = set().union(*getattr(env, "jaxmodels_documented", {}).values())
    for package in WHOLE_PACKAGES:
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
            module_name = f"{package}.{info.name}"
            if not info.name.startswith("_") and module_name not in API_MODULES:
                logger.warning(
                    "module %s is not in docs/conf.py API_MODULES",
                    module_name,
                    type="jaxmodels",
                    subtype="api",
                )
    checked = set()
    for module_name in API_MODULES:
        for name, obj in public_names(module_name).items():
            if name in _SKIP_MEMBERS or canonical(obj, name) in checked:
                continue
            checked.add(canonical(obj, name))
            # A method's docstring may be its base class's (autodoc shows that one); a class's or
            # a function's must be its own.
            method = "." in getattr(obj, "__qualname__", "")
            doc = inspect.getdoc(obj) if method else obj.__doc__
            if not (doc or "").strip():
                logger.warning(
                    "public name %s has no docstring (docs/conf.py API_MODULES)",
                    name,
                    type="jaxmodels",
                    subtype="docstring",
                )
            elif canonical(obj, name) not in documented:
                logger.warning(
                    "public name %s is in no page of the API reference (docs/api/)",
                    name,
                    type="jaxmodels",
                    subtype="api",
                )


# ---------------------------------------------------------------------------------------------
# The docstrings' plain-text blocks as literal blocks

# The docstrings are plain text read with help() as much as in these pages: an indented block
# (a layout, an equation, a table, a call) follows its paragraph after a blank line, or right
# after a line ending in ":". Outside napoleon's sections each such block is made an RST literal
# block ("::"), so it renders as written; a list item's or a "name: text" line's indented
# continuation stays what it is.
_SECTION = re.compile(
    r"^(Args|Arguments|Parameters|Returns?|Raises|Yields?|Attributes|Examples?|Notes?|Warnings?|"
    r"See Also|References|Todo|Keyword Args|Keyword Arguments|Other Parameters|Methods):\s*$"
)


_ITEM = re.compile(r"^([-*+]|\d+[.)])\s")


def _paragraph_start(lines: list[str], end: int) -> str:
    start = end
    while start > 0 and lines[start - 1].strip() and lines[start - 1][:1] not in (" ", "\t"):
        start -= 1
    return lines[start]


def literal_blocks(lines: list[str]) -> list[str]:
    """Each indented block outside a napoleon section, after a paragraph, as a literal block."""
    out: list[str] = []
    in_section = False
    for line in lines:
        indented = line[:1] in (" ", "\t")
        if line.strip() and not indented:
            in_section = bool(_SECTION.match(line))
        elif indented and not in_section:
            prev = next((i for i in range(len(out) - 1, -1, -1) if out[i].strip()), None)
            if prev is None or out[prev][:1] in (" ", "\t"):
                pass  # not the block's first line
            elif (prev == len(out) - 1 and not out[prev].rstrip().endswith(":")) or _ITEM.match(
                _paragraph_start(out, prev)
            ):
                pass  # a continuation line
            else:
                if not out[prev].rstrip().endswith("::"):
                    text = out[prev].rstrip()
                    out[prev] = text + ":" if text.endswith(":") else text + " ::"
                if out[-1].strip():
                    out.append("")
        out.append(line)
    return out


def _literal_blocks(app, what, name, obj, options, lines):
    lines[:] = literal_blocks(lines)


# ---------------------------------------------------------------------------------------------
# experiments/README.md, included by guides/experiments.md: its links to result files

_RESULT_LINK = re.compile(r"(?<!!)\[([^\]`<>]+)\]\((results/[^)\s]+)\)")


def _result_links(app, relative_path, parent_docname, content):
    """include-read: in experiments/README.md, each link to a file under results/ (markdown,
    JSON, PNG) becomes a download of that file; its images resolve through :relative-images:."""
    if relative_path.as_posix().endswith("experiments/README.md"):
        content[0] = _RESULT_LINK.sub(
            lambda m: f"{{download}}`{m.group(1)} <../../experiments/{m.group(2)}>`", content[0]
        )


def setup(app):
    app.connect("include-read", _result_links)
    app.connect("autodoc-process-docstring", _literal_blocks, priority=400)  # before napoleon
    app.connect("autodoc-process-docstring", _record)
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    app.connect("env-check-consistency", _check_public_names)
    return {"parallel_read_safe": True}
