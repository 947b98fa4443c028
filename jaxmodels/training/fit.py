"""Training: ``fit`` a model on a data set (evaluation is ``jaxmodels.training.evaluate``'s).

    model, ds = get_model("cnn"), get_dataset("digits")
    result = fit(model, ds, TrainConfig(epochs=10), "runs/cnn-digits")
    result.test_metrics                                   # {"loss": ..., "accuracy": ...}

    fit(model, ds, TrainConfig(epochs=10), "runs/lion", optimizer=optax.lion(1e-4))

``fit`` sets up (``_setup``: the optimizer by name from ``jaxmodels.training.optim`` or the
optax transformation given, the pure steps of ``jaxmodels.training.steps`` compiled by a strategy
of ``jaxmodels.training.parallel``, one device by default), loops (``_loop``: saves and resumes
checkpoints, ``jaxmodels.training.checkpoint``; writes the run's log,
``jaxmodels.training.runlog``) and finishes (``_finish``: the final test metrics and plot).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import optax

from jaxmodels.data.datasets import Dataset
from jaxmodels.nn.models import Model, options_of
from jaxmodels.training.batches import BatchIterator
from jaxmodels.training.evaluate import check_task, evaluate, module_config, test_iterator
from jaxmodels.training.optim import describe_transformation, make_optimizer, make_schedule
from jaxmodels.training.parallel import Strategy, get_strategy
from jaxmodels.training.rundir import checkpoint_dir, record_resume
from jaxmodels.training.runlock import claim
from jaxmodels.training.runlog import MetricsWindow, RunWriter, progress_bar
from jaxmodels.training.steps import TrainState, create_train_state, make_eval_step, make_train_step

if TYPE_CHECKING:
    from jaxmodels.training.checkpoint import Checkpoints


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
# command line fills the options not given from them. The seed CNN on MNIST: Adam at 1e-3 with
# cosine decay to 0 over the run, batch 64, 5 epochs, which ends at >= 0.990 test accuracy on
# every seed measured (experiments/cli_seeds.py). The Keras example the network comes from
# (Chollet, Deep Learning with Python, 5.1: RMSprop at a constant 1e-3, batch 64, 5 epochs) ends
# at a constant rate, one draw of a noisy final epoch; experiments/cnn_mnist.py keeps it, by name
# (``KERAS_CNN_MNIST``), for the comparison with Keras.
RECIPES: dict[tuple[str, str], dict] = {
    ("cnn", "mnist"): {
        "epochs": 5,
        "batch_size": 64,
        "optimizer": "adam",
        "schedule": "cosine",
    },
}

KERAS_CNN_MNIST: dict = {
    "epochs": 5,
    "batch_size": 64,
    "lr": 1e-3,
    "optimizer": "rmsprop",
    "schedule": "constant",
}


def recipe(model: str, dataset: str, **overrides) -> TrainConfig:
    """The TrainConfig for ``model`` on ``dataset``: the defaults, then the pair's ``RECIPES``
    entry, then ``overrides`` (e.g. ``recipe("cnn", "mnist", seed=1)``: batch 64, 5 epochs, Adam
    at 1e-3 with cosine decay; ``recipe("cnn", "mnist", **KERAS_CNN_MNIST)``: the Keras example's
    RMSprop at a constant 1e-3).

    Examples:
      >>> config = recipe("cnn", "digits", epochs=2)
      >>> config.epochs, config.batch_size
      (2, 32)
    """
    return TrainConfig(**(RECIPES.get((model, dataset), {}) | overrides))


@dataclasses.dataclass
class FitResult:
    """state: the final TrainState (on the host). history: every metrics row written.
    test_metrics: the last evaluation ({} without a test split)."""

    state: TrainState
    history: list[dict]
    test_metrics: dict[str, float]


def fit(
    model: Model,
    dataset: Dataset,
    config: TrainConfig | dict | None = None,
    workdir: str | Path = "runs/latest",
    *,
    optimizer: optax.GradientTransformation | None = None,
    strategy: Strategy | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> FitResult:
    """Train ``model`` on ``dataset``'s train split for ``config.epochs`` epochs, evaluating on the
    test split after each epoch.

    ``optimizer``: any optax transformation to train with, e.g.
    ``optax.chain(optax.clip_by_global_norm(1.0), optax.lion(1e-4))``; it replaces the one that
    ``config`` names (its ``OPTIMIZER_SETTINGS`` must then keep their defaults), and the train
    rows have no "lr". None: ``make_optimizer`` builds the named one.

    Writes to ``workdir``: config.json (model, dataset and its ``options``, model and train
    settings, versions), metrics.jsonl (one JSON row per line, each on disk before it is shown:
    "train" rows every ``log_every`` steps with loss, accuracy, grad_norm, lr, examples_per_sec;
    "eval" rows per epoch with test loss and accuracy), test_metrics.json (the final test metrics)
    and learning_curves.png. config.json's "train" has the optimizer's name and settings, or for
    a given ``optimizer`` its description (``describe_transformation``) in their place.

    The work folder is claimed before anything is computed (``jaxmodels.training.runlock.claim``):
    a run holds its lock to the end (another process training there: ``RunLockedError``); a fresh
    run refuses a folder that holds another run (``RunFolderError``) unless ``overwrite``, which
    moves that run aside to WORKDIR.old-<date>-<time>; it must be writable.

    Checkpoints (``config.checkpoint``) go to workdir/checkpoints. ``resume``: continue from the
    latest readable checkpoint there (state, data position, RNG; printed), so that the run ends
    with exactly the parameters of an uninterrupted one; metrics.jsonl keeps its rows up to that
    step and is appended to. No checkpoint yet: a fresh start. A run of another model or data set
    raises ``RunFolderError``. Options that change the function trained or the exact continuation
    (model and data options, dtype, batch size, seed, optimizer, lr, schedule, warmup, clip norm,
    weight decay; epochs and max_steps too while the schedule decays over the total steps) raise
    ``IncompatibleCheckpointError`` naming each, saved vs now (``compat.REQUIRED``): a given
    ``optimizer`` resumes only a run of the same transformation (the same description). The
    others continue (``compat.CONTINUES``: epochs and max_steps with a constant schedule,
    log_every, checkpoint_every, keep, eval_batch_size, progress, ...), and config.json's
    "resumes" records each change with the step it applies from:
    ``[{"step": 16, "changed": {"train.epochs": [1, 2], ...}}]``.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig(**(config or {}))
    _check_fit(model, dataset, cfg, optimizer)
    with claim(workdir, model=model.name, dataset=dataset.name, resume=resume, overwrite=overwrite):
        run = _setup(model, dataset, cfg, workdir, optimizer, strategy, resume)
        with progress_bar(run.cfg.progress and run.lead) as progress, _closing(run.checkpoints):
            keep_until = run.start_step if run.start_step else None  # resumed: rows up to it stay
            writer = RunWriter(Path(workdir), enabled=run.lead, keep_until=keep_until)
            writer.save_config(run.config)
            state, step, test_metrics = _loop(run, writer, progress)
        return _finish(run, writer, state, step, test_metrics)


# TrainConfig fields that choose and set up the optimizer by name (``make_optimizer``); a
# transformation given to ``fit`` replaces them.
OPTIMIZER_SETTINGS = ("optimizer", "lr", "schedule", "warmup_steps", "clip_norm", "weight_decay")


@dataclasses.dataclass
class _Run:
    """What ``_setup`` prepares for the loop: the settings, iterators, placed state and compiled
    steps, the run's config (config.json) and its checkpoints (None when it neither saves nor
    resumes). ``start_step``: the restored checkpoint's step (0 for a fresh start)."""

    cfg: TrainConfig
    strategy: Strategy
    train_it: BatchIterator
    test_it: BatchIterator | None
    total_steps: int
    state: TrainState
    train_step: Callable
    eval_step: Callable
    config: dict
    checkpoints: Checkpoints | None
    start_step: int

    @property
    def last_epoch(self) -> int:
        """The epochs the run reaches."""
        return -(-self.total_steps // self.train_it.steps_per_epoch)

    @property
    def lead(self) -> bool:
        """Whether this is the one process that writes files and prints."""
        return jax.process_index() == 0


def _setup(model, dataset, cfg: TrainConfig, workdir, optimizer, strategy, resume) -> _Run:
    """The optimizer, state and steps built for ``fit``'s checked inputs, and with ``resume`` the
    latest checkpoint restored into the state and the train iterator."""
    strategy = strategy or get_strategy()  # "sharded" over several devices, else "single"
    train_it = BatchIterator(
        (dataset.x_train, dataset.y_train), cfg.batch_size, seed=cfg.seed, remainder=cfg.remainder
    )
    test_it = (
        None if dataset.x_test is None else test_iterator(dataset, cfg.eval_batch_size, strategy)
    )
    total_steps = cfg.epochs * train_it.steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    lead = jax.process_index() == 0  # the one process that prints
    tx, schedule = optimizer, None
    if optimizer is None:
        opt_args = (cfg.lr, cfg.schedule, cfg.warmup_steps, total_steps)
        tx = make_optimizer(
            cfg.optimizer, *opt_args, clip_norm=cfg.clip_norm, weight_decay=cfg.weight_decay
        )
        schedule = make_schedule(*opt_args)
    state = create_train_state(model, tx, dataset.x_train[: cfg.batch_size], cfg.seed)
    train_step = make_train_step(model, tx, schedule=schedule, axis_name=strategy.axis_name)
    train_step = strategy.compile(train_step, donate_state=True)
    eval_step = strategy.compile(make_eval_step(model, axis_name=strategy.axis_name))
    train = _train_settings(cfg, optimizer, state.params)
    run_config = _run_config(model, dataset, train, strategy, total_steps)
    checkpoints, restored = _open_checkpoints(cfg, workdir, resume, state, run_config)
    if restored is not None:
        state = restored.state
        train_it.restore(restored.position)
        run_config, changed = _resumed_config(run_config, restored)
        if lead:
            shown = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            print(
                f"resumed from step {restored.step} ({checkpoints.directory})"
                + (f" with {shown}" if shown else "")
            )
    elif resume and lead:
        print(f"no checkpoint in {checkpoint_dir(workdir)} yet: starting afresh")
    return _Run(
        cfg, strategy, train_it, test_it, total_steps, strategy.put_state(state), train_step,
        eval_step, run_config, checkpoints, restored.step if restored is not None else 0,
    )  # fmt: skip


def _run_config(model: Model, dataset: Dataset, train: dict, strategy, total_steps: int) -> dict:
    """config.json: what the run trains on and how (``train``: ``_train_settings``), with the
    versions and devices it ran with; ``resume`` compares it with a checkpoint's."""
    return {
        "model": model.name,
        "task": model.task,
        "dataset": dataset.name,
        "dataset_options": dict(dataset.options),
        "model_config": module_config(model),
        "model_options": options_of(model),
        "train": train,
        "strategy": strategy.name,
        "total_steps": total_steps,
        "versions": {p: version(p) for p in ("jax", "optax", "flax")},
        "devices": [str(d) for d in jax.devices()],
    }


def _resumed_config(run_config: dict, restored) -> tuple[dict, dict]:
    """The run config of a run resumed from ``restored`` (which ``check_compatible`` accepted):
    the options that may change and did (``compat.resume_changes``: epochs, max_steps,
    log_every, ...) recorded with the restored step in its "resumes" (``rundir.record_resume``),
    and those changes, ``{option: [saved, now]}``."""
    from jaxmodels.training.compat import resume_changes

    changed = resume_changes(restored.config, run_config)
    return record_resume(run_config, restored.config, restored.step, changed), changed


def _check_fit(model: Model, dataset: Dataset, cfg: TrainConfig, optimizer) -> None:
    """ValueError (TypeError for ``optimizer``) for inputs ``fit`` cannot train on."""
    check_task(model, dataset)
    if dataset.x_train is None:
        raise ValueError(f"dataset {dataset.name!r} has no train split")
    if cfg.epochs < 1 or cfg.log_every < 1:
        raise ValueError(
            f"expected epochs >= 1 and log_every >= 1, got {cfg.epochs} and {cfg.log_every}"
        )
    if optimizer is None:
        return
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"expected optimizer to be an optax.GradientTransformation, got {optimizer!r} (an "
            f"optimizer by name goes in TrainConfig(optimizer=...))"
        )
    default = TrainConfig()
    changed = [
        f"{k}={getattr(cfg, k)!r}"
        for k in OPTIMIZER_SETTINGS
        if getattr(cfg, k) != getattr(default, k)
    ]
    if changed:
        raise ValueError(
            f"expected TrainConfig's {', '.join(OPTIMIZER_SETTINGS)} at their defaults with "
            f"fit(optimizer=...), which replaces them; got {', '.join(changed)}"
        )


def _train_settings(cfg: TrainConfig, optimizer, params) -> dict:
    """config.json's "train": ``cfg``'s fields; for a given ``optimizer`` "optimizer" holds its
    description (``describe_transformation``, which a resume compares) and the other
    ``OPTIMIZER_SETTINGS``, which it replaces, are left out."""
    settings = dataclasses.asdict(cfg)
    if optimizer is None:
        return settings
    settings = {k: v for k, v in settings.items() if k not in OPTIMIZER_SETTINGS[1:]}
    return settings | {"optimizer": describe_transformation(optimizer, params)}


def _loop(run: _Run, writer: RunWriter, progress) -> tuple[TrainState, int, dict[str, float]]:
    """Train from ``run.start_step`` to ``run.total_steps``: a metrics row every ``log_every``
    steps and at each epoch's end, a checkpoint when due, a test evaluation after each epoch.
    Returns the state, the last step and the last test metrics ({} when none ran)."""
    cfg, strategy, state, step = run.cfg, run.strategy, run.state, run.start_step
    test_metrics: dict[str, float] = {}
    t0, window = time.perf_counter(), MetricsWindow()
    task = progress.add_task("train", total=run.total_steps, completed=step, loss="-")
    for epoch in range(run.train_it.position.epoch + 1, cfg.epochs + 1):
        if step >= run.total_steps:  # resumed from the last checkpoint of a finished run
            break
        progress.update(task, description=f"epoch {epoch}/{run.last_epoch}")
        for batch in run.train_it.epoch():
            state, metrics = run.train_step(state, strategy.put_batch(batch))
            step += 1
            final = step == run.total_steps
            window.add(metrics, int(batch["mask"].sum()), first=step == run.start_step + 1)
            if step % cfg.log_every == 0 or final or run.train_it.position.step == 0:
                row = window.row(strategy.fetch, epoch, step, t0)
                writer.log(row)
                progress.update(task, completed=step, loss=f"{row['loss']:.4f}")
            if cfg.checkpoint and run.checkpoints.should_save(step, final=final):
                window.check_finite(strategy.fetch, step)  # never save a diverged state
                run.checkpoints.save(
                    step, strategy.fetch(state), position=run.train_it.position, config=run.config
                )
            if final:
                break
        if run.test_it is not None:
            test_metrics = _test_epoch(run, state, epoch, step, t0, writer, progress)
        if step == run.total_steps:
            break
    return state, step, test_metrics


def _test_epoch(run: _Run, state, epoch: int, step: int, t0: float, writer, progress) -> dict:
    """Evaluate ``state`` on the test split: an "eval" row in the log, a line on the console."""
    start = time.perf_counter()
    metrics = evaluate(run.eval_step, state, run.test_it, run.strategy)
    now = time.perf_counter()
    times = {"time_s": now - t0, "eval_time_s": now - start}
    writer.log({"kind": "eval", "epoch": epoch, "step": step, **metrics, **times})
    if run.lead:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        where = f"epoch {epoch}/{run.last_epoch}  step {step}/{run.total_steps}"
        progress.console.print(f"{where}  test {shown}")
    return metrics


def _finish(run: _Run, writer: RunWriter, state, step: int, test_metrics: dict) -> FitResult:
    """After the loop (checkpoints on disk): the final test metrics (evaluated here for a run
    resumed after its last step), test_metrics.json and the plot."""
    if run.test_it is not None and not test_metrics:
        test_metrics = evaluate(run.eval_step, state, run.test_it, run.strategy)
    if test_metrics:
        writer.save_test_metrics(step, test_metrics)
    if run.cfg.plot:
        writer.plot()
    return FitResult(run.strategy.fetch(state), writer.history, test_metrics)


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
