"""Pure training and evaluation steps: the state they carry, the per-task losses, the steps.

    state = create_train_state(model, tx, example_x, seed=0)
    step = jax.jit(make_train_step(model, tx))
    state, metrics = step(state, {"x": x, "y": y, "mask": mask})   # metrics: loss, accuracy, ...

Steps are pure functions ``(state, batch) -> (state, metrics)`` that know a model only through
``init`` / ``apply`` and ``task``; how they are compiled and where state and batches live is a
strategy's business (``jaxmodels.training.parallel``). A data-parallel strategy makes the same step reduce
over its device axis by passing ``axis_name``. The optimizer is any optax transformation; its
``init`` and ``update`` run under optax's dtype promotion (``jaxmodels.training.optim.optax_promotion``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxmodels.nn.models import Model
from jaxmodels.training.optim import optax_promotion

Array = jax.Array
Batch = dict[str, Array]  # {"x": [batch, ...], "y": [batch, ...], "mask": [batch]}


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes; a pytree (so it jits, shards and checkpoints).

    step: [] int32, optimizer steps taken. params: the model's "params" collection.
    opt_state: the optax state. rng: [2] uint32 raw key data (``jax.random.key_data``); the step
    draws ``fold_in(rng, step)`` so a run is reproducible from (seed, step) alone.
    """

    step: Array
    params: Any
    opt_state: Any
    rng: Array


def create_train_state(
    model: Model, tx: optax.GradientTransformation, example_x: Array, seed: int
) -> TrainState:
    """Initialise ``model`` on ``example_x`` [batch, ...] and ``tx`` on its parameters (step 0)."""
    init_key, train_key = jax.random.split(jax.random.key(seed))
    variables = dict(model.init(init_key, example_x))
    params = variables.pop("params")
    if variables:
        raise ValueError(
            f"model {model.name!r} has variable collections besides 'params' ({sorted(variables)}); "
            "the trainer supports models whose only variables are parameters"
        )
    with optax_promotion():
        opt_state = tx.init(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=opt_state,
        rng=jax.random.key_data(train_key),
    )


# --------------------------------------------------------------------------------------- losses
# Each loss maps (outputs, targets) to per-example values [batch]: "loss", and "accuracy" where it
# applies. Steps average them with the batch mask, so padded examples never count.


def classification_loss(logits: Array, labels: Array) -> dict[str, Array]:
    """Softmax cross-entropy. logits [batch, classes], labels [batch] integers -> [batch] each."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [batch, classes] and labels [batch], got {logits.shape} and {labels.shape}"
        )
    logits, labels = logits.astype(jnp.float32), labels.astype(jnp.int32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return {"loss": loss, "accuracy": correct}


def regression_loss(preds: Array, targets: Array) -> dict[str, Array]:
    """Mean squared error over outputs. preds [batch, outputs], targets [batch, outputs] (or
    [batch] when outputs == 1) -> loss [batch]."""
    targets = targets.reshape(preds.shape).astype(jnp.float32)
    return {"loss": jnp.mean(jnp.square(preds.astype(jnp.float32) - targets), axis=-1)}


def language_model_loss(logits: Array, targets: Array) -> dict[str, Array]:
    """Per-token cross-entropy and accuracy, averaged over time. logits [batch, time, vocab],
    targets [batch, time] integers -> [batch] each."""
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [batch, time, vocab] and targets [batch, time], got {logits.shape} and {targets.shape}"
        )
    logits, targets = logits.astype(jnp.float32), targets.astype(jnp.int32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {"loss": jnp.mean(loss, axis=-1), "accuracy": jnp.mean(correct, axis=-1)}


LOSSES: dict[str, Callable[[Array, Array], dict[str, Array]]] = {
    "classification": classification_loss,
    "regression": regression_loss,
    "language_model": language_model_loss,
}


def masked_mean(values: Array, mask: Array) -> Array:
    """sum(values * mask) / sum(mask) for values and mask [batch] (0 when the mask is all zero)."""
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _shard_masked_mean(values: Array, mask: Array, axis_name: str) -> Array:
    """One device's share of the global masked mean: sum(values * mask) / pmean(sum(mask)), so that
    pmean over ``axis_name`` of the shares = sum over devices of sum(values * mask) / global count."""
    count = jax.lax.pmean(jnp.sum(mask), axis_name)
    return jnp.sum(values * mask) / jnp.where(count > 0, count, 1.0)


# ---------------------------------------------------------------------------------------- steps


def make_train_step(
    model: Model,
    tx: optax.GradientTransformation,
    loss_fn: Callable | None = None,
    *,
    schedule: optax.Schedule | None = None,
    axis_name: str | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
    """A pure (not yet compiled) step ``(state, batch) -> (state, metrics)``.

    params <- params + u, where (u, opt_state) = tx.update(g, opt_state, params) and g is the
    gradient of the batch's mask-weighted mean loss. metrics: "loss" and "accuracy"
    (mask-weighted means over the batch), "grad_norm" (``|g|``, the global norm before any clipping
    in ``tx``), "lr" = ``schedule(step)`` when ``schedule`` is given. With ``axis_name`` the step runs under a
    named device axis (pmap / shard_map) and averages gradients and metrics over it.
    """
    loss_fn = loss_fn or LOSSES[model.task]

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Array]]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        mean = functools.partial(masked_mean, mask=batch["mask"])
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
            # Each device divides its masked sum by the devices' mean count, so the pmean below is
            # the global batch's mask-weighted mean even when padding is uneven across devices.
            mean = functools.partial(_shard_masked_mean, mask=batch["mask"], axis_name=axis_name)

        def loss_of(params):
            outputs = model.apply({"params": params}, batch["x"], train=True, rng=rng)
            per_example = loss_fn(outputs, batch["y"])
            return mean(per_example["loss"]), per_example

        (loss, per_example), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        metrics = {k: mean(v) for k, v in per_example.items() if k != "loss"}
        metrics["loss"] = loss
        if axis_name is not None:
            grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
        metrics["grad_norm"] = optax.tree.norm(grads)
        with optax_promotion():
            if schedule is not None:
                metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        )
        return new_state, metrics

    return step


def make_eval_step(
    model: Model, loss_fn: Callable | None = None, *, axis_name: str | None = None
) -> Callable[[TrainState, Batch], dict[str, Array]]:
    """A pure step ``(state, batch) -> sums``: mask-weighted sums of the per-example losses and
    accuracies, and "count" (sum of the mask), so that sums over batches (and devices, with
    ``axis_name``) divided by the count give exact means however the data was padded."""
    loss_fn = loss_fn or LOSSES[model.task]

    def step(state: TrainState, batch: Batch) -> dict[str, Array]:
        outputs = model.apply({"params": state.params}, batch["x"], train=False)
        sums = {k: jnp.sum(v * batch["mask"]) for k, v in loss_fn(outputs, batch["y"]).items()}
        sums["count"] = jnp.sum(batch["mask"])
        return jax.lax.psum(sums, axis_name) if axis_name is not None else sums

    return step
