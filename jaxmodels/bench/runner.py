"""Running suites: the peak, every workload, the peak again, the ratios; the files.

``run_suite`` times a suite with an executor: a ``jaxmodels.bench.pool.Pool`` (``--isolation
process``, the default: every framework configuration in its own worker process) or
``timing.InProcess`` (``--isolation shared``: everything in this process, as before the pool, kept
so that the difference can be measured again). Per contender of a workload it adds GFLOP/s from
the workload's analytic FLOP count, the fraction of the matmul peak measured in the same run (a
large float32 ``jnp`` matmul, timed the same way before and after the suite; the faster median
counts), and speed-ups ``t_other / t`` (above 1: faster) against the suite's baseline, its
``compare`` contenders, and the strongest PyTorch configuration of that workload: the PyTorch
contender (any allocator, any thread count) with the lowest median.

``run`` builds the named suites and runs them with one executor (a pool's workers start with the
run, each recording its environment first, and stop after the last suite, also on Ctrl-C), and
writes each suite's ``OUT/SUITE.json`` (everything, every sample
included), ``OUT/SUITE.md`` (tables) and ``OUT/SUITE.png`` (bar charts of the speed-ups), with
``-small`` added to SUITE for the tiny shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxmodels.bench import report
from jaxmodels.bench.cnn import cnn_suite
from jaxmodels.bench.lstm import lstm_suite
from jaxmodels.bench.pool import Pool, Timeouts
from jaxmodels.bench.timing import (
    AS_INSTALLED,
    DTYPES,
    InProcess,
    Suite,
    check_dtypes,
    measure_peak,
    time_workload,
)
from jaxmodels.bench.torch_configs import ALLOCATORS
from jaxmodels.records import load_average, write_results

SUITES = ("lstm", "cnn")
SHAPE_SETS = ("small", "full")
ISOLATIONS = ("process", "shared")


def _check(name: str, shapes: str) -> None:
    if name not in SUITES:
        raise ValueError(f"expected a suite in {SUITES}, got {name!r}")
    if shapes not in SHAPE_SETS:
        raise ValueError(f"expected shapes in {SHAPE_SETS}, got {shapes!r}")


def build_suite(
    name: str,
    shapes: str = "full",
    *,
    torch_threads: int | None = None,
    backend: str | None = None,
    allocators: Sequence[str] = (AS_INSTALLED,),
    dtypes: Sequence[str] = DTYPES,
) -> Suite:
    """The suite ``name`` ("lstm" or "cnn") over the ``shapes`` set ("small" or "full") in each of
    ``dtypes``, PyTorch in every configuration of ``torch_threads`` and ``allocators``;
    ``backend``: where JAX runs (default: this process's)."""
    _check(name, shapes)
    options = dict(torch_threads=torch_threads, allocators=allocators, dtypes=dtypes)
    if name == "lstm":
        return lstm_suite(shapes, backend=backend, **options)
    return cnn_suite(shapes, **options)


def _progress_line(workload, records: list[dict]) -> str:
    parts = []
    for r in records:
        if "median_s" in r:
            parts.append(f"{r['name']} {r['median_s'] * 1e3:.3g} ms")
        else:
            parts.append(f"{r['name']} {'skipped' if 'skipped' in r else 'ERROR'}")
    return f"{workload.group} {workload.name}: " + ", ".join(parts)


def _ratios(workloads: list[dict], peak: float, baseline: str, compare: Sequence[str]) -> None:
    """GFLOP/s, fraction of peak, the strongest PyTorch configuration and the speed-ups, in place."""
    for workload in workloads:
        timed = [r for r in workload["contenders"] if "median_s" in r]
        times = {r["name"]: r["median_s"] for r in timed}
        torch = [r for r in timed if r["framework"] == "torch"]
        strongest = min(torch, key=lambda r: r["median_s"]) if torch else None
        workload["strongest_torch"] = strongest["name"] if strongest else None
        others = [baseline, *compare] + ([strongest["name"]] if strongest else [])
        for record in timed:
            record["gflops"] = workload["flops"] / record["median_s"] / 1e9
            record["frac_peak"] = record["gflops"] / peak
            record["speedup"] = {
                other: times[other] / record["median_s"] if other in times else None
                for other in dict.fromkeys(others)
            }


def run_suite(
    suite: Suite,
    *,
    repeats: int = 10,
    warmup: int = 2,
    min_sample_s: float = 0.05,
    budget_s: float | None = None,
    executor: Any = None,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Measure the peak, every workload, the peak again, with ``executor`` (a started Pool, or
    None: ``timing.InProcess``); return the JSON-ready result. ``budget_s``: the seconds of
    samples a contender may take per workload (``timing.time_workload``)."""
    log = log or (lambda _: None)
    executor = executor if executor is not None else InProcess()
    loads = [load_average()]
    log(
        f"{suite.name}: {len(suite.workloads)} workloads, {repeats} repeats, isolation "
        f"{executor.isolation}, backend {executor.backend}, load average {loads[0]}"
    )
    timing = dict(repeats=repeats, min_sample_s=min_sample_s, executor=executor)
    peaks = [measure_peak(suite.peak_n, **timing)]
    log(f"  peak: {peaks[0]['gflops']:.1f} GFLOP/s ({peaks[0]['name']})")
    workloads = []
    for workload in suite.workloads:
        records = time_workload(workload, warmup=warmup, budget_s=budget_s, **timing)
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
    peaks.append(measure_peak(suite.peak_n, **timing))
    log(f"  peak again: {peaks[1]['gflops']:.1f} GFLOP/s")
    peak = max(p["gflops"] for p in peaks)
    _ratios(workloads, peak, suite.baseline, suite.compare)
    environment, processes = executor.processes()
    return {
        "suite": suite.name,
        "baseline": suite.baseline,
        "compare": list(suite.compare),
        "isolation": executor.isolation,
        "repeats": repeats,
        "warmup": warmup,
        "min_sample_s": min_sample_s,
        "budget_s": budget_s,
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
        "environment": environment,
        "processes": processes,
        "workloads": workloads,
    }


def run(
    suites: Sequence[str],
    *,
    shapes: str = "full",
    repeats: int = 10,
    out: Path | str = "benchmarks/results",
    min_sample_s: float | None = None,
    budget_s: float | None = 60.0,
    torch_threads: int | None = None,
    isolation: str = "process",
    dtypes: Sequence[str] = DTYPES,
    timeouts: Timeouts | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, dict]:
    """Run the named suites ("lstm", "cnn"), write OUT/NAME[-small].{json,md,png}, return the results.

    ``min_sample_s`` defaults to 50 ms for the full shapes and 0 (one call per sample) for the small;
    ``budget_s``: the seconds of samples one contender may take per workload, a slower one is
    sampled in fewer rounds (``timing.rounds_sampled``; None: every round);
    ``torch_threads`` (PyTorch's intra-op threads) to the CPU count. ``isolation`` "process": each
    framework configuration in its own worker process (PyTorch with every allocator of
    ``torch_configs.ALLOCATORS``); "shared": all in this process (PyTorch as installed only).
    ``dtypes``: the compute dtypes timed (``timing.DTYPES``: float32, bfloat16).
    """
    if repeats < 1:
        raise ValueError(f"expected repeats >= 1, got {repeats}")
    if budget_s is not None and not budget_s > 0:
        raise ValueError(f"expected a budget of seconds > 0 (or None), got {budget_s}")
    if isolation not in ISOLATIONS:
        raise ValueError(f"expected isolation in {ISOLATIONS}, got {isolation!r}")
    check_dtypes(dtypes)
    for name in suites:
        _check(name, shapes)  # before any process starts
    if min_sample_s is None:
        min_sample_s = 0.05 if shapes == "full" else 0.0
    if isolation == "process":
        executor = Pool(torch_threads=torch_threads, timeouts=timeouts)
        allocators = tuple(ALLOCATORS)
    else:
        executor, allocators = InProcess(), (AS_INSTALLED,)
    results = {}
    with (
        executor
    ):  # a pool's workers serve every suite of the run; stopped at the end, or on Ctrl-C
        for name in suites:
            suite = build_suite(
                name,
                shapes,
                torch_threads=torch_threads,
                backend=executor.backend,
                allocators=allocators,
                dtypes=dtypes,
            )
            result = run_suite(
                suite,
                repeats=repeats,
                min_sample_s=min_sample_s,
                budget_s=budget_s,
                executor=executor,
                log=log,
            )
            stem = name if shapes == "full" else f"{name}-{shapes}"
            paths = write_results(
                result, out, stem, render_markdown=report.markdown, render_png=report.plot
            )
            if log:
                log(report.markdown(result))
                log("wrote " + ", ".join(str(p) for p in paths))
            results[name] = result
    return results
