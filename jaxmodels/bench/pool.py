"""The worker processes, parent side: one long-lived process per framework configuration (one for
every JAX contender; one per PyTorch allocator and thread count, ``torch_configs``), started
together, each contender set up and sampled in its configuration's process on request.

A ``Pool`` is the executor ``jaxmodels.bench.timing.time_workload`` runs the rounds with, so the
method is the same as in one process: every round, every contender of a workload gets one sample,
in a new seeded random order; only the process each sample runs in differs. The parent imports
neither torch nor jax's runtime for this (it never initializes a backend); it only sends requests
(``jaxmodels/bench/worker.py`` lists them) and waits. Each worker records its environment
(``records.environment()`` for its own framework, with its ``LD_PRELOAD``) when it starts, before
anything is timed; the workers serve every suite of a run.

Nothing hangs: a worker that does not say hello within ``Timeouts.start``, finish a setup (first
call and warm-up included) within ``Timeouts.setup`` or a sample within the larger of
``Timeouts.sample`` and 50x the sample's expected time is killed and its contenders are reported
as errors; a worker that dies is reported the same way, with the end of its output, and started
afresh for the next contender that needs it. A configuration that cannot run (its allocator
library missing, torch not installed) is skipped with the reason. ``close`` (also on Ctrl-C, as a
context manager) stops every worker: "exit", then SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from multiprocessing.connection import Pipe
from pathlib import Path
from typing import Any

from jaxmodels.bench.timing import AS_INSTALLED, Contender, Failed, Skipped
from jaxmodels.bench.torch_configs import ALLOCATORS, allocator_library, label, thread_counts

WORKER = Path(__file__).resolve().with_name("worker.py")


@dataclasses.dataclass
class Timeouts:
    """Seconds a worker may take before it is killed."""

    start: float = 300.0  # from its start to its hello (importing torch or jax on a loaded machine)
    setup: float = 900.0  # a contender's setup, first call (compilation) and warm-up calls
    sample: float = 120.0  # a sample, at least; else 50x its expected time
    stop: float = 10.0  # after "exit", before SIGTERM (and as long again before SIGKILL)


def target(setup: Any) -> dict:
    """What a worker calls to set a contender up: ``setup``, a module-level function or a
    ``functools.partial`` of one, by module and name, with its arguments."""
    func, args, kwargs = setup, (), {}
    if isinstance(setup, functools.partial):
        func, args, kwargs = setup.func, setup.args, setup.keywords
    module, name = getattr(func, "__module__", None), getattr(func, "__qualname__", "")
    if not module or not name or "<" in name:
        raise ValueError(
            "a worker process runs module-level setups only (a function, or a functools.partial "
            f"of one), got {setup!r}"
        )
    return {"module": module, "function": name, "args": tuple(args), "kwargs": dict(kwargs)}


def _exit_words(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class Worker:
    """One worker process and its pipe; ``info`` is its record in the result (name, framework,
    allocator, library preloaded, threads, status, reason, pids, deaths, hello, environment)."""

    def __init__(
        self,
        name: str,
        framework: str,
        *,
        threads: int | None = None,
        allocator: str = AS_INSTALLED,
        library: str | None = None,
        unavailable: str | None = None,
    ):
        self.name, self.framework, self.threads = name, framework, threads
        self.library = library
        self.proc: subprocess.Popen | None = None
        self.conn = None
        self.log_path: str | None = None
        self.generation = 0  # starts so far: a contender set up in an earlier one is gone
        self.info: dict[str, Any] = {
            "name": name,
            "framework": framework,
            "allocator": allocator,
            "library": library,
            "threads": threads,
            "status": "skipped" if unavailable else "not started",
            "reason": unavailable,
            "pids": [],
            "deaths": [],
        }

    @property
    def running(self) -> bool:
        return self.info["status"] == "running"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def launch(self) -> None:
        """Start the process (its hello is read by ``await_hello``)."""
        self.discard_log()  # an earlier process's, quoted in its death's reason
        env = dict(os.environ)
        paths = (os.path.abspath(p or os.curdir) for p in sys.path)
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if os.path.isdir(p)))
        if self.library:
            env["LD_PRELOAD"] = ":".join(filter(None, [self.library, env.get("LD_PRELOAD")]))
        parent, child = Pipe()
        log_fd, self.log_path = tempfile.mkstemp(prefix="jaxmodels-bench-worker-", suffix=".log")
        command = [sys.executable, str(WORKER), str(child.fileno()), self.framework]
        command += [str(self.threads)] if self.threads else []
        try:
            self.proc = subprocess.Popen(
                command,
                pass_fds=(child.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
            )
        finally:
            os.close(log_fd)
            child.close()
        self.conn = parent
        self.generation += 1
        self.info["pids"].append(self.proc.pid)
        self.info["status"] = "starting"

    def await_hello(self, timeout: float) -> None:
        """Read the worker's hello and environment; a framework that cannot start makes the worker
        "unavailable" (an import error: its contenders are skipped) or "broken" (anything else:
        errors), and it exits."""
        try:
            hello = self.receive(timeout, "hello")
        except Failed as err:
            self.info.update(status="failed", reason=str(err))
            return
        self.info["environment"] = hello.pop("environment", None)
        self.info["hello"] = hello
        self.info["jax_imported"] = hello.get("jax_imported")
        if "error" not in hello:
            self.info.update(status="running")
            return
        if hello["error"].startswith(("ModuleNotFoundError", "ImportError")):
            reason = f"{self.framework} cannot be imported here ({hello['error']})"
            self.info.update(status="unavailable", reason=reason)
        else:
            reason = f"{self.framework} failed to start ({hello['error']})"
            self.info.update(status="broken", reason=reason)
        self.stop(Timeouts.stop)

    def ensure(self, timeout: float) -> None:
        """Make sure the worker can take a contender: start it (again, after a death); raise
        Skipped or Failed, with the reason, where it cannot."""
        status = self.info["status"]
        if status in ("not started", "died"):
            self.launch()
            self.await_hello(timeout)
            status = self.info["status"]
        if status == "running":
            return
        if status in ("skipped", "unavailable"):
            raise Skipped(self.info["reason"])
        raise Failed(f"{self.name}: {self.info['reason']}")

    def send(self, message: tuple) -> None:
        if not self.running:
            raise Failed(f"worker {self.name}: {self.info['reason'] or 'not running'}")
        try:
            self.conn.send(message)
        except (OSError, EOFError):
            raise self.died() from None

    def receive(self, timeout: float, what: str) -> dict:
        try:
            if not self.conn.poll(timeout):
                self.kill()
                reason = f"no answer to {what} within {timeout:.0f} s: killed"
                self.info.update(status="died", reason=reason)
                self.info["deaths"].append(reason)
                raise Failed(f"worker {self.name}: {reason}")
            return self.conn.recv()
        except (OSError, EOFError):
            raise self.died() from None

    def request(self, message: tuple, timeout: float) -> dict:
        self.send(message)
        return self.receive(timeout, message[0])

    def log_tail(self, lines: int = 4) -> str:
        try:
            text = Path(self.log_path).read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())

    def died(self) -> Failed:
        """The worker's end, recorded: its status, exit and the end of its output."""
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.returncode
        tail = self.log_tail()
        reason = f"died ({_exit_words(code)})" + (f"; its output ended: {tail}" if tail else "")
        self.info.update(status="died", reason=reason)
        self.info["deaths"].append(reason)
        self.close_pipe()
        return Failed(f"worker {self.name} (pid {self.pid}) {reason}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.close_pipe()

    def close_pipe(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def stop(self, timeout: float, *, graceful: bool = True) -> None:
        """Ask the worker to exit; SIGTERM after ``timeout``, SIGKILL after as long again."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            if graceful and self.conn is not None:
                try:
                    self.conn.send(("exit",))
                    proc.wait(timeout=timeout)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.info["status"] == "running":
            self.info["status"] = "ran"
        self.close_pipe()
        self.discard_log()

    def discard_log(self) -> None:
        if self.log_path:
            Path(self.log_path).unlink(missing_ok=True)
            self.log_path = None


class Pool:
    """The worker processes of one run: "jax", and "torch, ALLOCATOR, N thread(s)" for each
    allocator in ``allocators`` and thread count of ``torch_configs.thread_counts(torch_threads)``.
    A context manager: entering starts them all (concurrently), leaving stops them all."""

    isolation = "process"

    def __init__(
        self,
        *,
        torch_threads: int | None = None,
        allocators: Sequence[str] = tuple(ALLOCATORS),
        timeouts: Timeouts | None = None,
    ):
        self.timeouts = timeouts or Timeouts()
        self.torch_threads = thread_counts(torch_threads)[0]
        self.workers: dict[Any, Worker] = {"jax": Worker("jax", "jax")}
        for allocator in allocators:
            library, missing = allocator_library(allocator)
            for threads in thread_counts(torch_threads):
                self.workers["torch", allocator, threads] = Worker(
                    "torch, " + label(allocator, threads),
                    "torch",
                    threads=threads,
                    allocator=allocator,
                    library=library,
                    unavailable=missing,
                )
        self.prepared: dict[Any, tuple[Worker, int, float]] = {}

    def __enter__(self) -> Pool:
        try:
            self.start()
        except BaseException:
            self.close(graceful=False)
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(graceful=exc_type is None)

    def start(self) -> None:
        """Start every worker that can run, all at once, and wait for their hellos."""
        waiting = [w for w in self.workers.values() if w.info["status"] == "not started"]
        for worker in waiting:
            worker.launch()
        for worker in waiting:
            worker.await_hello(self.timeouts.start)

    @property
    def backend(self) -> str:
        """The JAX worker's default backend."""
        jax_worker = self.workers["jax"]
        jax_worker.ensure(self.timeouts.start)
        return jax_worker.info["hello"]["backend"]

    def worker(self, contender: Contender) -> Worker | None:
        if contender.framework == "jax":
            return self.workers["jax"]
        threads = contender.threads or self.torch_threads
        return self.workers.get((contender.framework, contender.allocator, threads))

    def where(self, contender: Contender) -> dict:
        worker = self.worker(contender)
        return {
            "process": worker.name if worker else None,
            "allocator": contender.allocator,
            "threads": contender.threads,
        }

    def setup(self, key: Any, contender: Contender, *, warmup: int, min_sample_s: float) -> dict:
        worker = self.worker(contender)
        if worker is None:
            raise Skipped(
                f"no {contender.framework} worker with {contender.allocator} and "
                f"{contender.threads} threads in this run"
            )
        worker.ensure(self.timeouts.start)
        message = ("setup", key, contender.name, contender.framework, target(contender.setup))
        reply = worker.request((*message, warmup, min_sample_s), self.timeouts.setup)
        if "error" in reply:
            raise Failed(reply["error"])
        self.prepared[key] = (worker, worker.generation, reply["number"] * reply["warm_s"])
        imported = reply.pop("jax_imported", None)
        worker.info["jax_imported"] = bool(worker.info.get("jax_imported") or imported)
        return reply | {"pid": worker.pid}

    def sample(self, key: Any) -> float:
        worker, generation, expected_s = self.prepared[key]
        if worker.generation != generation or not worker.running:
            raise Failed(f"worker {worker.name} {worker.info['reason']}")
        timeout = max(self.timeouts.sample, 50 * expected_s)
        reply = worker.request(("sample", key), timeout)
        if "error" in reply:
            raise Failed(reply["error"])
        return reply["sample_s"]

    def release(self) -> None:
        """Every worker drops its set-up contenders (after each workload)."""
        for worker in {w for w, _, _ in self.prepared.values()}:
            if worker.info["status"] == "running":
                with contextlib.suppress(Failed):  # recorded in its info; restarted when needed
                    worker.request(("release",), self.timeouts.setup)
        self.prepared.clear()

    def processes(self) -> tuple[dict, list[dict]]:
        """The JAX worker's environment (the result's ``environment``) and every worker's record,
        each with the environment it recorded when it started (``records.environment()`` inside
        the worker, for its own framework only, before anything was timed)."""
        self.workers["jax"].ensure(self.timeouts.start)
        infos = copy.deepcopy([w.info for w in self.workers.values()])
        for info in infos:  # a copy for the suite's result: these workers ran it
            if info["status"] == "running":
                info["status"] = "ran"
        return infos[0]["environment"], infos

    def close(self, *, graceful: bool = True) -> None:
        """Stop every worker: all asked to exit at once, then each waited for (or terminated)."""
        if graceful:
            for worker in self.workers.values():
                with contextlib.suppress(OSError, AttributeError):  # gone, or never started
                    worker.conn.send(("exit",))
        for worker in self.workers.values():
            worker.stop(self.timeouts.stop, graceful=graceful)
