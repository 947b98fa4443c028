"""A worker process of ``jaxmodels.bench``: it runs the contenders of one framework configuration,
started and spoken to by ``jaxmodels.bench.pool``.

    python .../jaxmodels/bench/worker.py FD jax          # the JAX worker
    python .../jaxmodels/bench/worker.py FD torch N      # a PyTorch worker, N intra-op threads

FD is this process's end of a socket pair (``multiprocessing.connection``); the parent sets the
environment (``LD_PRELOAD`` for an allocator configuration) and sys.path (``PYTHONPATH``). The file
runs by path, so that jaxmodels' package (whose ``__init__`` imports jax and flax) is imported only
where a contender needs it: the modules a PyTorch worker needs (``timing``, ``torch_models``,
``records``) are loaded from their files, and a PyTorch worker never imports jax.

The worker first says hello: pid, framework, backend (jax) or torch version and threads, the
preloaded libraries found in /proc/self/maps, whether jax is imported, and its environment
(``records.environment()`` for its own framework only, recorded before anything is timed); or,
when its framework cannot start (torch not installed), the error and its environment, and exits.
Then it answers each request with one dict, ``error`` ("Type: message") when it failed:

    ("setup", key, name, framework, target, warmup, min_sample_s)
                           -> compile_s, number, warm_s, jax_imported
    ("sample", key)        -> sample_s, the seconds per call of one sample
    ("release",)           -> drops every set-up contender
    ("exit",)

A target is {"module", "function", "args", "kwargs"}: the contender's setup is
module.function(*args, **kwargs). Idle, the worker blocks on the pipe; when the parent goes away
(end of file) it exits. It ignores SIGINT: on Ctrl-C the parent stops it.
"""

from __future__ import annotations

import functools
import gc
import importlib
import importlib.util
import os
import signal
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
# Modules that import neither jax nor the jaxmodels package: loaded from their files.
BY_PATH = {
    "jaxmodels.bench.timing": HERE / "timing.py",
    "jaxmodels.bench.torch_models": HERE / "torch_models.py",
    "jaxmodels.records": HERE.parent / "records.py",
}


@functools.cache
def load(module: str) -> ModuleType:
    """The module named ``module``: one of BY_PATH from its file (under a name of its own, so that
    importing jaxmodels' package later does not meet a half-made one), any other imported."""
    if module not in BY_PATH:
        return importlib.import_module(module)
    name = "jaxmodels_worker_" + module.replace(".", "_")
    spec = importlib.util.spec_from_file_location(name, BY_PATH[module])
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded  # dataclasses look their module up while being made
    spec.loader.exec_module(loaded)
    return loaded


def resolve(target: dict):
    """The setup function a target names, with its arguments bound."""
    func = load(target["module"])
    for part in target["function"].split("."):
        func = getattr(func, part)
    return functools.partial(func, *target["args"], **target["kwargs"])


def preloaded() -> list[str]:
    """The LD_PRELOAD libraries mapped into this process (/proc/self/maps)."""
    wanted = os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    return [lib for lib in wanted if os.path.basename(lib) in maps]


def start(framework: str, threads: int | None) -> dict:
    """Import the framework and say what this process is."""
    hello = {"pid": os.getpid(), "framework": framework, "python": sys.executable}
    if framework == "torch":
        import torch

        if threads:
            torch.set_num_threads(threads)
        # plain str: a TorchVersion would import torch into the parent that unpickles it
        hello |= {"torch": str(torch.__version__), "threads": torch.get_num_threads()}
    elif framework == "jax":
        import jax

        hello |= {"jax": str(jax.__version__), "backend": jax.default_backend()}
    else:
        raise ValueError(f"expected framework jax or torch, got {framework!r}")
    return hello | {"preloaded": preloaded(), "jax_imported": "jax" in sys.modules}


def serve(conn, framework: str, threads: int | None) -> int:
    timing = load("jaxmodels.bench.timing")
    records = load("jaxmodels.records")
    try:
        hello = start(framework, threads)
    except Exception as err:
        conn.send(
            {
                "error": f"{type(err).__name__}: {err}",
                "pid": os.getpid(),
                "preloaded": preloaded(),
                "jax_imported": "jax" in sys.modules,
                "environment": records.environment(frameworks=()),
            }
        )
        return 1
    conn.send(hello | {"environment": records.environment(frameworks=(framework,))})
    prepared = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return 0
        kind = message[0]
        if kind == "exit":
            return 0
        try:
            if kind == "setup":
                _, key, name, framework_, target, warmup, min_sample_s = message
                contender = timing.Contender(name, resolve(target), framework_)
                prepared.pop(key, None)
                reply, prepared[key] = timing.prepare(
                    contender, warmup=warmup, min_sample_s=min_sample_s
                )
                reply["jax_imported"] = "jax" in sys.modules
                gc.collect()
            elif kind == "sample":
                reply = {"sample_s": timing.sample(prepared[message[1]])}
            elif kind == "release":
                prepared.clear()
                gc.collect()
                reply = {}
            else:
                reply = {"error": f"ValueError: unknown request {kind!r}"}
        except Exception as err:
            reply = {"error": f"{type(err).__name__}: {err}"}
        conn.send(reply)


def main(argv: list[str]) -> int:
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
        sys.path.pop(0)  # this folder's modules are not top-level modules
    fd, framework = int(argv[0]), argv[1]
    threads = int(argv[2]) if len(argv) > 2 else None
    return serve(Connection(fd), framework, threads)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
