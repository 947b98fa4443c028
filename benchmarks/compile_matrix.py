"""What compiles where: lstm_scan compiled (not just lowered) for H100, A100, TPU v5e and v6e.

    python benchmarks/compile_matrix.py [--out benchmarks/results] [--targets h100,v5e]

For every target, shape of ``jaxmodels.targets.COMPILE_GRID``, dtype, pass (forward, gradient) and
impl ("auto", "pallas"): the path taken (the persistent kernel, the stepwise kernel or the scan),
whether it compiled, the compile time, the compiler's memory figures (``memory_analysis()``) and
its cost figures where it gives them (``cost_analysis()``: TPU only), and a roofline estimate of
the time at the target's peak FLOP/s and memory bandwidth. The estimate is a lower bound that
ignores the recurrence's serial dependence (time steps run one after another), so it says how
much arithmetic and traffic there is, not how fast it runs. Needs the compilers (see
``jaxmodels.targets``); writes compile_matrix.json and .md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp

import jaxmodels
from jaxmodels import bench, records, targets
from jaxmodels.kernels import lstm_sequence

DTYPES = ("float32", "bfloat16")
PASSES = ("forward", "gradient")
IMPLS = ("auto", "pallas")


def path_taken(target: str, hidden: int, dtype: str, impl: str) -> str:
    """The path lstm_scan takes for this target and shape (the dispatch follows the persistent
    kernel's plan for the target's device; tests/test_compile.py checks that it does)."""
    backend = "triton" if targets.TARGETS[target].platform == "cuda" else "mosaic"
    with targets.on_device(target):
        fits = lstm_sequence.plan(hidden, jnp.dtype(dtype), backend) is not None
    if fits:
        return "persistent kernel"
    return "stepwise kernel" if impl == "pallas" else "scan"


def traffic_bytes(hidden: int, batch: int, time_: int, itemsize: int, gradient: bool) -> float:
    """Least memory traffic of one layer (features = hidden): weights, xs and hs once each; with
    the gradient also the residuals (4 gates and c per step, float32) written and read back, and
    the gradients of weights and xs written."""
    weights = 8 * hidden * hidden * itemsize
    sequence = batch * time_ * hidden * itemsize
    traffic = weights + 2 * sequence
    if gradient:
        traffic += 2 * 5 * batch * time_ * hidden * 4 + weights + sequence
    return float(traffic)


def compile_case(
    target: str, hidden: int, batch: int, time_: int, dtype: str, gradient: bool, impl: str
) -> dict:
    params = jax.eval_shape(lambda: jaxmodels.init_lstm(jax.random.key(0), hidden, hidden))
    params = jax.tree.map(lambda a: targets.abstract(a.shape, jnp.dtype(dtype), target), params)
    xs = targets.abstract((batch, time_, hidden), jnp.dtype(dtype), target)
    forward = lambda p, x: jaxmodels.lstm_scan(p, x, impl=impl)[1]
    fn = (
        jax.grad(lambda p, x: jnp.sum(forward(p, x).astype(jnp.float32)), argnums=(0, 1))
        if gradient
        else forward
    )
    spec = targets.TARGETS[target]
    flops = bench.lstm_flops(hidden, batch, time_, train=gradient)
    traffic = traffic_bytes(hidden, batch, time_, jnp.dtype(dtype).itemsize, gradient)
    record = {
        "target": target,
        "hidden": hidden,
        "batch": batch,
        "time": time_,
        "dtype": dtype,
        "pass": "gradient" if gradient else "forward",
        "impl": impl,
        "path": path_taken(target, hidden, dtype, impl),
        "flops": flops,
        "traffic_bytes": traffic,
        "roofline_estimate_ms": 1e3 * max(flops / spec.peak_flops[dtype], traffic / spec.bandwidth),
    }
    start = time.perf_counter()
    try:
        compiled = targets.compile(fn, params, xs, target=target)
    except Exception as e:
        record.update(
            compiled=False,
            error=str(e).splitlines()[0][:300],
            compile_s=time.perf_counter() - start,
        )
        return record
    record.update(compiled=True, compile_s=time.perf_counter() - start)
    memory = compiled.memory_analysis()
    if memory is not None:
        record["memory"] = {
            key: getattr(memory, f"{key}_size_in_bytes")
            for key in ("argument", "output", "temp", "generated_code")
        }
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    if cost:
        record["compiler_cost"] = {
            key: cost[key] for key in ("flops", "bytes accessed", "optimal_seconds") if key in cost
        }
    return record


def run(target_names: list[str]) -> dict:
    rows, skipped = [], {}
    for target in target_names:
        try:
            targets.device(target)
        except RuntimeError as e:
            skipped[target] = str(e)
            continue
        for hidden, batch, time_ in targets.COMPILE_GRID:
            for dtype in DTYPES:
                for gradient in (False, True):
                    for impl in IMPLS:
                        row = compile_case(target, hidden, batch, time_, dtype, gradient, impl)
                        rows.append(row)
                        status = "ok" if row["compiled"] else "FAILED " + row["error"]
                        print(
                            f"{target} {hidden}x{batch}x{time_} {dtype} {row['pass']} {impl}: "
                            f"{row['path']}, {row['compile_s']:.1f} s, {status}",
                            file=sys.stderr,
                            flush=True,
                        )
    return {
        "environment": records.environment(),
        "targets": {
            name: vars(targets.TARGETS[name]) for name in target_names if name not in skipped
        },
        "skipped": skipped,
        "rows": rows,
    }


def _mib(n) -> str:
    return f"{n / 2**20:.1f}"


def markdown(result: dict) -> str:
    rows = result["rows"]
    env = result["environment"]
    lines = [
        "# Compile matrix: lstm_scan for real accelerators",
        "",
        f"jax {env['versions']['jax']}, jaxlib {env['versions']['jaxlib']}, commit {env['git_commit']}; "
        "regenerate with `python benchmarks/compile_matrix.py`.",
        "",
        "## Totals",
        "",
        "| target | compiled | failed | persistent | stepwise | scan | compile time (s, sum) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for target in result["targets"]:
        mine = [r for r in rows if r["target"] == target]
        paths = [r["path"] for r in mine]
        lines.append(
            f"| {target} | {sum(r['compiled'] for r in mine)} | {sum(not r['compiled'] for r in mine)} "
            f"| {paths.count('persistent kernel')} | {paths.count('stepwise kernel')} | {paths.count('scan')} "
            f"| {sum(r['compile_s'] for r in mine):.0f} |"
        )
    for target, reason in result["skipped"].items():
        lines.append(f"| {target} | skipped: {reason} | | | | | |")
    lines += [
        "",
        "## Every case",
        "",
        "Memory: the compiler's figures (MiB; temp is the scratch the program allocates on the device). "
        "Roofline: an **estimate**, max(FLOPs / peak, traffic / bandwidth) at the data-sheet peak, a lower "
        "bound that ignores the serial time steps. Compiler FLOPs: XLA:TPU's own count where it gives one "
        "(the CUDA compiler gives none).",
        "",
        "| target | hidden | batch | time | dtype | pass | impl | path | compiled | compile s | "
        "args MiB | temp MiB | roofline ms (estimate) | compiler GFLOP |",
        "| --- | ---: | ---: | ---: | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        memory = r.get("memory")
        cost = r.get("compiler_cost", {})
        args_mib, temp_mib = (
            (_mib(memory["argument"]), _mib(memory["temp"])) if memory else ("", "")
        )
        gflop = f"{cost['flops'] / 1e9:.2f}" if "flops" in cost else ""
        status = "yes" if r["compiled"] else "NO: " + r["error"]
        lines.append(
            f"| {r['target']} | {r['hidden']} | {r['batch']} | {r['time']} | {r['dtype']} | {r['pass']} | "
            f"{r['impl']} | {r['path']} | {status} | {r['compile_s']:.1f} | {args_mib} | {temp_mib} | "
            f"{r['roofline_estimate_ms']:.3g} | {gflop} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results"), help="output folder"
    )
    parser.add_argument(
        "--targets", default=",".join(targets.TARGETS), help="comma-separated targets"
    )
    args = parser.parse_args(argv)
    names = [t for t in args.targets.split(",") if t]
    unknown = sorted(set(names) - set(targets.TARGETS))
    if unknown:
        parser.error(f"expected targets from {sorted(targets.TARGETS)}, got {unknown}")
    result = run(names)
    for path in records.write_results(
        result, args.out, "compile_matrix", render_markdown=markdown, render_png=None
    ):
        print(path)
    failed = [r for r in result["rows"] if not r["compiled"]]
    return 1 if failed or not result["rows"] else 0


if __name__ == "__main__":
    sys.exit(main())
