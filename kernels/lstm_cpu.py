"""The LSTM recurrence as a compiled CPU kernel: ``lstm_cpu.cc``'s forward and backward loops,
called through the XLA FFI (``jax.ffi``), with the weight and input gradients as XLA matmuls.

Why a kernel: in XLA's ``lax.scan`` each step is a few separate operations (the step's matmul,
then its gate fusion), each handed to the thread pool and joined again. The kernel keeps one
thread per part of the hidden units for the whole sequence, each with its part of W_h packed in
its core's cache, and synchronizes once a step (see the file's header for the equations and the
layout).

Building: the C++ file ships with the package and is compiled on first use with the system's
C++ compiler (``$CXX``, else ``g++``, ``c++`` or ``clang++``) against the FFI headers of the
installed jaxlib, into ``$JAXMODELS_CACHE_DIR`` (default ``$XDG_CACHE_HOME/jaxmodels`` or
``~/.cache/jaxmodels``), one file per source, headers, compiler and flags, reused afterwards
(about 6 s once; nothing at install time). It runs on x86-64 CPUs with AVX2 and FMA; where the CPU
has AVX-512F (``isa()``), its matmuls are built for that, a vector a panel row, and where it also
has AMX's bfloat16 tiles, with those for bfloat16 (below). Where it cannot be built or run,
``unavailable()`` says why and ``lstm_scan`` runs its ``lax.scan`` instead;
``JAXMODELS_CPU_KERNEL=0`` chooses the scan without trying, ``=avx2`` the AVX2 build on any CPU,
``=avx512`` the AVX-512 build without tiles.

Scope: full-length sequences (no ``seq_lengths``) of concrete shapes, in float32, bfloat16 or
float16 (``DTYPES``), returned in the inputs' dtype. Float32 and float16 are computed in float32.
Bfloat16 too, except where ``tiles()``: there every matmul takes bfloat16 operands and
accumulates in float32, as bfloat16 libraries do on such CPUs: in the kernel on AMX tiles (per
step h_{t-1} W_h and x_t W_x, and δpre_t W_hᵀ backwards, h_t and δpre_t rounded to bfloat16),
and the weight and input gradients in XLA; the gates and the cell stay float32. ``lstm_scan``
checks these before choosing it. A function exported with ``jax.export`` for concrete shapes on
CPU would contain the kernel's custom call, which an artifact cannot carry: export with
symbolic shapes (as ``jaxmodels.export`` does, taking the scan) or with ``impl="scan"``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SOURCE = Path(__file__).with_name("lstm_cpu.cc")
FORWARD_TARGET = "jaxmodels_lstm_cpu_forward"
BACKWARD_TARGET = "jaxmodels_lstm_cpu_backward"
FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-w")
ISA_FLAGS = {  # added to FLAGS per instruction set
    "avx2": (),
    "avx512": ("-mavx512f",),
    "amx": ("-mavx512f", "-mamx-tile", "-mamx-bf16"),
}
SWITCH = "JAXMODELS_CPU_KERNEL"  # "0": never build or use the kernel; else 1 or an ISA_FLAGS key
DTYPES = tuple(map(jnp.dtype, ("float32", "bfloat16", "float16")))
UNITS_PER_THREAD = 64  # the fewest hidden units a thread is given (smaller parts cost more in sync)
# The fewest FLOPs of a time step, 2·B·(F+H)·4H, that each thread of a training step's kernels is
# given. Measured on 2 CPUs: below this a step's work is tens of microseconds, and in a training
# step (whose gradient matmuls run on XLA's pool around the kernels) one thread was 1.2-1.5x faster
# than two at (128, 16, 100), (256, 1, 150) and (128, 4, 300), two faster at (256, 16, 150)
# (16.8 MFLOP a step). The forward pass alone keeps a thread per UNITS_PER_THREAD units.
TRAINING_STEP_FLOPS_PER_THREAD = 8e6


class _Missing(NamedTuple):
    """Why there is no kernel; ``build_failed``: this CPU could run one, but it was not built."""

    reason: str
    build_failed: bool


def unavailable() -> str | None:
    """Why the kernel cannot run here, or None when it can (building it on the first call)."""
    library = _library()
    return library.reason if isinstance(library, _Missing) else None


def warn_unavailable() -> None:
    """One warning per process where an AVX2 x86-64 CPU could run the kernel but it could not be
    built (no compiler, a failed build), so that a slower ``lstm_scan`` is never a silent one."""
    library = _library()
    if isinstance(library, _Missing) and library.build_failed:
        _warn_once(library.reason)


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(
        f"jaxmodels: the compiled CPU LSTM kernel is unavailable ({reason}); lstm_scan runs its "
        f"lax.scan, slower ({SWITCH}=0 chooses the scan without this warning)",
        RuntimeWarning,
        stacklevel=3,
    )


@functools.cache
def _library() -> ctypes.CDLL | _Missing:
    """The built and registered kernel library, or why there is none."""
    switch = os.environ.get(SWITCH, "1")
    if switch not in ("0", "1", "avx2", "avx512"):
        expected = f"expected {SWITCH} to be 0, 1, avx2 or avx512, got {switch!r}"
        return _Missing(expected, build_failed=True)
    if switch == "0":
        return _Missing(f"disabled by {SWITCH}=0", build_failed=False)
    if platform.machine().lower() not in ("x86_64", "amd64"):
        reason = f"needs an x86-64 CPU with AVX2 and FMA, this is {platform.machine()}"
        return _Missing(reason, build_failed=False)
    try:
        path = _build()
    except (OSError, subprocess.SubprocessError) as error:
        return _Missing(str(error), build_failed=True)
    library = ctypes.CDLL(str(path))
    if not library.JaxmodelsLstmCpuSupported():
        return _Missing(
            f"needs an x86-64 CPU with AVX2 and FMA ({isa()} build), this one lacks them",
            build_failed=False,
        )
    for target, handler in (
        (FORWARD_TARGET, library.JaxmodelsLstmForward),
        (BACKWARD_TARGET, library.JaxmodelsLstmBackward),
    ):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return library


def isa() -> str:
    """The instruction set the kernel is built for here (a key of ``ISA_FLAGS``), from the CPU's
    flags in Linux's /proc/cpuinfo: "amx" where it has AVX-512F and AMX's bfloat16 tiles, "avx512"
    where it has AVX-512F, else "avx2"; ``JAXMODELS_CPU_KERNEL=avx2`` or ``avx512`` caps it."""
    switch = os.environ.get(SWITCH)
    if switch == "avx2":
        return "avx2"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "avx2"
    flags = next(
        (
            set(line.split(":", 1)[1].split())
            for line in cpuinfo.splitlines()
            if line.startswith("flags")
        ),
        set(),
    )
    if "avx512f" not in flags:
        return "avx2"
    return "amx" if {"amx_tile", "amx_bf16"} <= flags and switch != "avx512" else "avx512"


def tiles() -> bool:
    """Whether bfloat16 runs its matmuls on AMX tiles here: the kernel is built for "amx" and the
    operating system let this process use the tiles (Linux 5.16 or later)."""
    library = _library()
    return not isinstance(library, _Missing) and bool(library.JaxmodelsLstmCpuTiles())


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise OSError("no C++ compiler found ($CXX, g++, c++ or clang++)")


def cache_dir() -> Path:
    """Where built kernels are kept: $JAXMODELS_CACHE_DIR, else $XDG_CACHE_HOME/jaxmodels, else
    ~/.cache/jaxmodels."""
    if os.environ.get("JAXMODELS_CACHE_DIR"):
        return Path(os.environ["JAXMODELS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxmodels"


def _build() -> Path:
    """The shared library of ``SOURCE``, compiled unless a build of the same source, FFI headers,
    compiler and flags is cached. Concurrent first uses (test workers) each compile to a private
    temporary file and rename it into place, so none reads a half-written library."""
    compiler = _compiler()
    flags = (*FLAGS, *ISA_FLAGS[isa()])
    include = Path(jax.ffi.include_dir())
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + version.encode() + " ".join(flags).encode())
    for header in sorted((include / "xla" / "ffi" / "api").glob("*.h")):
        digest.update(header.read_bytes())
    directory = cache_dir()
    path = directory / f"lstm_cpu-{digest.hexdigest()[:16]}.so"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        built = Path(scratch) / path.name
        command = [compiler, *flags, f"-I{include}", str(SOURCE), "-o", str(built), "-pthread"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise OSError(f"{Path(compiler).name} failed to build {SOURCE.name}: {last}")
        os.replace(built, path)
    return path


def threads_for(hidden: int, batch: int | None = None, features: int | None = None) -> int:
    """Threads for a layer of ``hidden`` units: the CPUs this process may use, at most one per
    ``UNITS_PER_THREAD`` units (at least one). For a training step's kernels (``batch`` and
    ``features`` given), also at most one per ``TRAINING_STEP_FLOPS_PER_THREAD`` of a step."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = min(cpus or 1, hidden // UNITS_PER_THREAD)
    if batch is not None and features is not None:
        step_flops = 2 * batch * (features + hidden) * 4 * hidden
        threads = min(threads, int(step_flops // TRAINING_STEP_FLOPS_PER_THREAD))
    return max(1, threads)


# ---------------------------------------------------------------------------------------------
# The recurrence, with its backward pass


def _f32(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _attributes(reverse: bool, threads: int, bf16: bool) -> dict:
    return {"reverse": np.int32(reverse), "threads": np.int32(threads), "bf16": np.int32(bf16)}


def _run_forward(w_x, w_h, b, carry, xs, reverse: bool, bf16: bool, save: bool):
    """xs [batch, time, features] -> (hs [batch, time, hidden], c_T [batch, hidden], cs
    [batch, time, hidden] and acts [batch, time, 4*hidden] where ``save``, else [0]-shaped);
    ``bf16``: its matmuls take bfloat16 operands."""
    batch, time, features = xs.shape
    hidden = w_h.shape[0]
    saved = (_f32(batch, time, hidden), _f32(batch, time, 4 * hidden)) if save else (_f32(0),) * 2
    threads = threads_for(hidden, batch, features) if save else threads_for(hidden)
    call = jax.ffi.ffi_call(
        FORWARD_TARGET,
        (_f32(batch, time, hidden), _f32(batch, hidden), *saved),
        vmap_method="sequential",
    )
    return call(xs, w_x, b, w_h, *carry, **_attributes(reverse, threads, bf16))


def _final(hs: Array, reverse: bool) -> Array:
    return hs[:, 0] if reverse else hs[:, -1]


def recurrence(
    w_x: Array, w_h: Array, b: Array, carry: tuple[Array, Array], xs: Array, reverse: bool
) -> tuple[tuple[Array, Array], Array]:
    """The LSTM over xs [batch, time, features] from carry (h_0, c_0), each [batch, hidden], with
    w_x [features, 4*hidden], w_h [hidden, 4*hidden], b [4*hidden] (gates i, f, g, o), all of one
    dtype of ``DTYPES``, computed as the module docstring says. Returns ((h_T, c_T), hs [batch,
    time, hidden]) in that dtype, as ``lstm_scan``; differentiable (the kernel's backward loop).
    The caller checks the arguments and ``unavailable()``."""
    dtype = xs.dtype
    f32 = lambda a: a.astype(jnp.float32)
    carry = tuple(map(f32, carry))
    bf16 = dtype == jnp.bfloat16 and tiles()
    (h, c), hs = _recurrence(f32(w_x), f32(w_h), f32(b), carry, f32(xs), reverse, bf16)
    return (h.astype(dtype), c.astype(dtype)), hs.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _recurrence(w_x, w_h, b, carry, xs, reverse, bf16):
    """``recurrence`` on float32 arrays; ``bf16``: every matmul takes bfloat16 operands."""
    hs, c_last, _, _ = _run_forward(w_x, w_h, b, carry, xs, reverse, bf16, save=False)
    return (_final(hs, reverse), c_last), hs


def _recurrence_fwd(w_x, w_h, b, carry, xs, reverse, bf16):
    hs, c_last, cs, acts = _run_forward(w_x, w_h, b, carry, xs, reverse, bf16, save=True)
    outputs = ((_final(hs, reverse), c_last), hs)
    return outputs, (w_x, w_h, carry, xs, hs, cs, acts)


def _recurrence_bwd(reverse, bf16, residuals, cotangents):
    """δpre_t [batch, time, 4*hidden] from the kernel (written over acts, which it aliases: no
    new buffer of that size); then δW_x = Σ_t x_tᵀ δpre_t, δW_h = Σ_t h_{t-1}ᵀ δpre_t, δb =
    Σ_t δpre_t and δx_t = δpre_t W_xᵀ, each one matmul over all steps, all batch-major as the
    kernel's buffers are (a layout mismatch costs XLA a transpose of the operands); with ``bf16``
    their operands rounded to bfloat16, accumulated in float32."""
    w_x, w_h, (h0, c0), xs, hs, cs, acts = residuals
    (dh_last, dc_last), dhs = cotangents
    batch, time, gates = acts.shape
    hidden = gates // 4
    call = jax.ffi.ffi_call(
        BACKWARD_TARGET,
        (_f32(batch, time, gates), _f32(batch, hidden), _f32(batch, hidden)),
        vmap_method="sequential",
        input_output_aliases={3: 0},  # acts -> dpre
    )
    threads = threads_for(hidden, batch, xs.shape[2])  # as the forward's that saved the residuals
    attributes = _attributes(reverse, threads, bf16)
    dpre, dh0, dc0 = call(w_h, c0, cs, acts, dhs, dh_last, dc_last, **attributes)
    # h entering each step: h_0 then h_1 .. h_{T-1}; reversed, h_2 .. h_T then h_0.
    if reverse:
        h_in = jnp.concatenate([hs[:, 1:], h0[:, None]], axis=1)
    else:
        h_in = jnp.concatenate([h0[:, None], hs[:, :-1]], axis=1)
    operand = (lambda a: a.astype(jnp.bfloat16)) if bf16 else (lambda a: a)
    dot = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    dpre_in = operand(dpre)
    dw_x = dot("btf,btg->fg", operand(xs), dpre_in)
    dw_h = dot("bth,btg->hg", operand(h_in), dpre_in)
    dxs = dot("btg,fg->btf", dpre_in, operand(w_x))
    return dw_x, dw_h, jnp.sum(dpre, axis=(0, 1)), (dh0, dc0), dxs


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
