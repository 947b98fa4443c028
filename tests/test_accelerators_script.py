"""benchmarks/accelerators.py end to end on CPU: the --dry-run pipeline, the refusal to run
without it, and the watchdog that turns a hung or crashed item into a record.

The script runs as a subprocess, as a user would start it (repository root, JAX_PLATFORMS=cpu).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accelerators.py"
KERNELS = {
    "dense",
    "lstm_cell",
    "lstm_sequence",
    "lstm_stepwise",
    "lstm_grid",
    "lstm_scan(pallas) vs (scan)",
    "rnn_scan(pallas) vs (scan)",
}
DRY_SHAPE = {"hidden": 32, "batch": 2, "time": 3, "dtype": "float32"}
# Lines the CUDA plugin of jaxlib logs on a machine without a GPU (absl), not written by the script.
PLUGIN_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWE]\d{4} )")


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerators")
    proc = run_script("--dry-run", "--out", str(out), "--repeats", "2", timeout=900)
    return proc, out


def test_dry_run_exits_0_and_writes_dry_run_files(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "accelerators-cpu-cpu-dry-run.json",
        "accelerators-cpu-cpu-dry-run.md",
    ]
    markdown = (out / "accelerators-cpu-cpu-dry-run.md").read_text()
    assert "DRY RUN" in markdown and "interpret mode on CPU: not a speed" in markdown
    assert proc.stdout.strip() == markdown.strip()  # the markdown is printed too


def test_dry_run_correctness_covers_every_kernel_and_passes(dry_run):
    _proc, out = dry_run
    result = json.loads((out / "accelerators-cpu-cpu-dry-run.json").read_text())
    assert result["dry_run"] is True and "dry-run" in result["label"]
    assert result["complete"] is True and result["passed"] is True
    cases = result["correctness"]
    assert {(c["kernel"], c["dtype"]) for c in cases} == {
        (k, d) for k in KERNELS for d in ("float32", "bfloat16")
    }
    for case in cases:
        assert case["status"] == "pass", case
        assert case["forward_error"] <= case["forward_tolerance"]
        assert case["gradient_error"] <= case["gradient_tolerance"]
    env = result["environment"]
    assert result["device"]["platform"] == "cpu"
    assert env["versions"]["jax"] and "xla_flags" in env and "git_commit" in env


def test_dry_run_timings_and_skipped_contenders(dry_run):
    _proc, out = dry_run
    result = json.loads((out / "accelerators-cpu-cpu-dry-run.json").read_text())
    rows = result["timing"]
    assert result["repeats"] == 2
    for pass_name in ("forward", "forward+backward"):
        at_shape = {
            r["name"]: r
            for r in rows
            if r["pass"] == pass_name and all(r[k] == v for k, v in DRY_SHAPE.items())
        }
        for impl in ("scan", "pallas", "auto"):
            row = at_shape[f"jaxmodels lstm_scan({impl})"]
            assert "error" not in row and "skipped" not in row, row
            assert len(row["samples_s"]) == 2 and row["min_s"] <= row["median_s"] <= row["max_s"]
            assert row["number"] == 1 and row["path"]  # one call per sample in the dry run
        for name in ("jax.experimental.rnn (cuDNN)", "PyTorch nn.LSTM (cuDNN)"):
            assert at_shape[name]["skipped"] and "median_s" not in at_shape[name], at_shape[name]


def test_dry_run_stresses_the_grid_barrier_and_trains_pixel_mnist(dry_run):
    _proc, out = dry_run
    result = json.loads((out / "accelerators-cpu-cpu-dry-run.json").read_text())
    assert result["unfinished"] == []
    stress = result["stress"]
    assert len(stress) == 2 and {c["dtype"] for c in stress} == {"float32", "bfloat16"}
    for case in stress:
        assert case["status"] == "pass" and case["kernel"] == "lstm_grid", case
        assert case["forward_error"] <= case["forward_tolerance"]
    runs = {r["impl"]: r for r in result["pixel_mnist"]}
    assert set(runs) == {"scan", "pallas"}
    for run in runs.values():
        assert run["status"] == "ran" and run["seq_len"] == 784 and run["steps"] >= 1, run
        assert run["test_accuracy"] and all(0 <= a <= 1 for a in run["test_accuracy"])
    auto = result["auto"]
    assert {a["pass"] for a in auto} == {"forward", "forward+backward"}
    for a in auto:
        assert a["faster"] in ("lax.scan", a["pallas_path"]) and a["cudnn_ms"] is None
    markdown = (out / "accelerators-cpu-cpu-dry-run.md").read_text()
    for heading in ("## The grid barrier under stress", "## Pixel-by-pixel MNIST", 'impl="auto"'):
        assert heading in markdown


FAKE_CHILD = textwrap.dedent(
    """
    import argparse, json, os, time
    p = argparse.ArgumentParser()
    p.add_argument("--stage"); p.add_argument("--first", type=int); p.add_argument("--events")
    args = p.parse_args()
    labels = ["ok", "hangs", "crashes", "ok again"]
    with open(args.events, "a") as events:
        emit = lambda e: (events.write(json.dumps(e) + "\\n"), events.flush())
        emit({"labels": labels})
        for i in range(args.first, len(labels)):
            emit({"start": i})
            if labels[i] == "hangs":
                time.sleep(600)
            if labels[i] == "crashes":
                raise SystemExit("the kernel broke")
            emit({"done": i, "record": {"item": labels[i]}})
    """
)


def load_accelerators():
    spec = importlib.util.spec_from_file_location("accelerators_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_hung_or_crashed_item_is_recorded_and_the_stage_goes_on(tmp_path):
    accelerators = load_accelerators()
    child = tmp_path / "child.py"
    child.write_text(FAKE_CHILD)
    outcomes = []
    start = time.monotonic()
    labels = accelerators.run_stage(
        "fake",
        [sys.executable, str(child)],
        deadline=start + 120,
        item_timeout_s=3.0,
        workdir=tmp_path,
        on_item=lambda index, label, outcome: outcomes.append((index, label, outcome)),
    )
    assert labels == ["ok", "hangs", "crashes", "ok again"]
    assert [(i, label, o["status"]) for i, label, o in outcomes] == [
        (0, "ok", "done"), (1, "hangs", "hung"), (2, "crashes", "crashed"), (3, "ok again", "done")
    ]  # fmt: skip
    assert (
        outcomes[0][2]["record"] == {"item": "ok"}
        and outcomes[3][2]["record"]["item"] == "ok again"
    )
    assert "no result in 3 s" in outcomes[1][2]["error"]
    assert (
        "exit status 1" in outcomes[2][2]["error"] and "the kernel broke" in outcomes[2][2]["error"]
    )
    assert time.monotonic() - start < 60  # the hung child was killed, not waited for
    # out of time: the item running is stopped and the rest are recorded as not run
    outcomes.clear()
    accelerators.run_stage(
        "late",
        [sys.executable, str(child)],
        deadline=time.monotonic() + 4,
        item_timeout_s=100.0,
        workdir=tmp_path,
        on_item=lambda index, label, outcome: outcomes.append((index, label, outcome)),
    )
    assert [(label, o["status"]) for _, label, o in outcomes] == [
        ("ok", "done"), ("hangs", "not run"), ("crashes", "not run"), ("ok again", "not run")
    ]  # fmt: skip


def test_without_dry_run_on_cpu_exits_2_with_one_line():
    proc = run_script(timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [
        line for line in proc.stderr.splitlines() if line.strip() and not PLUGIN_LOG.match(line)
    ]
    assert len(lines) == 1 and "--dry-run" in lines[0] and "GPU or TPU" in lines[0], proc.stderr
    assert proc.stdout == ""


def test_bad_argument_is_argparse_error():
    proc = run_script("--repeats", "0", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: argument --repeats: expected a positive integer" in proc.stderr
