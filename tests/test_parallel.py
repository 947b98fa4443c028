"""Parallel strategies: single, pmap and sharded give one trajectory on 8 fake CPU devices (a
subprocess, since XLA_FLAGS must be set before jax is imported), padded batches included; the
indivisible-batch error; the CLI with --strategy pmap; multi-host start-up from flags and env vars."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxmodels.cli import main
from jaxmodels.training import parallel

WORKER = Path(__file__).resolve().parent / "_parallel_worker.py"
TOL = 1e-4  # float32 over 10 Adam steps; measured differences are ~1e-6


def run_worker(config: dict) -> subprocess.Popen:
    """Start tests/_parallel_worker.py with ``config`` in a clean environment (CPU only, no
    distributed settings inherited from the caller)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"worker timed out after {timeout} s:\n{output[-4000:]}")
    assert proc.returncode == 0, (
        f"worker failed with exit status {proc.returncode}:\n{output[-4000:]}"
    )
    return output


def load_run(out: Path, name: str, process: int = 0) -> tuple[dict, list[np.ndarray]]:
    result = json.loads((out / f"result-p{process}.json").read_text())
    with np.load(out / f"{name}-p{process}.npz") as npz:
        leaves = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    return result["runs"][name], leaves


def largest_difference(a: tuple[dict, list], b: tuple[dict, list]) -> dict[str, float]:
    """Largest absolute differences between two runs: per-step metrics (every history row's
    numbers except times and throughput) and the final state's leaves."""
    (run_a, leaves_a), (run_b, leaves_b) = a, b
    rows_a, rows_b = run_a["history"], run_b["history"]
    assert [(r["kind"], r["step"]) for r in rows_a] == [(r["kind"], r["step"]) for r in rows_b]
    timing = {"time_s", "eval_time_s", "examples_per_sec", "first_step_s"}
    metrics = max(
        abs(ra[k] - rb[k])
        for ra, rb in zip(rows_a, rows_b)
        for k in ra
        if k not in timing and isinstance(ra[k], float)
    )
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, x.dtype, y.shape, y.dtype)
    state = max(
        float(np.max(np.abs(x.astype(np.float64) - y), initial=0.0))
        for x, y in zip(leaves_a, leaves_b)
    )
    return {"metrics": metrics, "state": state}


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("eight")
    config = {
        "devices": 8,
        "out": str(out),
        "runs": list(parallel.STRATEGIES),
        "steps": True,
        "cli": True,
    }
    finish(run_worker(config))
    return out, json.loads((out / "result-p0.json").read_text())


def test_three_strategies_give_one_trajectory(eight_devices):
    out, result = eight_devices
    assert result["devices"] == 8 and result["default"] == "sharded"
    single = load_run(out, "single")
    history = single[0]["history"]
    assert [r["kind"] for r in history].count("train") == 10 and [r["kind"] for r in history].count(
        "eval"
    ) == 2
    assert history[-1]["loss"] < history[0]["loss"]  # it trains
    for name in ("pmap", "sharded"):
        diff = largest_difference(single, load_run(out, name))
        print(f"single vs {name}: largest difference {diff}")
        assert diff["metrics"] < TOL and diff["state"] < TOL, (name, diff)
        assert {"config.json", "metrics.jsonl"} <= set(result["runs"][name]["wrote"])


def test_uneven_padding_across_devices(eight_devices):
    """Batches whose real rows sit on the first devices only: pmap's per-device means must combine
    into the global masked mean (5 real rows of 32: devices 0 and 1 hold them, 2..7 only padding)."""
    _, result = eight_devices
    steps = result["steps"]
    for name in ("pmap", "sharded"):
        np.testing.assert_allclose(
            steps[name]["losses"], steps["single"]["losses"], rtol=1e-5, atol=1e-6
        )
        for got, want in zip(steps[name]["params"], steps["single"]["params"]):
            np.testing.assert_allclose(got, want, atol=TOL)


def test_indivisible_batch_is_a_clear_error(eight_devices):
    _, result = eight_devices
    for name in ("pmap", "sharded"):
        assert "global batch size 30 does not divide by the 8 devices" in result["errors"][name]
    with pytest.raises(
        ValueError,
        match="global batch size 30 does not divide by the 8 devices; use a multiple of 8",
    ):
        parallel.check_divisible(30, 8)
    parallel.check_divisible(32, 8)


def test_cli_trains_with_pmap_on_eight_devices(eight_devices):
    _, result = eight_devices
    cli = result["cli"]
    assert cli["code"] == 0 and cli["strategy"] == "pmap"
    train = [r for r in cli["rows"] if r["kind"] == "train"]
    evals = [r for r in cli["rows"] if r["kind"] == "eval"]
    assert train[-1]["step"] == 3 and len(evals) == 1 and 0.0 <= evals[0]["accuracy"] <= 1.0
    assert np.isfinite(train[-1]["loss"])


def test_cli_strategy_in_process(tmp_path, capsys):
    """One device here: pmap and sharded still run (over one device), and a bad name is rejected."""
    args = [
        "train",
        "cnn",
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--batch-size",
        "16",
        "--no-progress",
    ]
    assert main([*args, "--strategy", "pmap", "--workdir", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "config.json").read_text())["strategy"] == "pmap"
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--strategy", "ring"])
    assert exit_info.value.code == 2 and "invalid choice: 'ring'" in capsys.readouterr().err


def test_get_strategy():
    assert parallel.default_strategy_name() == "single"  # one CPU device in the test process
    assert isinstance(parallel.get_strategy(), parallel.SingleDevice)
    pmap, sharded = parallel.get_strategy("pmap"), parallel.get_strategy("sharded")
    assert (pmap.axis_name, pmap.num_devices) == ("batch", 1)
    assert (sharded.axis_name, sharded.num_devices, sharded.mesh.axis_names) == (None, 1, ("data",))
    with pytest.raises(
        ValueError,
        match=r"unknown strategy 'ring'; expected one of \('single', 'pmap', 'sharded'\)",
    ):
        parallel.get_strategy("ring")


class _Stop(Exception):
    pass


def test_multihost_settings_from_flags_and_environment(monkeypatch):
    calls = []

    def fake_initialize(*args):
        calls.append(args)
        raise _Stop

    for name in (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(parallel.jax.distributed, "initialize", fake_initialize)
    assert parallel.initialize_distributed() is False and calls == []  # nothing asked: one process

    with pytest.raises(_Stop):  # flags, through the command line
        main(
            [
                "train",
                "cnn",
                "--coordinator-address",
                "10.0.0.1:1234",
                "--num-processes",
                "4",
                "--process-id",
                "3",
            ]
        )
    assert calls[-1] == ("10.0.0.1:1234", 4, 3)

    monkeypatch.setenv(parallel.ENV_COORDINATOR, "10.0.0.2:99")
    monkeypatch.setenv(parallel.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(parallel.ENV_PROCESS_ID, "1")
    with pytest.raises(_Stop):  # environment variables
        parallel.initialize_distributed()
    assert calls[-1] == ("10.0.0.2:99", 2, 1)
    with pytest.raises(_Stop):  # a flag wins over its variable
        parallel.initialize_distributed(process_id=0)
    assert calls[-1] == ("10.0.0.2:99", 2, 0)

    with pytest.raises(
        ValueError, match=r"expected 0 <= process id < number of processes, got 2 and 2"
    ):
        parallel.initialize_distributed(process_id=2)
    monkeypatch.setenv(parallel.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match=r"expected an integer in \$JAX_NUM_PROCESSES, got 'two'"):
        parallel.initialize_distributed()
    assert len(calls) == 3
