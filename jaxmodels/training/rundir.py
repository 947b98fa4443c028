"""A run's folder (WORKDIR): the names and the formats of the files in it, what marks it as
holding a run, the rules that keep two runs from mixing in it, and reading a run's settings back.

    WORKDIR/config.json          the run's settings (``write_config``, ``read_config``,
                                 ``load_run_settings``; what resumes changed: ``record_resume``)
    WORKDIR/metrics.jsonl        one JSON row per line (``write_rows``, ``append_row``, ``read_rows``)
    WORKDIR/test_metrics.json    the final test metrics (``write_test_metrics``)
    WORKDIR/learning_curves.png  the loss (and accuracy) curves (``CURVES_FILE``, drawn by runlog)
    WORKDIR/eval.json            ``jaxmodels eval``'s result (``eval_text``, ``write_eval``)
    WORKDIR/checkpoints/         orbax checkpoints (``checkpoint_dir``; ``jaxmodels.training.checkpoint``)
    WORKDIR/train.lock           who trains here (``jaxmodels.training.runlock``)

Whole files are replaced atomically (``write_atomic``). A run's config is JSON with dtypes by name
and numpy values as numbers (``json_default``; ``to_json`` is its round trip, which checkpoint
metadata stores and resumed runs compare); lists of a model's options are read back as tuples.

    prepare_workdir("runs/cnn-digits", model="cnn", dataset="digits")   # fresh: refuses a used one
    prepare_workdir(w, model="cnn", dataset="digits", overwrite=True)  # moves the old run aside
    prepare_workdir(w, model="cnn", dataset="digits", resume=True)     # the same model and data
    settings = load_run_settings("runs/cnn-digits")  # model, dataset, dataset_options, dtype

A folder holds a run when it has config.json, metrics.jsonl or a non-empty checkpoints/ (what
``jaxmodels.training.fit.fit`` writes). A fresh run never starts in such a folder: its old checkpoints,
with higher steps, would be taken for the new run's by ``eval`` and ``resume``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import jax

from jaxmodels.files import json_default, to_json, write_atomic
from jaxmodels.nn.models import tuples

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TEST_METRICS_FILE = "test_metrics.json"
CURVES_FILE = "learning_curves.png"
EVAL_FILE = "eval.json"
CHECKPOINT_SUBDIR = "checkpoints"
LOCK_FILE = "train.lock"  # who trains here (jaxmodels.training.runlock); not a mark of a run
# What a training run leaves in its folder, for messages ("wrote WORKDIR/config.json, ...").
RUN_FILES = (CONFIG_FILE, METRICS_FILE, TEST_METRICS_FILE, CURVES_FILE, CHECKPOINT_SUBDIR + "/")


class RunFolderError(ValueError):
    """A work folder that cannot be used as asked: it holds another run (a fresh start), or a run
    of another model or data set (a resume)."""


def checkpoint_dir(workdir: str | Path) -> Path:
    """Where a run in ``workdir`` keeps its checkpoints: ``workdir/checkpoints``."""
    return Path(workdir) / CHECKPOINT_SUBDIR


def saved_steps(workdir: str | Path) -> list[int]:
    """Steps of the complete checkpoints in WORKDIR/checkpoints, ascending, from the folder names
    alone (orbax's temporary folders of an unfinished save are not numbers); [] when none."""
    folder = checkpoint_dir(workdir)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())


def describe_checkpoints(workdir: str | Path) -> str:
    """Where a run can continue from, for messages: "the last checkpoint is step N in
    WORKDIR/checkpoints (continue with --resume)", or that there is none."""
    steps, folder = saved_steps(workdir), checkpoint_dir(workdir)
    if not steps:
        return f"no checkpoint was saved in {folder}"
    return f"the last checkpoint is step {steps[-1]} in {folder} (continue with --resume)"


def run_contents(workdir: str | Path) -> list[str]:
    """What marks ``workdir`` as holding a run, for messages (e.g. ["config.json", "checkpoints up
    to step 50"]); [] for a missing or unused folder."""
    workdir = Path(workdir)
    found = [name for name in (CONFIG_FILE, METRICS_FILE) if (workdir / name).is_file()]
    steps, checkpoints = saved_steps(workdir), checkpoint_dir(workdir)
    if steps:
        found.append(f"checkpoints up to step {steps[-1]}")
    elif checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append(f"{checkpoints.name}/")
    return found


def check_writable(folder: str | Path, what: str = "folder") -> Path:
    """Create ``folder`` (and its parents) if needed and check that a file can be written in it,
    by creating and removing a probe file; returns it as a Path. Raises an OSError with a message
    that names ``what`` and the folder: NotADirectoryError when it (or a parent) is a file,
    PermissionError when it cannot be created or written in, OSError for the rest (a full disk)."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"the {what} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # the errno stays: ENOSPC is a full disk
        raise type(err)(err.errno, f"cannot create the {what} {folder}: {err.strerror}") from None
    try:
        handle, probe = tempfile.mkstemp(prefix=".jaxmodels-probe-", dir=folder)
        os.close(handle)
        os.remove(probe)
    except OSError as err:
        raise type(err)(err.errno, f"cannot write in the {what} {folder}: {err.strerror}") from None
    return folder


def move_aside(workdir: str | Path) -> Path:
    """Rename ``workdir`` to WORKDIR.old-YYYYmmdd-HHMMSS next to it (-2, -3, ... when taken);
    returns the new path."""
    workdir = Path(workdir)
    stem = f"{workdir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    target, n = workdir.with_name(stem), 2
    while target.exists():
        target, n = workdir.with_name(f"{stem}-{n}"), n + 1
    shutil.move(str(workdir), target)
    return target


def prepare_workdir(
    workdir: str | Path,
    *,
    model: str,
    dataset: str,
    resume: bool = False,
    overwrite: bool = False,
) -> Path | None:
    """Make ``workdir`` ready for a run of ``model`` on ``dataset``, before any training.

    Fresh (neither flag): a folder that holds a run (``run_contents``) raises ``RunFolderError``
    naming --resume and --overwrite. ``overwrite``: such a folder is moved aside (``move_aside``,
    printed) and the run starts in an empty one; returns where the old run went (else None).
    ``resume``: a config.json naming another model or data set raises ``RunFolderError`` naming
    both (the checkpoint's own settings are compared when it is restored). Then the folder is
    created and checked writable (``check_writable``). Files are moved and probed by process 0
    only; every process checks.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run or replace it")
    workdir = Path(workdir).expanduser()
    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(f"the work folder {workdir} is a file, not a folder")
    lead, moved = jax.process_index() == 0, None
    found = run_contents(workdir)
    if resume and (workdir / CONFIG_FILE).is_file():
        saved = read_config(workdir)
        was = (saved.get("model"), saved.get("dataset"))
        if was != (model, dataset):
            raise RunFolderError(
                f"{workdir} holds a run of {was[0]} on {was[1]}, not {model} on {dataset}: resume "
                f"it as {was[0]} on {was[1]}, or use another work folder (--workdir)"
            )
    elif found and not resume:
        if not overwrite:
            raise RunFolderError(
                f"{workdir} already holds a run ({', '.join(found)}): continue it with resume=True "
                f"(--resume), or move it aside and start afresh with overwrite=True (--overwrite)"
            )
        if lead:
            moved = move_aside(workdir)
            print(f"moved the run that was in {workdir} to {moved}")
    if lead:
        check_writable(workdir, "work folder")
    return moved


# ---------------------------------------------------------------------------- the files, as JSON


def write_config(workdir: Path, config: dict) -> None:
    """WORKDIR/config.json: ``config`` as indented JSON (``json_default``), replaced atomically."""
    text = json.dumps(config, indent=2, default=json_default) + "\n"
    write_atomic(workdir / CONFIG_FILE, text)


RESUMES = "resumes"  # config.json: the options a resumed run changed, [{"step", "changed"}, ...]


def record_resume(config: dict, saved: dict, step: int, changed: dict) -> dict:
    """``config`` (a resumed run's, for config.json and its checkpoints) with the "resumes" of
    ``saved`` (the restored checkpoint's config: the resumes up to its step, not those of a later
    attempt that ended before a checkpoint) and, when ``changed`` (``{option: [saved, now]}``) is
    not empty, one more: ``{"step": step, "changed": changed}``, the step from which it applies."""
    resumes = [*(saved.get(RESUMES) or [])]
    if changed:
        resumes.append({"step": int(step), "changed": to_json(changed)})
    return {k: v for k, v in config.items() if k != RESUMES} | (
        {RESUMES: resumes} if resumes else {}
    )


def _row_line(row: dict) -> str:
    return json.dumps(row) + "\n"


def write_rows(workdir: Path, rows: Iterable[dict]) -> None:
    """WORKDIR/metrics.jsonl holding ``rows`` (none: empty), replaced atomically."""
    write_atomic(workdir / METRICS_FILE, "".join(map(_row_line, rows)))


def append_row(workdir: Path, row: dict) -> None:
    """Append ``row`` to WORKDIR/metrics.jsonl; it is on disk (flushed, closed) when this returns."""
    with open(workdir / METRICS_FILE, "a") as f:
        f.write(_row_line(row))


def read_rows(workdir: Path) -> list[dict]:
    """The JSON rows of WORKDIR/metrics.jsonl; a line cut short by a killed run is skipped."""
    rows = []
    for line in (workdir / METRICS_FILE).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def write_test_metrics(workdir: Path, step: int, metrics: dict[str, float]) -> None:
    """WORKDIR/test_metrics.json: the run's final test metrics, {"step", "test"}."""
    text = json.dumps({"step": step, "test": metrics}, indent=2) + "\n"
    write_atomic(workdir / TEST_METRICS_FILE, text)


def eval_text(result: dict) -> str:
    """An evaluation's ``result`` as ``jaxmodels eval`` shows it: indented JSON."""
    return json.dumps(result, indent=2)


def write_eval(path: Path, result: dict) -> None:
    """``eval_text(result)`` in ``path`` (WORKDIR/eval.json by default), replaced atomically."""
    write_atomic(path, eval_text(result) + "\n")


# ------------------------------------------------------------------------------ settings back


def read_config(workdir: str | Path) -> dict:
    """WORKDIR/config.json as a dict. FileNotFoundError when absent, ValueError when unreadable."""
    path = Path(workdir).expanduser() / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no run in {path.parent}: {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a run's config (unreadable JSON: {err})") from None
    if not isinstance(config, dict) or not {"model", "dataset"} <= config.keys():
        raise ValueError(f"{path} is not a run's config: expected its model and dataset")
    return config


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What a run in ``workdir`` was trained with, from its config.json.

    model, dataset: registry names (``get_model``, ``get_dataset``). dataset_options: the
    ``get_dataset`` options it was loaded with (e.g. data_dir, path, seq_len; {} for a run written
    before they were recorded). dtype: the model's compute dtype, "float32" or "bfloat16".
    model_options: the model's options (``models.model_options``; lists read back as tuples; {}
    for a run written before they were recorded). config: the whole config.json.
    """

    workdir: Path
    model: str
    dataset: str
    dataset_options: dict
    dtype: str
    model_options: dict
    config: dict


def load_run_settings(workdir: str | Path) -> RunSettings:
    """The settings of the run in ``workdir`` (see ``RunSettings``), for commands that rebuild its
    model and data set (eval). FileNotFoundError when it has no config.json."""
    config = read_config(workdir)
    return RunSettings(
        workdir=Path(workdir).expanduser(),
        model=config["model"],
        dataset=config["dataset"],
        dataset_options=dict(config.get("dataset_options") or {}),
        dtype=(config.get("model_config") or {}).get("dtype") or "float32",
        model_options={k: tuples(v) for k, v in (config.get("model_options") or {}).items()},
        config=config,
    )
