"""The benchmark harness and the standard suites (``jaxmodels bench``, ``benchmarks/*.py``).

    jaxmodels bench lstm --repeats 10            # writes benchmarks/results/lstm.{json,md,png}
    jaxmodels bench all --shapes small --out /tmp/bench

How a workload is timed (``time_workload``):

1. every contender is set up (parameters, inputs, jitted functions) and called once: that first
   call, compilation included, is reported apart as ``compile_s``;
2. ``warmup`` more calls, untimed, pick ``number``: how many calls one sample holds so that a
   sample lasts at least ``min_sample_s`` (the clock's resolution then does not matter);
3. ``repeats`` rounds in one process, every contender sampled once per round in a new random
   order (seeded: a run's orders are reproducible), each call waited on
   (``jax.block_until_ready``; PyTorch on CPU returns when done, on CUDA
   ``torch.cuda.synchronize``), so that load on a shared machine falls on every contender alike
   and the ratios stay meaningful; the shuffling varies who runs right after whom, so that an
   after-effect of one contender (PyTorch's thread pool) does not always fall on the same one;
4. per contender: the median and min-max of the per-call times, GFLOP/s from the workload's
   analytic FLOP count, the fraction of the matmul peak measured in the same run (a large float32
   ``jnp`` matmul, timed the same way, before and after the suite; the faster median counts), and
   speed-ups against named contenders of the same workload: ``t_baseline / t`` (above 1: faster).

FLOPs are counted analytically, multiply-add = 2: an LSTM layer's forward pass is
2·time·batch·(features+hidden)·4·hidden (the gate matmuls; the elementwise work is left out), a
convolution 2·batch·height_out·width_out·channels_out·(kh·kw·channels_in), a dense layer
2·batch·features·out; a training step (forward + backward) counts 3x its forward pass.

Results go to ``OUT/SUITE.json`` (everything, every sample included), ``OUT/SUITE.md`` (tables)
and ``OUT/SUITE.png`` (bar charts of the speed-ups), with ``-small`` added to SUITE for the tiny
shapes. Versions (jax, jaxlib, flax, optax, torch), XLA flags, CPU count, torch threads, the git
commit and the load average are recorded with every result.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import random
import statistics
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxmodels.records import cpu_count, environment, load_average, write_results

SUITES = ("lstm", "cnn")
SHAPE_SETS = ("small", "full")

# (hidden, batch, time), input features = hidden: DeepBench's shapes scaled to a small CPU machine,
# and the latency shapes (batch 1; small hidden).
LSTM_SHAPES = {
    "full": [
        (256, 16, 150),
        (256, 64, 150),
        (512, 16, 25),
        (512, 64, 25),
        (1024, 64, 25),
        (256, 1, 150),
        (128, 16, 100),
    ],
    "small": [(16, 2, 5)],
}
CNN_BATCHES = {  # (training batches, inference batches)
    "full": ((32, 128, 512), (1, 512)),
    "small": ((4,), (2,)),
}
PEAK_N = {"full": 2048, "small": 256}  # the peak matmul: [n, n] x [n, n] float32

LSTM_NAIVE = "naive lstm_cell scan"
LSTM_FLAX = "Flax nn.RNN(OptimizedLSTMCell)"
LSTM_TORCH = (
    "PyTorch nn.LSTM"  # intra-op threads: the CPU count; "... (1 thread)" is the other variant
)
LSTM_SCAN = "jaxmodels lstm_scan(scan)"
LSTM_PALLAS = "jaxmodels lstm_scan(pallas)"
CNN_TORCH = "PyTorch"
CNN_PLAIN = "Flax nn.Conv (plain)"


# ---------------------------------------------------------------------------------------------
# Data types


@dataclasses.dataclass
class Contender:
    """One implementation of a workload.

    ``setup()`` builds parameters, inputs and compiled functions and returns ``step``, a function of
    no arguments that runs the workload once and returns something to wait on.
    ``framework`` says how to wait: "jax" or "torch".
    """

    name: str
    setup: Callable[[], Callable[[], Any]]
    framework: str = "jax"


@dataclasses.dataclass
class Workload:
    """One measured thing: a name, its group (a table and a chart panel), its FLOPs per call, the
    contenders, and its parameters (shapes) for the record."""

    name: str
    group: str
    flops: float
    contenders: list[Contender]
    info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Suite:
    """Workloads with the name of the baseline contender and of others to give ratios against."""

    name: str
    workloads: list[Workload]
    baseline: str
    compare: tuple[str, ...] = ()
    peak_n: int = 2048
    notes: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# FLOP counts


def lstm_flops(
    hidden: int, batch: int, time: int, features: int | None = None, *, train: bool = False
) -> float:
    """FLOPs of one LSTM layer over a sequence: 2·time·batch·(features+hidden)·4·hidden forward
    (the gate matmuls), 3x that for forward + backward. ``features`` defaults to ``hidden``."""
    features = hidden if features is None else features
    forward = 2.0 * time * batch * (features + hidden) * 4 * hidden
    return 3 * forward if train else forward


def _conv_out(size: int, kernel: int, padding: str) -> int:
    return size - kernel + 1 if padding.upper() == "VALID" else size


def cnn_flops(
    model: Any,
    batch: int,
    height: int = 28,
    width: int = 28,
    channels: int = 1,
    *,
    train: bool = False,
) -> float:
    """FLOPs of ``jaxmodels.CNN``-like ``model`` on [batch, height, width, channels], from its
    attributes (features, kernel_size, pool_after, pool_size, padding, dense_features, num_classes):
    convolutions 2·batch·h_out·w_out·c_out·(kh·kw·c_in) and dense layers 2·batch·in·out; pooling
    and activations are not counted. 3x the forward pass for a training step."""
    kh, kw = model.kernel_size
    total = 0.0
    for out, pool in zip(model.features, model.pool_after):
        height, width = _conv_out(height, kh, model.padding), _conv_out(width, kw, model.padding)
        total += 2.0 * batch * height * width * out * kh * kw * channels
        channels = out
        if pool:
            height, width = height // model.pool_size[0], width // model.pool_size[1]
    features = height * width * channels
    for out in (*model.dense_features, model.num_classes):
        total += 2.0 * batch * features * out
        features = out
    return 3 * total if train else total


# ---------------------------------------------------------------------------------------------
# Timing


def _wait(framework: str, out: Any) -> None:
    if framework == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    else:
        jax.block_until_ready(out)


def time_workload(
    workload: Workload,
    *,
    repeats: int,
    warmup: int = 2,
    min_sample_s: float = 0.05,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict]:
    """Time every contender of ``workload`` interleaved (see the module docstring).

    Returns one record per contender: name, framework, compile_s (the first call), number (calls
    per sample), samples_s (per-call seconds, one per round), median_s, min_s, max_s, and ``error``
    (a message, with no times) for a contender whose setup or step raised.
    """
    records, steps = [], []
    for contender in workload.contenders:
        record: dict[str, Any] = {"name": contender.name, "framework": contender.framework}
        records.append(record)
        try:
            step = contender.setup()
            start = clock()
            _wait(contender.framework, step())
            record["compile_s"] = clock() - start
            times = []
            for _ in range(warmup):
                start = clock()
                _wait(contender.framework, step())
                times.append(clock() - start)
            per_call = min(times) if times else record["compile_s"]
            record["number"] = max(1, math.ceil(min_sample_s / max(per_call, 1e-9)))
            record["samples_s"] = []
            steps.append((record, contender.framework, step))
        except Exception as err:  # a broken contender is reported, the others still run
            record["error"] = f"{type(err).__name__}: {err}"
    gc.collect()
    gc.disable()
    try:
        rng = random.Random(0)
        for _ in range(repeats):
            for record, framework, step in rng.sample(steps, len(steps)):
                if "error" in record:
                    continue
                try:
                    start = clock()
                    for _ in range(record["number"]):
                        _wait(framework, step())
                    record["samples_s"].append((clock() - start) / record["number"])
                except Exception as err:
                    record["error"] = f"{type(err).__name__}: {err}"
    finally:
        gc.enable()
    for record in records:
        samples = record.get("samples_s")
        if "error" in record:
            record.pop("samples_s", None)
        elif samples:
            record.update(
                median_s=statistics.median(samples), min_s=min(samples), max_s=max(samples)
            )
    return records


def measure_peak(n: int, *, repeats: int, min_sample_s: float = 0.05) -> dict:
    """GFLOP/s of a jitted float32 [n, n] x [n, n] ``jnp`` matmul (2·n³ FLOPs), timed like a workload."""

    def setup():
        a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
        matmul = jax.jit(jnp.matmul)
        return lambda: matmul(a, b)

    workload = Workload(
        f"matmul {n}^3", "peak", 2.0 * n**3, [Contender(f"jnp.matmul float32 {n}x{n}", setup)]
    )
    (record,) = time_workload(workload, repeats=repeats, min_sample_s=min_sample_s)
    if "error" in record:
        raise RuntimeError(f"the peak matmul failed: {record['error']}")
    record["n"] = n
    record["gflops"] = workload.flops / record["median_s"] / 1e9
    return record


# ---------------------------------------------------------------------------------------------
# Environment


# ---------------------------------------------------------------------------------------------
# Running a suite


def run_suite(
    suite: Suite,
    *,
    repeats: int = 10,
    warmup: int = 2,
    min_sample_s: float = 0.05,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Measure the peak, every workload, the peak again; return the JSON-ready result."""
    log = log or (lambda _: None)
    env = environment()
    loads = [load_average()]
    log(
        f"{suite.name}: {len(suite.workloads)} workloads, {repeats} repeats, backend {env['backend']}, "
        f"{env['cpu_count']} CPUs, load average {loads[0]}"
    )
    peaks = [measure_peak(suite.peak_n, repeats=repeats, min_sample_s=min_sample_s)]
    log(f"  peak: {peaks[0]['gflops']:.1f} GFLOP/s ({peaks[0]['name']})")
    workloads = []
    for workload in suite.workloads:
        records = time_workload(workload, repeats=repeats, warmup=warmup, min_sample_s=min_sample_s)
        loads.append(load_average())
        workloads.append(
            {
                "name": workload.name,
                "group": workload.group,
                "flops": workload.flops,
                "info": workload.info,
                "loadavg_after": loads[-1],
                "contenders": records,
            }
        )
        log("  " + _progress_line(workload, records))
    peaks.append(measure_peak(suite.peak_n, repeats=repeats, min_sample_s=min_sample_s))
    log(f"  peak again: {peaks[1]['gflops']:.1f} GFLOP/s")
    peak = max(p["gflops"] for p in peaks)
    for workload in workloads:
        times = {r["name"]: r["median_s"] for r in workload["contenders"] if "median_s" in r}
        for record in workload["contenders"]:
            if "median_s" not in record:
                continue
            record["gflops"] = workload["flops"] / record["median_s"] / 1e9
            record["frac_peak"] = record["gflops"] / peak
            record["speedup"] = {
                other: times[other] / record["median_s"] if other in times else None
                for other in (suite.baseline, *suite.compare)
            }
    return {
        "suite": suite.name,
        "baseline": suite.baseline,
        "compare": list(suite.compare),
        "repeats": repeats,
        "warmup": warmup,
        "min_sample_s": min_sample_s,
        "peak": {"gflops": peak, "runs": peaks},
        "loadavg": {
            "start": loads[0],
            "end": load_average(),
            "min_1": min(load[0] for load in loads if load),
            "max_1": max(load[0] for load in loads if load),
        }
        if loads[0]
        else None,
        "notes": suite.notes,
        "environment": env,
        "workloads": workloads,
    }


def _progress_line(workload: Workload, records: list[dict]) -> str:
    parts = []
    for r in records:
        parts.append(
            f"{r['name']} {r['median_s'] * 1e3:.3g} ms" if "median_s" in r else f"{r['name']} ERROR"
        )
    return f"{workload.group} {workload.name}: " + ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Reports: markdown, PNG, files


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def markdown(result: dict) -> str:
    """Tables, one per workload group, with the run's conditions above them."""
    env = result["environment"]
    v = env["versions"]
    load = result["loadavg"]
    peak = result["peak"]
    lines = [
        f"# Benchmark: {result['suite']}",
        "",
        f"{env['date']}; backend {env['backend']} ({', '.join(sorted(set(env['devices'])))}), "
        f"{env['cpu_count']} CPUs ({env['processor']}), torch threads {env['torch_threads']}.",
        f"jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, optax {v['optax']}, torch {v['torch']}, "
        f"numpy {v['numpy']}, python {v['python']}; XLA_FLAGS={env['xla_flags'] or '(unset)'}; "
        f"git {(env['git_commit'] or 'unknown')[:10]}"
        + (
            f" with local changes in {', '.join(f.split()[-1] for f in env['git_dirty_files'])}"
            if env["git_dirty_files"]
            else ""
        ),
        f"Peak: {peak['gflops']:.1f} GFLOP/s, a float32 {peak['runs'][0]['n']}^3 jnp matmul in the same run "
        f"(before: {peak['runs'][0]['gflops']:.1f}, after: {peak['runs'][1]['gflops']:.1f}).",
    ]
    if load:
        lines.append(
            f"Load average (1, 5, 15 min) at start {load['start']}, at end {load['end']}; "
            f"1-min load between workloads {load['min_1']}-{load['max_1']}: the machine is shared, so the "
            "contenders are interleaved and the ratios, not the absolute times, are the result."
        )
    lines += [
        f"{result['repeats']} rounds, contenders in a new random order each round; "
        f"a sample is >= {result['min_sample_s'] * 1e3:.0f} ms "
        "of back-to-back calls, each waited on; median and min-max of the per-call time over the rounds; "
        "compile = the first call. `x B` = B's median / this median (above 1: faster than B).",
    ]
    lines += [f"{note}" for note in result["notes"]]
    others = [result["baseline"], *result["compare"]]
    groups: dict[str, list[dict]] = {}
    for workload in result["workloads"]:
        groups.setdefault(workload["group"], []).append(workload)
    for group, workloads in groups.items():
        lines += ["", f"## {group}", ""]
        header = [
            "workload",
            "contender",
            "median ms",
            "min-max ms",
            "compile s",
            "GFLOP/s",
            "% peak",
        ]
        header += [f"x {o}" for o in others]
        lines += [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
        ]
        for workload in workloads:
            for r in workload["contenders"]:
                if "median_s" not in r:
                    row = [
                        workload["name"],
                        r["name"],
                        f"error: {r.get('error', 'no samples')}",
                    ] + [""] * (len(header) - 3)
                else:
                    row = [
                        workload["name"],
                        r["name"],
                        _fmt_ms(r["median_s"]),
                        f"{_fmt_ms(r['min_s'])}-{_fmt_ms(r['max_s'])}",
                        f"{r['compile_s']:.2f}",
                        f"{r['gflops']:.1f}",
                        f"{100 * r['frac_peak']:.1f}",
                    ] + [
                        "" if r["speedup"].get(o) is None else f"{r['speedup'][o]:.2f}"
                        for o in others
                    ]
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Bar charts of the speed-up over the baseline (bars from 1, log scale), one panel per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups: dict[str, list[dict]] = {}
    for workload in result["workloads"]:
        groups.setdefault(workload["group"], []).append(workload)
    names = list(dict.fromkeys(r["name"] for w in result["workloads"] for r in w["contenders"]))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    most = max(len(w) for w in groups.values())
    fig, axes = plt.subplots(
        len(groups), 1, figsize=(max(8.0, 1.5 * most + 3), 3.4 * len(groups) + 1.0), squeeze=False
    )
    baseline = result["baseline"]
    width = 0.8 / len(names)
    for ax, (group, workloads) in zip(axes[:, 0], groups.items()):
        for j, name in enumerate(names):
            xs, ys = [], []
            for i, workload in enumerate(workloads):
                r = next((r for r in workload["contenders"] if r["name"] == name), None)
                if r is not None and r.get("speedup", {}).get(baseline) is not None:
                    xs.append(i + (j - (len(names) - 1) / 2) * width)
                    ys.append(r["speedup"][baseline])
            if xs:
                ax.bar(xs, [y - 1 for y in ys], width, bottom=1.0, label=name, color=colors[name])
                for x, y in zip(xs, ys):
                    ax.annotate(
                        f"{y:.2g}",
                        (x, y),
                        ha="center",
                        va="bottom" if y >= 1 else "top",
                        fontsize=6,
                    )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xticks(range(len(workloads)), [w["name"] for w in workloads], fontsize=8)
        ax.set_ylabel("speed-up (x baseline)")
        ax.set_title(f"{result['suite']}: {group}", fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="upper center", ncol=min(3, len(names)), fontsize=8, frameon=False
    )
    env = result["environment"]
    fig.text(
        0.01,
        0.005,
        f"baseline: {baseline} (median time of the baseline / median time; higher is faster)\n"
        f"{env['date']}, {env['backend']}, {env['cpu_count']} CPUs, jax {env['versions']['jax']}, "
        f"torch {env['versions']['torch']}, peak {result['peak']['gflops']:.0f} GFLOP/s",
        fontsize=7,
    )
    rows = math.ceil(len(names) / 3)
    fig.tight_layout(rect=(0, 0.035, 1, 1 - 0.035 * rows * 4 / (3.4 * len(groups) + 1.0)))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The LSTM suite


def _torch_contenders(name: str, make_setup: Callable, threads: int | None) -> list[Contender]:
    """PyTorch contenders, none when torch is not installed: ``name`` with ``threads`` intra-op threads
    (default: the CPU count) and, when that is more than one, ``name (1 thread)``. Each step sets its
    thread count first, since the two interleave. ``make_setup(torch)`` returns a Contender's setup."""
    try:
        import torch
    except ImportError:
        return []
    threads = threads or cpu_count()
    torch.set_num_threads(threads)

    def with_threads(n: int) -> Callable:
        def setup():
            torch.set_num_threads(n)
            step = make_setup(torch)()

            def run():
                if torch.get_num_threads() != n:
                    torch.set_num_threads(n)
                return step()

            return run

        return setup

    contenders = [Contender(name, with_threads(threads), "torch")]
    if threads > 1:
        contenders.append(Contender(f"{name} (1 thread)", with_threads(1), "torch"))
    return contenders


def lstm_contenders(
    hidden: int,
    batch: int,
    time: int,
    *,
    train: bool,
    backend: str | None = None,
    torch_threads: int | None = None,
) -> list[Contender]:
    """The LSTM contenders on xs [batch, time, hidden] (features = hidden), float32.

    Forward: the outputs hs [batch, time, hidden]. Training step: the gradients of sum(hs) with
    respect to the parameters and the inputs.
    """
    import flax.linen as nn
    from jax.experimental import rnn as jax_rnn

    import jaxmodels as jm

    backend = backend or jax.default_backend()
    features = hidden
    key = jax.random.key(0)

    def inputs():
        return jax.random.normal(jax.random.key(1), (batch, time, features), jnp.float32)

    def jax_contender(name: str, make: Callable[[], tuple[Callable, Any]]) -> Contender:
        """``make()`` -> (f(params, xs) -> hs, params); the step jits f or its gradient."""

        def setup():
            f, params = make()
            xs = inputs()
            if train:
                fn = jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x)), argnums=(0, 1)))
            else:
                fn = jax.jit(f)
            return lambda: fn(params, xs)

        return Contender(name, setup)

    def naive():
        def f(params, xs):
            zeros = jnp.zeros((batch, hidden), xs.dtype)
            _, hs = jax.lax.scan(
                lambda carry, x: jm.lstm_cell(params, carry, x),
                (zeros, zeros),
                jnp.swapaxes(xs, 0, 1),
            )
            return jnp.swapaxes(hs, 0, 1)

        return f, jm.init_lstm(key, features, hidden)

    def flax_rnn():
        model = nn.RNN(nn.OptimizedLSTMCell(hidden))
        params = model.init(key, jnp.zeros((batch, time, features), jnp.float32))
        return model.apply, params

    def experimental():
        weights = jax_rnn.init_lstm_weight(key, features, hidden, 1, False)
        zeros = jnp.zeros((1, batch, hidden), jnp.float32)
        lengths = jnp.full((batch,), time, jnp.int32)

        def f(weights, xs):
            if backend == "gpu":  # cuDNN
                return jax_rnn.lstm(
                    xs, zeros, zeros, weights, lengths, features, hidden, 1, 0.0, False
                )[0]
            w_ih, w_hh, b_ih, b_hh = jax_rnn.unpack_lstm_weights(
                weights, features, hidden, 1, False
            )
            return jax_rnn.lstm_ref(
                xs, zeros, zeros, w_ih, w_hh, b_ih, b_hh, lengths, features, hidden, 1, 0.0, False
            )[0]

        return f, weights

    def ours(impl: str):
        def make():
            return (lambda p, x: jm.lstm_scan(p, x, impl=impl)[1]), jm.init_lstm(
                key, features, hidden
            )

        return make

    experimental_name = "jax.experimental.rnn " + ("(cuDNN)" if backend == "gpu" else "(lstm_ref)")
    contenders = [
        jax_contender(LSTM_NAIVE, naive),
        jax_contender(LSTM_FLAX, flax_rnn),
        jax_contender(experimental_name, experimental),
    ]
    contenders += _torch_contenders(
        LSTM_TORCH,
        lambda torch: _torch_lstm_setup(torch, hidden, batch, time, features, train),
        torch_threads,
    )
    contenders.append(jax_contender(LSTM_SCAN, ours("scan")))
    if backend in ("gpu", "tpu"):  # never time the kernel in interpret mode
        contenders.append(jax_contender(LSTM_PALLAS, ours("pallas")))
    return contenders


def _torch_lstm_setup(torch, hidden, batch, time, features, train):
    def setup():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        lstm = torch.nn.LSTM(features, hidden, batch_first=True).to(device)
        xs = torch.randn(batch, time, features, device=device)
        if not train:

            def forward():
                with torch.no_grad():
                    return lstm(xs)[0]

            return forward
        xs.requires_grad_(True)
        wrt = [*lstm.parameters(), xs]

        def step():  # the gradients are returned, not accumulated into .grad
            return torch.autograd.grad(lstm(xs)[0].sum(), wrt)

        return step

    return setup


def lstm_suite(
    shapes: str = "full", *, backend: str | None = None, torch_threads: int | None = None
) -> Suite:
    """Forward and training-step workloads over LSTM_SHAPES[shapes]; baseline Flax, vs PyTorch too."""
    backend = backend or jax.default_backend()
    workloads = []
    for train in (False, True):
        for hidden, batch, steps in LSTM_SHAPES[shapes]:
            workloads.append(
                Workload(
                    name=f"({hidden}, {batch}, {steps})",
                    group="training step (forward + backward)" if train else "forward",
                    flops=lstm_flops(hidden, batch, steps, train=train),
                    contenders=lstm_contenders(
                        hidden,
                        batch,
                        steps,
                        train=train,
                        backend=backend,
                        torch_threads=torch_threads,
                    ),
                    info={
                        "hidden": hidden,
                        "batch": batch,
                        "time": steps,
                        "features": hidden,
                        "train": train,
                        "dtype": "float32",
                    },
                )
            )
    notes = [
        "Workloads are (hidden, batch, time) with input features = hidden, float32, one layer. Forward: hs "
        "[batch, time, hidden]. Training step: gradients of sum(hs) w.r.t. the parameters and the inputs "
        "(PyTorch: torch.autograd.grad; forward under torch.no_grad). FLOPs: 2·T·B·(F+H)·4H forward, 3x for training.",
        f"`{LSTM_NAIVE}`: lax.scan over jaxmodels.lstm_cell, input projection inside the step, autodiff backward. "
        f"`{LSTM_SCAN}`: the fused scan and its hand-written backward, time in chunks (CPU: input "
        "projection per step, weight and input gradients per chunk of up to 800 rows, steps x batch; "
        "GPU/TPU: each one matmul over the sequence).",
    ]
    if backend not in ("gpu", "tpu"):
        notes.append(
            "jax.experimental.rnn.lstm is cuDNN-only; on this backend its pure-JAX reference "
            "(jax.experimental.rnn.lstm_ref, on the same packed weights) runs. The Pallas kernel is "
            "timed on GPU and TPU only, never in interpret mode."
        )
    notes.append(_torch_note(torch_threads))
    return Suite(
        "lstm",
        workloads,
        baseline=LSTM_FLAX,
        compare=(LSTM_TORCH, f"{LSTM_TORCH} (1 thread)"),
        peak_n=PEAK_N[shapes],
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------
# The CNN suite


def _plain_cnn():
    """The seed's Keras network written the plain Flax way (nn.Conv, nn.max_pool, nn.Dense)."""
    import flax.linen as nn

    class PlainCNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.max_pool(
                nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x)), (2, 2), strides=(2, 2)
            )
            x = nn.max_pool(
                nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x)), (2, 2), strides=(2, 2)
            )
            x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
            x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
            return nn.Dense(10)(x)

    return PlainCNN()


def cnn_variants() -> list[tuple[str, dict]]:
    """(contender name, CNN kwargs) for ``jaxmodels.CNN``: one per value of a ``conv_impl``-style
    attribute when the module has one (values from ``layers.CONV_IMPLS`` or a ``Literal``
    annotation), else just ``CNN()``."""
    import jaxmodels as jm
    from jaxmodels import layers

    fields = {f.name: f for f in dataclasses.fields(jm.CNN)}
    option = next((name for name in ("conv_impl", "impl") if name in fields), None)
    if option is None:
        return [("jaxmodels CNN()", {})]
    values = getattr(layers, option.upper() + "S", None)
    if values is None:
        try:
            annotation = typing.get_type_hints(jm.CNN).get(option)
        except Exception:
            annotation = None
        values = (
            typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None
        )
    if not values:
        values = (fields[option].default,)
    return [(f"jaxmodels CNN({option}={value!r})", {option: value}) for value in values]


def cnn_contenders(batch: int, *, train: bool, torch_threads: int | None = None) -> list[Contender]:
    """The seed CNN on [batch, 28, 28, 1] float32 (PyTorch: [batch, 1, 28, 28]).

    Training step: softmax cross-entropy on integer labels, its gradient, an Adam update (optax;
    torch.optim.Adam), the new parameters and optimizer state kept for the next call.
    Inference: the logits (PyTorch under torch.inference_mode, in eval mode).
    """
    import optax

    import jaxmodels as jm

    def flax_contender(name: str, model) -> Contender:
        def setup():
            x = jax.random.normal(jax.random.key(1), (batch, 28, 28, 1), jnp.float32)
            y = jax.random.randint(jax.random.key(2), (batch,), 0, 10, jnp.int32)
            params = model.init(jax.random.key(0), x[:1])["params"]
            if not train:
                apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
                return lambda: apply(params, x)
            tx = optax.adam(1e-3)

            @jax.jit
            def step(params, opt_state, x, y):
                def loss_fn(p):
                    logits = model.apply({"params": p}, x)
                    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

                loss, grads = jax.value_and_grad(loss_fn)(params)
                with jax.numpy_dtype_promotion(
                    "standard"
                ):  # optax mixes Python floats and int32 counts
                    updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, loss

            state = [params, tx.init(params)]

            def run():
                state[0], state[1], loss = step(state[0], state[1], x, y)
                return loss, state[0]

            return run

        return Contender(name, setup)

    contenders = [flax_contender(name, jm.CNN(**kwargs)) for name, kwargs in cnn_variants()]
    contenders += _torch_contenders(
        CNN_TORCH, lambda torch: _torch_cnn_setup(torch, batch, train), torch_threads
    )
    contenders.append(flax_contender(CNN_PLAIN, _plain_cnn()))
    return contenders


def _torch_cnn_setup(torch, batch, train):
    def setup():
        nn = torch.nn
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3 * 3 * 64, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        ).to(device)
        x = torch.randn(batch, 1, 28, 28, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        if not train:
            model.eval()

            def infer():
                with torch.inference_mode():
                    return model(x)

            return infer
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            return loss

        return step

    return setup


def cnn_suite(shapes: str = "full", *, torch_threads: int | None = None) -> Suite:
    """The seed CNN: training steps and inference at CNN_BATCHES[shapes]; baseline plain Flax, vs PyTorch too."""
    import jaxmodels as jm

    train_batches, infer_batches = CNN_BATCHES[shapes]
    workloads = []
    for train, batches in ((True, train_batches), (False, infer_batches)):
        for batch in batches:
            workloads.append(
                Workload(
                    name=f"batch {batch}",
                    group="training step (Adam)" if train else "inference",
                    flops=cnn_flops(jm.CNN(), batch, train=train),
                    contenders=cnn_contenders(batch, train=train, torch_threads=torch_threads),
                    info={
                        "batch": batch,
                        "input": [batch, 28, 28, 1],
                        "train": train,
                        "dtype": "float32",
                    },
                )
            )
    per_sample = cnn_flops(jm.CNN(), 1)
    notes = [
        f"The seed CNN (Conv32-pool-Conv64-pool-Conv64-Dense64-Dense10, VALID, 93,322 parameters) on 28x28x1, "
        f"float32: {per_sample / 1e6:.2f} MFLOP per image forward (convolutions and dense layers), 3x for a training "
        "step. Training step: softmax cross-entropy, gradients, Adam (lr 1e-3) update; the new state feeds the "
        "next call. PyTorch: the same network in NCHW with torch.optim.Adam; inference under torch.inference_mode.",
        f"`{CNN_PLAIN}`: the same architecture written in the benchmark the plain way "
        "(nn.Conv, nn.max_pool, nn.Dense).",
    ]
    notes.append(_torch_note(torch_threads))
    return Suite(
        "cnn",
        workloads,
        baseline=CNN_PLAIN,
        compare=(CNN_TORCH, f"{CNN_TORCH} (1 thread)"),
        peak_n=PEAK_N[shapes],
        notes=notes,
    )


def _torch_note(threads: int | None) -> str:
    threads = threads or cpu_count()
    return (
        f"PyTorch runs with {threads} intra-op thread(s) (torch.set_num_threads; the CPU count unless "
        "--torch-threads says otherwise) and, as `(1 thread)`, with one: on a machine whose other load "
        "exceeds its cores, PyTorch's OpenMP fork-join loses far more than XLA's thread pool, and the "
        "one-thread variant shows PyTorch's speed without that penalty."
    )


# ---------------------------------------------------------------------------------------------
# Entry points


def build_suite(name: str, shapes: str = "full", *, torch_threads: int | None = None) -> Suite:
    """The suite ``name`` ("lstm" or "cnn") over the ``shapes`` set ("small" or "full")."""
    if name not in SUITES:
        raise ValueError(f"expected a suite in {SUITES}, got {name!r}")
    if shapes not in SHAPE_SETS:
        raise ValueError(f"expected shapes in {SHAPE_SETS}, got {shapes!r}")
    if name == "lstm":
        return lstm_suite(shapes, torch_threads=torch_threads)
    return cnn_suite(shapes, torch_threads=torch_threads)


def run(
    suites: Sequence[str],
    *,
    shapes: str = "full",
    repeats: int = 10,
    out: Path | str = "benchmarks/results",
    min_sample_s: float | None = None,
    torch_threads: int | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, dict]:
    """Run the named suites ("lstm", "cnn"), write OUT/NAME[-small].{json,md,png}, return the results.

    ``min_sample_s`` defaults to 50 ms for the full shapes and 0 (one call per sample) for the small;
    ``torch_threads`` (PyTorch's intra-op threads) to the CPU count.
    """
    if repeats < 1:
        raise ValueError(f"expected repeats >= 1, got {repeats}")
    if min_sample_s is None:
        min_sample_s = 0.05 if shapes == "full" else 0.0
    results = {}
    for name in suites:
        suite = build_suite(name, shapes, torch_threads=torch_threads)
        result = run_suite(suite, repeats=repeats, min_sample_s=min_sample_s, log=log)
        stem = name if shapes == "full" else f"{name}-{shapes}"
        paths = write_results(result, out, stem, render_markdown=markdown, render_png=plot)
        if log:
            log(markdown(result))
            log("wrote " + ", ".join(str(p) for p in paths))
        results[name] = result
    return results


def positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(parser) -> None:
    """The options of ``jaxmodels bench`` and of the benchmarks/ scripts (after SUITE)."""
    parser.add_argument(
        "--repeats", type=positive_int, default=10, help="rounds over the contenders (default: 10)"
    )
    parser.add_argument(
        "--shapes",
        default="full",
        choices=SHAPE_SETS,
        help="full: the standard shapes; small: tiny ones, a smoke run (default: full)",
    )
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    parser.add_argument(
        "--torch-threads",
        type=positive_int,
        default=None,
        help="PyTorch's intra-op threads (default: the CPU count)",
    )


def script_main(
    suite: str, argv: Sequence[str] | None = None, default_out: Path | str = "benchmarks/results"
) -> int:
    """``benchmarks/SUITE.py``: parse --repeats/--shapes/--out and run one suite."""
    import argparse

    parser = argparse.ArgumentParser(description=f"The {suite} benchmark suite (jaxmodels.bench).")
    add_arguments(parser)
    args = parser.parse_args(argv)
    run(
        [suite],
        shapes=args.shapes,
        repeats=args.repeats,
        out=args.out or default_out,
        torch_threads=args.torch_threads,
    )
    return 0
