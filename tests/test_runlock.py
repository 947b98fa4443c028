"""One writer per run folder (jaxmodels.training.runlock): a second writer is refused with a line
naming the holder, the lock dies with its process, and a filesystem without locks is said once."""

import errno
import fcntl
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jaxmodels.training import runlock
from jaxmodels.training.rundir import LOCK_FILE, run_contents
from jaxmodels.training.runlock import RunLock, RunLockedError, RunLockWarning, claim

HOLD = textwrap.dedent(
    """
    import sys, time
    from jaxmodels.training.runlock import RunLock
    with RunLock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
    """
)
TRY = textwrap.dedent(
    """
    import sys
    from jaxmodels.training.runlock import RunLock, RunLockedError
    try:
        RunLock(sys.argv[1]).acquire()
        print("free")
    except RunLockedError as e:
        print(e)
    """
)


def other_process_sees(workdir) -> str:
    """What another process gets when it tries to lock ``workdir``: "free" or the refusal."""
    run = subprocess.run(
        [sys.executable, "-c", TRY, str(workdir)], capture_output=True, text=True, check=True
    )
    return run.stdout.strip()


def test_the_lock_names_its_holder_and_a_second_writer_is_refused(tmp_path):
    with RunLock(tmp_path / "run"):
        stamp = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert stamp["pid"] == os.getpid() and stamp["host"] and stamp["started"]
        refusal = other_process_sees(tmp_path / "run")
        assert refusal.startswith(f"{tmp_path / 'run'} is being written by pid {os.getpid()} on")
        assert "--workdir" in refusal and "\n" not in refusal
    assert other_process_sees(tmp_path / "run") == "free"  # released on exit


def test_the_same_process_may_claim_its_folder_again(tmp_path):
    """The CLI claims the folder, then fit does: the lock is let go when the outer claim ends."""
    with RunLock(tmp_path):
        with RunLock(tmp_path):
            pass
        assert other_process_sees(tmp_path) != "free"
    assert other_process_sees(tmp_path) == "free"


def test_a_lock_file_alone_does_not_mark_a_run(tmp_path):
    with RunLock(tmp_path):
        assert run_contents(tmp_path) == []


def test_another_process_holds_it_until_it_is_killed(tmp_path):
    """The lock is the OS's, not the file's: a killed holder leaves no stale lock."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"pid {holder.pid} on host"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=60)
    with RunLock(tmp_path):
        pass


def test_follow_locks_the_new_folder_at_the_same_path(tmp_path):
    """--overwrite moves the locked folder aside: the lock follows the path, not the old folder."""
    lock = RunLock(tmp_path / "run").acquire()
    (tmp_path / "run").rename(tmp_path / "run.old")
    lock.follow()
    assert other_process_sees(tmp_path / "run") != "free"
    assert other_process_sees(tmp_path / "run.old") == "free"
    lock.release()
    assert other_process_sees(tmp_path / "run") == "free"


def test_claim_holds_the_folder_through_an_overwrite(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"model": "cnn", "dataset": "digits"}')
    with claim(workdir, model="cnn", dataset="digits", overwrite=True) as moved:
        assert moved is not None and (moved / "config.json").is_file()
        assert other_process_sees(workdir) != "free"
    assert other_process_sees(workdir) == "free"


def test_a_filesystem_without_locks_is_said_and_the_run_goes_on(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(RunLockWarning, match="cannot lock files"), RunLock(tmp_path):
        pass


def test_an_unreadable_lock_file_still_gives_a_line(tmp_path):
    (tmp_path / LOCK_FILE).write_text("not json")
    assert runlock.holder(tmp_path) == "another process (its lock file names none)"


# ------------------------------------------------------------------------------- end to end


CLI = [sys.executable, "-m", "jaxmodels.cli"]


def _cli_env() -> dict:
    """The environment of a ``jaxmodels`` subprocess: the CPU backend, this checkout first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def test_a_second_train_is_refused_while_the_first_runs_and_resumes_once_it_died(tmp_path, capsys):
    """`jaxmodels train` in a subprocess holds its folder: a second ``train --resume`` there is
    refused in one line naming the pid, ``eval`` reads the run meanwhile, and once the first is
    killed the lock is gone with it: ``--resume`` continues from its last checkpoint."""
    from jaxmodels.cli import main
    from jaxmodels.training.rundir import saved_steps

    workdir = tmp_path / "run"
    flags = ["--batch-size", "16", "--epochs", "1", "--keep", "3", "--no-progress"]  # 89 steps
    first = subprocess.Popen(
        [*CLI, "train", "cnn", "--workdir", str(workdir), *flags, "--checkpoint-every", "2"],
        env=_cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not saved_steps(workdir):  # training, its folder locked, a checkpoint to read
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.05)
        assert json.loads((workdir / LOCK_FILE).read_text())["pid"] == first.pid
        seen = saved_steps(workdir)[-1]

        again = ["train", "cnn", "--workdir", str(workdir), *flags, "--resume"]
        assert main(again) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(
            f"jaxmodels: error: {workdir} is being written by pid {first.pid} on host "
        ), line

        assert main(["eval", "--workdir", str(workdir)]) == 0  # readers take no lock
        result = json.loads(capsys.readouterr().out)
        assert result["step"] >= seen and result["test"]["accuracy"] >= 0  # a saved step
    finally:
        first.kill()
        first.communicate(timeout=60)

    assert saved_steps(workdir)[-1] < 89, "the first run ended before it was killed"
    assert main([*again, "--checkpoint-every", "1000"]) == 0  # from its last checkpoint
    assert saved_steps(workdir)[-1] == 89
    assert json.loads((workdir / LOCK_FILE).read_text())["pid"] == os.getpid()
