"""Resuming with changed options (``compat.REQUIRED`` / ``CONTINUES``): what changes the
function trained or the exact continuation refuses in one line naming each option, saved vs now;
bookkeeping and the run's length (with a constant schedule) continue, end bitwise equal to an
uninterrupted run, and config.json's "resumes" records each change with its step."""

import dataclasses
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import tree_leaves as jax_leaves

from jaxmodels import get_model
from jaxmodels.cli import main
from jaxmodels.data.datasets import get_dataset
from jaxmodels.training import rundir
from jaxmodels.training.checkpoint import Checkpoints
from jaxmodels.training.compat import IncompatibleCheckpointError, check_compatible, resume_changes
from jaxmodels.training.fit import TrainConfig, fit
from jaxmodels.training.rundir import checkpoint_dir


@pytest.fixture(scope="module")
def small():
    """256 train / 64 test digits: 8 steps per epoch at batch 32."""
    ds = get_dataset("digits")
    return dataclasses.replace(
        ds, x_train=ds.x_train[:256], y_train=ds.y_train[:256], x_test=ds.x_test[:64],
        y_test=ds.y_test[:64],
    )  # fmt: skip


def _quiet(**kw):
    return TrainConfig(**{"progress": False, "plot": False, "batch_size": 32, "epochs": 1, **kw})


def _assert_bitwise(a, b):
    for x, y in zip(jax_leaves(a), jax_leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _config(workdir) -> dict:
    return json.loads((workdir / "config.json").read_text())


@pytest.fixture(scope="module")
def saved(small, tmp_path_factory):
    """A 2-step run (cosine schedule) to resume with other options; a refused resume writes nothing."""
    workdir = tmp_path_factory.mktemp("saved")
    fit(get_model("cnn"), small, _quiet(max_steps=2), workdir)
    return workdir


def _refused(small, workdir, config, model=None, dataset=None) -> str:
    with pytest.raises(IncompatibleCheckpointError) as caught:
        fit(model or get_model("cnn"), dataset or small, config, workdir, resume=True)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------ refuses


def test_optimizer_and_data_stream_options_refuse_naming_each(small, saved):
    changed = dict(
        batch_size=16, lr=1e-2, optimizer="sgd", schedule="warmup-cosine", warmup_steps=1,
        clip_norm=1.0, weight_decay=1e-4, seed=1, remainder="pad",
    )  # fmt: skip
    message = _refused(small, saved, _quiet(max_steps=2, **changed))
    for option, now in changed.items():
        was = dataclasses.asdict(TrainConfig())[option]
        assert f"train.{option}: saved {was!r}, now {now!r}" in message
    assert "another --workdir" in message
    assert _config(saved)["train"]["lr"] == 1e-3 and "resumes" not in _config(saved)


@pytest.mark.parametrize("option", ["lr", "batch_size", "seed"])
def test_one_changed_option_refuses_alone(small, saved, option):
    now = {"lr": 3e-3, "batch_size": 16, "seed": 7}[option]
    message = _refused(small, saved, _quiet(max_steps=2, **{option: now}))
    assert message.count(": saved ") == 1 and f"train.{option}: saved" in message


def test_model_options_dtype_and_data_options_refuse(small, saved):
    message = _refused(small, saved, _quiet(max_steps=2), model=get_model("cnn", num_classes=12))
    assert "model_config: saved" in message and "'num_classes': 12" in message
    bf16 = get_model("cnn", dtype=jnp.bfloat16)
    assert "'dtype': 'bfloat16'" in _refused(small, saved, _quiet(max_steps=2), model=bf16)
    other = dataclasses.replace(small, options={**small.options, "test_size": 100})
    message = _refused(small, saved, _quiet(max_steps=2), dataset=other)
    assert "dataset_options.test_size: saved 360, now 100" in message


def test_longer_run_with_a_decaying_schedule_refuses(small, saved):
    """The cosine schedule spans total_steps: more epochs or steps change every later lr."""
    message = _refused(small, saved, _quiet(max_steps=4))
    assert "total_steps: saved 2, now 4 (the cosine schedule decays over total_steps" in message
    assert "max_steps" in message and message.count(": saved ") == 1


def test_cli_prints_the_refusal_in_one_line(tmp_path, capsys):
    workdir = tmp_path / "run"

    def train(max_steps, *extra):
        return main(
            ["train", "cnn", "--workdir", str(workdir), "--no-progress", "--batch-size", "16",
             "--schedule", "constant", "--max-steps", str(max_steps), *extra]
        )  # fmt: skip

    assert train(2) == 0
    capsys.readouterr()
    assert train(2, "--resume", "--lr", "0.01", "--seed", "3") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("jaxmodels: error: ") and "train.lr: saved 0.001, now 0.01" in err
    assert "train.seed: saved 0, now 3" in err
    assert "continue with --resume" not in err  # the CLI's tail after a failed run would mislead
    # a longer run at a constant learning rate continues, and says what changed
    assert train(3, "--resume") == 0
    out = capsys.readouterr().out
    assert "resumed from step 2" in out and "train.max_steps 2 -> 3" in out
    assert _config(workdir)["resumes"] == [
        {"step": 2, "changed": {"train.max_steps": [2, 3], "total_steps": [2, 3]}}
    ]


# ---------------------------------------------------------------------------------- continues


def test_bookkeeping_changes_continue_bitwise_and_are_recorded(small, tmp_path):
    config = _quiet(checkpoint_every=2, keep=5, log_every=2)  # the cosine schedule
    full = fit(get_model("cnn"), small, config, tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "run")
    for step in ("6", "8"):  # killed after step 4 was saved
        shutil.rmtree(checkpoint_dir(tmp_path / "run") / step)
    changed = dict(log_every=3, checkpoint_every=3, keep=2, eval_batch_size=16, plot=True)
    again = fit(get_model("cnn"), small, _quiet(**changed), tmp_path / "run", resume=True)
    _assert_bitwise(again.state, full.state)

    resumes = [
        {
            "step": 4,
            "changed": {
                "train.log_every": [2, 3],
                "train.checkpoint_every": [2, 3],
                "train.keep": [5, 2],
                "train.eval_batch_size": [512, 16],
                "train.plot": [False, True],
            },
        }
    ]
    written = _config(tmp_path / "run")
    assert written.pop("resumes") == resumes
    before = _config(tmp_path / "full")
    assert written.keys() == before.keys()  # config.json's keys and format otherwise kept
    assert {k: v for k, v in written.items() if k != "train"} == {
        k: v for k, v in before.items() if k != "train"
    }
    with Checkpoints(checkpoint_dir(tmp_path / "run"), read_only=True) as ckpt:
        assert ckpt.all_steps() == [6, 8]  # every 3 now, the latest 2 kept
        assert ckpt.restore().config["resumes"] == resumes  # the history travels with them

    # resumed again with the same options: nothing new to record
    fit(get_model("cnn"), small, _quiet(**changed), tmp_path / "run", resume=True)
    assert _config(tmp_path / "run")["resumes"] == resumes


def test_more_epochs_at_a_constant_lr_continue_like_one_longer_run(small, tmp_path):
    full = fit(get_model("cnn"), small, _quiet(epochs=2, schedule="constant"), tmp_path / "full")
    fit(get_model("cnn"), small, _quiet(max_steps=4, schedule="constant"), tmp_path / "run")
    longer = _quiet(epochs=2, schedule="constant")
    again = fit(get_model("cnn"), small, longer, tmp_path / "run", resume=True)
    _assert_bitwise(again.state, full.state)
    changed = {"train.epochs": [1, 2], "train.max_steps": [4, None], "total_steps": [4, 16]}
    assert _config(tmp_path / "run")["resumes"] == [{"step": 4, "changed": changed}]
    # and refused with the cosine schedule, whose length they set
    fit(get_model("cnn"), small, _quiet(), tmp_path / "cosine")
    message = _refused(small, tmp_path / "cosine", _quiet(epochs=2))
    assert "total_steps: saved 8, now 16 (the cosine schedule" in message


# ---------------------------------------------------------------------------------- the rules


def test_rules_for_older_checkpoints_moved_data_and_a_given_transformation():
    base = {"model": "cnn", "dataset": "mnist", "train": {"schedule": "cosine"}, "total_steps": 8}
    base |= {"dataset_options": {"data_dir": "/a", "seed": 0}, "model_options": {}}
    check_compatible({k: v for k, v in base.items() if "options" not in k}, base)  # older run
    moved = base | {"dataset_options": {"data_dir": "/b", "seed": 0}}
    check_compatible(base, moved)  # the data moved: its location is not compared ...
    assert resume_changes(base, moved) == {"dataset_options.data_dir": ["/a", "/b"]}  # ... but kept
    with pytest.raises(IncompatibleCheckpointError, match=r"dataset_options.seed: saved 0, now 1"):
        check_compatible(base, base | {"dataset_options": {"data_dir": "/a", "seed": 1}})
    given = {"train": {"optimizer": "optax transformation 5e1f"}, "total_steps": 8}
    check_compatible(given, given | {"total_steps": 16})  # its description fixes its schedule
    base |= {"strategy": "single", "devices": ["cpu:0"], "versions": {"jax": "8"}}
    where = base | {"strategy": "sharded", "devices": ["gpu:0"], "versions": {"jax": "9"}}
    check_compatible(base, where)  # where it runs is not the run: continued, recorded
    assert set(resume_changes(base, where)) == {"strategy", "devices", "versions"}
    assert rundir.record_resume({"a": 1}, {}, 3, {}) == {"a": 1}
    record = rundir.record_resume(
        {"a": 1}, {"resumes": [{"step": 1, "changed": {}}]}, 3, {"x": [1, 2]}
    )
    assert record == {
        "a": 1,
        "resumes": [{"step": 1, "changed": {}}, {"step": 3, "changed": {"x": [1, 2]}}],
    }
