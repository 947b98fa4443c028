"""Checkpoints: orbax save, restore and resume of a training run.

    ckpt = Checkpoints(checkpoint_dir(workdir), every=100, keep=3)   # rundir: WORKDIR/checkpoints
    if ckpt.should_save(step):
            ckpt.save(step, host_state, position=iterator.position, config=run_config)  # async
    restored = ckpt.restore(host_template, config=run_config)   # the latest readable one
    restored.step, restored.state, restored.position
    ckpt.close()                                                 # waits for pending saves

One checkpoint is a folder ``DIR/<step>`` written by an orbax ``CheckpointManager`` with two items:

  "state": the TrainState (step, params, opt_state, rng) as a pytree of host arrays,
           so a checkpoint knows nothing of devices and restores onto any number of them (the
           caller places the restored host state with its strategy's ``put_state``);
  "meta":  JSON ``{"step", "position": {"epoch", "step"}, "config"}``: the data iterator's
           position (the next batch) and the run's config, which ``restore`` compares with the
           current run's before it reads any array (``check_compatible``).

Saves are asynchronous (orbax writes in a background thread after the call has copied the
arrays); ``wait`` / ``close`` block until they are on disk. Orbax writes into a temporary folder
and renames it when complete, so a run killed while saving leaves no partial ``<step>`` folder.
A ``<step>`` folder that cannot be read (a truncated or missing file) is skipped: ``restore``
falls back to the one before, moves the unreadable ones aside to ``DIR.bad/`` so later saves can
reuse their steps, and reports each with one ``CheckpointWarning`` (step, reason, where it went);
the asyncio noise a failed orbax read leaves behind is dropped (``OrphanedCallbackFilter``).
A save that fails in orbax's background threads (a full disk, a failed rename) is raised by the
next ``save``, ``wait`` or ``close``; orbax's own tracebacks of it are dropped
(``SaveFailureLogFilter``), its temporary folder is never listed as a step, and the next run with
these checkpoints removes it.
A state with a NaN or Inf in it is never saved: ``save`` raises ``FloatingPointError`` instead,
so the last good checkpoint stays the latest. Ctrl-C during ``save``, ``wait`` or ``close`` is
raised once they are done (an interrupted orbax save would hang the program at exit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxmodels.files import to_json
from jaxmodels.training.batches import Position
from jaxmodels.training.compat import (
    PREFERRED,
    REQUIRED,
    CheckpointWarning,
    IncompatibleCheckpointError,
    check_compatible,
    check_structure,
)

STATE, META = "state", "meta"


class CorruptCheckpointError(ValueError):
    """No checkpoint could be read."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored checkpoint. state: shaped like the restore target (host numpy arrays), or the
    saved nested dicts when restored without one. position: the data iterator's position (the next
    batch). config: the saved run's config."""

    step: int
    state: Any
    position: Position
    config: dict
    directory: Path


def _host_copy(state: Any) -> Any:
    """Host numpy copies of a state's arrays (never views of device buffers that a donating step
    may reuse while an async save still reads them)."""
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(state))


def _first_non_finite(state: Any) -> str | None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
            return jax.tree_util.keystr(path)
    return None


class OrphanedCallbackFilter:
    """A ``sys.unraisablehook`` that drops one harmless report and passes the rest to ``previous``.

    Orbax runs each read in an asyncio event loop of its own and closes it when the read ends. When
    a read fails (a truncated array file), tensorstore still has the checkpoint's other reads in
    flight; each, completing, wakes the closed loop (asyncio's ``call_soon_threadsafe``), which
    raises RuntimeError("Event loop is closed"), and tensorstore reports it as unraisable: about
    one traceback per array, after the failure was already handled. Only that error, raised in
    ``call_soon_threadsafe``, is dropped.
    """

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable) -> None:
        tb = unraisable.exc_traceback
        code = tb.tb_frame.f_code if tb is not None else None
        if (
            isinstance(unraisable.exc_value, RuntimeError)
            and code is not None
            and code.co_name == "call_soon_threadsafe"
            and "asyncio" in code.co_filename
        ):
            return
        self.previous(unraisable)


class SaveFailureLogFilter(logging.Filter):
    """Drops the tracebacks orbax logs (absl's logger, level ERROR) when a save fails in one of
    its background threads: the save thread, the commit thread and ``wait_until_finished`` each log
    the same exception, which ``Checkpoints`` raises to its caller anyway (``save`` / ``wait`` /
    ``close``). Records without a traceback, and records from outside orbax, pass."""

    def __init__(self, orbax_dir: str | Path):
        super().__init__()
        self.orbax_dir = str(Path(orbax_dir).resolve())

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop) for an orbax record at level ERROR with a traceback, else True."""
        return not (
            record.levelno >= logging.ERROR
            and record.exc_info
            and str(Path(record.pathname).resolve()).startswith(self.orbax_dir)
        )


class Checkpoints:
    """The checkpoints of one run, in ``directory`` (created on first use unless ``read_only``).

    every: save every that many steps (``should_save``); None: only when ``final``.
    keep: how many of the latest checkpoints to keep (None: all).
    async_save: write in the background (orbax's async checkpointing); ``wait`` to block.
    read_only: never write, delete or move anything (for evaluation).

    Every process of a multi-host run must create it and call ``save`` / ``restore`` together
    (orbax synchronises them); arrays and metadata are written by the primary process.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        every: int | None = None,
        keep: int | None = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        import orbax.checkpoint as ocp

        if every is not None and every <= 0:
            raise ValueError(f"expected checkpoint every > 0 steps (or None), got {every}")
        if keep is not None and keep <= 0:
            raise ValueError(f"expected keep > 0 checkpoints (or None), got {keep}")
        self.directory = Path(directory).absolute()
        self.every, self.keep, self.read_only = every, keep, read_only
        self._orphan_filter: OrphanedCallbackFilter | None = None
        self._ocp = ocp
        self._log_filter: SaveFailureLogFilter | None = None
        if not read_only:  # a failed save is raised here, not logged by orbax's threads
            self._log_filter = SaveFailureLogFilter(Path(ocp.__file__).parent)
            logging.getLogger("absl").addFilter(self._log_filter)
        options = ocp.CheckpointManagerOptions(  # read_only is ours: orbax's logs warnings
            max_to_keep=None if read_only else keep,
            create=not read_only,
            cleanup_tmp_directories=not read_only,  # left by a run killed while saving
            enable_async_checkpointing=async_save,
        )
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"no checkpoints: {self.directory} does not exist")
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_names=(STATE, META),
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                META: ocp.JsonCheckpointHandler(),
            },
            options=options,
        )

    # --------------------------------------------------------------------------------- queries

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending (pending async saves excluded)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int, *, final: bool = False) -> bool:
        """Whether ``step`` is a checkpoint step: every ``every`` steps, and the ``final`` one."""
        return final or (self.every is not None and step % self.every == 0)

    # ------------------------------------------------------------------------------------ save

    def save(
        self,
        step: int,
        state: Any,
        *,
        position: Position | Sequence[int] | None = None,
        config: dict | None = None,
    ) -> bool:
        """Save ``state`` (any pytree of arrays; copied to the host before this returns) as step
        ``step`` with the iterator ``position`` (the next batch) and the run ``config``.

        Returns False (and writes nothing) when ``step`` is already saved. Raises
        ``FloatingPointError`` naming the step and the first non-finite array when the state holds
        a NaN or Inf, so a diverged state never replaces the last good checkpoint.
        """
        if self.read_only:
            raise ValueError(f"checkpoints in {self.directory} were opened read-only")
        self.wait()  # a pending save of an earlier step must be listed
        if step in self._manager.all_steps():
            return False
        host = _host_copy(state)
        bad = _first_non_finite(host)
        if bad is not None:
            raise FloatingPointError(
                f"the state after step {step} has a NaN or Inf in {bad}; not saving it "
                f"(the last good checkpoint is {self._describe_latest()})"
            )
        epoch, next_step = position if position is not None else (0, 0)
        meta = {
            "step": int(step),
            "position": {"epoch": int(epoch), "step": int(next_step)},
            "config": to_json(config or {}),
        }
        args = self._ocp.args.Composite(
            **{STATE: self._ocp.args.StandardSave(host), META: self._ocp.args.JsonSave(meta)}
        )
        with _interrupt_after():
            return bool(self._manager.save(int(step), args=args, force=True))

    def _describe_latest(self) -> str:
        latest = self.latest_step()
        return (
            f"step {latest} in {self.directory}"
            if latest is not None
            else f"none in {self.directory}"
        )

    # --------------------------------------------------------------------------------- restore

    def restore(
        self,
        target: Any = None,
        *,
        step: int | None = None,
        config: dict | None = None,
        required: Sequence[str] = REQUIRED,
        preferred: Sequence[str] = PREFERRED,
    ) -> Restored:
        """Restore step ``step`` (default: the latest readable checkpoint).

        target: a pytree like the saved state (host or device arrays, or ShapeDtypeStructs) whose
          structure, shapes and dtypes the checkpoint must match; the state comes back in its
          structure as host numpy arrays. None: the saved nested dicts, as numpy arrays.
        config: the current run's config; when given, ``check_compatible`` compares it with the
          saved one on ``required`` (error) and ``preferred`` (warning) entries.

        Raises FileNotFoundError when there is no checkpoint, IncompatibleCheckpointError when it
        belongs to a different run, CorruptCheckpointError when none can be read. Without
        ``step``, an unreadable checkpoint is skipped for the one before; unreadable ones newer
        than the one restored are moved aside to ``<directory>.bad/`` (unless read-only), and each
        gives one CheckpointWarning naming its step, the reason, the step restored instead and
        where it was moved.
        """
        self.wait()
        self._manager.reload()
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step is not None and step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; saved steps: {steps}"
            )
        candidates = [step] if step is not None else steps[::-1]
        failures: list[tuple[int, str]] = []
        self._quiet_orphans(True)  # kept until close() once a read has failed
        for s in candidates:
            where = f"checkpoint step {s} in {self.directory}"
            try:
                meta = self._read(s, META)
                position = Position(int(meta["position"]["epoch"]), int(meta["position"]["step"]))
            except Exception as err:
                failures.append((s, self._reason(err)))
            else:
                if config is not None:  # a different run is an error, not a reason to fall back
                    check_compatible(
                        meta.get("config", {}),
                        config,
                        required=required,
                        preferred=preferred,
                        where=where,
                    )
                try:
                    state = self._read_state(s, target, where)
                except IncompatibleCheckpointError:
                    raise
                except Exception as err:
                    failures.append((s, self._reason(err)))
                else:
                    self._quiet_orphans(bool(failures))
                    moved = self._set_aside([f for f, _ in failures])
                    for f, reason in failures:  # one line each: what, why, what now
                        aside = f"; step {f} moved to {moved[f]}" if f in moved else ""
                        warnings.warn(
                            f"checkpoint step {f} in {self.directory} is corrupt or incomplete: "
                            f"{reason}; falling back to step {s}{aside}",
                            CheckpointWarning,
                            stacklevel=2,
                        )
                    return Restored(
                        s, state, position, meta.get("config", {}), self.directory / str(s)
                    )
            if step is not None:
                raise CorruptCheckpointError(
                    f"checkpoint step {step} in {self.directory} is corrupt or incomplete: "
                    f"{failures[-1][1]}"
                )
        shown = "; ".join(f"step {s}: {r}" for s, r in failures)
        raise CorruptCheckpointError(f"no readable checkpoint in {self.directory} ({shown})")

    @staticmethod
    def _reason(err: BaseException) -> str:
        text = " ".join(str(err).split())
        return f"{type(err).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"

    def _read(self, step: int, item: str, item_args: Any = None) -> Any:
        ocp = self._ocp
        args = item_args if item_args is not None else ocp.args.JsonRestore()
        return self._manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]

    def _read_state(self, step: int, target: Any, where: str) -> Any:
        ocp = self._ocp
        saved = self._manager.item_metadata(step)[STATE]
        if saved is None:
            raise FileNotFoundError(f"no {STATE!r} metadata in the checkpoint")
        saved_tree = saved.tree if hasattr(saved, "tree") else saved
        if target is None:
            host = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved_tree)
            return self._read(step, STATE, ocp.args.StandardRestore(host))
        check_structure(saved_tree, target, where)
        host = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), target)
        return self._read(step, STATE, ocp.args.StandardRestore(host))

    def _set_aside(self, steps: Sequence[int]) -> dict[int, Path]:
        """Move unreadable ``steps`` to ``<directory>.bad/<step>`` (process 0; never read-only);
        returns {step: where it went} of the moves made here."""
        moved: dict[int, Path] = {}
        if not steps or self.read_only:
            return moved
        if jax.process_index() == 0:
            bad = self.directory.with_name(self.directory.name + ".bad")
            bad.mkdir(parents=True, exist_ok=True)
            for s in steps:
                dest, n = bad / str(s), 1
                while dest.exists():
                    dest, n = bad / f"{s}-{n}", n + 1
                shutil.move(str(self.directory / str(s)), dest)
                moved[s] = dest
        if jax.process_count() > 1:  # every process lists the steps only once they are moved
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxmodels: unreadable checkpoints set aside")
        self._manager.reload()
        return moved

    def wait(self) -> None:
        """Block until pending async saves are on disk (raises if one failed)."""
        with _interrupt_after():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release orbax's threads."""
        try:
            with _interrupt_after():
                self._manager.close()
                _join_orbax_threads()
        finally:
            self._quiet_orphans(False)
            if self._log_filter is not None:
                logging.getLogger("absl").removeFilter(self._log_filter)
                self._log_filter = None

    def _quiet_orphans(self, on: bool) -> None:
        """Install (or remove, if still the current hook) this object's ``OrphanedCallbackFilter``."""
        if on and self._orphan_filter is None:
            self._orphan_filter = OrphanedCallbackFilter(sys.unraisablehook)
            sys.unraisablehook = self._orphan_filter
        elif not on and self._orphan_filter is not None:
            if sys.unraisablehook is self._orphan_filter:
                sys.unraisablehook = self._orphan_filter.previous
            self._orphan_filter = None

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _interrupt_after():
    """Hold Ctrl-C (SIGINT) back until the block is done, then deliver it: a save interrupted
    half-way leaves orbax's threads waiting forever, and the program hangs when it exits."""
    held, main = [], threading.current_thread() is threading.main_thread()  # signals go to main
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(1)) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)


def _join_orbax_threads(timeout: float = 120.0) -> None:
    """Wait for orbax's threads that finish a save (metadata after the arrays commit): one still
    running when the program ends logs "cannot schedule new futures after interpreter shutdown"."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and type(thread).__module__.startswith("orbax"):
            thread.join(timeout)
