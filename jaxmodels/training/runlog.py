"""What a training run writes as it goes: metrics.jsonl rows, config.json, test_metrics.json,
learning_curves.png (their names and formats: ``jaxmodels.training.rundir``), and the progress bar
on the terminal.

``MetricsWindow`` gathers the step metrics between two rows (examples per second, the first
step's compile time apart) and stops the run on a non-finite loss; ``RunWriter`` appends the rows
(on disk before they are shown) and, on a resumed run, keeps the rows up to the resumed step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from jaxmodels.files import save_figure
from jaxmodels.training import rundir


class MetricsWindow:
    """Step metrics since the last "train" row, and the examples/s over them. The run's first step
    (which compiles) is timed apart, as first_step_s, and left out of the throughput."""

    def __init__(self):
        self.metrics, self.examples, self.start, self.first_step_s = (
            [],
            0,
            time.perf_counter(),
            None,
        )

    def __len__(self) -> int:
        return len(self.metrics)

    def add(self, metrics: dict, examples: int, *, first: bool = False) -> None:
        self.metrics.append(metrics)
        if first:
            jax.block_until_ready(metrics)
            now = time.perf_counter()
            self.first_step_s, self.start = now - self.start, now
        else:
            self.examples += examples

    def check_finite(self, fetch: Callable, step: int) -> None:
        """Raise FloatingPointError naming the step if a loss since the last row is not finite."""
        if self.metrics:
            summarise(fetch(self.metrics), step - len(self.metrics) + 1)

    def row(self, fetch: Callable, epoch: int, step: int, t0: float) -> dict:
        """The "train" row of this window (``t0``: the run's start); empties the window."""
        means = summarise(
            fetch(self.metrics), step - len(self.metrics) + 1
        )  # fetch waits for the steps
        now = time.perf_counter()
        row = {"kind": "train", "epoch": epoch, "step": step, **means, "time_s": now - t0}
        if self.examples:
            row["examples_per_sec"] = self.examples / (now - self.start)
        if self.first_step_s is not None:
            row["first_step_s"] = self.first_step_s  # includes compilation
        self.metrics, self.examples, self.start, self.first_step_s = [], 0, now, None
        return row


def summarise(window: list[dict], first_step: int) -> dict:
    """Means of host metrics over a window of steps; a non-finite loss stops the run."""
    losses = np.array([m["loss"] for m in window])
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        raise FloatingPointError(
            f"loss is {losses[bad[0]]} at step {first_step + int(bad[0])}; stopping"
        )
    return {k: float(np.mean([m[k] for m in window])) for k in window[0]}


def progress_bar(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


class RunWriter:
    """config.json, metrics.jsonl, test_metrics.json and learning_curves.png in a work folder (only
    when ``enabled``: on process 0). Whole files are replaced atomically (``files.write_atomic``,
    the plot ``jaxmodels.files.save_figure``), so a failed write (a full disk) leaves the previous
    version."""

    def __init__(self, workdir: Path, enabled: bool = True, keep_until: int | None = None):
        self.workdir, self.enabled, self.history = workdir, enabled, []
        if enabled:
            workdir.mkdir(parents=True, exist_ok=True)
            if keep_until is not None and (workdir / rundir.METRICS_FILE).exists():
                rows = rundir.read_rows(workdir)  # a resumed run: rows up to its step stay
                self.history = [r for r in rows if r.get("step", 0) <= keep_until]
            rundir.write_rows(workdir, self.history)

    def save_config(self, config: dict) -> None:
        if self.enabled:
            rundir.write_config(self.workdir, config)

    def log(self, row: dict) -> None:
        """Append ``row`` to metrics.jsonl; it is on disk (flushed, closed) when this returns, so
        before the caller shows it."""
        self.history.append(row)
        if self.enabled:
            rundir.append_row(self.workdir, row)

    def save_test_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """The run's final test metrics, {"step", "test"}, in test_metrics.json."""
        if self.enabled:
            rundir.write_test_metrics(self.workdir, step, metrics)

    def plot(self) -> None:
        """Loss (and accuracy) against step, train rows and eval rows, in learning_curves.png."""
        if not self.enabled:
            return
        from matplotlib.figure import Figure  # no pyplot: no global backend, renders with Agg

        names = ["loss"] + (["accuracy"] if any("accuracy" in r for r in self.history) else [])
        fig = Figure(figsize=(5 * len(names), 4), layout="constrained")
        for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
            for kind, style, label in (("train", "-", "train"), ("eval", "o-", "test")):
                rows = [r for r in self.history if r["kind"] == kind and name in r]
                ax.plot([r["step"] for r in rows], [r[name] for r in rows], style, label=label)
            ax.set(
                xlabel="step", ylabel=name, title=name, yscale="log" if name == "loss" else "linear"
            )
            ax.grid(alpha=0.3)
            ax.legend()
        save_figure(fig, self.workdir / rundir.CURVES_FILE, dpi=100)  # whole or not at all


def epoch_times(rows: list[dict]) -> list[float]:
    """Training seconds of each epoch of a run from its "eval" rows (each has the seconds since
    its process started, ``time_s``, and its own ``eval_time_s``): evaluation left out, the first
    epoch's compilation in. A resumed run's rows come from several processes, each with its own
    clock: a process's first "train" row (the one with ``first_step_s``) starts the clock anew, so
    the epoch it resumed in is timed from that start, compilation included (only the rest of that
    epoch where it resumed from a checkpoint inside it)."""
    times, start = [], 0.0
    for row in rows:
        if row["kind"] == "train" and "first_step_s" in row:
            start = 0.0
        elif row["kind"] == "eval":
            times.append(row["time_s"] - row["eval_time_s"] - start)
            start = row["time_s"]
    return times
