"""How the library writes files: whole or not at all, and JSON of the numpy values in them. Every
file the CLI writes for a user, and every result file, goes through here.

    write_atomic(path, "text\\n")       # or bytes
    with replacing(path) as tmp:        # for a writer that wants a file name
            save_file(tensors, tmp)
    save_figure(fig, path, dpi=100)     # a matplotlib figure, in the format of its suffix
    json.dumps(config, default=json_default)   # dtypes by name, numpy values as numbers

The new content goes to a temporary file in the target's folder (PATH.XXXXXXXX.part, so the same
file system), which is flushed and fsync'ed, then renamed over the target (``os.replace``) and the
folder fsync'ed. On any error, KeyboardInterrupt included, the temporary file is removed and the
error propagates: the target holds its old content (or does not exist), never a part of the new.
An OSError that names the temporary file (a full disk) names the target instead.

A replaced file takes the process's default permissions (umask), not the old file's. This module
imports neither jax nor anything of jaxmodels: any layer may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

PART = ".part"  # the temporary files' suffix


def temporary_path(path: str | os.PathLike) -> Path:
    """A fresh name beside ``path`` for its temporary file: PATH.XXXXXXXX.part."""
    path = Path(path)
    return path.with_name(f"{path.name}.{secrets.token_hex(4)}{PART}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable, where the system allows it (not on Windows, nor on
    some network file systems): best effort, the file is already in place."""
    with contextlib.suppress(OSError):
        _fsync(folder)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write the new content to (nothing is created there):
    when the block ends, the file written there is fsync'ed and renamed over ``path``; when the
    block (or the rename) raises, anything at the temporary path is removed and the error goes
    on, ``path`` untouched."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and str(err.filename) == str(tmp):
            err.filename = str(path)  # the user's file, not our temporary one
        raise
    _fsync_folder(path.parent)


def write_atomic(path: str | os.PathLike, data: bytes | str, encoding: str = "utf-8") -> None:
    """Replace the file ``path`` with ``data`` (text is encoded with ``encoding``): it holds the
    old content or the new, never a part (see the module docstring).

    Examples:
      >>> import tempfile
      >>> from pathlib import Path
      >>> path = Path(tempfile.mkdtemp()) / "result.json"
      >>> write_atomic(path, '{"accuracy": 0.98}')
      >>> path.read_text()
      '{"accuracy": 0.98}'
    """
    raw = data.encode(encoding) if isinstance(data, str) else bytes(data)
    with replacing(path) as tmp, open(tmp, "xb") as file:
        file.write(raw)  # closed, then fsync'ed and renamed by replacing


def save_figure(fig: Any, path: str | os.PathLike, **savefig: Any) -> None:
    """``fig.savefig`` (a matplotlib figure) to ``path`` through a temporary file, in the format
    named by ``path``'s suffix (PNG without one); ``savefig``: matplotlib's other arguments."""
    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    with replacing(path) as tmp:
        fig.savefig(tmp, format=fmt, **savefig)


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for what JSON cannot write: a dtype (or type) by its numpy name,
    numpy scalars and arrays as numbers and lists, anything else its str()."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    try:
        return np.dtype(value).name
    except (TypeError, ValueError):
        return str(value)


def to_json(tree: Any) -> Any:
    """A JSON round trip of ``tree`` (a run's config, an experiment's): dtypes become names, tuples
    lists, anything else its str(); what checkpoint metadata stores and resumed runs compare."""
    return json.loads(json.dumps(tree, default=json_default))
