"""Run records: what a benchmark or experiment writes beside its figures, and how.

``environment()`` describes the machine and the code (versions, backend and devices, CPU count,
XLA and allocator settings, the git commit and local changes); ``write_results`` writes a result
dict as OUT/STEM.json with its markdown (and optionally PNG) rendering, for the benchmarks and
for the experiments' report (``jaxmodels.report``), whole or not at all, with numpy values as
JSON numbers (``jaxmodels.files``). (A training run's own files, config.json and the rest, are
``jaxmodels.training.rundir``'s.) Imports neither jax nor the jaxmodels package at module level:
a PyTorch benchmark worker loads this file by its path (``jaxmodels.bench.worker``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

VERSIONED = ("jaxmodels", "jax", "jaxlib", "flax", "optax", "torch", "numpy")
# Environment variables that change what a timing means: XLA's and JAX's flags, thread pools, and
# the C allocator (LD_PRELOAD of jemalloc or tcmalloc, glibc's malloc tunables).
RECORDED_ENV_PREFIXES = (
    "XLA_", "JAX_", "TF_CPP", "OMP_", "MKL_", "OPENBLAS_", "LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_",
)  # fmt: skip


def version(package: str) -> str | None:
    """The installed version of ``package``, None when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages, None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# The CPU's instruction sets that decide which float32 and bfloat16 kernels run (AVX-512, its
# bfloat16 extension, AMX tiles), as /proc/cpuinfo names them.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_model() -> tuple[str | None, list[str]]:
    """(the CPU's model name, those of CPU_FEATURES it has), from /proc/cpuinfo; (None, []) where
    that file is missing (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, []
    fields = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition(":") for line in text.splitlines())
        if key.strip() in ("model name", "flags")
    )
    flags = set(fields.get("flags", "").split())
    return fields.get("model name"), [f for f in CPU_FEATURES if f in flags]


def environment(*, frameworks: Sequence[str] = ("jax", "torch")) -> dict:
    """Date, versions, backend, devices, CPU count, model and vector features, recorded
    environment variables (XLA flags, thread and allocator settings), PyTorch's thread count where
    installed, and the git commit with the files changed under jaxmodels/ and kernels/ (both
    None/empty outside a checkout).

    ``frameworks``: which of jax and torch to import and ask (backend and devices; thread count);
    the others' entries are None. A benchmark worker process names only its own, so that recording
    its environment imports nothing it does not run."""
    backend, devices, torch_threads = None, None, None
    if "jax" in frameworks:
        import jax  # here, so that writing a result file does not need jax

        backend = jax.default_backend()
        devices = [f"{d.platform} {d.device_kind}" for d in jax.devices()]
    if "torch" in frameworks and version("torch"):
        import torch

        torch_threads = torch.get_num_threads()
    dirty = _git("status", "--porcelain", "--", ":/jaxmodels", ":/kernels")
    model, features = cpu_model()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {p: version(p) for p in VERSIONED} | {"python": sys.version.split()[0]},
        "backend": backend,
        "devices": devices,
        "cpu_count": cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": model,
        "cpu_features": features,
        "platform": platform.platform(),
        "torch_threads": torch_threads,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(RECORDED_ENV_PREFIXES)},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty_files": dirty.splitlines() if dirty else [],
    }


def write_results(
    result: dict,
    out: Path | str,
    stem: str,
    *,
    render_markdown: Callable[[dict], str],
    render_png: Callable[[dict, Path], None] | None = None,
) -> list[Path]:
    """Write OUT/STEM.json (``result``), OUT/STEM.md (``render_markdown(result)``) and, with
    ``render_png``, OUT/STEM.png (``render_png(result, path)``, which should write it whole:
    ``jaxmodels.files.save_figure``); return the paths written. Each text file is replaced whole
    or not at all (``jaxmodels.files.write_atomic``)."""
    from jaxmodels.files import json_default, write_atomic  # not at import: see the docstring

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    write_atomic(paths[0], json.dumps(result, indent=1, default=json_default) + "\n")
    write_atomic(paths[1], render_markdown(result))
    if render_png is not None:
        paths.append(out / f"{stem}.png")
        render_png(result, paths[2])
    return paths
