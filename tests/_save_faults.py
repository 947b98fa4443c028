"""Faults injected where orbax (orbax-checkpoint 0.12.8) writes a checkpoint, for tests/test_faults.py.

``install(fault, step)`` patches orbax in this process so that saving checkpoint ``step`` fails:

  "enospc": ``orbax.checkpoint._src.path.async_path.write_text`` raises OSError(ENOSPC) for the
            state item's ``_METADATA`` (the tree metadata orbax writes in its commit thread after
            the arrays are on disk: the disk fills mid-save);
  "rename": ``async_path.rename`` raises OSError(EIO) for the step's temporary folder
            (``<step>.orbax-checkpoint-tmp`` renamed to ``<step>`` when the save is finalized);
  "stall":  ``orbax.checkpoint._src.path.atomicity.AtomicRenameTemporaryPath.finalize`` of the
            step's folder creates ``<step>.finalizing`` next to it and then sleeps (for the test to
            SIGKILL the process while the save is in flight).

Orbax calls these through module attributes on every save, so patching them is enough. Used in a
subprocess as ``python -c "...; _save_faults.install(fault, step); runpy.run_module(...)"``.
"""

import asyncio
import errno

from orbax.checkpoint._src.path import async_path, atomicity

TMP = ".orbax-checkpoint-tmp"


def install(fault: str, step: int) -> None:
    folder = f"{step}{TMP}"
    if fault == "enospc":
        real_write_text = async_path.write_text

        async def write_text(path, text):
            if path.name == "_METADATA" and folder in path.parts:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return await real_write_text(path, text)

        async_path.write_text = write_text
    elif fault == "rename":
        real_rename = async_path.rename

        async def rename(src, dst):
            if src.name == folder:
                raise OSError(errno.EIO, "Input/output error", str(src))
            return await real_rename(src, dst)

        async_path.rename = rename
    elif fault == "stall":
        cls = atomicity.AtomicRenameTemporaryPath
        real_finalize = cls.finalize

        async def finalize(self):
            if self.get().name == folder:
                (self.get().parent / f"{step}.finalizing").touch()
                while True:  # until SIGKILL
                    await asyncio.sleep(0.1)
            return await real_finalize(self)

        cls.finalize = finalize
    else:
        raise ValueError(f"unknown fault {fault!r}")
