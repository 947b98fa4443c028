"""The PyTorch configurations a suite times: each C allocator x intra-op thread count.

PyTorch on CPU takes its tensors' memory from the C allocator (``malloc``), and its step time
depends on that allocator's state: the seed CNN's training step took 41 ms in a process shared with
the JAX contenders, 50 ms in a fresh PyTorch process, 25 ms in a process that had just run large
JAX workloads. So each configuration runs in a worker process of its own (``jaxmodels.bench.pool``),
with its allocator preloaded there (``LD_PRELOAD``) and nowhere else:

- "as installed": glibc's malloc, what a plain ``pip install torch`` gives;
- "jemalloc": ``libjemalloc.so.2`` (Debian package libjemalloc2);
- "tcmalloc": ``libtcmalloc_minimal.so.4`` (Debian package libtcmalloc-minimal4), the tuned
  allocators PyTorch's performance guide recommends for CPU.

Thread counts: the CPU count (or ``--torch-threads``) and, when that is more than one, one thread.
A configuration whose library is not installed is skipped, its reason naming the Debian package.
On a CPU without bfloat16 instructions, PyTorch's bfloat16 contenders run as installed only
(``bfloat16_allocators``).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path

from jaxmodels.bench.timing import AS_INSTALLED, Contender
from jaxmodels.records import cpu_count, cpu_model

# name: (the library to preload, the Debian package that installs it); as installed: nothing.
ALLOCATORS: dict[str, tuple[str, str] | None] = {
    AS_INSTALLED: None,
    "jemalloc": ("libjemalloc.so.2", "libjemalloc2"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc-minimal4"),
}
LIBRARY_DIRS = (  # searched after the multiarch folders and ldconfig's cache
    "/usr/lib64",
    "/lib64",
    "/usr/lib",
    "/lib",
    "/usr/local/lib",
    "/usr/local/lib64",
)


def _ldconfig_paths(file: str) -> list[str]:
    """Paths ``ldconfig -p`` lists for the library ``file``, none where it cannot run."""
    for ldconfig in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            out = subprocess.run(
                [ldconfig, "-p"], capture_output=True, text=True, timeout=10, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        return [
            line.rsplit("=>", 1)[1].strip()
            for line in out.splitlines()
            if "=>" in line and line.split()[0] == file
        ]
    return []


@functools.cache
def find_library(file: str) -> str | None:
    """The absolute path of the shared library ``file`` (e.g. "libjemalloc.so.2"), None when it
    is not installed: this platform's multiarch folders first, then ldconfig's cache, then
    LIBRARY_DIRS."""
    multiarch = sysconfig.get_config_var("MULTIARCH")
    dirs = [f"/usr/lib/{multiarch}", f"/lib/{multiarch}"] if multiarch else []
    candidates = [os.path.join(d, file) for d in dirs]
    candidates += _ldconfig_paths(file)
    candidates += [os.path.join(d, file) for d in LIBRARY_DIRS]
    return next((str(Path(p)) for p in candidates if os.path.isfile(p)), None)


def allocator_library(allocator: str) -> tuple[str | None, str | None]:
    """(the library to preload, None) for ``allocator``; (None, None) for "as installed"; (None,
    the reason) when its library is not installed."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"expected an allocator in {tuple(ALLOCATORS)}, got {allocator!r}")
    spec = ALLOCATORS[allocator]
    if spec is None:
        return None, None
    file, package = spec
    path = find_library(file)
    if path is None:
        return None, f"{file} not found: install the Debian package {package}"
    return path, None


# /proc/cpuinfo's names of the instructions that compute in bfloat16 (AVX-512 BF16, AMX).
BFLOAT16_FEATURES = ("avx512_bf16", "amx_bf16")


def bfloat16_allocators(
    allocators: Sequence[str], cpu_features: Sequence[str] | None = None
) -> tuple[str, ...]:
    """The allocators PyTorch's bfloat16 contenders run with: ``allocators`` on a CPU with one
    of BFLOAT16_FEATURES (``cpu_features``, default this CPU's), else as installed only. Without
    them PyTorch's bfloat16 converts to and from float32 around every operation: a call takes
    several times its float32 time (seconds to a minute for the LSTM training step), spent in
    arithmetic that no allocator changes, so the other configurations would only multiply the
    suite's wall time."""
    features = cpu_model()[1] if cpu_features is None else cpu_features
    if any(f in features for f in BFLOAT16_FEATURES):
        return tuple(allocators)
    return tuple(a for a in allocators if a == AS_INSTALLED)


def thread_counts(torch_threads: int | None = None) -> list[int]:
    """PyTorch's intra-op thread counts timed: ``torch_threads`` (default: the CPU count) and, when
    that is more than one, 1."""
    threads = torch_threads or cpu_count()
    return [threads, 1] if threads > 1 else [threads]


def label(allocator: str, threads: int) -> str:
    """A configuration in words: "as installed, 2 threads", "jemalloc, 1 thread"."""
    return f"{allocator}, {threads} thread{'' if threads == 1 else 's'}"


def torch_contenders(
    name: str,
    setup: Callable,
    *,
    torch_threads: int | None = None,
    allocators: Sequence[str] = (AS_INSTALLED,),
    variant: str = "",
) -> list[Contender]:
    """The PyTorch contender ``name`` in every configuration: for each allocator, with
    ``torch_threads`` threads (default: the CPU count) and, when that is more than one, with one.
    Names: ``name`` as installed with the default threads, else ``name (1 thread)``,
    ``name (jemalloc)``, ``name (1 thread, jemalloc)``... ``variant``: ``Contender.variant``."""
    counts = thread_counts(torch_threads)
    contenders = []
    for allocator in allocators:
        if allocator not in ALLOCATORS:
            raise ValueError(f"expected an allocator in {tuple(ALLOCATORS)}, got {allocator!r}")
        for threads in counts:
            tags = ["1 thread"] if threads != counts[0] else []
            tags += [allocator] if allocator != AS_INSTALLED else []
            contenders.append(
                Contender(
                    f"{name} ({', '.join(tags)})" if tags else name,
                    setup,
                    "torch",
                    threads=threads,
                    allocator=allocator,
                    variant=variant,
                )
            )
    return contenders


def torch_dtype_contenders(
    name: str,
    setup: Callable,
    dtype: str,
    *,
    torch_threads: int | None = None,
    allocators: Sequence[str] = (AS_INSTALLED,),
) -> list[Contender]:
    """PyTorch's contenders computing in ``dtype``: for float32 ``torch_contenders(name, setup)``;
    for another dtype two variants in every configuration, the model cast to it (``name dtype``)
    and float32 under ``torch.autocast`` to it (``name autocast dtype``). ``setup`` takes
    ``dtype=`` and ``autocast=`` (``torch_models.lstm``, ``cnn``); a bfloat16 contender only with
    the allocators of ``bfloat16_allocators``."""
    if dtype == "float32":
        return torch_contenders(name, setup, torch_threads=torch_threads, allocators=allocators)
    options = dict(torch_threads=torch_threads, allocators=bfloat16_allocators(allocators))
    cast, autocast = dtype, f"autocast {dtype}"
    return [
        *torch_contenders(
            f"{name} {cast}", functools.partial(setup, dtype=dtype), variant=cast, **options
        ),
        *torch_contenders(
            f"{name} {autocast}",
            functools.partial(setup, autocast=dtype),
            variant=autocast,
            **options,
        ),
    ]


def torch_note(
    torch_threads: int | None, allocators: Sequence[str], dtypes: Sequence[str] = ("float32",)
) -> str:
    """The suites' note on the PyTorch configurations (of the workloads in ``dtypes``)."""
    threads = torch_threads or cpu_count()
    note = (
        f"PyTorch runs with {threads} intra-op thread(s) (torch.set_num_threads; the CPU count unless "
        "--torch-threads says otherwise) and, as `(1 thread)`, with one: on a machine whose other load "
        "exceeds its cores, PyTorch's OpenMP fork-join loses far more than XLA's thread pool, and the "
        "one-thread variant shows PyTorch's speed without that penalty."
    )
    tuned = [a for a in allocators if a != AS_INSTALLED]
    if tuned:
        note += (
            f" Each also runs with {' and with '.join(tuned)} preloaded (LD_PRELOAD, in that "
            "configuration's process only); `x strongest PyTorch` compares with the fastest "
            "configuration of each workload."
        )
        if "bfloat16" in dtypes and len(bfloat16_allocators(allocators)) < len(allocators):
            note += (
                " In bfloat16 PyTorch runs as installed only: this CPU has no bfloat16 instructions "
                f"({' or '.join(BFLOAT16_FEATURES)}), so PyTorch converts to and from float32 around "
                "every operation, and that arithmetic, not the allocator, sets its time."
            )
    return note
