"""One writer per run folder: an exclusive OS lock that a training run holds from its first check
of the folder to its last write.

    with claim(workdir, model="cnn", dataset="digits", resume=False, overwrite=False):
        ...                          # the whole run; RunLockedError when another process trains
                                     # in workdir, before the folder is looked at

The lock is ``flock`` on a file in the run folder (``rundir.LOCK_FILE``): the OS drops it when the
process ends, however it ends, so a killed run leaves no stale lock; the file itself stays and only
says who held it last (pid, host, start time), which the refusal names. Readers (``eval``,
``sample``, ``export``) take no lock: they read the latest complete checkpoint while a run trains.
On a filesystem without locks (some network mounts) a warning says so once and the run goes on
unguarded. Multi-host runs lock in process 0 only, the process that writes the run's files. A
process that holds a folder's lock may take it again (the CLI claims the folder before it loads
data, then ``fit`` claims it for the run): the lock is released when the outermost claim ends.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jax

from jaxmodels.training.rundir import LOCK_FILE, RunFolderError, check_writable, prepare_workdir

# errno values of a filesystem that does not implement flock (as opposed to a lock held elsewhere)
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


class RunLockedError(RunFolderError):
    """Another process holds the run folder's lock: it is training there now."""


class RunLockWarning(UserWarning):
    """The run folder's filesystem cannot lock: two writers would not be stopped."""


def holder(workdir: str | Path) -> str:
    """Who holds (or last held) ``workdir``'s lock, as "pid P on host H since T", from its file."""
    try:
        info = json.loads((Path(workdir) / LOCK_FILE).read_text())
        return f"pid {info['pid']} on host {info['host']} since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its lock file names none)"


# The folders this process holds, by resolved path: how many claims are open on each.
_HELD: dict[Path, int] = {}


class RunLock:
    """The exclusive lock on ``workdir`` (created if missing); ``follow`` moves it to a new folder
    at the same path (after ``--overwrite`` moved the old one aside). Taking a lock this process
    already holds only counts the nesting."""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir).expanduser()
        self._fd: int | None = None
        self._nested = False

    def acquire(self) -> RunLock:
        check_writable(self.workdir, "work folder")  # created, or one line saying why not
        key = self.workdir.resolve()
        if _HELD.get(key):
            _HELD[key] += 1
            self._nested = True
            return self
        fd = os.open(self.workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in NO_LOCKS:
                warnings.warn(
                    f"the filesystem of {self.workdir} cannot lock files ({err.strerror}): "
                    "nothing stops a second run from writing into this folder",
                    RunLockWarning,
                    stacklevel=2,
                )
                return self
            raise RunLockedError(
                f"{self.workdir} is being written by {holder(self.workdir)}: wait for that run to "
                "end (eval, sample and export may read it meanwhile), or use another --workdir"
            ) from None
        stamp = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(stamp) + "\n").encode())
        self._fd = fd
        _HELD[key] = 1
        return self

    def release(self) -> None:
        key = self.workdir.resolve()
        if self._nested:
            self._nested = False
            _HELD[key] -= 1
        elif self._fd is not None:
            fd, self._fd = self._fd, None
            _HELD.pop(key, None)
            os.close(fd)  # closing the last descriptor drops the flock

    def follow(self) -> None:
        """Lock the folder now at ``workdir`` and let go of the one moved away from it."""
        if self._nested:
            return  # the outer claim follows it
        old, self._fd = self._fd, None
        _HELD.pop(self.workdir.resolve(), None)
        try:
            self.acquire()
        finally:
            if old is not None:
                os.close(old)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def claim(
    workdir: str | Path, *, model: str, dataset: str, resume: bool = False, overwrite: bool = False
) -> Iterator[Path | None]:
    """Hold ``workdir``'s lock (process 0) and make the folder ready for a run of ``model`` on
    ``dataset`` (``rundir.prepare_workdir``: fresh, ``resume`` or ``overwrite``) until the block
    ends; yields where an overwritten run was moved (else None)."""
    if jax.process_index() != 0:
        yield prepare_workdir(
            workdir, model=model, dataset=dataset, resume=resume, overwrite=overwrite
        )
        return
    with RunLock(workdir) as lock:
        moved = prepare_workdir(
            workdir, model=model, dataset=dataset, resume=resume, overwrite=overwrite
        )
        if moved is not None:
            lock.follow()
        yield moved
