"""The accelerator check: kernel correctness on the device, then LSTM timings beside cuDNN and PyTorch.

One command for a GPU or TPU machine, a few minutes end to end:

    python benchmarks/accelerators.py                  # -> benchmarks/results/accelerators-<platform>-<device>.*
    python benchmarks/accelerators.py --out DIR --repeats 50
    JAX_PLATFORMS=cpu python benchmarks/accelerators.py --dry-run --out /tmp/acc   # the pipeline on CPU

What it does, in order:

1. Records the environment (``jaxmodels.records.environment``, as the bench harness does: versions,
   backend and devices, XLA_FLAGS and related settings, the date and the git commit) and the device
   under test (platform, kind, platform version).
2. Correctness on the device: every Pallas kernel (``dense``, ``lstm_cell``, ``lstm_sequence``,
   ``lstm_stepwise``, and ``lstm_scan(impl="pallas")``) against its jnp reference (``lstm_scan``'s
   is ``impl="scan"``; ``lstm_sequence`` is skipped where its w_h does not fit on chip), forward
   and the gradient of sum(sin(outputs)) with respect to every float input, in float32 and
   bfloat16. Error = max |kernel - reference| / max(1, max |reference|) per output or gradient
   array (absolute for values of order 1), the largest over the arrays, against a per-dtype
   tolerance (``TOLERANCES``). Matmuls run at full float32 precision here
   (``jax.default_matmul_precision("highest")``): at JAX's default, GPUs use TF32 for float32 dots,
   in the kernels and in XLA alike.
3. Timings of one LSTM layer (input features = hidden) at ``TIMING_SHAPES``: the forward pass and
   forward+backward (the gradients of sum(outputs) with respect to the weights and the inputs),
   ``lstm_scan`` with impl "scan", "pallas" and "auto", beside ``jax.experimental.rnn.lstm``
   (cuDNN, CUDA GPUs only) and PyTorch's ``nn.LSTM`` on CUDA (cuDNN) when torch is installed with
   CUDA. The bench harness times them (``jaxmodels.bench.timing.time_workload``, in this process):
   each contender set up and called once (``compile_s``), warmed up, then sampled over
   ``--repeats`` rounds in a new shuffled order each round, a sample being calls back to back for
   at least ``MIN_SAMPLE_S``, each waited on; reported are the median and min-max in ms, and the speed-up
   against cuDNN (cuDNN's median / this one's) in the same run. A contender that cannot run here is
   recorded as skipped with the reason, one that fails with its error.
4. Writes ``accelerators-<platform>-<device kind>.json`` and ``.md`` (the conditions, the
   correctness table and the timing table) into benchmarks/results/ (``--out DIR`` to change),
   rewritten after each step so that a crash leaves what was done, and prints the markdown.

``--dry-run`` runs the same pipeline on CPU with tiny shapes: kernels interpreted, two timing
rounds of one call per sample at one tiny shape, cuDNN and PyTorch skipped; its files are named
and marked dry-run, and their times are interpret mode on CPU, not a speed. Without it, on a CPU-only machine the script
exits with status 2. The exit status is 1 when a correctness case fails (after writing results).
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

import jaxmodels
from jaxmodels import records
from jaxmodels.arguments import positive_int
from jaxmodels.bench import report
from jaxmodels.bench.lstm import lstm_flops
from jaxmodels.bench.timing import Contender, Skipped, Workload, time_workload
from jaxmodels.kernels.common import target_platform
from jaxmodels.kernels.dense import dense, dense_reference
from jaxmodels.kernels.lstm_cell import lstm_cell, lstm_cell_reference
from jaxmodels.kernels.lstm_sequence import lstm_sequence, lstm_sequence_reference, plan
from jaxmodels.kernels.lstm_stepwise import lstm_stepwise

RESULTS = Path(__file__).resolve().parent / "results"

# Device tolerances (forward, gradient) on max |kernel - reference| / max(1, max |reference|) per array.
TOLERANCES = {"float32": (1e-4, 1e-3), "bfloat16": (3e-2, 2e-1)}
DTYPES = (jnp.float32, jnp.bfloat16)

# Correctness shapes, on the device and (tiny, interpreted) in the dry run.
#   dense: (rows, features, out, activation); lstm_cell: (batch, hidden);
#   lstm_sequence / lstm_stepwise: (time, batch, hidden, with seq_lengths, reverse);
#   lstm_scan: (batch, time, features, hidden, with seq_lengths, reverse).
# lstm_sequence keeps hidden at 64: its w_h must fit on chip (float32 hidden <= 64 on an H100/H200).
CORRECTNESS_SHAPES = {
    False: {
        "dense": [(16, 256, 256, "tanh"), (37, 100, 130, "sigmoid")],
        "lstm_cell": [(16, 64), (8, 256)],
        "lstm_sequence": [(20, 8, 64, False, False), (15, 16, 64, True, True)],
        "lstm_stepwise": [(10, 16, 256, False, False), (12, 8, 64, True, True)],
        "lstm_scan": [(8, 12, 32, 64, False, False), (16, 10, 48, 256, True, True)],
    },
    True: {
        "dense": [(5, 12, 24, "tanh")],
        "lstm_cell": [(3, 8)],
        "lstm_sequence": [(4, 3, 8, True, True)],
        "lstm_stepwise": [(3, 2, 8, False, False)],
        "lstm_scan": [(3, 4, 6, 8, True, True)],
    },
}

# Timing shapes (hidden, batch, time, dtype): DeepBench's (1024, 64, 25) and (256, 64, 150), FlashRNN's
# (768, 16, 1024); small hidden sizes where the persistent kernel fits a GPU (float32 <= 64, bfloat16
# <= 128 on H100/H200); the dry run's one tiny shape.
TIMING_SHAPES = {
    False: [
        (1024, 64, 25, "float32"),
        (256, 64, 150, "float32"),
        (768, 16, 1024, "bfloat16"),
        (1024, 64, 25, "bfloat16"),
        (256, 64, 150, "bfloat16"),
        (64, 64, 150, "float32"),
        (128, 64, 150, "bfloat16"),
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
    for name, kernel in (("lstm_sequence", lstm_sequence), ("lstm_stepwise", lstm_stepwise)):
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
                skip = f"w_h does not fit on chip of {jax.devices()[0].device_kind} (lstm_sequence.plan)"
            yield (
                name,
                _sequence_text(time_, batch, hidden, with_lengths, reverse),
                lambda x, w, c, f=kernel, n=lengths, r=reverse: f(x, w, c, n, reverse=r),
                lambda x, w, c, n=lengths, r=reverse: lstm_sequence_reference(
                    x, w, c, n, reverse=r
                ),
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


def run_correctness(dry_run: bool, progress: Callable[[str], None]) -> list[dict]:
    """Every case of ``correctness_cases`` in both dtypes; one record each, status pass, FAIL or skipped."""
    records = []
    with jax.default_matmul_precision("highest"):
        for dtype in DTYPES:
            dtype_name = jnp.dtype(dtype).name
            forward_tol, gradient_tol = TOLERANCES[dtype_name]
            for name, shape, kernel, reference, args, skip in correctness_cases(dry_run, dtype):
                record = {
                    "kernel": name,
                    "dtype": dtype_name,
                    "shape": shape,
                    "forward_tolerance": forward_tol,
                    "gradient_tolerance": gradient_tol,
                }
                if skip:
                    record.update(status="skipped", reason=skip)
                else:
                    try:
                        record.update(check_case(kernel, reference, args))
                        ok = (
                            record["forward_error"] <= forward_tol
                            and record["gradient_error"] <= gradient_tol
                        )
                        record["status"] = "pass" if ok else "FAIL"
                    except Exception as err:  # recorded as a failure; the other cases still run
                        record.update(status="FAIL", error=first_line(err))
                progress(f"correctness {name} {dtype_name} {shape}: {record['status']}")
                records.append(record)
    return records


# ---------------------------------------------------------------------------------------------
# Timing


def is_cuda() -> bool:
    """Whether the default backend is an NVIDIA GPU (cuDNN available)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and "rocm" not in device.client.platform_version.lower()


def pallas_path(impl: str, hidden: int, dtype) -> str:
    """What ``lstm_scan(impl=...)`` runs for this shape on this device (per ``lstm_sequence.plan``)."""
    platform = target_platform()
    if impl == "scan" or (impl == "auto" and platform == "interpret"):
        return "lax.scan"
    if plan(hidden, dtype, platform) is not None:
        kernel = "lstm_sequence (persistent)"
        return kernel + (", interpreted" if platform == "interpret" else "")
    return "lstm_stepwise" if impl == "pallas" else "lax.scan"


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


def run_timing(
    dry_run: bool,
    repeats: int,
    min_sample_s: float,
    progress: Callable[[str], None],
    on_workload: Callable[[list], None],
):
    """Time every workload of ``TIMING_SHAPES`` x ``PASSES`` with the harness (``time_workload``:
    interleaved rounds, this process); ``on_workload(rows so far)`` after each. Rows: the workload
    (hidden, batch, time, dtype, pass), the contender's record, the path ``lstm_scan`` takes, and
    x_cudnn = cuDNN's median / this median where cuDNN ran."""
    rows = []
    for hidden, batch, time_, dtype_name in TIMING_SHAPES[dry_run]:
        for pass_name in PASSES:
            workload = lstm_workload(hidden, batch, time_, dtype_name, pass_name)
            progress(f"timing {workload.group} {workload.name} {dtype_name}")
            records = time_workload(workload, repeats=repeats, min_sample_s=min_sample_s)
            cudnn = next((r for r in records if r["name"] == CUDNN and "median_s" in r), None)
            dtype = jnp.dtype(dtype_name)
            paths = {f"jaxmodels lstm_scan({i})": pallas_path(i, hidden, dtype) for i in IMPLS}
            for record in records:
                if record["name"] in paths:
                    record["path"] = paths[record["name"]]
                if cudnn and "median_s" in record:
                    record["x_cudnn"] = cudnn["median_s"] / record["median_s"]
                rows.append(workload.info | record)
            on_workload(rows)
    return rows


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
    cases = result["correctness"]
    failed = sum(c["status"] == "FAIL" for c in cases)
    lines += ["## Correctness", ""] + (
        ["Not run yet."]
        if "passed" not in result
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
    lines += ["", "## Timings", ""]
    timing = result["timing"]
    sample = (
        f">= {result['min_sample_s'] * 1e3:.0f} ms of back-to-back calls"
        if result["min_sample_s"]
        else "one call"
    )
    if timing is None:
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
    return "\n".join(lines) + "\n"


def write_results(result: dict, out: Path) -> list[Path]:
    """Write the JSON and markdown files (``jaxmodels.records.write_results``); return their paths."""
    dev = result["device"]
    stem = f"accelerators-{slug(dev['platform'])}-{slug(dev['kind'])}"
    stem += "-dry-run" if result["dry_run"] else ""
    return records.write_results(result, out, stem, render_markdown=markdown, render_png=None)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (``sys.argv[1:]`` when argv is None); a bad one exits 2 with argparse's error."""
    parser = argparse.ArgumentParser(
        description="Kernel correctness on the device and LSTM timings against cuDNN and PyTorch (GPU/TPU)."
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help=f"folder for the results (default {RESULTS})"
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help="timing rounds (default 20; 2 with --dry-run)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU check of the pipeline: tiny shapes, kernels interpreted, no speed measured",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the check; the exit status: 0, 1 when a correctness case failed, 2 on CPU without --dry-run."""
    args = parse_args(argv)
    if not args.dry_run and jax.default_backend() == "cpu":
        print(
            "accelerators.py: JAX's default backend is cpu; this script is for a GPU or TPU machine "
            "(pass --dry-run to check the pipeline on CPU)",
            file=sys.stderr,
        )
        return 2
    repeats = args.repeats or (2 if args.dry_run else 20)
    min_sample_s = 0.0 if args.dry_run else MIN_SAMPLE_S
    progress = lambda text: print(text, file=sys.stderr, flush=True)
    result = {
        "dry_run": args.dry_run,
        "label": "dry-run: " + DRY_RUN_NOTE if args.dry_run else "device run",
        "command": " ".join(
            ["python benchmarks/accelerators.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "environment": records.environment(),
        "device": device(),
        "repeats": repeats,
        "min_sample_s": min_sample_s,
        "tolerances": {k: {"forward": f, "gradient": g} for k, (f, g) in TOLERANCES.items()},
        "correctness": [],
        "timing": None,
        "published": PUBLISHED,
        "complete": False,
    }
    write_results(result, args.out)  # the environment, even if what follows crashes the process
    result["correctness"] = run_correctness(args.dry_run, progress)
    result["passed"] = all(c["status"] != "FAIL" for c in result["correctness"])
    write_results(result, args.out)

    def on_workload(rows):
        result["timing"] = rows
        write_results(result, args.out)

    run_timing(args.dry_run, repeats, min_sample_s, progress, on_workload)
    result["complete"] = True
    json_path, md_path = write_results(result, args.out)
    print(markdown(result))
    progress(f"wrote {json_path} and {md_path}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
