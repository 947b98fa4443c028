"""The accelerator check: kernel correctness on the device, the grid barrier under stress, LSTM
timings beside cuDNN and PyTorch, pixel-by-pixel MNIST training, and the ``impl="auto"`` table the
timings imply. One command for a GPU or TPU machine, within 10 minutes on one H100:

    python benchmarks/accelerators.py                  # -> benchmarks/results/accelerators-<platform>-<device>.*
    python benchmarks/accelerators.py --data-dir DIR --budget 540 --repeats 10
    JAX_PLATFORMS=cpu python benchmarks/accelerators.py --dry-run --out /tmp/acc   # the pipeline on CPU

What it does, in order, each stage in a child process of its own (``run_stage``):

1. Records the environment (``jaxmodels.records.environment``, as the bench harness does: versions,
   backend and devices, XLA_FLAGS and related settings, the date and the git commit) and the device
   under test (platform, kind, platform version).
2. ``correctness``: every Pallas kernel (``dense``, ``lstm_cell``, ``lstm_sequence``,
   ``lstm_stepwise``, ``lstm_grid``, ``lstm_scan(impl="pallas")`` and
   ``rnn_scan(impl="pallas")``) against its jnp reference (``lstm_grid``'s is its exact emulation
   ``lstm_grid_reference``, the scans' are ``impl="scan"``; a kernel whose plan refuses the
   shape on this device is skipped), forward and the gradient of sum(sin(outputs)) with respect
   to every float input, in float32 and bfloat16.
   Error = max |kernel - reference| / max(1, max |reference|) per output or gradient array
   (absolute for values of order 1), the largest over the arrays, against a per-dtype tolerance
   (``TOLERANCES``). Matmuls run at full float32 precision here
   (``jax.default_matmul_precision("highest")``): at JAX's default, GPUs use TF32 for float32
   dots, in the kernels and in XLA alike.
3. ``stress``: the grid kernel's barrier over thousands of steps at seeded random shapes
   (``stress_cases``: hidden across the grid kernel's range, batch, time, seq_lengths, reverse),
   forward and gradient against ``lstm_grid_reference``. A barrier that gives up turns the outputs
   NaN (``kernels.grid``): recorded as a failure, as is a case that hangs (below).
4. ``timing``: one LSTM layer (input features = hidden) at ``TIMING_SHAPES``, the forward pass and
   forward+backward (the gradients of sum(outputs) with respect to the weights and the inputs),
   ``lstm_scan`` with impl "scan", "pallas" and "auto", beside ``jax.experimental.rnn.lstm``
   (cuDNN, CUDA GPUs only) and PyTorch's ``nn.LSTM`` on CUDA (cuDNN) when torch is installed with
   CUDA. The bench harness times them (``jaxmodels.bench.timing.time_workload``): each contender
   set up and called once (``compile_s``), warmed up, then sampled over ``--repeats`` rounds in a
   new shuffled order each round, a sample being calls back to back for at least
   ``MIN_SAMPLE_S``, each waited on; reported are the median and min-max in ms and the speed-up
   against cuDNN (cuDNN's median / this one's) in the same run.
5. ``pixel-mnist``: the pixel-by-pixel MNIST LSTM (hidden 128, T = 784, batch 128, Adam) trained
   with ``lstm_scan`` impl "scan" and then "pallas", each for as many steps as fit in its share of
   ``--pixel-seconds`` (a short probe run measures the step first), tested on the 10,000 test
   images; skipped with the reason where the MNIST files are not in ``--data-dir``.
6. The ``impl="auto"`` table (``auto_table``): per timed shape, the faster of the scan and the
   Pallas path, against what ``auto`` takes today.
7. Writes ``accelerators-<platform>-<device kind>.json`` and ``.md`` into benchmarks/results/
   (``--out DIR`` to change), rewritten after each item so that a crash leaves what was done, and
   prints the markdown.

A hang is a recorded failure, not a lost session: each stage runs in a child process that reports
every item (a correctness case, a stress case, a timed workload, a training run) as it starts and
ends; an item that reports nothing for ``ITEM_TIMEOUT_S`` of its stage is killed with its process,
recorded as hung, and the stage goes on in a new child from the next item. A child that dies
records its item as crashed, with the end of its stderr. Items not reached within ``--budget``
seconds (the whole run) are recorded as not run.

``--dry-run`` runs the same pipeline on CPU with tiny shapes: kernels interpreted (the grid kernel
with one slice: interpreted programs run one at a time, so a barrier among several never
completes), two timing rounds of one call per sample at one tiny shape, cuDNN and PyTorch skipped,
the pixel stage on the embedded 8x8 digits read pixel by pixel; its files are named and marked
dry-run, and their times are interpret mode on CPU, not a speed. Without it, on a CPU-only machine
the script exits with status 2. The exit status is 1 when a correctness or stress case fails or
hangs (after writing results).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

import jaxmodels
from jaxmodels import records
from jaxmodels.arguments import positive_float, positive_int
from jaxmodels.bench import report
from jaxmodels.bench.lstm import lstm_flops
from jaxmodels.bench.timing import Contender, Skipped, Workload, time_workload
from jaxmodels.kernels import grid
from jaxmodels.kernels.common import target_platform
from jaxmodels.kernels.dense import dense, dense_reference
from jaxmodels.kernels.lstm_cell import lstm_cell, lstm_cell_reference
from jaxmodels.kernels.lstm_grid import grid_kernel, lstm_grid, lstm_grid_reference
from jaxmodels.kernels.lstm_sequence import lstm_sequence, lstm_sequence_reference, plan
from jaxmodels.kernels.lstm_stepwise import lstm_stepwise

RESULTS = Path(__file__).resolve().parent / "results"

# Device tolerances (forward, gradient) on max |kernel - reference| / max(1, max |reference|) per array.
TOLERANCES = {"float32": (1e-4, 1e-3), "bfloat16": (3e-2, 2e-1)}
DTYPES = (jnp.float32, jnp.bfloat16)

# Correctness shapes, on the device and (tiny, interpreted) in the dry run.
#   dense: (rows, features, out, activation); lstm_cell: (batch, hidden);
#   lstm_sequence / lstm_stepwise / lstm_grid: (time, batch, hidden, with seq_lengths, reverse);
#   lstm_scan, rnn_scan: (batch, time, features, hidden, with seq_lengths, reverse).
# lstm_sequence keeps hidden at 64: its w_h must fit on chip (float32 hidden <= 64 on an H100/H200);
# lstm_grid goes from there to its float32 limit (448 on H100 and A100; bfloat16 reaches further).
CORRECTNESS_SHAPES = {
    False: {
        "dense": [(16, 256, 256, "tanh"), (37, 100, 130, "sigmoid")],
        "lstm_cell": [(16, 64), (8, 256)],
        "lstm_sequence": [(20, 8, 64, False, False), (15, 16, 64, True, True)],
        "lstm_stepwise": [(10, 16, 256, False, False), (12, 8, 64, True, True)],
        "lstm_grid": [(20, 16, 256, False, False), (15, 40, 448, True, True)],
        "lstm_scan": [(8, 12, 32, 64, False, False), (16, 10, 48, 256, True, True)],
        "rnn_scan": [(8, 12, 32, 128, False, False), (16, 10, 48, 512, True, True)],
    },
    True: {
        "dense": [(5, 12, 24, "tanh")],
        "lstm_cell": [(3, 8)],
        "lstm_sequence": [(4, 3, 8, True, True)],
        "lstm_stepwise": [(3, 2, 8, False, False)],
        "lstm_grid": [(4, 3, 16, True, True)],
        "lstm_scan": [(3, 4, 6, 8, True, True)],
        "rnn_scan": [(3, 4, 6, 8, True, True)],
    },
}

# Timing shapes (hidden, batch, time, dtype): DeepBench's (1024, 64, 25) and (256, 64, 150), FlashRNN's
# (768, 16, 1024); small hidden sizes where the persistent kernel fits a GPU (float32 <= 64, bfloat16
# <= 128 on H100/H200); the dry run's one tiny shape.
TIMING_SHAPES = {
    False: [  # the most telling first: a run out of --budget drops the last
        (256, 64, 150, "float32"),
        (768, 16, 1024, "bfloat16"),
        (256, 64, 150, "bfloat16"),
        (64, 64, 150, "float32"),
        (128, 64, 150, "bfloat16"),
        (1024, 64, 25, "float32"),
        (1024, 64, 25, "bfloat16"),
    ],
    True: [(32, 2, 3, "float32")],
}
PASSES = ("forward", "forward+backward")
CUDNN, TORCH = "jax.experimental.rnn (cuDNN)", "PyTorch nn.LSTM (cuDNN)"
IMPLS = ("scan", "pallas", "auto")
PUBLISHED = {
    "source": "the FlashRNN paper, Pöppel, Beck and Hochreiter, arXiv:2412.07752",
    "contender": "cuDNN LSTM",
    "device": "NVIDIA H100",
    "shape": {"hidden": 768, "batch": 16, "time": 1024, "dtype": "bfloat16"},
    "forward_ms": 2.01,
    "forward+backward_ms": 5.19,
    "note": "a published figure, not measured here",
}
DRY_RUN_NOTE = "interpret mode on CPU: not a speed"
# The barrier stress (``stress_cases``): seeded random shapes, (cases, time range, float32 and
# bfloat16 hidden ranges in multiples of 16, largest batch); the dry run's grid has one slice.
STRESS = {
    False: {"cases": 8, "time": (1000, 4000), "hidden": {"float32": (80, 448),
            "bfloat16": (144, 1024)}, "batch": 48},
    True: {"cases": 2, "time": (20, 40), "hidden": {"float32": (16, 16), "bfloat16": (16, 16)},
           "batch": 3},
}  # fmt: skip
STRESS_SEED = 0
# Pixel MNIST: hidden size, batch, and the examples kept of each split (None: all); the dry run
# reads the first embedded digits (28x28 like MNIST) pixel by pixel with a tiny model.
PIXEL = {
    False: {"hidden": 128, "batch": 128, "train": None, "test": None},
    True: {"hidden": 8, "batch": 16, "train": 64, "test": 32},
}
PIXEL_IMPLS = ("scan", "pallas")
PIXEL_PROBE_STEPS = 10
# Seconds an item may go without reporting before it is killed as hung, per stage (the pixel
# stage's items add their training budget).
ITEM_TIMEOUT_S = {"correctness": 180.0, "stress": 240.0, "timing": 240.0, "pixel-mnist": 240.0}
STAGES = ("correctness", "stress", "timing", "pixel-mnist")
MIN_SAMPLE_S = (
    0.05  # a sample's calls last at least this long on a device (one call in the dry run)
)


# ---------------------------------------------------------------------------------------------
# The device


def device() -> dict:
    """The device under test: platform, kind and the platform's version (CUDA, ROCm, libtpu)."""
    d = jax.devices()[0]
    return {
        "platform": d.platform,
        "kind": d.device_kind,
        "platform_version": d.client.platform_version,
    }


def slug(text: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def first_line(err: BaseException) -> str:
    """'TypeName: first line of the message'."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


# ---------------------------------------------------------------------------------------------
# Correctness


def max_abs(tree) -> float:
    """max |x| over all leaves of a pytree of arrays, in float32."""
    return max(float(jnp.max(jnp.abs(x.astype(jnp.float32)))) for x in jax.tree.leaves(tree))


def scaled_error(a, b) -> float:
    """max |a - b| / max(1, max |b|) per leaf of two pytrees of arrays (b the reference), the largest
    over the leaves, in float32: the absolute error for values of order 1, relative for larger ones
    (a bias gradient sums over batch x time and reaches 100s, where a bfloat16 ulp is 1)."""
    return max(
        float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
        / max(1.0, max_abs(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def sin_loss(fn: Callable) -> Callable:
    """sum(sin(outputs)) of fn, in float32: a loss whose cotangents differ from element to element."""
    return lambda *args: sum(
        jnp.sum(jnp.sin(z.astype(jnp.float32))) for z in jax.tree.leaves(fn(*args))
    )


def _lengths(batch: int, steps: int) -> jax.Array:
    """seq_lengths spread over [0, steps], both ends included."""
    return jnp.array([steps - (steps * k) // max(batch - 1, 1) for k in range(batch)], jnp.int32)


def correctness_cases(dry_run: bool, dtype):
    """Yield (kernel name, shape description, kernel fn, reference fn, args, skip reason or None)."""
    shapes = CORRECTNESS_SHAPES[dry_run]
    keys = iter(jax.random.split(jax.random.key(0), 64))

    def rand(shape, scale=1.0):
        return (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    for rows, features, out, activation in shapes["dense"]:
        args = (rand((rows, features)), rand((features, out), features**-0.5), rand((out,), 0.1))
        yield (
            "dense",
            f"x [{rows}, {features}], w [{features}, {out}], {activation}",
            functools.partial(dense, activation=activation),
            functools.partial(dense_reference, activation=activation),
            args,
            None,
        )
    for batch, hidden in shapes["lstm_cell"]:
        args = (
            rand((batch, 4 * hidden)),
            rand((hidden, 4 * hidden), hidden**-0.5),
            (rand((batch, hidden), 0.5), rand((batch, hidden), 0.5)),
        )
        yield (
            "lstm_cell",
            f"batch {batch}, hidden {hidden}",
            lstm_cell,
            lstm_cell_reference,
            args,
            None,
        )
    platform = target_platform()
    kind = jax.devices()[0].device_kind
    sequence_kernels = (
        ("lstm_sequence", lstm_sequence, lstm_sequence_reference),
        ("lstm_stepwise", lstm_stepwise, lstm_sequence_reference),
        ("lstm_grid", lstm_grid, lstm_grid_reference),
    )
    for name, kernel, reference in sequence_kernels:
        for time_, batch, hidden, with_lengths, reverse in shapes[name]:
            lengths = _lengths(batch, time_) if with_lengths else None
            args = (
                rand((time_, batch, 4 * hidden)),
                rand((hidden, 4 * hidden), hidden**-0.5),
                (rand((batch, hidden), 0.5), rand((batch, hidden), 0.5)),
            )
            skip = None
            if (
                name == "lstm_sequence"
                and platform != "interpret"
                and plan(hidden, dtype, platform) is None
            ):
                skip = f"w_h does not fit on chip of {kind} (lstm_sequence.plan)"
            if name == "lstm_grid" and grid_kernel(platform, hidden, dtype, reverse) is None:
                skip = f"the grid kernel does not run hidden {hidden} on {kind} (kernels.grid.plan)"
            yield (
                name,
                _sequence_text(time_, batch, hidden, with_lengths, reverse),
                lambda x, w, c, f=kernel, n=lengths, r=reverse: f(x, w, c, n, reverse=r),
                lambda x, w, c, f=reference, n=lengths, r=reverse: f(x, w, c, n, reverse=r),
                args,
                skip,
            )
    for batch, time_, features, hidden, with_lengths, reverse in shapes["lstm_scan"]:
        params = jaxmodels.init_lstm(next(keys), features, hidden, forget_bias=1.0, dtype=dtype)
        params["b"] = params["b"] + rand((4 * hidden,), 0.1)
        lengths = _lengths(batch, time_) if with_lengths else None
        yield (
            "lstm_scan(pallas) vs (scan)",
            f"features {features}, " + _sequence_text(time_, batch, hidden, with_lengths, reverse),
            functools.partial(
                _lstm_scan_outputs, seq_lengths=lengths, reverse=reverse, impl="pallas"
            ),
            functools.partial(
                _lstm_scan_outputs, seq_lengths=lengths, reverse=reverse, impl="scan"
            ),
            (params, rand((batch, time_, features))),
            None,
        )
    for batch, time_, features, hidden, with_lengths, reverse in shapes["rnn_scan"]:
        params = jaxmodels.init_rnn(next(keys), features, hidden, dtype=dtype)
        lengths = _lengths(batch, time_) if with_lengths else None
        options = dict(seq_lengths=lengths, reverse=reverse)
        yield (
            "rnn_scan(pallas) vs (scan)",
            f"features {features}, " + _sequence_text(time_, batch, hidden, with_lengths, reverse),
            functools.partial(jaxmodels.rnn_scan, impl="pallas", **options),
            functools.partial(jaxmodels.rnn_scan, impl="scan", **options),
            (params, rand((batch, time_, features))),
            None,
        )


def _lstm_scan_outputs(params, xs, *, seq_lengths, reverse, impl):
    """``jaxmodels.lstm_scan``'s ((h_T, c_T), hs) with the given options."""
    return jaxmodels.lstm_scan(params, xs, seq_lengths=seq_lengths, reverse=reverse, impl=impl)


def _sequence_text(time_: int, batch: int, hidden: int, with_lengths: bool, reverse: bool) -> str:
    """The shape column of a sequence case."""
    text = f"time {time_}, batch {batch}, hidden {hidden}"
    return text + (", seq_lengths" if with_lengths else "") + (", reverse" if reverse else "")


def check_case(kernel: Callable, reference: Callable, args: tuple) -> dict:
    """Forward and gradient errors of kernel vs reference on args, each jitted, and the reference's scales."""
    argnums = tuple(range(len(args)))
    out = jax.jit(kernel)(*args)
    expected = jax.jit(reference)(*args)
    grads = jax.jit(jax.grad(sin_loss(kernel), argnums))(*args)
    expected_grads = jax.jit(jax.grad(sin_loss(reference), argnums))(*args)
    return {
        "forward_error": scaled_error(out, expected),
        "gradient_error": scaled_error(grads, expected_grads),
        "forward_scale": max_abs(expected),
        "gradient_scale": max_abs(expected_grads),
    }


def correctness_items(dry_run: bool) -> list[tuple[str, Callable[[], dict]]]:
    """Every case of ``correctness_cases`` in both dtypes, as (label, run) items: ``run()`` returns
    its record, status pass, FAIL or skipped."""
    items = []
    for dtype in DTYPES:
        dtype_name = jnp.dtype(dtype).name
        for case in correctness_cases(dry_run, dtype):
            label = f"correctness {case[0]} {dtype_name} {case[1]}"
            items.append((label, functools.partial(_run_case, dtype_name, *case)))
    return items


def _run_case(dtype_name, name, shape, kernel, reference, args, skip) -> dict:
    forward_tol, gradient_tol = TOLERANCES[dtype_name]
    record = {
        "kernel": name,
        "dtype": dtype_name,
        "shape": shape,
        "forward_tolerance": forward_tol,
        "gradient_tolerance": gradient_tol,
    }
    if skip:
        return record | {"status": "skipped", "reason": skip}
    try:
        with jax.default_matmul_precision("highest"):
            record.update(check_case(kernel, reference, args))
        ok = record["forward_error"] <= forward_tol and record["gradient_error"] <= gradient_tol
        record["status"] = "pass" if ok else "FAIL"
    except Exception as err:  # recorded as a failure; the other cases still run
        record.update(status="FAIL", error=first_line(err))
    return record


# ---------------------------------------------------------------------------------------------
# The grid barrier under stress


def stress_cases(dry_run: bool) -> list[dict]:
    """Seeded random shapes for the grid kernel (``STRESS``): per case a dtype, hidden (a multiple
    of 16 in the dtype's range), batch, time, seq_lengths or not, reverse or not."""
    spec, rng = STRESS[dry_run], random.Random(STRESS_SEED)
    cases = []
    for k in range(spec["cases"]):
        dtype = ("float32", "bfloat16")[k % 2]
        low, high = spec["hidden"][dtype]
        cases.append(
            {
                "dtype": dtype,
                "hidden": 16 * rng.randint(low // 16, high // 16),
                "batch": rng.randint(1, spec["batch"]),
                "time": rng.randint(*spec["time"]),
                "seq_lengths": rng.random() < 0.5,
                "reverse": rng.random() < 0.5,
            }
        )
    return cases


def stress_items(dry_run: bool) -> list[tuple[str, Callable[[], dict]]]:
    """The stress cases as (label, run) items."""
    items = []
    for case in stress_cases(dry_run):
        label = "stress " + ", ".join(f"{k} {v}" for k, v in case.items())
        items.append((label, functools.partial(run_stress_case, case, dry_run)))
    return items


def run_stress_case(case: dict, dry_run: bool) -> dict:
    """One stress case: ``lstm_grid`` (interpreted in the dry run) against ``lstm_grid_reference``,
    forward and gradient, the errors as in the correctness stage; NaN in the kernel's outputs (a
    barrier that gave up) fails the case whatever the tolerance."""
    dtype = jnp.dtype(case["dtype"])
    hidden, batch, time_ = case["hidden"], case["batch"], case["time"]
    record = dict(case, kernel="lstm_grid")
    platform = "interpret" if dry_run else target_platform()
    if grid_kernel(platform, hidden, dtype, case["reverse"]) is None:
        kind = jax.devices()[0].device_kind
        return record | {"status": "skipped", "reason": f"no grid plan for it on {kind}"}
    keys = jax.random.split(jax.random.key(STRESS_SEED), 4)
    args = (
        (jax.random.normal(keys[0], (time_, batch, 4 * hidden)) * 0.5).astype(dtype),
        (jax.random.normal(keys[1], (hidden, 4 * hidden)) * hidden**-0.5).astype(dtype),
        tuple((jax.random.normal(k, (batch, hidden)) * 0.5).astype(dtype) for k in keys[2:]),
    )
    lengths = _lengths(batch, time_) if case["seq_lengths"] else None
    interpret = True if dry_run else None
    kernel = lambda x, w, c: lstm_grid(
        x, w, c, lengths, reverse=case["reverse"], interpret=interpret
    )
    reference = lambda x, w, c: lstm_grid_reference(x, w, c, lengths, reverse=case["reverse"])
    forward_tol, gradient_tol = TOLERANCES[dtype.name]
    record.update(forward_tolerance=forward_tol, gradient_tolerance=gradient_tol)
    start = time.perf_counter()
    try:
        with jax.default_matmul_precision("highest"):
            record.update(check_case(kernel, reference, args))
    except Exception as err:
        return record | {"status": "FAIL", "error": first_line(err)}
    record["seconds"] = time.perf_counter() - start
    nan = math.isnan(record["forward_error"])  # the reference has no NaN: the kernel's outputs do
    ok = record["forward_error"] <= forward_tol and record["gradient_error"] <= gradient_tol
    if nan:
        record["error"] = "NaN outputs: a barrier gave up (kernels.grid.MAX_SPIN polls)"
    record["status"] = "pass" if ok and not nan else "FAIL"
    return record


# ---------------------------------------------------------------------------------------------
# Timing


def is_cuda() -> bool:
    """Whether the default backend is an NVIDIA GPU (cuDNN available)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and "rocm" not in device.client.platform_version.lower()


def pallas_path(impl: str, hidden: int, dtype) -> str:
    """What ``lstm_scan(impl=...)`` runs for this shape on this device: the persistent kernel where
    ``lstm_sequence.plan`` fits it, else for "pallas" the grid kernel where ``grid.plan`` does,
    else the stepwise kernel; the scan for "scan", and for "auto" where no persistent kernel fits
    (``jaxmodels.nn.recurrent``)."""
    platform = target_platform()
    if impl == "scan" or (impl == "auto" and platform == "interpret"):
        return "lax.scan"
    if plan(hidden, dtype, platform) is not None:
        kernel = "lstm_sequence (persistent)"
        return kernel + (", interpreted" if platform == "interpret" else "")
    if impl != "pallas":
        return "lax.scan"
    if grid.plan(hidden, dtype, platform) is not None:
        return "lstm_grid (grid-persistent)"
    return "lstm_stepwise"


def jax_step(f: Callable, weights, xs, train: bool) -> Callable[[], object]:
    """A no-argument call of jit(f)(weights, xs), or of the gradients of sum(f) wrt both when ``train``."""
    if train:
        fn = jax.jit(jax.grad(lambda w, x: jnp.sum(f(w, x).astype(jnp.float32)), argnums=(0, 1)))
    else:
        fn = jax.jit(f)
    return lambda: fn(weights, xs)


def lstm_workload(hidden: int, batch: int, time_: int, dtype_name: str, pass_name: str) -> Workload:
    """One timed workload (the harness's ``Workload``): ``lstm_scan`` with each impl, cuDNN and
    PyTorch's cuDNN LSTM, on xs [batch, time, hidden] (features = hidden) from N(0, 1) in
    ``dtype_name``. A contender that cannot run here raises ``Skipped`` from its setup."""
    dtype, train = jnp.dtype(dtype_name), pass_name != "forward"
    xs = jax.random.normal(jax.random.key(1), (batch, time_, hidden), jnp.float32).astype(dtype)
    cuda = is_cuda()

    def ours(impl: str) -> Callable:
        def setup():
            params = jaxmodels.init_lstm(jax.random.key(0), hidden, hidden, dtype=dtype)
            return jax_step(lambda p, x: jaxmodels.lstm_scan(p, x, impl=impl)[1], params, xs, train)

        return setup

    def cudnn():
        if not cuda:
            raise Skipped(f"cuDNN needs a CUDA GPU, not {jax.devices()[0].device_kind}")
        from jax.experimental import rnn

        weights = rnn.init_lstm_weight(jax.random.key(0), hidden, hidden, 1, False).astype(dtype)
        zeros = jnp.zeros((1, batch, hidden), dtype)
        lengths = jnp.full((batch,), time_, jnp.int32)
        f = lambda w, x: rnn.lstm(x, zeros, zeros, w, lengths, hidden, hidden, 1, 0.0, False)[0]
        return jax_step(f, weights, xs, train)

    contenders = [Contender(f"jaxmodels lstm_scan({impl})", ours(impl)) for impl in IMPLS]
    contenders.append(Contender(CUDNN, cudnn))
    torch_setup = functools.partial(_torch_setup, cuda, hidden, batch, time_, dtype_name, train)
    contenders.append(Contender(TORCH, torch_setup, framework="torch"))
    shape = {
        "hidden": hidden,
        "batch": batch,
        "time": time_,
        "dtype": dtype_name,
        "pass": pass_name,
    }
    return Workload(
        name=f"({hidden}, {batch}, {time_})",
        group=pass_name,
        flops=lstm_flops(hidden, batch, time_, train=train),
        contenders=contenders,
        info=shape,
    )


def _torch_skip(cuda: bool) -> str | None:
    """Why PyTorch's cuDNN LSTM cannot run here, or None. torch is imported only on a CUDA machine,
    after JAX has initialised its GPU backend."""
    if not cuda:
        return "no CUDA GPU for PyTorch here (JAX's default backend is not a CUDA GPU)"
    try:
        import torch
    except ModuleNotFoundError:
        return "torch is not installed"
    except Exception as err:
        return f"torch does not import: {first_line(err)}"
    return None if torch.cuda.is_available() else "torch.cuda.is_available() is False"


def _torch_setup(
    cuda: bool, hidden: int, batch: int, time_: int, dtype_name: str, train: bool
) -> Callable[[], object]:
    """``nn.LSTM(batch_first=True)`` on cuda: forward under no_grad, or the gradients of sum(outputs)
    wrt the parameters and the inputs (returned, not accumulated); the harness waits on the device."""
    skip = _torch_skip(cuda)
    if skip:
        raise Skipped(skip)
    import torch

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(hidden, hidden, batch_first=True).to(device="cuda", dtype=dtype)
    xs = torch.randn(batch, time_, hidden, device="cuda", dtype=dtype, requires_grad=train)
    wrt = [*lstm.parameters(), xs]

    def step():
        if train:
            return torch.autograd.grad(lstm(xs)[0].float().sum(), wrt)
        with torch.no_grad():
            return lstm(xs)[0]

    return step


def timing_items(
    dry_run: bool, repeats: int, min_sample_s: float
) -> list[tuple[str, Callable[[], list]]]:
    """Every workload of ``TIMING_SHAPES`` x ``PASSES`` as (label, run) items; ``run()`` times it
    with the harness (``time_workload``: interleaved rounds) and returns its rows: the workload
    (hidden, batch, time, dtype, pass), the contender's record, the path ``lstm_scan`` takes, and
    x_cudnn = cuDNN's median / this median where cuDNN ran."""
    items = []
    for hidden, batch, time_, dtype_name in TIMING_SHAPES[dry_run]:
        for pass_name in PASSES:
            label = f"timing {pass_name} ({hidden}, {batch}, {time_}) {dtype_name}"
            shape = (hidden, batch, time_, dtype_name, pass_name)
            items.append((label, functools.partial(time_shape, shape, repeats, min_sample_s)))
    return items


def time_shape(shape: tuple, repeats: int, min_sample_s: float) -> list[dict]:
    hidden, _, _, dtype_name, _ = shape
    workload = lstm_workload(*shape)
    records = time_workload(workload, repeats=repeats, min_sample_s=min_sample_s)
    cudnn = next((r for r in records if r["name"] == CUDNN and "median_s" in r), None)
    dtype = jnp.dtype(dtype_name)
    paths = {f"jaxmodels lstm_scan({i})": pallas_path(i, hidden, dtype) for i in IMPLS}
    rows = []
    for record in records:
        if record["name"] in paths:
            record["path"] = paths[record["name"]]
        if cudnn and "median_s" in record:
            record["x_cudnn"] = cudnn["median_s"] / record["median_s"]
        rows.append(workload.info | record)
    return rows


def auto_table(rows: list[dict]) -> list[dict]:
    """Per timed workload, what ``impl="auto"`` should take by these timings: the faster of
    ``lstm_scan(scan)`` and ``lstm_scan(pallas)`` (the Pallas path that shape takes), with both
    medians, cuDNN's, and the path ``auto`` takes today; ``agrees``: whether that is the faster."""
    table = []
    by_workload: dict[tuple, dict] = {}
    for r in rows:
        key = tuple(r[k] for k in ("hidden", "batch", "time", "dtype", "pass"))
        by_workload.setdefault(key, {})[r["name"]] = r
    for key, named in by_workload.items():
        scan = named.get("jaxmodels lstm_scan(scan)", {})
        pallas = named.get("jaxmodels lstm_scan(pallas)", {})
        auto = named.get("jaxmodels lstm_scan(auto)", {})
        if "median_s" not in scan or "median_s" not in pallas:
            continue
        faster = pallas if pallas["median_s"] < scan["median_s"] else scan
        entry = dict(zip(("hidden", "batch", "time", "dtype", "pass"), key))
        entry.update(
            scan_ms=scan["median_s"] * 1e3,
            pallas_ms=pallas["median_s"] * 1e3,
            pallas_path=pallas.get("path"),
            cudnn_ms=named[CUDNN]["median_s"] * 1e3 if "median_s" in named.get(CUDNN, {}) else None,
            faster=faster.get("path"),
            auto_path=auto.get("path"),
        )
        entry["agrees"] = entry["auto_path"] == entry["faster"]
        table.append(entry)
    return table


# ---------------------------------------------------------------------------------------------
# Pixel-by-pixel MNIST


def pixel_items(dry_run: bool, data_dir: str | None, seconds: float) -> list:
    """One training item per impl of ``PIXEL_IMPLS``, each with its share of ``seconds``."""
    share = seconds / len(PIXEL_IMPLS)
    return [
        (
            f"pixel-mnist impl={impl}",
            functools.partial(train_pixels, impl, dry_run, data_dir, share),
        )
        for impl in PIXEL_IMPLS
    ]


def pixel_dataset(dry_run: bool, data_dir: str | None):
    """The pixel-by-pixel data set: MNIST from ``data_dir`` ($JAXMODELS_DATA when None), the
    embedded digits in the dry run; raises Skipped naming what is missing."""
    from jaxmodels.data.datasets import get_dataset

    spec = PIXEL[dry_run]
    if dry_run:
        ds = get_dataset("seq-digits", steps="pixels")
    else:
        try:
            ds = get_dataset("seq-mnist", data_dir=data_dir, steps="pixels")
        except (FileNotFoundError, ValueError) as err:
            raise Skipped(f"no MNIST files: {first_line(err)} (--data-dir)") from None
    return ds.head(train=spec["train"], test=spec["test"])


def train_pixels(impl: str, dry_run: bool, data_dir: str | None, seconds: float) -> dict:
    """Train ``lstm-classifier`` (``PIXEL``) with ``lstm_scan(impl=impl)`` on pixel-by-pixel
    MNIST for as many steps as fit in ``seconds``: a probe of ``PIXEL_PROBE_STEPS`` steps times a
    step (compilation apart), then a fresh run of that many steps (whole epochs where one fits,
    Adam at 1e-3 with cosine decay, clip norm 1), tested after each epoch and at the end."""
    from jaxmodels.nn.models import get_model
    from jaxmodels.training.fit import TrainConfig, fit

    spec = PIXEL[dry_run]
    record = {"impl": impl, "model": "lstm-classifier", "hidden": spec["hidden"]}
    try:
        ds = pixel_dataset(dry_run, data_dir)
    except Skipped as why:
        return record | {"status": "skipped", "reason": str(why)}
    batch = spec["batch"]
    per_epoch = len(ds.x_train) // batch
    record.update(dataset=ds.name, seq_len=ds.input_shape[0], batch=batch)
    record.update(train_examples=len(ds.x_train), test_examples=len(ds.x_test))
    model = get_model("lstm-classifier", impl=impl, hidden_size=spec["hidden"])
    options = dict(batch_size=batch, lr=1e-3, clip_norm=1.0, seed=0, log_every=1)
    options.update(progress=False, plot=False, checkpoint=False)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(io.StringIO()):
        probe = fit(model, ds, TrainConfig(epochs=1, max_steps=PIXEL_PROBE_STEPS, **options),
                    workdir, overwrite=True)  # fmt: skip
        rows = [r for r in probe.history if r["kind"] == "train"]
        step_s = (rows[-1]["time_s"] - rows[0]["time_s"]) / max(len(rows) - 1, 1)
        left = seconds - (time.perf_counter() - start)
        steps = max(1, int(left / step_s))
        epochs = max(1, steps // per_epoch)
        config = TrainConfig(
            epochs=epochs, max_steps=min(steps, epochs * per_epoch), log_every=50,
            **{k: v for k, v in options.items() if k != "log_every"},
        )  # fmt: skip
        result = fit(model, ds, config, workdir, overwrite=True)
    evals = [r for r in result.history if r["kind"] == "eval"]
    train_rows = [r for r in result.history if r["kind"] == "train"]
    return record | {
        "status": "ran",
        "probe_step_ms": step_s * 1e3,
        "steps": config.max_steps,
        "steps_per_epoch": per_epoch,
        "epochs": config.max_steps / per_epoch,
        "first_step_s": train_rows[0].get("first_step_s") if train_rows else None,
        "train_s": evals[-1]["time_s"] - sum(r["eval_time_s"] for r in evals) if evals else None,
        "test_accuracy": [r["accuracy"] for r in evals],
        "test_steps": [r["step"] for r in evals],
    }


# ---------------------------------------------------------------------------------------------
# Output


def _fmt(value: float | None, digits: int = 3) -> str:
    """value to ``digits`` significant digits; empty for None."""
    return "" if value is None else f"{value:.{digits}g}"


def status(record: dict) -> str:
    """A timing record's last column: ok, or why it has no times."""
    if "skipped" in record:
        return f"skipped: {record['skipped']}"
    return f"error: {record['error']}" if "error" in record else "ok"


def markdown(result: dict) -> str:
    """The result as markdown: a dry-run banner where it applies, the correctness table, the timing
    table with the published cuDNN figure for context; the environment as the bench harness's reports
    give it (the full record is in the JSON)."""
    env = result["environment"]
    title = f"# Accelerator check: {result['device']['kind']} ({result['device']['platform']})"
    lines = [title + (" - DRY RUN" if result["dry_run"] else ""), ""]
    if result["dry_run"]:
        lines += [
            f"**Dry run ({DRY_RUN_NOTE}).** Tiny shapes, kernels interpreted, cuDNN and PyTorch "
            "skipped: this checks the pipeline, not the device.",
            "",
        ]
    dev = result["device"]
    lines += [
        f"`{result['command']}`: {report.machine(env)}; device {dev['kind']} "
        f"({dev['platform_version']}).",
        report.software(env) + ".",
        "",
    ]
    if not result["complete"]:
        lines += [
            "**Incomplete**: written part-way through the run; a run that ended here stopped early.",
            "",
        ]
    lines += _unfinished(result["unfinished"])
    cases = result["correctness"]
    failed = sum(c["status"] == "FAIL" for c in cases)
    lines += ["## Correctness", ""] + (
        ["Not run yet."]
        if not cases
        else [
            f"{len(cases)} cases, {failed} failed. "
            "Error = max |kernel - reference| / max(1, max |reference|) per array "
            "of the outputs (forward) or of the gradients of sum(sin(outputs)) wrt every float input (gradient), the "
            "largest over the arrays; scale = max |reference| over them. Matmuls at full float32 precision "
            '(`jax.default_matmul_precision("highest")`).',
            "",
            "| kernel | dtype | shape | forward error | tol | gradient error | tol | scale fwd / grad | status |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
    )
    for c in cases:
        note = c.get("error") or c.get("reason") or ""
        scales = (
            f"{_fmt(c.get('forward_scale'))} / {_fmt(c.get('gradient_scale'))}"
            if "forward_scale" in c
            else ""
        )
        lines.append(
            f"| {c['kernel']} | {c['dtype']} | {c['shape']} | {_fmt(c.get('forward_error'))} | "
            f"{c['forward_tolerance']:g} | {_fmt(c.get('gradient_error'))} | {c['gradient_tolerance']:g} | "
            f"{scales} | {c['status']}{': ' + note if note else ''} |"
        )
    lines += _stress(result["stress"])
    lines += ["", "## Timings", ""]
    timing = result["timing"]
    sample = (
        f">= {result['min_sample_s'] * 1e3:.0f} ms of back-to-back calls"
        if result["min_sample_s"]
        else "one call"
    )
    if not timing:
        lines += ["Not run yet."]
    else:
        lines += [
            ("Dry run: " + DRY_RUN_NOTE + ". " if result["dry_run"] else "")
            + f"{result['repeats']} rounds, contenders in a new random order each round, after compile (the "
            f"first call) and 2 warm-up calls; a sample is {sample}, each waited on (the harness of "
            "`jaxmodels.bench.timing`). Forward: the "
            "outputs [batch, time, hidden]; forward+backward: the gradients of sum(outputs) wrt weights and "
            "inputs. Input features = hidden. x cuDNN = jax.experimental.rnn's median / this median (above 1 "
            "is faster). JAX's default matmul precision: float32 matmuls may use TF32 on NVIDIA GPUs (XLA, "
            "the kernels and cuDNN alike) and bfloat16 passes on TPU.",
            "",
            "| (H, B, T) | dtype | pass | contender | path | median ms | min-max ms | x cuDNN | compile s | status |",
            "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in timing:
            timed = "median_s" in r
            span = f"{report.fmt_ms(r['min_s'])}-{report.fmt_ms(r['max_s'])}" if timed else ""
            lines.append(
                f"| ({r['hidden']}, {r['batch']}, {r['time']}) | {r['dtype']} | {r['pass']} | {r['name']} | "
                f"{r.get('path', '')} | {report.fmt_ms(r['median_s']) if timed else ''} | {span} | "
                f"{_fmt(r.get('x_cudnn'))} | {_fmt(r.get('compile_s'))} | {status(r)} |"
            )
        p = PUBLISHED
        shape = p["shape"]
        lines += [
            "",
            f"For context, {p['note']}: {p['contender']} at ({shape['hidden']}, {shape['batch']}, {shape['time']}), "
            f"{shape['dtype']}, on an {p['device']}: {p['forward_ms']} ms forward, {p['forward+backward_ms']} ms "
            f"forward+backward ({p['source']}).",
        ]
    lines += _auto(result.get("auto") or auto_table(timing))
    lines += _pixels(result["pixel_mnist"])
    return "\n".join(lines) + "\n"


def _unfinished(items: list[dict]) -> list[str]:
    """The items that hung, crashed or were not reached, first: they are what to look at."""
    if not items:
        return []
    lines = ["## Items that did not finish", "", "| stage | item | status | seconds | detail |"]
    lines.append("| --- | --- | --- | ---: | --- |")
    for u in items:
        seconds = f"{u['seconds']:.0f}" if "seconds" in u else ""
        lines.append(
            f"| {u['stage']} | {u['item']} | {u['status']} | {seconds} | {u.get('error', '')} |"
        )
    return [*lines, ""]


def _stress(cases: list[dict]) -> list[str]:
    lines = ["", "## The grid barrier under stress", ""]
    if not cases:
        return [*lines, "Not run yet."]
    failed = sum(c["status"] == "FAIL" for c in cases)
    lines += [
        f"{len(cases)} cases (seeded random shapes), {failed} failed: `lstm_grid` against its exact "
        "emulation `lstm_grid_reference`, forward and gradient, errors as above; NaN outputs mean a "
        "barrier gave up.",
        "",
        "| dtype | hidden | batch | time | seq_lengths | reverse | forward error | gradient error "
        "| s | status |",
        "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for c in cases:
        note = c.get("error") or c.get("reason") or ""
        lines.append(
            f"| {c['dtype']} | {c['hidden']} | {c['batch']} | {c['time']} | {c['seq_lengths']} | "
            f"{c['reverse']} | {_fmt(c.get('forward_error'))} | {_fmt(c.get('gradient_error'))} | "
            f"{_fmt(c.get('seconds'))} | {c['status']}{': ' + note if note else ''} |"
        )
    return lines


def _auto(table: list[dict]) -> list[str]:
    lines = ["", '## What `impl="auto"` should take, by these timings', ""]
    if not table:
        return [*lines, "No shape with both the scan and the Pallas path timed."]
    lines += [
        "Per timed shape, the faster of `lstm_scan(scan)` and `lstm_scan(pallas)` (the Pallas path "
        "that shape takes) against the path `auto` takes today.",
        "",
        "| (H, B, T) | dtype | pass | scan ms | pallas ms | pallas path | cuDNN ms | faster | auto "
        "today | agrees |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | --- | --- | --- |",
    ]
    for a in table:
        lines.append(
            f"| ({a['hidden']}, {a['batch']}, {a['time']}) | {a['dtype']} | {a['pass']} | "
            f"{_fmt(a['scan_ms'])} | {_fmt(a['pallas_ms'])} | {a['pallas_path']} | "
            f"{_fmt(a['cudnn_ms'])} | {a['faster']} | {a['auto_path']} | "
            f"{'yes' if a['agrees'] else 'NO'} |"
        )
    return lines


def _pixels(runs: list[dict]) -> list[str]:
    lines = ["", "## Pixel-by-pixel MNIST", ""]
    if not runs:
        return [*lines, "Not run yet."]
    lines += [
        "`lstm-classifier` on the images read one pixel a step, Adam 1e-3 with cosine decay over "
        "the steps that fit the stage's time, clip norm 1; test accuracy after each epoch and at "
        "the end. Step ms from a probe run after its first (compiling) step.",
        "",
        "| impl | hidden | data (train / test) | T | batch | step ms | steps | epochs | test accuracy "
        "| status |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in runs:
        if r["status"] != "ran":
            note = f"{r['status']}: {r.get('reason', '')}"
            lines.append(f"| {r['impl']} | {r['hidden']} | | | | | | | | {note} |")
            continue
        accuracy = ", ".join(f"{a:.4f}" for a in r["test_accuracy"])
        data = f"{r['dataset']} ({r['train_examples']} / {r['test_examples']})"
        lines.append(
            f"| {r['impl']} | {r['hidden']} | {data} | {r['seq_len']} | {r['batch']} | "
            f"{_fmt(r['probe_step_ms'])} | {r['steps']} | {r['epochs']:.2f} | {accuracy} | ran |"
        )
    return lines


def write_results(result: dict, out: Path) -> list[Path]:
    """Write the JSON and markdown files (``jaxmodels.records.write_results``); return their paths."""
    dev = result["device"]
    stem = f"accelerators-{slug(dev['platform'])}-{slug(dev['kind'])}"
    stem += "-dry-run" if result["dry_run"] else ""
    return records.write_results(result, out, stem, render_markdown=markdown, render_png=None)


# ---------------------------------------------------------------------------------------------
# Stages in child processes


def stage_items(stage: str, args: argparse.Namespace) -> list[tuple[str, Callable]]:
    """The (label, run) items of ``stage``, built in the child that runs them."""
    if stage == "correctness":
        return correctness_items(args.dry_run)
    if stage == "stress":
        return stress_items(args.dry_run)
    if stage == "timing":
        return timing_items(args.dry_run, args.repeats, args.min_sample_s)
    return pixel_items(args.dry_run, args.data_dir, args.pixel_seconds)


def child_main(args: argparse.Namespace) -> int:
    """A stage's child process: append to ``args.events`` one JSON line as each item starts and
    one with its record as it ends, from item ``args.first`` on ("info": the environment and the
    device, the parent's only source of them, so that it never opens the device itself)."""
    with open(args.events, "a", encoding="utf-8") as events:

        def emit(event: dict) -> None:
            events.write(json.dumps(event) + "\n")
            events.flush()

        if args.stage == "info":
            info = {"environment": records.environment(), "device": device()}
            emit({"info": info, "backend": jax.default_backend()})
            return 0
        items = stage_items(args.stage, args)
        emit({"labels": [label for label, _ in items]})
        for index in range(args.first, len(items)):
            _label, run = items[index]
            emit({"start": index})
            emit({"done": index, "record": run()})
    return 0


def _read_events(path: Path, seen: int) -> tuple[list[dict], int]:
    """The whole lines of ``path`` after the first ``seen``, parsed, and the new count."""
    if not path.exists():
        return [], seen
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]  # a partial last line waits
    return [json.loads(line) for line in lines[seen:]], len(lines)


def _tail(path: Path, lines: int = 6) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    kept = [
        line for line in text.splitlines() if line.strip() and not line.startswith(("I0", "W0"))
    ]
    return " | ".join(kept[-lines:])


def run_stage(
    stage: str,
    command: list[str],
    *,
    deadline: float,
    item_timeout_s: float,
    workdir: Path,
    on_item: Callable[[int, str, dict], None],
) -> list[str]:
    """Run ``stage`` in child processes (``command`` + --stage, --first, --events: ``child_main``)
    until its items are done or ``deadline`` (``time.monotonic``) passes; ``on_item(index, label,
    outcome)`` for each item as it ends: {"status": "done", "record", "seconds"}, or "hung" (no
    record within ``item_timeout_s``: the child is killed and a new one goes on from the next
    item), "crashed" (the child died: its exit status and the end of its stderr), "not run" (out
    of time). Returns the labels."""
    labels: list[str] = []
    first, attempt = 0, 0
    while True:
        attempt += 1
        events_path = workdir / f"{stage}-{attempt}.jsonl"
        stderr_path = workdir / f"{stage}-{attempt}.err"
        argv = [*command, "--stage", stage, "--first", str(first), "--events", str(events_path)]
        with open(stderr_path, "w", encoding="utf-8") as stderr:
            child = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
            )
        seen, current, started, killed = 0, None, time.monotonic(), None
        while True:
            code = child.poll()
            events, seen = _read_events(events_path, seen)
            for event in events:
                if "labels" in event:
                    labels = event["labels"]
                elif "start" in event:
                    current, started = event["start"], time.monotonic()
                elif "done" in event:
                    outcome = {"status": "done", "record": event["record"]}
                    outcome["seconds"] = time.monotonic() - started
                    on_item(event["done"], labels[event["done"]], outcome)
                    current, started = None, time.monotonic()
                    first = event["done"] + 1
            if code is not None:
                break
            now = time.monotonic()
            if now > deadline or now - started > item_timeout_s:
                killed = "not run" if now > deadline else "hung"
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                break
            time.sleep(0.2)
        if killed is None and first >= len(labels) and labels:
            return labels  # every item done
        if not labels:  # died or was stopped before it listed its items
            why = killed or f"crashed (exit status {child.returncode}): {_tail(stderr_path)}"
            on_item(-1, f"{stage}: the child process", {"status": why})
            return labels
        if current is not None:
            status = killed or "crashed"
            outcome = {"status": status, "seconds": time.monotonic() - started}
            if status == "hung":
                outcome["error"] = f"no result in {item_timeout_s:.0f} s: killed"
            elif status == "crashed":
                outcome["error"] = f"exit status {child.returncode}: {_tail(stderr_path)}"
            on_item(current, labels[current], outcome)
            first = current + 1
        if killed == "not run" or time.monotonic() > deadline:
            for index in range(first, len(labels)):
                on_item(index, labels[index], {"status": "not run"})
            return labels
        if first >= len(labels):
            return labels


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (``sys.argv[1:]`` when argv is None); a bad one exits 2 with argparse's error."""
    parser = argparse.ArgumentParser(
        description="Kernel correctness on the device, the grid barrier under stress, LSTM timings "
        "against cuDNN and PyTorch, pixel MNIST training (GPU/TPU)."
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help=f"folder for the results (default {RESULTS})"
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help="timing rounds (default 10; 2 with --dry-run)",
    )
    parser.add_argument(
        "--budget",
        type=positive_float,
        default=540.0,
        metavar="SECONDS",
        help="the whole run's seconds: items not reached by then are recorded as not run "
        "(default 540)",
    )
    parser.add_argument(
        "--pixel-seconds",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="training seconds of the pixel MNIST stage, shared by its impls (default 120; 20 "
        "with --dry-run)",
    )
    parser.add_argument(
        "--data-dir", default=None, help="MNIST's folder for the pixel stage ($JAXMODELS_DATA)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU check of the pipeline: tiny shapes, kernels interpreted, no speed measured",
    )
    # A stage's child process (``child_main``), started by the script itself.
    parser.add_argument("--stage", choices=("info", *STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--events", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (2 if args.dry_run else 10)
    args.pixel_seconds = args.pixel_seconds or (20.0 if args.dry_run else 120.0)
    args.min_sample_s = 0.0 if args.dry_run else MIN_SAMPLE_S
    return args


def device_info(args: argparse.Namespace, workdir: Path) -> dict | str:
    """The "info" child's event ({"info": {"environment", "device"}, "backend"}), or why none."""
    events_path = workdir / "info.jsonl"
    command = [*_child_command(args), "--stage", "info", "--events", str(events_path)]
    try:
        child = subprocess.run(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        return "no answer in 300 s"
    events, _ = _read_events(events_path, 0)
    if events:
        return events[0]
    tail = [line for line in child.stderr.splitlines() if line.strip()][-3:]
    return f"exit status {child.returncode}: {' | '.join(tail)}"


def _child_command(args: argparse.Namespace) -> list[str]:
    """This script with the options a stage's child takes from the parent."""
    argv = [sys.executable, str(Path(__file__).resolve())]
    argv += ["--repeats", str(args.repeats), "--pixel-seconds", str(args.pixel_seconds)]
    argv += ["--dry-run"] if args.dry_run else []
    return argv + (["--data-dir", args.data_dir] if args.data_dir else [])


def main(argv: list[str] | None = None) -> int:
    """Run the check; the exit status: 0, 1 when a correctness or stress case failed or an item
    hung or crashed, 2 on CPU without --dry-run."""
    args = parse_args(argv)
    if args.stage:
        return child_main(args)
    progress = lambda text: print(text, file=sys.stderr, flush=True)
    deadline = time.monotonic() + args.budget
    with tempfile.TemporaryDirectory(prefix="accelerators-") as tmp:
        workdir = Path(tmp)
        info = device_info(args, workdir)
        if isinstance(info, str):
            progress(f"accelerators.py: the device could not be opened: {info}")
            return 1
        backend = info["backend"]
        if not args.dry_run and backend == "cpu":
            progress(
                "accelerators.py: JAX's default backend is cpu; this script is for a GPU or TPU "
                "machine (pass --dry-run to check the pipeline on CPU)"
            )
            return 2
        result = {
            "dry_run": args.dry_run,
            "label": "dry-run: " + DRY_RUN_NOTE if args.dry_run else "device run",
            "command": " ".join(
                ["python benchmarks/accelerators.py", *(sys.argv[1:] if argv is None else argv)]
            ),
            **info["info"],
            "repeats": args.repeats,
            "min_sample_s": args.min_sample_s,
            "budget_s": args.budget,
            "tolerances": {k: {"forward": f, "gradient": g} for k, (f, g) in TOLERANCES.items()},
            "correctness": [],
            "stress": [],
            "timing": [],
            "pixel_mnist": [],
            "unfinished": [],
            "complete": False,
        }
        write_results(result, args.out)  # the environment, even if what follows crashes
        keys = {"correctness": "correctness", "stress": "stress", "timing": "timing"}
        keys["pixel-mnist"] = "pixel_mnist"
        for stage in STAGES:

            def on_item(index, label, outcome, stage=stage):
                if outcome["status"] == "done":
                    record = outcome["record"]
                    rows = record if isinstance(record, list) else [record]
                    result[keys[stage]] += rows
                    status = record.get("status", "ok") if isinstance(record, dict) else "ok"
                    progress(f"{label}: {status} ({outcome['seconds']:.1f} s)")
                else:
                    result["unfinished"].append({"stage": stage, "item": label, **outcome})
                    progress(f"{label}: {outcome['status'].upper()} {outcome.get('error', '')}")
                write_results(result, args.out)

            timeout = ITEM_TIMEOUT_S[stage] + (args.pixel_seconds if stage == "pixel-mnist" else 0)
            run_stage(stage, _child_command(args), deadline=deadline, item_timeout_s=timeout,
                      workdir=workdir, on_item=on_item)  # fmt: skip
    result["auto"] = auto_table(result["timing"])
    failed = [c for c in result["correctness"] + result["stress"] if c["status"] == "FAIL"]
    stopped = [u for u in result["unfinished"] if u["status"] in ("hung", "crashed")]
    result["passed"] = not failed and not stopped
    result["complete"] = True
    json_path, md_path = write_results(result, args.out)
    print(markdown(result))
    progress(f"wrote {json_path} and {md_path}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
