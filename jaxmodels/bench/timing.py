"""Timing one workload: what is timed (Contender, Workload, Suite), how a contender is set up and
sampled, and the interleaved rounds over its contenders (``time_workload``).

How a workload is timed:

1. every contender is set up (parameters, inputs, jitted functions) and called once: that first
   call, compilation included, is reported apart as ``compile_s``;
2. ``warmup`` more calls, untimed, pick ``number``: how many calls one sample holds so that a
   sample lasts at least ``min_sample_s`` (the clock's resolution then does not matter);
3. ``repeats`` rounds, every contender sampled once per round in a new random order (seeded: a
   run's orders are reproducible), except that a contender whose ``repeats`` samples would last
   more than ``budget_s`` is sampled in fewer rounds (as many as fit in the budget, at least
   MIN_ROUNDS), spread evenly over the run (``rounds_sampled``); each call is waited on
   (``jax.block_until_ready``; PyTorch on CPU returns when done, on CUDA
   ``torch.cuda.synchronize``), so that load on a shared machine falls
   on every contender alike and the ratios stay meaningful; the shuffling varies who runs right
   after whom, so that an after-effect of one contender (PyTorch's thread pool) does not always
   fall on the same one; Python's garbage collector is off while a sample runs;
4. per contender: the median and min-max of the per-call times (the suite adds GFLOP/s, the
   fraction of the matmul peak and the speed-ups, ``jaxmodels.bench.runner``).

Where a contender runs is the executor's business: ``InProcess`` runs it in this process (the
``--isolation shared`` mode, and scripts such as benchmarks/lstm_floor.py); the worker pool of
``jaxmodels.bench.pool`` runs each in the long-lived process of its framework configuration, which
calls ``prepare`` and ``sample`` below for it. The rounds are the same either way.

This module imports neither jax nor torch at import time, nor anything of jaxmodels: a PyTorch
worker process loads it by path and never imports jax.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib.util
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

PEAK_N = {"full": 2048, "small": 256}  # the peak matmul: [n, n] x [n, n] float32
AS_INSTALLED = "as installed"  # the C allocator of a process nothing was preloaded into
DTYPES = ("float32", "bfloat16")  # the compute dtypes a suite's workloads run in
MIN_ROUNDS = 3  # the fewest rounds a slow contender is sampled in (time_workload's budget_s)


def check_dtypes(dtypes: Sequence[str]) -> Sequence[str]:
    """``dtypes``, when it is a non-empty selection of DTYPES; else a ValueError naming them."""
    if not dtypes or any(d not in DTYPES for d in dtypes):
        raise ValueError(f"expected dtypes among {DTYPES}, got {list(dtypes)}")
    return dtypes


@dataclasses.dataclass
class Contender:
    """One implementation of a workload.

    ``setup()`` builds parameters, inputs and compiled functions and returns ``step``, a function of
    no arguments that runs the workload once and returns something to wait on. ``framework`` says
    how to wait and which process runs it: "jax" or "torch". ``threads``: PyTorch's intra-op
    threads (None: leave as is); ``allocator``: the C allocator of the process that runs it
    ("as installed", "jemalloc", "tcmalloc": see ``jaxmodels.bench.torch_configs``); ``variant``:
    how a PyTorch contender computes, where a workload times it more than one way (e.g. "bfloat16",
    the module cast, and "autocast bfloat16"), "" otherwise.

    To run in a worker process, ``setup`` must be a module-level function or a ``functools.partial``
    of one with picklable arguments (the worker imports it by name); in this process, anything.
    """

    name: str
    setup: Callable[[], Callable[[], Any]]
    framework: str = "jax"
    threads: int | None = None
    allocator: str = AS_INSTALLED
    variant: str = ""


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
    """Workloads with the name of the baseline contender and of others to give ratios against
    (besides the strongest PyTorch configuration, which every workload gets)."""

    name: str
    workloads: list[Workload]
    baseline: str
    compare: tuple[str, ...] = ()
    peak_n: int = 2048
    notes: list[str] = dataclasses.field(default_factory=list)


class Skipped(Exception):
    """A contender that cannot run here (torch not installed, an allocator library missing): its
    record says why, and it is no error."""


class Failed(Exception):
    """A contender's failure already put in words (by its worker process): recorded as it is."""


def describe_error(err: BaseException) -> str:
    """A failure as a record's ``error``: a worker's own words, else "Type: message"."""
    return str(err) if isinstance(err, Failed) else f"{type(err).__name__}: {err}"


def waiter(framework: str) -> Callable[[Any], Any]:
    """How to wait for a step's result: ``jax.block_until_ready``; for PyTorch nothing on CPU (its
    calls return when done), ``torch.cuda.synchronize`` where CUDA is available."""
    if framework == "torch":
        import torch

        if torch.cuda.is_available():
            return lambda _: torch.cuda.synchronize()
        return lambda _: None
    import jax

    return jax.block_until_ready


def use_threads(contender: Contender) -> None:
    """Set PyTorch's intra-op threads to the contender's, where it names a count."""
    if contender.framework == "torch" and contender.threads:
        import torch

        if torch.get_num_threads() != contender.threads:
            torch.set_num_threads(contender.threads)


@dataclasses.dataclass
class Prepared:
    """A set-up contender: its step, how to wait on it, and how many calls make one sample."""

    step: Callable[[], Any]
    wait: Callable[[Any], Any]
    number: int


def prepare(
    contender: Contender,
    *,
    warmup: int,
    min_sample_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict, Prepared]:
    """Steps 1 and 2 of the method: set up, time the first call, run ``warmup`` more and choose
    ``number``. Returns the record's fields (compile_s, number, warm_s: the fastest warm call) and
    the prepared contender. Raises what the setup or a call raises."""
    use_threads(contender)
    step = contender.setup()
    wait = waiter(contender.framework)
    start = clock()
    wait(step())
    compile_s = clock() - start
    times = []
    for _ in range(warmup):
        start = clock()
        wait(step())
        times.append(clock() - start)
    per_call = min(times) if times else compile_s
    number = max(1, math.ceil(min_sample_s / max(per_call, 1e-9)))
    fields = {"compile_s": compile_s, "number": number, "warm_s": per_call}
    return fields, Prepared(step, wait, number)


def sample(prepared: Prepared, clock: Callable[[], float] = time.perf_counter) -> float:
    """One sample: ``number`` calls back to back, each waited on, the garbage collector off; the
    seconds per call."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = clock()
        for _ in range(prepared.number):
            prepared.wait(prepared.step())
        return (clock() - start) / prepared.number
    finally:
        if enabled:
            gc.enable()


class InProcess:
    """Runs every contender in this process (``--isolation shared``): setups in turn, samples on
    request; a PyTorch contender's thread count is set before its setup and its samples, outside
    the timed calls. Every contender runs with the allocator this process has."""

    isolation = "shared"

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.prepared: dict[Any, tuple[Contender, Prepared]] = {}

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def backend(self) -> str:
        import jax

        return jax.default_backend()

    def where(self, contender: Contender) -> dict:
        return {
            "process": "this process",
            "pid": os.getpid(),
            "allocator": AS_INSTALLED,
            "threads": contender.threads,
        }

    def setup(self, key: Any, contender: Contender, *, warmup: int, min_sample_s: float) -> dict:
        if contender.allocator != AS_INSTALLED:
            raise Skipped(
                f"the {contender.allocator} allocator needs its own process (--isolation process)"
            )
        if contender.framework == "torch" and importlib.util.find_spec("torch") is None:
            raise Skipped("torch cannot be imported here (it is not installed)")
        fields, prepared = prepare(
            contender, warmup=warmup, min_sample_s=min_sample_s, clock=self.clock
        )
        self.prepared[key] = (contender, prepared)
        return fields

    def sample(self, key: Any) -> float:
        contender, prepared = self.prepared[key]
        use_threads(contender)
        return sample(prepared, self.clock)

    def release(self) -> None:
        self.prepared.clear()
        gc.collect()

    def processes(self) -> tuple[dict, list[dict]]:
        """This process's environment (``jaxmodels.records.environment``) and its one entry in the
        result's list of processes."""
        from jaxmodels.records import environment

        return environment(), [
            {
                "name": "this process",
                "framework": "jax and torch",
                "allocator": AS_INSTALLED,
                "threads": None,
                "status": "ran",
                "pids": [os.getpid()],
            }
        ]


def rounds_sampled(sample_s: float, repeats: int, budget_s: float | None) -> list[int]:
    """The rounds (0 ... repeats - 1) a contender whose sample lasts ``sample_s`` seconds is
    sampled in: all of them when ``repeats`` samples fit in ``budget_s`` (or it is None), else
    ``k = max(MIN_ROUNDS, floor(budget_s / sample_s))`` of them (at most ``repeats``), evenly
    spread: round ``floor(i * repeats / k)`` for i < k, so that a slow contender still meets the
    machine's load of the whole run rather than of its start."""
    if budget_s is None or repeats * sample_s <= budget_s:
        return list(range(repeats))
    k = min(repeats, max(MIN_ROUNDS, math.floor(budget_s / max(sample_s, 1e-9))))
    return [i * repeats // k for i in range(k)]


def time_workload(
    workload: Workload,
    *,
    repeats: int,
    warmup: int = 2,
    min_sample_s: float = 0.05,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
    executor: Any = None,
    seed: int = 0,
) -> list[dict]:
    """Time every contender of ``workload`` interleaved (see the module docstring), in this process
    or, with ``executor`` (a ``jaxmodels.bench.pool.Pool``), in the worker processes.
    ``budget_s``: the seconds of samples one contender may take (None: no limit); one whose
    ``repeats`` samples, judged by its fastest warm call, would take longer is sampled in the
    rounds of ``rounds_sampled``.

    Returns one record per contender: name, framework, where it ran (process, pid, allocator,
    threads), compile_s (the first call), number (calls per sample), warm_s, samples_s (per-call
    seconds, one per round it was sampled in), median_s, min_s, max_s; ``rounds`` (the rounds it
    was sampled in) where they are fewer than ``repeats``; ``error`` (a message, with no times) for
    a contender whose setup or step failed, ``skipped`` (the reason) for one that cannot run here.
    """
    executor = executor if executor is not None else InProcess(clock)
    records, active = [], []
    try:
        for key, contender in enumerate(workload.contenders):
            record: dict[str, Any] = {"name": contender.name, "framework": contender.framework}
            if contender.variant:
                record["variant"] = contender.variant
            record.update(executor.where(contender))
            records.append(record)
            try:
                record.update(
                    executor.setup(key, contender, warmup=warmup, min_sample_s=min_sample_s)
                )
                record["samples_s"] = []
                rounds = rounds_sampled(record["warm_s"] * record["number"], repeats, budget_s)
                if len(rounds) < repeats:
                    record["rounds"] = rounds
                active.append((key, record, set(rounds)))
            except Skipped as why:
                record["skipped"] = str(why)
            except Exception as err:  # a broken contender is reported, the others still run
                record["error"] = describe_error(err)
        gc.collect()
        rng = random.Random(seed)
        for r in range(repeats):
            for key, record, rounds in rng.sample(active, len(active)):
                if "error" in record or r not in rounds:
                    continue
                try:
                    record["samples_s"].append(executor.sample(key))
                except Exception as err:
                    record["error"] = describe_error(err)
    finally:
        executor.release()
    for record in records:
        samples = record.get("samples_s")
        if "error" in record:
            record.pop("samples_s", None)
        elif samples:
            record.update(
                median_s=statistics.median(samples), min_s=min(samples), max_s=max(samples)
            )
    return records


def peak_setup(n: int) -> Callable[[], Any]:
    """The peak's step: a jitted float32 [n, n] x [n, n] ``jnp`` matmul (2·n³ FLOPs)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    return lambda: matmul(a, b)


def measure_peak(n: int, *, repeats: int, min_sample_s: float = 0.05, executor: Any = None) -> dict:
    """GFLOP/s of a jitted float32 [n, n] x [n, n] ``jnp`` matmul, timed like a workload (in the
    JAX worker process when ``executor`` is a pool)."""
    contender = Contender(f"jnp.matmul float32 {n}x{n}", functools.partial(peak_setup, n))
    workload = Workload(f"matmul {n}^3", "peak", 2.0 * n**3, [contender])
    (record,) = time_workload(
        workload, repeats=repeats, min_sample_s=min_sample_s, executor=executor
    )
    if "median_s" not in record:
        raise RuntimeError(f"the peak matmul failed: {record.get('error', 'no samples')}")
    record["n"] = n
    record["gflops"] = workload.flops / record["median_s"] / 1e9
    return record
