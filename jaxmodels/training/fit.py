"""Training: ``fit`` a model on a data set, and evaluate a saved run's checkpoint.

    >>> model, ds = get_model("cnn"), get_dataset("digits")
    >>> result = fit(model, ds, TrainConfig(epochs=10), "runs/cnn-digits")
    >>> result.test_metrics                                   # {"loss": ..., "accuracy": ...}

``fit`` builds the optimizer (``jaxmodels.training.optim``) and the pure steps (``jaxmodels.training.steps``), runs
them under a strategy (``jaxmodels.training.parallel``; one device by default), saves and resumes
checkpoints (``jaxmodels.training.checkpoint``) and writes the run's log (``jaxmodels.training.runlog``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxmodels.data.datasets import Dataset
from jaxmodels.nn.models import Model, options_of
from jaxmodels.records import version
from jaxmodels.training.batches import BatchIterator
from jaxmodels.training.checkpoint import checkpoint_dir
from jaxmodels.training.optim import make_optimizer, make_schedule
from jaxmodels.training.parallel import SingleDevice, Strategy, get_strategy
from jaxmodels.training.rundir import prepare_workdir
from jaxmodels.training.runlog import MetricsWindow, RunWriter, progress_bar
from jaxmodels.training.steps import TrainState, create_train_state, make_eval_step, make_train_step


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
    none on the way) and after the last step, keeping the latest ``keep`` (``jaxmodels.training.checkpoint``)."""

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


# Recipes: TrainConfig fields that differ from its defaults for a (model, data set) pair; the
# command line fills the options not given from them. The seed CNN on MNIST follows the Keras
# example it comes from (Chollet, Deep Learning with Python, 5.1: RMSprop 1e-3, batch 64, 5
# epochs), which experiments/cnn_mnist.py measures.
RECIPES: dict[tuple[str, str], dict] = {
    ("cnn", "mnist"): {
        "epochs": 5,
        "batch_size": 64,
        "optimizer": "rmsprop",
        "schedule": "constant",
    },
}


def recipe(model: str, dataset: str, **overrides) -> TrainConfig:
    """The TrainConfig for ``model`` on ``dataset``: the defaults, then the pair's ``RECIPES``
    entry, then ``overrides`` (e.g. ``recipe("cnn", "mnist", seed=1)``: batch 64, 5 epochs,
    RMSprop at a constant 1e-3)."""
    return TrainConfig(**(RECIPES.get((model, dataset), {}) | overrides))


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
    overwrite: bool = False,
) -> FitResult:
    """Train ``model`` on ``dataset``'s train split for ``config.epochs`` epochs, evaluating on the
    test split after each epoch.

    Writes to ``workdir``: config.json (model, dataset and its ``options``, model and train
    settings, versions), metrics.jsonl (one JSON row per line, each on disk before it is shown:
    "train" rows every ``log_every`` steps with loss, accuracy, grad_norm, lr, examples_per_sec;
    "eval" rows per epoch with test loss and accuracy), test_metrics.json (the final test metrics)
    and learning_curves.png.

    The work folder is checked before anything is computed (``jaxmodels.training.rundir.prepare_workdir``):
    a fresh run refuses a folder that holds another run (``RunFolderError``) unless ``overwrite``,
    which moves that run aside to WORKDIR.old-<date>-<time>; it must be writable.

    Checkpoints (``config.checkpoint``) go to workdir/checkpoints. ``resume``: continue from the
    latest readable checkpoint there (state, data position, RNG; printed), so that the run ends
    with exactly the parameters of an uninterrupted one; metrics.jsonl keeps its rows up to that
    step and is appended to. No checkpoint yet: a fresh start. A run of another model or data set
    raises ``RunFolderError``, a checkpoint of a different run (optimizer, batch size, ...)
    ``IncompatibleCheckpointError``.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig(**(config or {}))
    if strategy is None:  # "sharded" over all devices when there are several, else "single"
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
    last_epoch = -(-total_steps // train_it.steps_per_epoch)  # the epochs the run reaches
    lead = jax.process_index() == 0  # the one process that writes files and prints
    prepare_workdir(
        workdir, model=model.name, dataset=dataset.name, resume=resume, overwrite=overwrite
    )

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
        "dataset_options": dict(dataset.options),
        "model_config": _module_config(model),
        "model_options": options_of(model),
        "train": dataclasses.asdict(cfg),
        "strategy": strategy.name,
        "total_steps": total_steps,
        "versions": {p: version(p) for p in ("jax", "optax", "flax")},
        "devices": [str(d) for d in jax.devices()],
    }
    checkpoints, restored = _open_checkpoints(cfg, workdir, resume, state, run_config)
    if restored is not None:
        state = restored.state
        train_it.restore(restored.position)
        if lead:
            print(f"resumed from step {restored.step} ({checkpoints.directory})")
    elif resume and lead:
        print(f"no checkpoint in {checkpoint_dir(workdir)} yet: starting afresh")
    state = strategy.put_state(state)
    start_step = restored.step if restored is not None else 0
    test_metrics: dict[str, float] = {}
    t0, step, window = time.perf_counter(), start_step, MetricsWindow()
    with progress_bar(cfg.progress and lead) as progress, _closing(checkpoints):
        keep_until = start_step if restored else None
        writer = RunWriter(Path(workdir), enabled=lead, keep_until=keep_until)
        writer.save_config(run_config)
        task = progress.add_task("train", total=total_steps, completed=step, loss="-")
        for epoch in range(train_it.position.epoch + 1, cfg.epochs + 1):
            if step >= total_steps:  # resumed from the last checkpoint of a finished run
                break
            progress.update(task, description=f"epoch {epoch}/{last_epoch}")
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
                    progress.console.print(
                        f"epoch {epoch}/{last_epoch}  step {step}/{total_steps}  test {shown}"
                    )
            if step == total_steps:
                break
    if test_it is not None and not test_metrics:  # resumed after the last step: evaluate once
        test_metrics = evaluate(eval_step, state, test_it, strategy)
    if test_metrics:
        writer.save_test_metrics(step, test_metrics)
    if cfg.plot:
        writer.plot()
    return FitResult(strategy.fetch(state), writer.history, test_metrics)


def restore_params(
    model: Model, example, workdir: str | Path, *, step: int | None = None, dataset: str = ""
) -> tuple[int, TrainState]:
    """``(step, state)``: the TrainState (params and rng; no optimizer state) of step ``step``
    (default: the latest readable one, falling back past corrupt ones) of workdir/checkpoints,
    read-only. ``example``: an input batch of the model (its shape and dtype check the restored
    parameters). The checkpoint must come from the same model and model config
    (``IncompatibleCheckpointError`` otherwise); ``dataset``, when given, is compared with the
    run's with a warning only."""
    from jaxmodels.training.checkpoint import REQUIRED_FOR_EVAL, Checkpoints, check_structure

    config = {"model": model.name, "task": model.task, "model_config": _module_config(model)}
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
    if model.task != dataset.task:
        raise ValueError(
            f"model {model.name!r} does the task {model.task!r}, dataset {dataset.name!r} {dataset.task!r}"
        )
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
    eval_bs = min(batch_size, len(dataset.x_test))
    eval_bs = -(-eval_bs // strategy.num_devices) * strategy.num_devices
    test_it = BatchIterator(
        (dataset.x_test, dataset.y_test), eval_bs, shuffle=False, remainder="pad"
    )
    eval_step = strategy.compile(make_eval_step(model, axis_name=strategy.axis_name))
    return evaluate(eval_step, strategy.put_state(state), test_it, strategy)


def _open_checkpoints(
    cfg: TrainConfig, workdir, resume: bool, template: TrainState, run_config: dict
):
    """The run's ``Checkpoints`` (None when it neither saves nor resumes) and, with ``resume``, the
    latest readable checkpoint restored as host arrays in ``template``'s structure (None when there
    is none yet); the caller places it with its strategy's ``put_state``, on however many devices."""
    if not (cfg.checkpoint or resume):
        return None, None
    from jaxmodels.training.checkpoint import Checkpoints

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
