"""The experiments' one report: a study's record from start to files, its tables and its plot.

An experiment is a configuration plus calls into the library; what it writes is the same for
every study and lives here once:

- ``Study``: started when created (wall clock, load average), ``finish`` adds the environment
  (``jaxmodels.records.environment``) and writes OUT/NAME.json, .md and .png
  (``jaxmodels.records.write_results``), then prints the markdown and the paths;
- ``summarise``: one summary row per group of runs (a configuration over its seeds), its fields
  computed by ``each``, ``first``, ``mean``, ``std``, ``minimum``, ``median`` or the study's own;
- ``Report``: the markdown (title, ``provenance``, the study's setup in words, the summary
  ``table`` of ``Column``s, the study's notes) and the PNG (``Curves``: one line per run);
- ``provenance``: where, when and with what a result was made, in one sentence.

A study says which runs, which metrics, which columns and which anchors from the papers; this
module imports nothing of jaxmodels but ``jaxmodels.records`` (and ``jaxmodels.files``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxmodels.files import save_figure, to_json
from jaxmodels.records import environment, load_average, write_results

Metric = str | Callable[[dict], Any]  # a run's key, or a function of the run


def _value(run: dict, metric: Metric) -> Any:
    return metric(run) if callable(metric) else run[metric]


# ---------------------------------------------------------------------------------------------
# Summaries over seeds


def each(metric: Metric) -> Callable[[list[dict]], list]:
    """A summary field: the metric of every run of the group (one per seed), in run order."""
    return lambda runs: [_value(r, metric) for r in runs]


def first(metric: Metric) -> Callable[[list[dict]], Any]:
    """A summary field: the metric of the group's first run (one shared by its seeds: a size)."""
    return lambda runs: _value(runs[0], metric)


def mean(metric: Metric) -> Callable[[list[dict]], float]:
    """A summary field: the metric's mean over the group's runs."""
    return lambda runs: float(np.mean(each(metric)(runs)))


def std(metric: Metric) -> Callable[[list[dict]], float]:
    """A summary field: the metric's standard deviation over the group's runs (numpy's, ddof 0)."""
    return lambda runs: float(np.std(each(metric)(runs)))


def minimum(metric: Metric) -> Callable[[list[dict]], float]:
    """A summary field: the metric's smallest value over the group's runs."""
    return lambda runs: float(min(each(metric)(runs)))


def median(metric: Metric) -> Callable[[list[dict]], float]:
    """A summary field: the median over the group's runs of a metric that is one number per run,
    or over all their values of one that is a list per run (epoch times)."""

    def field(runs: list[dict]) -> float:
        values = each(metric)(runs)
        flat = [x for v in values for x in v] if values and isinstance(values[0], list) else values
        return float(np.median(flat))

    return field


def summarise(
    runs: list[dict], by: Sequence[str], fields: Mapping[str, Callable[[list[dict]], Any]]
) -> list[dict]:
    """One row per distinct value of the runs' ``by`` keys, in the order the runs first show it:
    those keys' values, then every field computed from the group's runs (a configuration over its
    seeds)."""
    key = lambda run: tuple(run[k] for k in by)
    rows = []
    for values in dict.fromkeys(map(key, runs)):
        mine = [r for r in runs if key(r) == values]
        rows.append(dict(zip(by, values)) | {name: f(mine) for name, f in fields.items()})
    return rows


# ---------------------------------------------------------------------------------------------
# Markdown


@dataclasses.dataclass(frozen=True)
class Column:
    """A markdown table's column: its header, its cell (a ``str.format`` template over the row, or
    a function of the row) and whether it is a number (right-aligned)."""

    header: str
    cell: str | Callable[[dict], Any]
    right: bool = False

    def text(self, row: dict) -> str:
        return self.cell.format(**row) if isinstance(self.cell, str) else str(self.cell(row))


def joined(key: str, spec: str) -> Callable[[dict], str]:
    """A cell: the row's list ``key`` (one value per seed), each formatted with ``spec``."""
    return lambda row: ", ".join(format(x, spec) for x in row[key])


def table(columns: Sequence[Column], rows: Sequence[dict]) -> list[str]:
    """A markdown table's lines: header, alignment, one line per row."""
    return [
        "| " + " | ".join(c.header for c in columns) + " |",
        "|" + "|".join("---:" if c.right else "---" for c in columns) + "|",
        *("| " + " | ".join(c.text(row) for c in columns) + " |" for row in rows),
    ]


def provenance(result: dict) -> str:
    """A result's "where, when, with what" in one markdown sentence: date, backend and CPU count,
    versions, git commit (and whether it had local changes), wall time and load average."""
    env, v = result["environment"], result["environment"]["versions"]
    versions = ", ".join(f"{p} {v[p]}" for p in ("jax", "flax", "optax", "torch") if v.get(p))
    commit = (env["git_commit"] or "unknown")[:10] + (
        " with local changes" if env["git_dirty_files"] else ""
    )
    load = result.get("loadavg", {})
    return (
        f"{env['date']}; {env['backend']} ({env['cpu_count']} CPUs), {versions}, python "
        f"{v['python']}; git {commit}. Wall time {result['wall_s']:.0f} s, load average "
        f"{load.get('start')} at start, {load.get('end')} at end."
    )


# ---------------------------------------------------------------------------------------------
# The plot


@dataclasses.dataclass(frozen=True)
class Curves:
    """How a study's runs are drawn: one line per run (``curve``: run -> (xs, ys)), coloured by
    ``color_by`` (a run key, or keys whose values' tuple ``colors`` maps), dashed by the sorted
    values of ``dash_by``, one panel per value of ``panel_by`` (titled ``title`` with ``{panel}``);
    the first run of each colour and dash in a panel names it in the legend (``label``, a format
    template over the run). ``point``: a marker drawn after each run's line (run -> (x, y));
    ``hlines``: dashed reference lines of a panel ((result, panel) -> [(y, color, label)]), the
    papers' anchors and baselines. ``style``: the lines' other matplotlib options; ``axes``: the
    panels' (scales, limits); ``grid``: which ticks get grid lines; ``size``: one panel's inches."""

    curve: Callable[[dict], tuple[Sequence, Sequence]]
    color_by: str | tuple[str, ...]
    colors: Mapping[Hashable, str]
    label: str
    xlabel: str
    ylabel: str
    title: str
    size: tuple[float, float]
    panel_by: str | None = None
    dash_by: str | None = None
    point: Callable[[dict], tuple[float, float]] | None = None
    hlines: Callable[[dict, Any], list[tuple[float, str, str]]] = lambda result, panel: []
    style: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    axes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    grid: str = "major"

    def key(self, run: dict, by: str | tuple[str, ...]) -> Hashable:
        return tuple(run[k] for k in by) if isinstance(by, tuple) else run[by]

    def draw(self, result: dict, path: Path) -> None:
        """The figure of ``result["runs"]``, saved as a PNG at ``path`` (100 dpi)."""
        from matplotlib.figure import Figure

        runs = result["runs"]
        panels = list(dict.fromkeys(r[self.panel_by] for r in runs)) if self.panel_by else [None]
        dashes = {}
        if self.dash_by:
            values = sorted({r[self.dash_by] for r in runs})
            dashes = dict(zip(values, ["-", ":", "-."] * len(values)))
        width, height = self.size
        fig = Figure(figsize=(width * len(panels), height), layout="constrained")
        for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
            seen = set()
            for run in runs:
                if self.panel_by and run[self.panel_by] != panel:
                    continue
                color = self.colors[self.key(run, self.color_by)]
                series = (color, dashes.get(run.get(self.dash_by)))
                xs, ys = self.curve(run)
                style = dict(self.style) | ({"linestyle": series[1]} if self.dash_by else {})
                label = None if series in seen else self.label.format(**run)
                ax.plot(xs, ys, color=color, label=label, **style)
                seen.add(series)
                if self.point:
                    ax.plot(*self.point(run), "o", color=color)
            for y, color, label in self.hlines(result, panel):
                ax.axhline(y, color=color, linestyle="--", linewidth=1, label=label)
            ax.set(**self.axes, xlabel=self.xlabel, ylabel=self.ylabel)
            ax.set(title=self.title.format(panel=panel))
            ax.grid(alpha=0.3, which=self.grid)
            ax.legend(fontsize=8)
        save_figure(fig, path, dpi=100)  # whole or not at all


# ---------------------------------------------------------------------------------------------
# The report and the study


@dataclasses.dataclass(frozen=True)
class Report:
    """A study's files from its result: the markdown is the title, ``provenance``, ``setup(result)``
    (the configuration in words: lines), the summary table of ``columns`` over
    ``result["summary"]`` and ``notes(result)`` (lines: other tables, samples); the PNG is
    ``curves`` of ``result["runs"]``."""

    title: str
    setup: Callable[[dict], list[str]]
    columns: Sequence[Column]
    curves: Curves
    notes: Callable[[dict], list[str]] = lambda result: []

    def markdown(self, result: dict) -> str:
        lines = [f"# {self.title}", "", provenance(result), *self.setup(result), ""]
        lines += table(self.columns, result["summary"]) + self.notes(result)
        return "\n".join(lines) + "\n"

    def plot(self, result: dict, path: Path) -> None:
        self.curves.draw(result, path)


class Study:
    """One experiment's record, started when created (wall clock and load average).

        study = Study("cnn_mnist", config, REPORT)
        ...                                              # the runs
        result, paths = study.finish(out, runs=runs, summary=summarise(runs, BY, FIELDS))

    ``finish`` returns the result {"experiment", "config", "environment", "wall_s", "loadavg",
    **parts} and writes it as OUT/NAME.json, .md and .png (the report's markdown and plot), then
    prints the markdown and the files' paths. ``config`` is kept as JSON writes it
    (``jaxmodels.files.to_json``: paths as text)."""

    def __init__(self, name: str, config: dict, report: Report):
        self.name, self.report = name, report
        self.config = to_json(config)
        self.start, self.load_start = time.perf_counter(), load_average()

    def finish(self, out: Path | str, **parts: Any) -> tuple[dict, list[Path]]:
        result = {
            "experiment": self.name,
            "config": self.config,
            "environment": environment(),
            "wall_s": time.perf_counter() - self.start,
            "loadavg": {"start": self.load_start, "end": load_average()},
            **parts,
        }
        paths = write_results(
            result,
            out,
            self.name,
            render_markdown=self.report.markdown,
            render_png=self.report.plot,
        )
        print(self.report.markdown(result))
        print("wrote " + ", ".join(str(p) for p in paths))
        return result, paths
