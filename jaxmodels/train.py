"""Training: TrainState, optimizers, per-task losses, jitted train/eval steps and ``fit``.

    >>> model, ds = get_model("cnn"), get_dataset("digits")
    >>> result = fit(model, ds, TrainConfig(epochs=10), "runs/cnn-digits")
    >>> result.test_metrics                                   # {"loss": ..., "accuracy": ...}

The trainer knows a model only through ``init`` / ``apply`` and ``task``. Steps are pure functions
``(state, batch) -> (state, metrics)``; a ``Strategy`` decides how they are compiled and where
state and batches live (``SingleDevice`` here: ``jax.jit`` on one device). A data-parallel strategy
makes the same step reduce over its device axis by passing ``axis_name``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodels.data import BatchIterator, Dataset
from jaxmodels.models import Model
from jaxmodels.records import json_default

Array = jax.Array
Batch = dict[str, Array]  # {"x": [batch, ...], "y": [batch, ...], "mask": [batch]}

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine", "warmup-cosine")


# ---------------------------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes; a pytree (so it jits, shards and checkpoints).

    step: [] int32, optimizer steps taken. params: the model's "params" collection.
    opt_state: the optax state. rng: [2] uint32 raw key data (``jax.random.key_data``); the step
    draws ``fold_in(rng, step)`` so a run is reproducible from (seed, step) alone.
    collections: the model's other variable collections (e.g. "batch_stats"), updated by
    ``apply(..., mutable=...)`` in training steps; empty for the current models.
    """

    step: Array
    params: Any
    opt_state: Any
    rng: Array
    collections: dict = flax.struct.field(default_factory=dict)


def create_train_state(
    model: Model, tx: optax.GradientTransformation, example_x: Array, seed: int
) -> TrainState:
    """Initialise ``model`` on ``example_x`` [batch, ...] and ``tx`` on its parameters."""
    init_key, train_key = jax.random.split(jax.random.key(seed))
    variables = dict(model.init(init_key, example_x))
    params = variables.pop("params")
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(train_key),
        collections=variables,
    )


# ----------------------------------------------------------------------------------- optimizers


def _standard_promotion(fn: Callable) -> Callable:
    """``fn`` traced under standard dtype promotion. optax's internals mix Python floats with int32
    step counts (e.g. adam's bias correction ``b1 ** count``), which strict promotion rejects;
    our own code stays under whatever promotion mode the caller chose."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.numpy_dtype_promotion("standard"):
            return fn(*args, **kwargs)

    return wrapped


def make_schedule(
    lr: float, schedule: str = "constant", warmup_steps: int = 0, total_steps: int | None = None
) -> optax.Schedule:
    """Learning rate by step. "constant": ``lr`` (after a linear warm-up from 0 over
    ``warmup_steps`` when > 0); "cosine": cosine decay from ``lr`` to 0 over ``total_steps``;
    "warmup-cosine": linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to 0 at
    ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if lr <= 0 or warmup_steps < 0:
        raise ValueError(
            f"expected lr > 0 and warmup_steps >= 0, got lr={lr} warmup_steps={warmup_steps}"
        )
    if schedule == "constant":
        if warmup_steps == 0:
            return _standard_promotion(optax.constant_schedule(lr))
        warmup = optax.linear_schedule(0.0, lr, warmup_steps)
        return _standard_promotion(
            optax.join_schedules([warmup, optax.constant_schedule(lr)], [warmup_steps])
        )
    if total_steps is None or total_steps <= warmup_steps:
        raise ValueError(
            f"schedule {schedule!r} needs total_steps > warmup_steps, got total_steps={total_steps} "
            f"warmup_steps={warmup_steps}"
        )
    if schedule == "cosine":
        return _standard_promotion(optax.cosine_decay_schedule(lr, total_steps))
    return _standard_promotion(
        optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1), total_steps)
    )


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
    0.9), "rmsprop". For the others a ``weight_decay`` > 0 adds ``weight_decay * params`` to the
    gradients (L2). ``clip_norm`` clips the gradients' global norm first (``clip_by_global_norm``)."""
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
                "rmsprop": lambda: optax.rmsprop(lr_fn),
            }[name]()
        )
    tx = optax.chain(*parts)
    return optax.GradientTransformation(
        _standard_promotion(tx.init), _standard_promotion(tx.update)
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

    metrics: "loss" and "accuracy" (mask-weighted means over the batch), "grad_norm" (global norm
    before clipping), "lr" when ``schedule`` is given. With ``axis_name`` the step runs under a
    named device axis (pmap / shard_map) and averages gradients, metrics and collections over it.
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
        mutable = list(state.collections)

        def loss_of(params):
            variables = {"params": params, **state.collections}
            if mutable:
                outputs, new_collections = model.apply(
                    variables, batch["x"], train=True, rng=rng, mutable=mutable
                )
            else:
                outputs, new_collections = (
                    model.apply(variables, batch["x"], train=True, rng=rng),
                    {},
                )
            per_example = loss_fn(outputs, batch["y"])
            return mean(per_example["loss"]), (per_example, new_collections)

        (loss, (per_example, collections)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state.params
        )
        metrics = {k: mean(v) for k, v in per_example.items() if k != "loss"}
        metrics["loss"] = loss
        if axis_name is not None:
            grads, metrics, collections = jax.lax.pmean((grads, metrics, collections), axis_name)
        metrics["grad_norm"] = optax.tree.norm(grads)
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            collections=dict(collections),
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
        outputs = model.apply(
            {"params": state.params, **state.collections}, batch["x"], train=False
        )
        sums = {k: jnp.sum(v * batch["mask"]) for k, v in loss_fn(outputs, batch["y"]).items()}
        sums["count"] = jnp.sum(batch["mask"])
        return jax.lax.psum(sums, axis_name) if axis_name is not None else sums

    return step


# ------------------------------------------------------------------------------------- strategy


class Strategy(Protocol):
    """How steps run on devices. ``axis_name``: the device axis steps reduce over (None: none).
    ``compile`` turns a pure step into a runnable one; ``put_state`` / ``put_batch`` place host
    values (a global batch [batch, ...]) where compiled steps expect them; ``fetch`` brings
    results (metrics, state) back to the host as numpy, one copy."""

    name: str
    axis_name: str | None
    num_devices: int  # a global batch must divide by it

    def compile(self, fn: Callable, *, donate_state: bool = False) -> Callable: ...
    def put_state(self, state: TrainState) -> TrainState: ...
    def put_batch(self, batch: dict[str, np.ndarray]) -> Batch: ...
    def fetch(self, tree: Any) -> Any: ...


@dataclasses.dataclass(frozen=True)
class SingleDevice:
    """``jax.jit`` on one device (the default device unless ``device`` is given)."""

    device: Any = None
    name: str = "single"
    axis_name: str | None = None
    num_devices: int = 1

    def _device(self):
        return self.device if self.device is not None else jax.devices()[0]

    def compile(self, fn: Callable, *, donate_state: bool = False) -> Callable:
        return jax.jit(fn, donate_argnums=(0,) if donate_state else ())

    def put_state(self, state: TrainState) -> TrainState:
        return jax.device_put(state, self._device())

    def put_batch(self, batch: dict[str, np.ndarray]) -> Batch:
        return jax.device_put(batch, self._device())

    def fetch(self, tree: Any) -> Any:
        return jax.device_get(tree)


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


# -------------------------------------------------------------------------------------------- fit


@dataclasses.dataclass
class TrainConfig:
    """Settings of one ``fit``. ``remainder``: the train iterator's policy (see ``BatchIterator``);
    evaluation always pads, so every test example counts once. ``log_every``: steps per metrics
    row and progress update. ``max_steps``: stop early after that many steps (None: all epochs).
    ``checkpoint``: save checkpoints to WORKDIR/checkpoints every ``checkpoint_every`` steps (None:
    none on the way) and after the last step, keeping the latest ``keep`` (``jaxmodels.checkpoint``)."""

    epochs: int = 25
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    schedule: str = "cosine"
    warmup_steps: int = 0
    clip_norm: float | None = None
    weight_decay: float = 0.0
    seed: int = 0
    remainder: str = "drop"
    eval_batch_size: int = 512
    log_every: int = 10
    max_steps: int | None = None
    progress: bool = True
    plot: bool = True
    checkpoint: bool = True
    checkpoint_every: int | None = None
    keep: int = 3


@dataclasses.dataclass
class FitResult:
    """state: the final TrainState (on the host). history: every metrics row written.
    test_metrics: the last evaluation ({} without a test split)."""

    state: TrainState
    history: list[dict]
    test_metrics: dict[str, float]


def _module_config(model: Model) -> dict:
    module = model.module
    return {
        f.name: getattr(module, f.name)
        for f in dataclasses.fields(module)
        if f.name not in ("parent", "name")
    }


def fit(
    model: Model,
    dataset: Dataset,
    config: TrainConfig | dict | None = None,
    workdir: str | Path = "runs/latest",
    *,
    strategy: Strategy | None = None,
    resume: bool = False,
) -> FitResult:
    """Train ``model`` on ``dataset``'s train split for ``config.epochs`` epochs, evaluating on the
    test split after each epoch.

    Writes to ``workdir``: config.json (model, dataset, model and train settings, versions),
    metrics.jsonl (one JSON row per line, started afresh: "train" rows every ``log_every`` steps
    with loss, accuracy, grad_norm, lr, examples_per_sec; "eval" rows per epoch with test loss and
    accuracy) and learning_curves.png.

    Checkpoints (``config.checkpoint``) go to workdir/checkpoints. ``resume``: continue from the
    latest readable checkpoint there (state, data position, RNG), so that the run ends with
    exactly the parameters of an uninterrupted one; metrics.jsonl keeps its rows up to that step
    and is appended to. No checkpoint yet: a fresh start. A checkpoint of a different run (model,
    data set, optimizer, ...) raises ``IncompatibleCheckpointError``.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig(**(config or {}))
    if strategy is None:  # "sharded" over all devices when there are several, else "single"
        from jaxmodels.parallel import get_strategy

        strategy = get_strategy()
    if model.task != dataset.task:
        raise ValueError(
            f"model {model.name!r} does the task {model.task!r}, dataset {dataset.name!r} {dataset.task!r}"
        )
    if dataset.x_train is None:
        raise ValueError(f"dataset {dataset.name!r} has no train split")
    if cfg.epochs < 1 or cfg.log_every < 1:
        raise ValueError(
            f"expected epochs >= 1 and log_every >= 1, got {cfg.epochs} and {cfg.log_every}"
        )
    train_it = BatchIterator(
        (dataset.x_train, dataset.y_train), cfg.batch_size, seed=cfg.seed, remainder=cfg.remainder
    )
    test_it = None
    if dataset.x_test is not None:
        eval_bs = min(cfg.eval_batch_size, len(dataset.x_test))
        eval_bs = (
            -(-eval_bs // strategy.num_devices) * strategy.num_devices
        )  # padded, so splits evenly
        test_it = BatchIterator(
            (dataset.x_test, dataset.y_test), eval_bs, shuffle=False, remainder="pad"
        )
    total_steps = cfg.epochs * train_it.steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    opt_args = (cfg.lr, cfg.schedule, cfg.warmup_steps, total_steps)
    tx = make_optimizer(
        cfg.optimizer, *opt_args, clip_norm=cfg.clip_norm, weight_decay=cfg.weight_decay
    )
    schedule = make_schedule(*opt_args)
    state = create_train_state(model, tx, dataset.x_train[: cfg.batch_size], cfg.seed)
    train_step = make_train_step(model, tx, schedule=schedule, axis_name=strategy.axis_name)
    train_step = strategy.compile(train_step, donate_state=True)
    eval_step = strategy.compile(make_eval_step(model, axis_name=strategy.axis_name))

    run_config = {
        "model": model.name,
        "task": model.task,
        "dataset": dataset.name,
        "model_config": _module_config(model),
        "train": dataclasses.asdict(cfg),
        "strategy": strategy.name,
        "total_steps": total_steps,
        "versions": {"jax": jax.__version__, "optax": optax.__version__, "flax": flax.__version__},
        "devices": [str(d) for d in jax.devices()],
    }
    checkpoints, restored = _open_checkpoints(cfg, workdir, resume, state, run_config)
    if restored is not None:
        state = restored.state
        train_it.restore(restored.position)
    state = strategy.put_state(state)
    start_step = restored.step if restored is not None else 0
    lead = jax.process_index() == 0  # the one process that writes files and prints
    writer = _RunWriter(Path(workdir), enabled=lead, keep_until=start_step if restored else None)
    writer.save_config(run_config)
    test_metrics: dict[str, float] = {}
    t0, step, window = time.perf_counter(), start_step, _Window()
    with _progress(cfg.progress and lead) as progress, _closing(checkpoints):
        task = progress.add_task("train", total=total_steps, completed=step, loss="-")
        for epoch in range(train_it.position.epoch + 1, cfg.epochs + 1):
            if step >= total_steps:  # resumed from the last checkpoint of a finished run
                break
            progress.update(task, description=f"epoch {epoch}/{cfg.epochs}")
            for batch in train_it.epoch():
                state, metrics = train_step(state, strategy.put_batch(batch))
                step += 1
                window.add(metrics, int(batch["mask"].sum()), first=step == start_step + 1)
                if step % cfg.log_every == 0 or step == total_steps or train_it.position.step == 0:
                    row = window.row(strategy.fetch, epoch, step, t0)
                    writer.log(row)
                    progress.update(task, completed=step, loss=f"{row['loss']:.4f}")
                if cfg.checkpoint and checkpoints.should_save(step, final=step == total_steps):
                    window.check_finite(strategy.fetch, step)  # never save a diverged state
                    checkpoints.save(
                        step, strategy.fetch(state), position=train_it.position, config=run_config
                    )
                if step == total_steps:
                    break
            if test_it is not None:
                start = time.perf_counter()
                test_metrics = evaluate(eval_step, state, test_it, strategy)
                now = time.perf_counter()
                writer.log(
                    {
                        "kind": "eval",
                        "epoch": epoch,
                        "step": step,
                        **test_metrics,
                        "time_s": now - t0,
                        "eval_time_s": now - start,
                    }
                )
                shown = "  ".join(f"{k} {v:.4f}" for k, v in test_metrics.items())
                if lead:
                    progress.console.print(f"epoch {epoch}/{cfg.epochs}  step {step}  test {shown}")
            if step == total_steps:
                break
    if test_it is not None and not test_metrics:  # resumed after the last step: evaluate once
        test_metrics = evaluate(eval_step, state, test_it, strategy)
    if cfg.plot:
        writer.plot()
    return FitResult(strategy.fetch(state), writer.history, test_metrics)


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

    Restores step ``step`` (default: the latest readable one, falling back past corrupt ones) of
    workdir/checkpoints, read-only, and evaluates its parameters and collections on ``dataset``'s
    test split. The checkpoint must come from the same model and model config
    (``IncompatibleCheckpointError`` otherwise); another data set of the same task is allowed.
    """
    from jaxmodels.checkpoint import REQUIRED_FOR_EVAL, Checkpoints, check_structure, checkpoint_dir

    strategy = strategy or SingleDevice()
    if dataset.x_test is None:
        raise ValueError(f"dataset {dataset.name!r} has no test split")
    if model.task != dataset.task:
        raise ValueError(
            f"model {model.name!r} does the task {model.task!r}, dataset {dataset.name!r} {dataset.task!r}"
        )
    config = {
        "model": model.name,
        "task": model.task,
        "dataset": dataset.name,
        "model_config": _module_config(model),
    }
    with Checkpoints(checkpoint_dir(workdir), read_only=True) as checkpoints:
        restored = checkpoints.restore(
            step=step, config=config, required=REQUIRED_FOR_EVAL, preferred=("dataset",)
        )
    variables = dict(jax.eval_shape(model.init, jax.random.key(0), dataset.x_test[:1]))
    saved = {
        "params": restored.state["params"],
        "collections": restored.state.get("collections") or {},
    }
    target = {"params": variables.pop("params"), "collections": variables}
    check_structure(saved, target, f"checkpoint step {restored.step} in {checkpoints.directory}")
    state = TrainState(
        jnp.asarray(restored.step, jnp.int32),
        saved["params"],
        None,
        restored.state["rng"],
        saved["collections"],
    )
    eval_bs = min(batch_size, len(dataset.x_test))
    eval_bs = -(-eval_bs // strategy.num_devices) * strategy.num_devices
    test_it = BatchIterator(
        (dataset.x_test, dataset.y_test), eval_bs, shuffle=False, remainder="pad"
    )
    eval_step = strategy.compile(make_eval_step(model, axis_name=strategy.axis_name))
    return restored.step, evaluate(eval_step, strategy.put_state(state), test_it, strategy)


def _open_checkpoints(
    cfg: TrainConfig, workdir, resume: bool, template: TrainState, run_config: dict
):
    """The run's ``Checkpoints`` (None when it neither saves nor resumes) and, with ``resume``, the
    latest readable checkpoint restored as host arrays in ``template``'s structure (None when there
    is none yet); the caller places it with its strategy's ``put_state``, on however many devices."""
    if not (cfg.checkpoint or resume):
        return None, None
    from jaxmodels.checkpoint import Checkpoints, checkpoint_dir

    checkpoints = Checkpoints(checkpoint_dir(workdir), every=cfg.checkpoint_every, keep=cfg.keep)
    if not resume or checkpoints.latest_step() is None:
        return checkpoints, None
    try:
        return checkpoints, checkpoints.restore(jax.device_get(template), config=run_config)
    except BaseException:
        checkpoints.close()
        raise


@contextlib.contextmanager
def _closing(checkpoints):
    """Waits for pending checkpoint saves on the way out, also after an error; a non-finite loss
    names the last good checkpoint."""
    try:
        yield
    except FloatingPointError as err:
        if checkpoints is None or "last good checkpoint" in str(err):
            raise
        checkpoints.wait()
        latest = checkpoints.latest_step()
        where = f"step {latest} in {checkpoints.directory}" if latest is not None else "none"
        raise FloatingPointError(f"{err}; the last good checkpoint is {where}") from None
    finally:
        if checkpoints is not None:
            checkpoints.close()


class _Window:
    """Step metrics since the last "train" row, and the examples/s over them. The run's first step
    (which compiles) is timed apart, as first_step_s, and left out of the throughput."""

    def __init__(self):
        self.metrics, self.examples, self.start, self.first_step_s = (
            [],
            0,
            time.perf_counter(),
            None,
        )

    def __len__(self) -> int:
        return len(self.metrics)

    def add(self, metrics: dict, examples: int, *, first: bool = False) -> None:
        self.metrics.append(metrics)
        if first:
            jax.block_until_ready(metrics)
            now = time.perf_counter()
            self.first_step_s, self.start = now - self.start, now
        else:
            self.examples += examples

    def check_finite(self, fetch: Callable, step: int) -> None:
        """Raise FloatingPointError naming the step if a loss since the last row is not finite."""
        if self.metrics:
            _summarise(fetch(self.metrics), step - len(self.metrics) + 1)

    def row(self, fetch: Callable, epoch: int, step: int, t0: float) -> dict:
        """The "train" row of this window (``t0``: the run's start); empties the window."""
        means = _summarise(
            fetch(self.metrics), step - len(self.metrics) + 1
        )  # fetch waits for the steps
        now = time.perf_counter()
        row = {"kind": "train", "epoch": epoch, "step": step, **means, "time_s": now - t0}
        if self.examples:
            row["examples_per_sec"] = self.examples / (now - self.start)
        if self.first_step_s is not None:
            row["first_step_s"] = self.first_step_s  # includes compilation
        self.metrics, self.examples, self.start, self.first_step_s = [], 0, now, None
        return row


def _summarise(window: list[dict], first_step: int) -> dict:
    """Means of host metrics over a window of steps; a non-finite loss stops the run."""
    losses = np.array([m["loss"] for m in window])
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        raise FloatingPointError(
            f"loss is {losses[bad[0]]} at step {first_step + int(bad[0])}; stopping"
        )
    return {k: float(np.mean([m[k] for m in window])) for k in window[0]}


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


class _RunWriter:
    """config.json, metrics.jsonl and learning_curves.png in a work folder (only when ``enabled``:
    on process 0)."""

    def __init__(self, workdir: Path, enabled: bool = True, keep_until: int | None = None):
        self.workdir, self.enabled, self.history = workdir, enabled, []
        if enabled:
            workdir.mkdir(parents=True, exist_ok=True)
            path = workdir / "metrics.jsonl"
            if keep_until is not None and path.exists():  # a resumed run: rows up to its step stay
                self.history = [r for r in _read_rows(path) if r.get("step", 0) <= keep_until]
            path.write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def save_config(self, config: dict) -> None:
        if self.enabled:
            (self.workdir / "config.json").write_text(
                json.dumps(config, indent=2, default=json_default) + "\n"
            )

    def log(self, row: dict) -> None:
        self.history.append(row)
        if self.enabled:
            with open(self.workdir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def plot(self) -> None:
        """Loss (and accuracy) against step, train rows and eval rows, in learning_curves.png."""
        if not self.enabled:
            return
        from matplotlib.figure import Figure  # no pyplot: no global backend, renders with Agg

        names = ["loss"] + (["accuracy"] if any("accuracy" in r for r in self.history) else [])
        fig = Figure(figsize=(5 * len(names), 4), layout="constrained")
        for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
            for kind, style, label in (("train", "-", "train"), ("eval", "o-", "test")):
                rows = [r for r in self.history if r["kind"] == kind and name in r]
                ax.plot([r["step"] for r in rows], [r[name] for r in rows], style, label=label)
            ax.set(
                xlabel="step", ylabel=name, title=name, yscale="log" if name == "loss" else "linear"
            )
            ax.grid(alpha=0.3)
            ax.legend()
        fig.savefig(self.workdir / "learning_curves.png", dpi=100)


def _read_rows(path: Path) -> list[dict]:
    """The JSON rows of a metrics.jsonl; a line cut short by a killed run is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
