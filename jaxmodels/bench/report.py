"""Reports of a suite's result: markdown tables and a PNG of the speed-ups.

The markdown gives the run's conditions (versions, peak, load, the processes and their allocators),
then per workload group a table of every contender (median, min-max, compile time, GFLOP/s, % of
peak, ratios to the baseline and to the strongest PyTorch configuration) and a table of every
PyTorch configuration's median, so that both PyTorch as installed and with a tuned allocator are
visible; contenders that could not run here are listed once, with the reason.
"""

from __future__ import annotations

import math
from pathlib import Path

from jaxmodels.bench.timing import MIN_ROUNDS
from jaxmodels.bench.torch_configs import label
from jaxmodels.files import save_figure


def fmt_ms(seconds: float) -> str:
    """Seconds as milliseconds, 3 significant digits (whole ones from 100 ms)."""
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _groups(result: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for workload in result["workloads"]:
        groups.setdefault(workload["group"], []).append(workload)
    return groups


def _process_status(info: dict) -> str:
    status, reason = info["status"], info.get("reason")
    pids = ", ".join(map(str, info.get("pids", [])))
    if status in ("ran", "running"):
        text = f"ran (pid {pids})"
        if info.get("deaths"):
            text += f"; died {len(info['deaths'])}x, last: {info['deaths'][-1]}"
        return text
    if status in ("skipped", "unavailable"):
        return f"skipped: {reason}"
    return f"{status}: {reason}"


def _processes(result: dict) -> list[str]:
    lines = [
        "",
        "## Processes",
        "",
        "Each contender runs in the worker process of its framework configuration: one for JAX, "
        "one per PyTorch allocator and thread count; each process's environment is in the JSON file."
        if result.get("isolation") == "process"
        else "Isolation `shared`: every contender in this one process, PyTorch as installed.",
        "",
        "| process | allocator | preloaded | torch threads | status |",
        "| --- | --- | --- | ---: | --- |",
    ]
    for info in result.get("processes", []):
        hello = info.get("hello") or {}
        library = info.get("library") or ""
        if library:
            library = f"`{library}`" + (" (mapped)" if hello.get("preloaded") else "")
        threads = hello.get("threads", info.get("threads"))
        if info["name"] == "this process":
            threads = result["environment"].get("torch_threads")
        lines.append(
            f"| {info['name']} | {info['allocator']} | {library} | {threads or ''} | "
            f"{_process_status(info)} |"
        )
    return lines


def _torch_table(workloads: list[dict]) -> list[str]:
    """Every PyTorch configuration's median per workload, the strongest in bold and named; a
    column per variant (``Contender.variant``), allocator and thread count."""
    columns = list(
        dict.fromkeys(
            (r.get("variant", ""), r["allocator"], r["threads"])
            for w in workloads
            for r in w["contenders"]
            if r["framework"] == "torch" and "skipped" not in r
        )
    )
    if not columns:
        return []
    lines = [
        "",
        "PyTorch configurations, median ms (the strongest in bold):",
        "",
        "| workload | "
        + " | ".join(f"{v}, " * bool(v) + label(a, t or 0) for v, a, t in columns)
        + " | strongest |",
        "|---|" + "---:|" * len(columns) + "---|",
    ]
    for workload in workloads:
        cells = []
        for column in columns:
            r = next(
                (
                    r
                    for r in workload["contenders"]
                    if r["framework"] == "torch"
                    and (r.get("variant", ""), r["allocator"], r["threads"]) == column
                ),
                None,
            )
            if r is None or "skipped" in r:
                cells.append("")
            elif "median_s" not in r:
                cells.append("error")
            elif r["name"] == workload.get("strongest_torch"):
                cells.append(f"**{fmt_ms(r['median_s'])}**")
            else:
                cells.append(fmt_ms(r["median_s"]))
        strongest = workload.get("strongest_torch") or ""
        lines.append(f"| {workload['name']} | " + " | ".join(cells) + f" | {strongest} |")
    return lines


def _skipped(result: dict) -> list[str]:
    reasons: dict[str, dict[str, None]] = {}
    for workload in result["workloads"]:
        for r in workload["contenders"]:
            if "skipped" in r:
                reasons.setdefault(r["skipped"], {})[r["name"]] = None
    if not reasons:
        return []
    lines = ["", "Not run here:", ""]
    lines += [
        f"- {', '.join(f'`{n}`' for n in names)}: {reason}" for reason, names in reasons.items()
    ]
    return lines


def machine(env: dict) -> str:
    """Where a result was measured (a ``records.environment()``): date, backend and devices, CPUs
    (their model and vector features where recorded)."""
    cpu = env["processor"]
    if env.get("cpu_model"):
        cpu = f"{env['cpu_model']}, {cpu}, {' '.join(env['cpu_features']) or 'no AVX2'}"
    return (
        f"{env['date']}; backend {env['backend']} ({', '.join(sorted(set(env['devices'])))}), "
        f"{env['cpu_count']} CPUs ({cpu})"
    )


def software(env: dict) -> str:
    """What was measured (a ``records.environment()``): versions, XLA_FLAGS, the git commit and the
    files it had changed."""
    v = env["versions"]
    dirty = env["git_dirty_files"]
    return (
        f"jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, optax {v['optax']}, torch {v['torch']}, "
        f"numpy {v['numpy']}, python {v['python']}; XLA_FLAGS={env['xla_flags'] or '(unset)'}; "
        f"git {(env['git_commit'] or 'unknown')[:10]}"
        + (f" with local changes in {', '.join(f.split()[-1] for f in dirty)}" if dirty else "")
    )


def markdown(result: dict) -> str:
    """Tables, one per workload group, with the run's conditions above them."""
    env = result["environment"]
    load = result["loadavg"]
    peak = result["peak"]
    isolation = result.get("isolation", "shared")
    lines = [
        f"# Benchmark: {result['suite']}",
        "",
        f"{machine(env)}; isolation `{isolation}` (the processes are listed below).",
        software(env),
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
        "compile = the first call. `x B` = B's median / this median (above 1: faster than B); "
        "`x strongest PyTorch`: against the PyTorch configuration (allocator, threads) with the "
        "lowest median in that workload, named in the PyTorch table.",
    ]
    if result.get("budget_s") is not None:
        lines[-1] += (
            f" A contender whose {result['repeats']} samples would last more than "
            f"{result['budget_s']:g} s is sampled in fewer rounds (at least {MIN_ROUNDS}), spread "
            "over the run; its min-max cell says how many."
        )
    lines += [f"{note}" for note in result["notes"]]
    lines += _processes(result)
    others = [result["baseline"], *result["compare"]]
    for group, workloads in _groups(result).items():
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
        with_strongest = any(w.get("strongest_torch") for w in workloads)
        header += [f"x {o}" for o in others] + ["x strongest PyTorch"] * with_strongest
        lines += [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
        ]
        for workload in workloads:
            strongest = workload.get("strongest_torch")
            for r in workload["contenders"]:
                if "skipped" in r:
                    continue
                if "median_s" not in r:
                    row = [workload["name"], r["name"], f"error: {r.get('error', 'no samples')}"]
                    row += [""] * (len(header) - 3)
                else:
                    row = [
                        workload["name"],
                        r["name"],
                        fmt_ms(r["median_s"]),
                        f"{fmt_ms(r['min_s'])}-{fmt_ms(r['max_s'])}"
                        + (f" ({len(r['rounds'])} rounds)" if "rounds" in r else ""),
                        f"{r['compile_s']:.2f}",
                        f"{r['gflops']:.1f}",
                        f"{100 * r['frac_peak']:.1f}",
                    ]
                    row += [
                        "" if r["speedup"].get(o) is None else f"{r['speedup'][o]:.2f}"
                        for o in [*others, strongest]
                        if o != strongest or with_strongest
                    ]
                lines.append("| " + " | ".join(row) + " |")
        lines += _torch_table(workloads)
    lines += _skipped(result)
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Bar charts of the speed-up over the baseline (bars from 1, log scale), one panel per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = _groups(result)
    names = list(
        dict.fromkeys(
            r["name"] for w in result["workloads"] for r in w["contenders"] if "median_s" in r
        )
    )
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colors = {name: cmap(i % cmap.N) for i, name in enumerate(names)}
    most = max(len(w) for w in groups.values())
    fig, axes = plt.subplots(
        len(groups), 1, figsize=(max(8.0, 1.5 * most + 3), 3.4 * len(groups) + 1.0), squeeze=False
    )
    baseline = result["baseline"]
    width = 0.8 / max(1, len(names))
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
        f"torch {env['versions']['torch']}, peak {result['peak']['gflops']:.0f} GFLOP/s, "
        f"isolation {result.get('isolation', 'shared')}",
        fontsize=7,
    )
    rows = math.ceil(len(names) / 3)
    fig.tight_layout(rect=(0, 0.035, 1, 1 - 0.035 * rows * 4 / (3.4 * len(groups) + 1.0)))
    try:
        save_figure(fig, path, dpi=110)  # whole or not at all
    finally:
        plt.close(fig)
