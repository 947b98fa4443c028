"""Optimizers and learning-rate schedules by name, as optax transformations, and what a run
records of any optax transformation.

    tx = make_optimizer("adam", lr=1e-3, schedule="cosine", total_steps=1000, clip_norm=1.0)
    describe_transformation(optax.lion(1e-4), params)     # "optax transformation 5e1f..."

``OPTIMIZERS`` and ``SCHEDULES`` are the names the trainer and the command line accept; ``fit``
also takes any ``optax.GradientTransformation`` (``fit(..., optimizer=tx)``).
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np
import optax

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine", "warmup-cosine")


def optax_promotion():
    """The dtype promotion optax runs under: JAX's "standard", whatever the caller's
    ``jax_numpy_dtype_promotion``. optax mixes Python floats with its int32 step counts (adam's
    bias correction ``1 - b1 ** count``, the cosine schedule's ``pi * count / steps``), which
    "strict" rejects; under "standard" the context changes nothing. The steps
    (``jaxmodels.training.steps``) call every transformation's ``init`` and ``update`` and the
    schedule in it, so the model, losses and metrics stay under the caller's setting."""
    return jax.numpy_dtype_promotion("standard")


def make_schedule(
    lr: float, schedule: str = "constant", warmup_steps: int = 0, total_steps: int | None = None
) -> optax.Schedule:
    """Learning rate by step. "constant": ``lr`` (after a linear warm-up from 0 over
    ``warmup_steps`` when > 0); "cosine": cosine decay from ``lr`` to 0 over ``total_steps``;
    "warmup-cosine": linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to 0 at
    ``total_steps``.

    Examples:
      >>> schedule = make_schedule(1e-3, "warmup-cosine", warmup_steps=10, total_steps=100)
      >>> [round(float(schedule(step)), 6) for step in (0, 5, 10, 100)]
      [0.0, 0.0005, 0.001, 0.0]
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if lr <= 0 or warmup_steps < 0:
        raise ValueError(
            f"expected lr > 0 and warmup_steps >= 0, got lr={lr} warmup_steps={warmup_steps}"
        )
    if schedule == "constant":
        if warmup_steps == 0:
            return optax.constant_schedule(lr)
        warmup = optax.linear_schedule(0.0, lr, warmup_steps)
        return optax.join_schedules([warmup, optax.constant_schedule(lr)], [warmup_steps])
    if total_steps is None or total_steps <= warmup_steps:
        raise ValueError(
            f"schedule {schedule!r} needs total_steps > warmup_steps, got total_steps={total_steps} "
            f"warmup_steps={warmup_steps}"
        )
    if schedule == "cosine":
        return optax.cosine_decay_schedule(lr, total_steps)
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1), total_steps)


def make_optimizer(
    name: str = "adam",
    lr: float = 1e-3,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    clip_norm: float | None = None,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """An optax optimizer by name: "adam", "adamw" (decoupled ``weight_decay``), "sgd" (momentum
    0.9), "rmsprop" (decay 0.9, eps 1e-7 under the square root: Keras 3's RMSprop). For the others
    a ``weight_decay`` > 0 adds ``weight_decay * params`` to the gradients (L2).
    ``clip_norm`` clips the gradients' global norm first (``clip_by_global_norm``)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
    if weight_decay < 0 or (clip_norm is not None and clip_norm <= 0):
        raise ValueError(
            f"expected weight_decay >= 0 and clip_norm > 0, got {weight_decay} and {clip_norm}"
        )
    lr_fn = make_schedule(lr, schedule, warmup_steps, total_steps)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm is not None else []
    if name == "adamw":
        parts.append(optax.adamw(lr_fn, weight_decay=weight_decay))
    else:
        if weight_decay > 0:
            parts.append(optax.add_decayed_weights(weight_decay))
        parts.append(
            {
                "adam": lambda: optax.adam(lr_fn),
                "sgd": lambda: optax.sgd(lr_fn, momentum=0.9),
                "rmsprop": lambda: optax.rmsprop(lr_fn, decay=0.9, eps=1e-7),
            }[name]()
        )
    return optax.chain(*parts)


def describe_transformation(tx: optax.GradientTransformation, params) -> str:
    """What a run records of an optax transformation it did not build by name, so that a resume
    can tell it from another: "optax transformation <hash>", the sha256 of its update on
    ``params``' shapes and dtypes (the jaxpr of ``tx.update(grads, state, params)``, whose
    literals hold the hyperparameters, and the values of the arrays it closes over). The same
    transformation always gets the same description; another learning rate, schedule or chain
    another one, and so may a JAX release that traces the same optax code differently."""
    shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    with optax_promotion():
        state = jax.eval_shape(tx.init, shapes)
        closed = jax.make_jaxpr(tx.update)(shapes, state, shapes)
    digest = hashlib.sha256(str(closed.jaxpr).encode())
    for const in map(np.asarray, closed.consts):
        digest.update(f"{const.dtype}{const.shape}".encode() + const.tobytes())
    return f"optax transformation {digest.hexdigest()[:16]}"
