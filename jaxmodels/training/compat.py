"""What a checkpoint must share with the run that restores it.

A resumed run continues only where the result is the same run (``check_compatible`` compares the
run config in a checkpoint's metadata with the current run's, entry by entry; ``REQUIRED`` says
which refuse, ``CONTINUES`` which continue and are recorded, ``resume_changes`` lists those), and
a restored pytree must have the structure, shapes and dtypes of its target (``check_structure``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxmodels.files import to_json

# What a resumed run may change, by config entry (dotted paths into the run config that fit writes
# to config.json and every checkpoint's metadata holds; ``check_compatible`` compares them).
#
# REQUIRED: what fixes the function being trained and the exact continuation of the run: the
# model and its options (dtype included), the data set and its options, the data stream (batch
# size: the saved data position counts batches; seed: the data order and the RNG; remainder) and
# the optimizer with its hyper-parameters and schedule. A difference refuses the resume
# (``IncompatibleCheckpointError``, one line naming each entry, saved vs now): a new learning rate
# or schedule is another run, to start in another work folder.
REQUIRED = (
    "model",
    "task",
    "dataset",
    "dataset_options",
    "model_config",
    "model_options",
    "train.optimizer",
    "train.lr",
    "train.schedule",
    "train.warmup_steps",
    "train.clip_norm",
    "train.weight_decay",
    "train.batch_size",
    "train.seed",
    "train.remainder",
    "total_steps",  # only while the schedule decays over it (SCHEDULES_OVER_TOTAL)
)
# Schedules whose learning rate at a step depends on the run's total steps: with them, extending
# or shortening a run (epochs, max_steps) changes every later learning rate, so it refuses; with
# "constant" (and a given optax transformation, compared by its description) it continues.
SCHEDULES_OVER_TOTAL = ("cosine", "warmup-cosine")
# Data set options that say where the data is, not what it is: the data may have moved.
DATA_LOCATIONS = ("data_dir", "path")
# Entries that checkpoints of older runs lack: not compared with them.
RECORDED_LATER = ("dataset_options", "model_options")
# CONTINUES: the length of the run and its bookkeeping (logging, checkpointing, evaluation batch,
# progress, plot) and where it runs (strategy, devices, versions, the data's location): a
# difference continues the run and is recorded in config.json's "resumes" (``resume_changes``).
CONTINUES = (
    "train.epochs",
    "train.max_steps",
    "total_steps",
    "train.log_every",
    "train.checkpoint",
    "train.checkpoint_every",
    "train.keep",
    "train.eval_batch_size",
    "train.progress",
    "train.plot",
    *(f"dataset_options.{k}" for k in DATA_LOCATIONS),
    "strategy",
    "devices",
    "versions",
)
# Compared with a warning only (evaluation passes its own); a resume warns of nothing.
PREFERRED: tuple[str, ...] = ()
# What evaluating a checkpoint needs: the same model.
REQUIRED_FOR_EVAL = ("model", "task", "model_config")

ABSENT = "<absent>"


class CheckpointWarning(UserWarning):
    """An unreadable checkpoint was skipped, or a checkpoint evaluated differs from the run asked
    for (``preferred`` entries)."""


class IncompatibleCheckpointError(ValueError):
    """The checkpoint belongs to a different run (model, data set, optimizer, shapes), or a resume
    asks for settings with which the run cannot continue exactly (``REQUIRED``)."""


def _lookup(config: dict, dotted: str) -> Any:
    value: Any = config
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return ABSENT
        value = value[key]
    return value


def _schedule_over_total(saved: dict, current: dict) -> str | None:
    """The schedule (saved or now) that decays over the run's total steps, if any."""
    for config in (saved, current):
        schedule = _lookup(config, "train.schedule")
        if schedule in SCHEDULES_OVER_TOTAL:
            return schedule
    return None


def _compared(key: str, saved: dict, current: dict) -> list[str]:
    """The entries ``key`` stands for: "dataset_options" one per option but its locations."""
    if key != "dataset_options":
        return [key]
    a, b = _lookup(saved, key), _lookup(current, key)
    names = {*(a if isinstance(a, dict) else {}), *(b if isinstance(b, dict) else {})}
    return [f"{key}.{k}" for k in sorted(names - set(DATA_LOCATIONS))] or [key]


def _differences(saved: dict, current: dict, required: Sequence[str]) -> list[str]:
    """ "key: saved A, now B" for each ``required`` entry that differs."""
    diffs = []
    for key in required:
        if key in RECORDED_LATER and _lookup(saved, key) == ABSENT:
            continue  # a checkpoint written before it was recorded
        note = ""
        if key == "total_steps":
            schedule = _schedule_over_total(saved, current)
            if schedule is None:
                continue  # a constant schedule: a longer or shorter run continues
            note = f" (the {schedule} schedule decays over total_steps, which epochs and max_steps set)"
        for k in _compared(key, saved, current):
            a, b = _lookup(saved, k), _lookup(current, k)
            if a != b:
                diffs.append(f"{k}: saved {a!r}, now {b!r}{note}")
    return diffs


def check_compatible(
    saved: dict,
    current: dict,
    *,
    required: Sequence[str] = REQUIRED,
    preferred: Sequence[str] = PREFERRED,
    where: str = "checkpoint",
) -> None:
    """Raise ``IncompatibleCheckpointError`` naming every ``required`` entry (a dotted path into
    the run config) that differs between ``saved`` and ``current``, in one line; warn for
    ``preferred`` ones. "total_steps" counts only while either schedule decays over it
    (``SCHEDULES_OVER_TOTAL``); "dataset_options" is compared option by option, but for the data's
    location (``DATA_LOCATIONS``); ``RECORDED_LATER`` entries absent from ``saved`` are skipped."""
    saved, current = to_json(saved), to_json(current)
    diffs = _differences(saved, current, required)
    if diffs:
        raise IncompatibleCheckpointError(
            f"{where} was written by a different run and cannot be continued exactly with these "
            f"settings ({'; '.join(diffs)}): resume with the saved settings, or train with the new "
            f"ones in another --workdir (a changed learning rate, schedule or optimizer is a new run)"
        )
    for k in preferred:
        a, b = _lookup(saved, k), _lookup(current, k)
        if a != b:
            warnings.warn(
                f"{where}: {k} was {a!r}, now {b!r}; the resumed run will not match an uninterrupted one",
                CheckpointWarning,
                stacklevel=3,
            )


def resume_changes(saved: dict, current: dict, keys: Sequence[str] = CONTINUES) -> dict:
    """``{entry: [saved, now]}`` for each of ``keys`` (the options a resumed run may change,
    ``CONTINUES``) that differs between ``saved`` (the checkpoint's run config) and ``current``;
    what config.json's "resumes" records (``rundir.record_resume``). An entry absent from
    ``saved`` (a checkpoint of an older run) is left out."""
    saved, current = to_json(saved), to_json(current)
    changed = {}
    for k in keys:
        a, b = _lookup(saved, k), _lookup(current, k)
        if a != b and a != ABSENT:
            changed[k] = [a, None if b == ABSENT else b]
    return changed


def _leaf_signatures(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{orbax parameter name ("params.Dense_0.kernel"): (shape, dtype name)} of a tree's arrays."""
    import orbax.checkpoint as ocp

    names = jax.tree.leaves(ocp.tree.get_param_names(tree, include_empty_nodes=False))
    leaves = jax.tree.leaves(tree)
    return {n: (tuple(np.shape(x)), np.dtype(x.dtype).name) for n, x in zip(names, leaves)}


def check_structure(saved_metadata: Any, target: Any, where: str) -> None:
    """The target's arrays must all be in the checkpoint, with the same shapes and dtypes."""
    saved, wanted = _leaf_signatures(saved_metadata), _leaf_signatures(target)
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    differ = [(n, saved[n], wanted[n]) for n in wanted if n in saved and saved[n] != wanted[n]]
    if missing or extra or differ:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        for n, (s_shape, s_dtype), (w_shape, w_dtype) in differ[:5]:
            parts.append(f"{n}: saved {s_dtype}{list(s_shape)}, expected {w_dtype}{list(w_shape)}")
        raise IncompatibleCheckpointError(
            f"{where} does not match the state being restored: {'; '.join(parts)}"
        )
