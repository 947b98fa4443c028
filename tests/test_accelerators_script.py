"""benchmarks/accelerators.py end to end on CPU: the --dry-run pipeline, and the refusal to run without it.

The script runs as a subprocess, as a user would start it (repository root, JAX_PLATFORMS=cpu).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accelerators.py"
KERNELS = {"dense", "lstm_cell", "lstm_sequence", "lstm_stepwise", "lstm_scan(pallas) vs (scan)"}
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
    proc = run_script("--dry-run", "--out", str(out), "--repeats", "2", timeout=300)
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
