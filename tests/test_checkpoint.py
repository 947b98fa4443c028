"""Checkpoints: save/restore round trip and keep-last-K; SIGKILL then --resume ends bitwise equal to
an uninterrupted run (CLI subprocesses); resuming on 8 devices (sharded and pmap) from a 1-device
checkpoint; a corrupt latest checkpoint falls back with a warning; an incompatible resume is a
clear error; a NaN loss stops the run and the last good checkpoint stays; ``jaxmodels eval``."""

import dataclasses
import functools
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxmodels import get_model
from jaxmodels.cli import main
from jaxmodels.data.datasets import get_dataset
from jaxmodels.files import to_json
from jaxmodels.training import rundir
from jaxmodels.training.batches import BatchIterator, Position
from jaxmodels.training.checkpoint import Checkpoints, CorruptCheckpointError
from jaxmodels.training.compat import CheckpointWarning, IncompatibleCheckpointError
from jaxmodels.training.fit import TrainConfig, fit
from jaxmodels.training.optim import make_optimizer
from jaxmodels.training.rundir import checkpoint_dir
from jaxmodels.training.steps import TrainState, create_train_state

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small():
    """256 train / 64 test digits: 8 steps per epoch at batch 32."""
    ds = get_dataset("digits")
    return dataclasses.replace(
        ds,
        x_train=ds.x_train[:256],
        y_train=ds.y_train[:256],
        x_test=ds.x_test[:64],
        y_test=ds.y_test[:64],
    )


def _quiet(**kw):
    return TrainConfig(**{"progress": False, "plot": False, "batch_size": 32, "epochs": 1, **kw})


@functools.cache
def _base_state() -> TrainState:
    tx = make_optimizer("adam", 1e-3, "cosine", total_steps=100)
    return jax.device_get(
        create_train_state(get_model("cnn"), tx, np.zeros((2, 28, 28, 1), np.float32), 0)
    )


def _state(seed=0) -> TrainState:
    """A host TrainState of the CNN with Adam (namedtuples, int counts), every value offset by
    ``seed``; the same structure as fit's with the default TrainConfig."""
    return jax.tree.map(lambda x: x + np.asarray(seed, x.dtype), _base_state())


def _assert_bitwise(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def _cli(workdir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jaxmodels.cli",
        "train",
        "cnn",
        "--workdir",
        str(workdir),
        "--max-steps",
        "50",
        "--batch-size",
        "16",
        "--checkpoint-every",
        "20",
        "--log-every",
        "10",
        "--no-progress",
        *extra,
    ]


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}


def _rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _trajectory(rows):
    """The deterministic part of the metrics rows (no timings)."""
    keep = ("kind", "epoch", "step", "loss", "accuracy", "grad_norm", "lr")
    return [{k: r[k] for k in keep if k in r} for r in rows]


# --------------------------------------------------------------------------------- round trip


def test_save_restore_roundtrip_keeps_the_last_k(tmp_path):
    states = [_state(seed) for seed in range(4)]
    config = {"model": "cnn", "train": {"batch_size": 32}}
    with Checkpoints(tmp_path / "ck", keep=2) as ckpt:
        for step, state in enumerate(states, start=1):
            ckpt.save(step, state, position=Position(0, step), config=config)
        assert ckpt.save(4, states[0]) is False  # a saved step is never overwritten
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
        restored = ckpt.restore(states[0], config=config)
    assert restored.step == 4 and restored.position == Position(0, 4) and restored.config == config
    assert isinstance(restored.state, TrainState)
    _assert_bitwise(restored.state, states[3])

    with Checkpoints(tmp_path / "ck", read_only=True) as ckpt:  # no target: the saved nested dicts
        raw = ckpt.restore(step=3)
    _assert_bitwise(raw.state["params"], states[2].params)
    assert raw.state["rng"].dtype == np.uint32 and raw.state["step"].dtype == np.int32


@pytest.fixture
def terminal_sigint():
    """Python's own SIGINT handler for the test, as in a terminal: an earlier test in this worker
    process may have left SIGINT ignored, and an ignored Ctrl-C is rightly never delivered."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_waits_for_orbax_to_finish_then_interrupts(tmp_path, monkeypatch, terminal_sigint):
    """Ctrl-C while orbax saves, waits or closes (a KeyboardInterrupt inside its thread joins logs a
    traceback and can leave the save half-done): held until the call returns, then delivered."""
    ckpt = Checkpoints(tmp_path / "ck")
    finished = []

    def pressed_during(name):
        real = getattr(ckpt._manager, name)

        def call(*args, **kwargs):
            signal.raise_signal(signal.SIGINT)  # Ctrl-C as orbax starts
            out = real(*args, **kwargs)
            finished.append(name)
            return out

        monkeypatch.setattr(ckpt._manager, name, call)

    ckpt.save(1, _state(0))
    pressed_during("wait_until_finished")
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(2, _state(1))  # waits for step 1 first
    assert finished == ["wait_until_finished"] and ckpt.all_steps() == [1]
    with pytest.raises(KeyboardInterrupt):
        ckpt.restore(_state(0))
    monkeypatch.undo()
    pressed_during("save")
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(2, _state(1))
    pressed_during("close")
    with pytest.raises(KeyboardInterrupt):
        ckpt.close()
    assert finished == ["wait_until_finished"] * 2 + ["save", "close"]
    with Checkpoints(tmp_path / "ck", read_only=True) as ckpt:
        assert ckpt.all_steps() == [1, 2]
        _assert_bitwise(ckpt.restore(_state(0)).state, _state(1))


def test_should_save_and_argument_errors(tmp_path):
    ckpt = Checkpoints(tmp_path / "ck", every=5)
    assert [s for s in range(1, 13) if ckpt.should_save(s, final=s == 12)] == [5, 10, 12]
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        ckpt.restore()
    ckpt.close()
    with pytest.raises(ValueError, match="expected keep > 0"):
        Checkpoints(tmp_path / "other", keep=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Checkpoints(tmp_path / "missing", read_only=True)


def test_fit_saves_every_n_and_at_the_end_and_resumes_a_finished_run(small, tmp_path):
    config = _quiet(
        epochs=2, checkpoint_every=5, keep=2, log_every=4, clip_norm=1.0
    )  # EmptyState too
    result = fit(get_model("cnn"), small, config, tmp_path)
    with Checkpoints(checkpoint_dir(tmp_path), read_only=True) as ckpt:
        assert ckpt.all_steps() == [15, 16]  # 5, 10, 15 and the final 16; the latest 2 kept
        last = ckpt.restore(jax.device_get(result.state))
    assert last.position == Position(2, 0)
    _assert_bitwise(last.state, result.state)

    again = fit(get_model("cnn"), small, config, tmp_path, resume=True)  # nothing left to train
    _assert_bitwise(again.state, result.state)
    assert again.test_metrics == result.test_metrics
    assert _trajectory(_rows(tmp_path)) == _trajectory(result.history)


# ---------------------------------------------------------------------- SIGKILL and --resume


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """`jaxmodels train cnn` for 50 steps, checkpoints every 20: started in the background so it
    overlaps the run that gets killed."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    proc = subprocess.Popen(
        _cli(workdir), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    yield workdir, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_sigkill_then_resume_equals_an_uninterrupted_run(uninterrupted, tmp_path):
    full_dir, full_proc = uninterrupted
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(workdir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckdir, deadline = checkpoint_dir(workdir), time.monotonic() + 180
    try:
        # Kill once step 20 is saved and a metrics row past it is written (so the resumed run must
        # drop rows newer than its checkpoint), before the run can finish.
        while time.monotonic() < deadline and proc.poll() is None:
            rows = (
                (workdir / "metrics.jsonl").read_text().splitlines()
                if (workdir / "metrics.jsonl").exists()
                else []
            )
            if (ckdir / "20").is_dir() and any(
                json.loads(r)["step"] >= 30 for r in rows if r.endswith("}")
            ):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
    assert saved and max(saved) < 50, saved
    assert proc.returncode == -signal.SIGKILL

    resumed = subprocess.run(
        _cli(workdir, "--resume"), env=_env(), capture_output=True, text=True, timeout=240
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    _finish(full_proc)

    with (
        Checkpoints(checkpoint_dir(full_dir), read_only=True) as a,
        Checkpoints(ckdir, read_only=True) as b,
    ):
        full, again = a.restore(), b.restore()
    assert full.step == again.step == 50
    _assert_bitwise(again.state, full.state)  # params, optimizer state, step and RNG, bit for bit
    assert again.position == full.position
    # metrics.jsonl was appended to, not restarted: the same rows, none twice
    assert _trajectory(_rows(workdir)) == _trajectory(_rows(full_dir))


def test_eval_command_restores_the_latest_checkpoint(uninterrupted, capsys):
    full_dir, full_proc = uninterrupted
    if full_proc.poll() is None:
        _finish(full_proc)
    assert main(["eval", "cnn", "--workdir", str(full_dir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((full_dir / "eval.json").read_text())
    last_eval = [r for r in _rows(full_dir) if r["kind"] == "eval"][-1]
    assert printed["step"] == 50 == last_eval["step"] and printed["model"] == "cnn"
    assert printed["test"]["accuracy"] == pytest.approx(last_eval["accuracy"], abs=1e-9)
    assert printed["test"]["loss"] == pytest.approx(last_eval["loss"], rel=1e-6)

    assert main(["eval", "cnn", "--workdir", str(full_dir), "--dtype", "bfloat16"]) == 1
    assert "--dtype bfloat16 contradicts the run in" in capsys.readouterr().err
    assert main(["eval", "cnn", "--workdir", str(full_dir / "nowhere")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (full_dir / "nowhere").exists()  # nothing created for a run that is not there


# ------------------------------------------------------------------------- other device counts

_EIGHT_DEVICES = textwrap.dedent("""
    import dataclasses, json, shutil, sys
    import jax, numpy as np
    from jaxmodels import get_model
    from jaxmodels.data.datasets import get_dataset
    from jaxmodels.training.parallel import get_strategy
    from jaxmodels.training.fit import TrainConfig, fit
    src, expected = sys.argv[1], np.load(sys.argv[2])
    ds = get_dataset("digits")
    ds = dataclasses.replace(ds, x_train=ds.x_train[:256], y_train=ds.y_train[:256], x_test=ds.x_test[:64],
                             y_test=ds.y_test[:64])
    config = TrainConfig(epochs=1, batch_size=32, progress=False, plot=False, checkpoint_every=4)
    out = {"devices": jax.device_count()}
    for name in ("sharded", "pmap"):
        workdir = f"{src}-{name}"
        shutil.copytree(src, workdir)
        result = fit(get_model("cnn"), ds, config, workdir, strategy=get_strategy(name), resume=True)
        leaves = [np.asarray(x) for x in jax.tree.leaves(result.state.params)]
        out[name] = max(float(np.max(np.abs(a - expected[f"p{i}"]))) for i, a in enumerate(leaves))
    print(json.dumps(out))
""")


def test_resume_on_eight_devices_from_a_one_device_checkpoint(small, tmp_path):
    config = _quiet(checkpoint_every=4)
    full = fit(get_model("cnn"), small, config, tmp_path / "one")
    shutil.rmtree(checkpoint_dir(tmp_path / "one") / "8")  # as if stopped after step 4
    expected = tmp_path / "expected.npz"
    np.savez(expected, **{f"p{i}": x for i, x in enumerate(jax.tree.leaves(full.state.params))})
    env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run(
        [sys.executable, "-c", _EIGHT_DEVICES, str(tmp_path / "one"), str(expected)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    diffs = json.loads(out.stdout.strip().splitlines()[-1])
    print("max |params - uninterrupted| after resuming on 8 devices:", diffs)
    assert diffs["devices"] == 8
    assert diffs["sharded"] < 1e-5 and diffs["pmap"] < 1e-5, diffs  # float32, 4 more Adam steps


# ------------------------------------------------------------------------------------ corrupt


def _truncate_arrays(step_dir: Path):
    for path in glob.glob(str(step_dir / "state" / "ocdbt.process_0" / "d" / "*")):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


CORRUPTIONS = {
    "truncated arrays": _truncate_arrays,
    "missing meta": lambda d: os.remove(d / "meta" / "metadata"),
    "truncated array metadata": lambda d: os.truncate(d / "state" / "_METADATA", 10),
    "missing state": lambda d: shutil.rmtree(d / "state"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path, corruption):
    states = [_state(seed) for seed in range(3)]
    with Checkpoints(tmp_path / "ck") as ckpt:
        for step, state in zip((10, 20, 30), states):
            ckpt.save(step, state, position=(0, step))
    CORRUPTIONS[corruption](tmp_path / "ck" / "30")
    with Checkpoints(tmp_path / "ck") as ckpt:
        with pytest.warns(CheckpointWarning) as caught:
            restored = ckpt.restore(states[0])
        (warning,) = caught  # one line: what, why, what instead, where it went
        assert re.fullmatch(
            rf"checkpoint step 30 in {re.escape(str(tmp_path))}/ck is corrupt or incomplete: .*; "
            rf"falling back to step 20; step 30 moved to {re.escape(str(tmp_path))}/ck.bad/30",
            str(warning.message),
        )
        assert restored.step == 20
        _assert_bitwise(restored.state, states[1])
        assert ckpt.all_steps() == [10, 20] and (tmp_path / "ck.bad" / "30").is_dir()  # moved aside
        assert ckpt.save(30, states[2])  # the step can be saved again


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
    with Checkpoints(tmp_path / "ck") as ckpt:
        ckpt.save(1, _state(), position=(0, 1))
        ckpt.save(2, _state(), position=(0, 2))
    for step in (1, 2):
        os.remove(tmp_path / "ck" / str(step) / "meta" / "metadata")
    with Checkpoints(tmp_path / "ck", read_only=True) as ckpt:
        with pytest.raises(
            CorruptCheckpointError, match=r"no readable checkpoint .*step 2: .*step 1: "
        ):
            ckpt.restore(_state())
        with pytest.raises(CorruptCheckpointError, match=r"step 1 .* is corrupt"):
            ckpt.restore(_state(), step=1)
    assert (tmp_path / "ck" / "2").is_dir()  # read-only: nothing moved


def test_resume_past_a_corrupt_checkpoint_matches_the_uninterrupted_run(small, tmp_path):
    config = _quiet(checkpoint_every=2, keep=5, log_every=2)
    full = fit(get_model("cnn"), small, config, tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "run")
    ckdir = checkpoint_dir(tmp_path / "run")
    shutil.rmtree(ckdir / "8")  # killed before the end
    _truncate_arrays(ckdir / "6")  # and the latest is damaged
    with pytest.warns(CheckpointWarning, match="step 6"):
        again = fit(get_model("cnn"), small, config, tmp_path / "run", resume=True)
    _assert_bitwise(again.state, full.state)
    assert _trajectory(_rows(tmp_path / "run")) == _trajectory(_rows(tmp_path / "full"))


# ------------------------------------------------------------------------------- incompatible


def test_a_run_config_is_json_with_dtypes_by_name(tmp_path):
    """config.json and the checkpoints' metadata (``files.to_json``): dtypes by name, numpy values
    as numbers, tuples as lists."""
    config = {"model_config": {"dtype": jax.numpy.bfloat16, "features": (32, 64)}}
    config |= {"lr": np.float32(0.5), "shape": np.array([2, 3])}
    expected = {"model_config": {"dtype": "bfloat16", "features": [32, 64]}, "lr": 0.5}
    expected |= {"shape": [2, 3]}
    assert to_json(config) == expected
    rundir.write_config(tmp_path, config)
    assert (tmp_path / "config.json").read_text() == json.dumps(expected, indent=2) + "\n"


def test_incompatible_resume_is_a_clear_error(small, tmp_path, capsys):
    fit(get_model("cnn"), small, _quiet(max_steps=2), tmp_path)
    with pytest.raises(
        IncompatibleCheckpointError, match=r"train.optimizer: saved 'adam', now 'sgd'"
    ):
        fit(get_model("cnn"), small, _quiet(max_steps=2, optimizer="sgd"), tmp_path, resume=True)
    with pytest.raises(
        IncompatibleCheckpointError, match=r"model_config: saved .*'num_classes': 10.*12"
    ):
        fit(get_model("cnn", num_classes=12), small, _quiet(max_steps=2), tmp_path, resume=True)
    with pytest.raises(  # another learning rate is another run (tests/test_resume_options.py)
        IncompatibleCheckpointError, match=r"train.lr: saved 0.001, now 0.01"
    ):
        fit(get_model("cnn"), small, _quiet(max_steps=2, lr=1e-2), tmp_path, resume=True)

    with Checkpoints(checkpoint_dir(tmp_path)) as ckpt:  # a target of another shape
        wrong = _state()
        wrong = wrong.replace(
            params={
                **wrong.params,
                "Dense_1": {
                    "bias": np.zeros(12, np.float32),
                    "kernel": np.zeros((64, 12), np.float32),
                },
            }
        )
        with pytest.raises(
            IncompatibleCheckpointError,
            match=r"params.Dense_1.bias: saved float32\[10\], expected "
            r"float32\[12\]",
        ):
            ckpt.restore(wrong)
        assert ckpt.all_steps() == [2]  # an incompatible target is not a corrupt checkpoint

    code = main(
        [
            "train",
            "cnn",
            "--workdir",
            str(tmp_path),
            "--resume",
            "--optimizer",
            "sgd",
            "--no-progress",
            "--max-steps",
            "2",
        ]
    )
    assert code == 1
    assert "different run" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- NaN


def test_nan_loss_stops_the_run_and_the_last_good_checkpoint_stays(small, tmp_path):
    # Poison exactly the examples of step 6 (the 6th batch of epoch 0 in the iterator's order).
    order = BatchIterator((small.x_train, small.y_train), 32, seed=0).order(0)
    x = small.x_train.copy()
    x[order[5 * 32 : 6 * 32]] = np.nan
    poisoned = dataclasses.replace(small, x_train=x)
    config = _quiet(checkpoint_every=2, log_every=5)
    with pytest.raises(
        FloatingPointError, match=r"loss is nan at step 6.*last good checkpoint is step 4"
    ):
        fit(get_model("cnn"), poisoned, config, tmp_path)
    with Checkpoints(checkpoint_dir(tmp_path), read_only=True) as ckpt:
        assert ckpt.all_steps() == [2, 4]
        good = ckpt.restore()
    assert good.step == 4 and good.position == Position(0, 4) and int(good.state["step"]) == 4
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(good.state))

    with Checkpoints(tmp_path / "direct") as ckpt:  # a non-finite state is never saved
        bad = jax.tree.map(np.array, _state())  # writable copies
        bad.params["Dense_0"]["bias"][3] = np.inf
        with pytest.raises(
            FloatingPointError, match=r"after step 7 has a NaN or Inf in .*Dense_0.*not saving"
        ):
            ckpt.save(7, bad)
        assert ckpt.all_steps() == []
