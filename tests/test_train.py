"""Training: optimizers and schedules, losses against numpy, jitted steps (no retrace, masks),
fit on digits (and MNIST when present), fit with a user's optax transformation (resumed bitwise).
The command line: tests/test_cli.py."""

import dataclasses
import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _paths import MNIST_DIR

from jaxmodels import get_model
from jaxmodels.data.datasets import get_dataset
from jaxmodels.training.batches import BatchIterator
from jaxmodels.training.compat import IncompatibleCheckpointError
from jaxmodels.training.evaluate import evaluate
from jaxmodels.training.fit import KERAS_CNN_MNIST, RECIPES, TrainConfig, fit, recipe
from jaxmodels.training.optim import (
    describe_transformation,
    make_optimizer,
    make_schedule,
    optax_promotion,
)
from jaxmodels.training.parallel import SingleDevice
from jaxmodels.training.rundir import RunFolderError, checkpoint_dir, saved_steps
from jaxmodels.training.steps import (
    TrainState,
    classification_loss,
    create_train_state,
    language_model_loss,
    make_eval_step,
    make_train_step,
    masked_mean,
    regression_loss,
)


@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits")


def _subset(ds, train, test):
    return dataclasses.replace(
        ds,
        x_train=ds.x_train[:train],
        y_train=ds.y_train[:train],
        x_test=ds.x_test[:test],
        y_test=ds.y_test[:test],
    )


def _quiet(**kw):
    return TrainConfig(progress=False, plot=False, **kw)


# ----------------------------------------------------------------------------------- optimizers


def test_schedules():
    constant = make_schedule(0.1)
    assert float(constant(0)) == pytest.approx(0.1) and float(constant(1000)) == pytest.approx(0.1)
    warm = make_schedule(0.1, "constant", warmup_steps=10)
    assert (
        float(warm(0)) == 0.0
        and float(warm(5)) == pytest.approx(0.05)
        and float(warm(50)) == pytest.approx(0.1)
    )
    cosine = make_schedule(0.1, "cosine", total_steps=100)
    assert float(cosine(0)) == pytest.approx(0.1) and float(cosine(50)) == pytest.approx(0.05)
    assert float(cosine(100)) == pytest.approx(0.0, abs=1e-7)
    wc = make_schedule(0.1, "warmup-cosine", warmup_steps=10, total_steps=110)
    assert (
        float(wc(0)) == 0.0
        and float(wc(10)) == pytest.approx(0.1)
        and float(wc(60)) == pytest.approx(0.05)
    )
    with pytest.raises(ValueError, match="needs total_steps > warmup_steps"):
        make_schedule(0.1, "cosine")
    with pytest.raises(ValueError, match=r"unknown schedule 'step'; expected one of \('constant'"):
        make_schedule(0.1, "step")


def test_recipes():
    """The seed CNN on MNIST: Adam with cosine decay by default (a run that ends at a low rate);
    the Keras example's recipe by name; other pairs take TrainConfig's defaults; overrides win."""
    keys = ("epochs", "batch_size", "lr", "optimizer", "schedule")
    as_tuple = lambda cfg: tuple(getattr(cfg, k) for k in keys)
    assert as_tuple(recipe("cnn", "mnist")) == (5, 64, 1e-3, "adam", "cosine")
    keras = recipe("cnn", "mnist", **KERAS_CNN_MNIST)
    assert as_tuple(keras) == (5, 64, 1e-3, "rmsprop", "constant")
    assert recipe("cnn", "digits") == TrainConfig()
    overridden = recipe("cnn", "mnist", seed=3, epochs=2)
    assert (overridden.seed, overridden.epochs, overridden.optimizer) == (3, 2, "adam")
    assert set(RECIPES) == {("cnn", "mnist")}


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "rmsprop"])
def test_optimizers_descend_a_quadratic(name):
    tx = make_optimizer(name, lr=0.05, clip_norm=10.0, weight_decay=1e-4)
    params = {"w": jnp.array([3.0, -2.0])}
    state = tx.init(params)
    loss = lambda p: jnp.sum(p["w"] ** 2)
    for _ in range(30):
        with optax_promotion():  # as the train step calls optax
            updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert float(loss(params)) < 13.0 * 0.5


def test_clip_by_global_norm_and_decoupled_weight_decay():
    grads = {"a": jnp.full((4,), 5.0)}  # global norm 10
    params = {"a": jnp.ones((4,))}
    tx = make_optimizer("sgd", lr=1.0, clip_norm=0.5)
    with optax_promotion():  # as the train step calls optax
        updates, _ = tx.update(grads, tx.init(params), params)
    assert float(optax.global_norm(updates)) == pytest.approx(0.5, rel=1e-5)
    zero = {"a": jnp.zeros((4,))}
    tx = make_optimizer("adamw", lr=0.1, weight_decay=0.01)
    with optax_promotion():
        updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["a"], -0.1 * 0.01 * np.ones(4), rtol=1e-5)
    with pytest.raises(
        ValueError, match=r"unknown optimizer 'lion'; expected one of \('adam', 'adamw', 'sgd'"
    ):
        make_optimizer("lion")


# --------------------------------------------------------------------------------------- losses


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_losses_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 4)).astype(np.float32)
    labels = np.array([0, 3, 1, 1, 2], np.int32)
    out = classification_loss(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(out["loss"], -_log_softmax(logits)[np.arange(5), labels], rtol=1e-5)
    np.testing.assert_array_equal(out["accuracy"], (logits.argmax(-1) == labels).astype(np.float32))

    preds, targets = (
        rng.normal(size=(5, 1)).astype(np.float32),
        rng.normal(size=(5,)).astype(np.float32),
    )
    np.testing.assert_allclose(
        regression_loss(jnp.asarray(preds), jnp.asarray(targets))["loss"],
        (preds[:, 0] - targets) ** 2,
        rtol=1e-5,
    )

    seq_logits = rng.normal(size=(2, 3, 6)).astype(np.float32)
    tokens = rng.integers(0, 6, (2, 3)).astype(np.int32)
    out = language_model_loss(jnp.asarray(seq_logits), jnp.asarray(tokens))
    nll = -np.take_along_axis(_log_softmax(seq_logits), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out["loss"], nll.mean(-1), rtol=1e-5)
    np.testing.assert_allclose(
        out["accuracy"], (seq_logits.argmax(-1) == tokens).mean(-1), rtol=1e-6
    )

    np.testing.assert_allclose(
        masked_mean(jnp.array([1.0, 2.0, 9.0]), jnp.array([1.0, 1.0, 0.0])), 1.5
    )
    with pytest.raises(
        ValueError, match=r"expected logits \[batch, classes\] and labels \[batch\]"
    ):
        classification_loss(jnp.zeros((5, 4)), jnp.zeros((4,), jnp.int32))


# ---------------------------------------------------------------------------------------- steps


def _setup(digits):
    model = get_model("cnn")
    tx = make_optimizer("adam", 1e-3)
    return model, tx, create_train_state(model, tx, digits.x_train[:2], seed=0)


def test_train_step_no_retrace_and_loss_goes_down(digits):
    model = get_model("cnn")
    schedule = make_schedule(3e-3, "warmup-cosine", warmup_steps=2, total_steps=20)
    tx = make_optimizer("adam", 3e-3, "warmup-cosine", warmup_steps=2, total_steps=20)
    state = create_train_state(model, tx, digits.x_train[:2], seed=0)
    step = jax.jit(chex.assert_max_traces(make_train_step(model, tx, schedule=schedule), n=1))
    it = BatchIterator((digits.x_train[:320], digits.y_train[:320]), 32, seed=0)
    losses = []
    for batch in list(it.epoch()) * 2:  # 20 steps, the same 10 batches twice
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert set(metrics) == {"loss", "accuracy", "grad_norm", "lr"}
    assert int(state.step) == 20 and np.isfinite(float(metrics["grad_norm"]))
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5]), losses
    chex.clear_trace_counter()


def test_padded_batch_equals_the_smaller_batch(digits):
    """Masked padding rows change nothing: one step on a padded batch = one step on the real rows."""
    model, tx, state = _setup(digits)
    step = jax.jit(make_train_step(model, tx))
    x, y = digits.x_train[:20], digits.y_train[:20]
    (padded,) = BatchIterator((x, y), 32, shuffle=False, remainder="pad").epoch()
    (kept,) = BatchIterator((x, y), 32, shuffle=False, remainder="keep").epoch()
    s_pad, m_pad = step(state, padded)
    s_keep, m_keep = step(state, kept)
    np.testing.assert_allclose(m_pad["loss"], m_keep["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_pad["grad_norm"], m_keep["grad_norm"], rtol=1e-5)
    # Adam's first step is about lr * sign(g): a gradient entry near zero whose last bits differ
    # between the two batch shapes (another summation order) moves by a fraction of lr = 1e-3.
    chex.assert_trees_all_close(s_pad.params, s_keep.params, atol=1e-5)

    eval_step = jax.jit(make_eval_step(model))
    test = BatchIterator(
        (digits.x_test, digits.y_test), 64, shuffle=False, remainder="pad"
    )  # 360 = 5*64 + 40
    got = evaluate(eval_step, state, test, SingleDevice())
    logits = model.apply({"params": state.params}, jnp.asarray(digits.x_test))
    want = classification_loss(logits, jnp.asarray(digits.y_test))
    assert got["loss"] == pytest.approx(float(want["loss"].mean()), rel=1e-5)
    assert got["accuracy"] == pytest.approx(float(want["accuracy"].mean()), abs=1e-7)


def test_train_state_is_a_pytree_and_bf16_compute_keeps_fp32_params(digits):
    model = get_model("cnn", dtype=jnp.bfloat16)
    tx = make_optimizer("adam", 1e-3)
    state = create_train_state(model, tx, digits.x_train[:2], seed=0)
    assert isinstance(state, TrainState) and state.rng.dtype == jnp.uint32
    leaves = jax.tree.leaves(state.params)
    assert sum(leaf.size for leaf in leaves) == 93_322
    (batch,) = BatchIterator((digits.x_train[:16], digits.y_train[:16]), 16).epoch()
    new, metrics = jax.jit(make_train_step(model, tx))(state, batch)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(new.params))
    assert np.isfinite(float(metrics["loss"])) and int(new.step) == 1
    np.testing.assert_array_equal(new.rng, state.rng)  # per-step keys are fold_in(rng, step)


# ------------------------------------------------------------------------------------------ fit


def test_fit_digits_reaches_a_sensible_accuracy_and_writes_the_run(digits, tmp_path):
    result = fit(
        get_model("cnn"), _subset(digits, 768, 360), TrainConfig(epochs=4, progress=False), tmp_path
    )
    assert result.test_metrics["accuracy"] >= 0.85, result.test_metrics
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert len(evals) == 4 and evals[-1]["accuracy"] == result.test_metrics["accuracy"]
    assert {"loss", "accuracy", "grad_norm", "lr", "examples_per_sec", "step", "epoch"} <= set(
        train_rows[1]
    )
    assert "first_step_s" in train_rows[0] and train_rows[-1]["step"] == 4 * (768 // 32)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert (
        config["model"] == "cnn"
        and config["dataset"] == "digits"
        and config["train"]["epochs"] == 4
    )
    assert (tmp_path / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert int(result.state.step) == 4 * 24


@pytest.mark.skipif(
    not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()
    and not (MNIST_DIR / "t10k-images-idx3-ubyte").is_file(),
    reason=f"MNIST test files not found in {MNIST_DIR.resolve()}",
)
def test_loss_goes_down_on_real_mnist(tmp_path):
    ds = get_dataset("mnist", data_dir=MNIST_DIR)
    # only the test split is shipped: train on its first 1,600 images, test on the next 400
    ds = dataclasses.replace(
        ds,
        x_train=ds.x_test[:1600],
        y_train=ds.y_test[:1600],
        x_test=ds.x_test[1600:2000],
        y_test=ds.y_test[1600:2000],
    )
    config = _quiet(epochs=1, batch_size=64, lr=3e-3, schedule="constant", log_every=5)
    result = fit(get_model("cnn"), ds, config, tmp_path)
    train_rows = [r for r in result.history if r["kind"] == "train"]
    assert train_rows[-1]["loss"] < 0.5 * train_rows[0]["loss"], train_rows
    assert result.test_metrics["accuracy"] > 0.7


def test_fit_errors(digits, tmp_path):
    with pytest.raises(
        ValueError, match="model 'lstm-regressor' does the task 'regression', dataset 'digits'"
    ):
        fit(get_model("lstm-regressor"), digits, _quiet(), tmp_path)
    with pytest.raises(ValueError, match="has no train split"):
        fit(
            get_model("cnn"),
            dataclasses.replace(digits, x_train=None, y_train=None),
            _quiet(),
            tmp_path,
        )
    with pytest.raises(ValueError, match="batch size 2000 is larger than the 1437 examples"):
        fit(get_model("cnn"), digits, _quiet(batch_size=2000), tmp_path)
    poisoned = _subset(digits, 64, 32)
    poisoned = dataclasses.replace(poisoned, x_train=np.full_like(poisoned.x_train, np.nan))
    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        fit(get_model("cnn"), poisoned, _quiet(epochs=1, batch_size=32), tmp_path)


def test_fit_never_mixes_two_runs_in_one_workdir(digits, tmp_path, capsys):
    """A fresh fit refuses a folder that holds a run (before any compilation); overwrite moves it
    aside whole; resume refuses a run of another model."""
    small = _subset(digits, 64, 32)
    fit(get_model("cnn"), small, _quiet(max_steps=2, checkpoint_every=1), tmp_path / "run")
    with pytest.raises(RunFolderError, match=r"already holds a run \(config.json, metrics.jsonl"):
        fit(get_model("cnn"), small, _quiet(max_steps=1), tmp_path / "run")
    fit(get_model("cnn"), small, _quiet(max_steps=1), tmp_path / "run", overwrite=True)
    (aside,) = tmp_path.glob("run.old-*")
    assert f"moved the run that was in {tmp_path / 'run'} to {aside}" in capsys.readouterr().out
    assert saved_steps(aside) == [1, 2] and saved_steps(tmp_path / "run") == [1]
    with pytest.raises(RunFolderError, match="holds a run of cnn on digits, not rnn-classifier"):
        fit(get_model("rnn-classifier"), small, _quiet(), tmp_path / "run", resume=True)


# ------------------------------------------------------------------ fit with an optax transformation


def _lion(lr=3e-3):
    """A user's optax chain, none of the named optimizers, with a schedule of its own."""
    schedule = optax.cosine_decay_schedule(lr, 12)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.lion(schedule, weight_decay=1e-4))


def test_fit_trains_with_an_optax_transformation_and_resumes_it_bitwise(digits, tmp_path):
    """Under the suite's strict dtype promotion too (tests/conftest.py)."""
    small = _subset(digits, 128, 32)  # 4 steps per epoch
    config = _quiet(epochs=3, checkpoint_every=4, keep=5, log_every=2)
    full = fit(get_model("cnn"), small, config, tmp_path / "full", optimizer=_lion())
    rows = [r for r in full.history if r["kind"] == "train"]
    assert rows[-1]["loss"] < rows[0]["loss"] and "lr" not in rows[-1]
    train = json.loads((tmp_path / "full" / "config.json").read_text())["train"]
    assert train["optimizer"].startswith("optax transformation ") and "lr" not in train

    shutil.copytree(tmp_path / "full", tmp_path / "run")
    shutil.rmtree(checkpoint_dir(tmp_path / "run") / "12")  # killed after step 8's checkpoint
    again = fit(get_model("cnn"), small, config, tmp_path / "run", resume=True, optimizer=_lion())
    chex.assert_trees_all_equal(again.state, full.state)
    assert again.test_metrics == full.test_metrics

    other = r"train.optimizer: saved 'optax transformation [0-9a-f]{16}', now"
    with pytest.raises(IncompatibleCheckpointError, match=other + r" 'optax transformation "):
        fit(get_model("cnn"), small, config, tmp_path / "run", resume=True, optimizer=_lion(1e-3))
    with pytest.raises(IncompatibleCheckpointError, match=other + " 'adam'"):
        fit(get_model("cnn"), small, config, tmp_path / "run", resume=True)


def test_describe_transformation_and_optimizer_errors(digits, tmp_path):
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros((2,))}
    first = describe_transformation(_lion(), params)
    assert first == describe_transformation(_lion(), params)  # built anew: the same
    assert first != describe_transformation(_lion(1e-3), params)
    masked = optax.masked(optax.sgd(0.1), {"w": True, "b": False})
    assert describe_transformation(masked, params) != describe_transformation(
        optax.sgd(0.1), params
    )
    with pytest.raises(
        TypeError, match=r"expected optimizer to be an optax\.GradientTransformation, got 'adam'"
    ):
        fit(get_model("cnn"), digits, _quiet(), tmp_path, optimizer="adam")
    with pytest.raises(
        ValueError,
        match=r"at their defaults with fit\(optimizer=...\), which replaces them; "
        r"got lr=0.01, schedule='constant'$",
    ):
        fit(
            get_model("cnn"),
            digits,
            _quiet(lr=1e-2, schedule="constant"),
            tmp_path,
            optimizer=_lion(),
        )
