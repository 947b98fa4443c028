"""Evaluation: test metrics of parameters, of a saved run's checkpoint, and the checkpoint's
parameters read back.

    step, metrics = evaluate_checkpoint(get_model("cnn"), get_dataset("digits"), "runs/cnn-digits")
    metrics                                               # {"loss": ..., "accuracy": ...}
    step, state = restore_params(model, example_batch, "runs/cnn-digits")   # state.params

Every test example is counted once: batches are rounded up to a multiple of the devices and the
last one padded (``test_iterator``); the sums stay on device until the end (``evaluate``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxmodels.data.datasets import Dataset
from jaxmodels.kernels.common import round_up
from jaxmodels.nn.models import Model
from jaxmodels.training.batches import BatchIterator
from jaxmodels.training.parallel import SingleDevice, Strategy
from jaxmodels.training.rundir import checkpoint_dir
from jaxmodels.training.steps import TrainState, make_eval_step


def evaluate(
    eval_step: Callable, state: TrainState, iterator: BatchIterator, strategy: Strategy
) -> dict[str, float]:
    """Mean loss (and accuracy) of ``state`` over one pass of ``iterator``; sums stay on device
    until the end."""
    total = None
    for batch in iterator.epoch():
        sums = eval_step(state, strategy.put_batch(batch))
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    host = strategy.fetch(total)
    count = float(host.pop("count"))
    return {k: float(v) / count for k, v in host.items()}


def module_config(model: Model) -> dict:
    """The model's module fields (its dataclass fields but parent and name), as a checkpoint
    records them under "model_config" and a restore compares them."""
    module = model.module
    return {
        f.name: getattr(module, f.name)
        for f in dataclasses.fields(module)
        if f.name not in ("parent", "name")
    }


def check_task(model: Model, dataset: Dataset) -> None:
    """ValueError unless ``model`` does the task ``dataset`` has."""
    if model.task != dataset.task:
        raise ValueError(
            f"model {model.name!r} does the task {model.task!r}, dataset {dataset.name!r} {dataset.task!r}"
        )


def test_iterator(dataset: Dataset, batch_size: int, strategy: Strategy) -> BatchIterator:
    """One pass over the test split in order, every example once: batches of ``batch_size`` (at
    most the split) rounded up to a multiple of the devices so they split evenly, the last padded."""
    size = round_up(min(batch_size, len(dataset.x_test)), strategy.num_devices)
    return BatchIterator((dataset.x_test, dataset.y_test), size, shuffle=False, remainder="pad")


def restore_params(
    model: Model, example, workdir: str | Path, *, step: int | None = None, dataset: str = ""
) -> tuple[int, TrainState]:
    """``(step, state)``: the TrainState (params and rng; no optimizer state) of step ``step``
    (default: the latest readable one, falling back past corrupt ones) of workdir/checkpoints,
    read-only. ``example``: an input batch of the model (its shape and dtype check the restored
    parameters). The checkpoint must come from the same model and model config
    (``IncompatibleCheckpointError`` otherwise); ``dataset``, when given, is compared with the
    run's with a warning only."""
    from jaxmodels.training.checkpoint import Checkpoints
    from jaxmodels.training.compat import REQUIRED_FOR_EVAL, check_structure

    config = {"model": model.name, "task": model.task, "model_config": module_config(model)}
    config |= {"dataset": dataset} if dataset else {}
    with Checkpoints(checkpoint_dir(workdir), read_only=True) as checkpoints:
        restored = checkpoints.restore(
            step=step,
            config=config,
            required=REQUIRED_FOR_EVAL,
            preferred=("dataset",) if dataset else (),
        )
    params = restored.state["params"]
    target = jax.eval_shape(model.init, jax.random.key(0), example)["params"]
    check_structure(params, target, f"checkpoint step {restored.step} in {checkpoints.directory}")
    state = TrainState(jnp.asarray(restored.step, jnp.int32), params, None, restored.state["rng"])
    return restored.step, state


def evaluate_checkpoint(
    model: Model,
    dataset: Dataset,
    workdir: str | Path,
    *,
    step: int | None = None,
    batch_size: int = 512,
    strategy: Strategy | None = None,
) -> tuple[int, dict[str, float]]:
    """Test metrics of a checkpoint of the run in ``workdir``: ``(step, {"loss", "accuracy", ...})``.

    Restores it with ``restore_params`` (another data set of the same task is allowed, with a
    warning) and evaluates its parameters on ``dataset``'s test split (``evaluate_params``).
    """
    if dataset.x_test is None:
        raise ValueError(f"dataset {dataset.name!r} has no test split")
    check_task(model, dataset)
    step, state = restore_params(
        model, dataset.x_test[:1], workdir, step=step, dataset=dataset.name
    )
    return step, evaluate_params(
        model, dataset, state.params, batch_size=batch_size, strategy=strategy
    )


def evaluate_params(
    model: Model,
    dataset: Dataset,
    params: dict,
    *,
    batch_size: int = 512,
    strategy: Strategy | None = None,
) -> dict[str, float]:
    """Test metrics ({"loss", "accuracy", ...}) of ``model`` with ``params`` on ``dataset``'s test
    split, every example counted once (the last batch padded)."""
    strategy = strategy or SingleDevice()
    if dataset.x_test is None:
        raise ValueError(f"dataset {dataset.name!r} has no test split")
    state = TrainState(jnp.zeros((), jnp.int32), params, None, jnp.zeros((2,), jnp.uint32))
    test_it = test_iterator(dataset, batch_size, strategy)
    eval_step = strategy.compile(make_eval_step(model, axis_name=strategy.axis_name))
    return evaluate(eval_step, strategy.put_state(state), test_it, strategy)
