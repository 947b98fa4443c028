"""Multi-host: two real processes (``jax.distributed`` on 127.0.0.1, gloo CPU collectives, 2 fake
devices each, the sharded strategy over the 4-device global mesh, each process feeding only its
half of every batch) match a one-process run of the same global batches; only process 0 writes."""

import importlib.util
import json
import shutil
import socket
from pathlib import Path

import jax
import numpy as np
from test_parallel import TOL, WORKER, finish, largest_difference, load_run, run_worker

from jaxmodels.training.fit import fit
from jaxmodels.training.parallel import SingleDevice


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_run(out: Path) -> tuple[dict, list[np.ndarray]]:
    """The same model, data and settings as the workers, in this process on one device."""
    spec = importlib.util.spec_from_file_location("_parallel_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    model, ds, cfg = worker.setup()
    result = fit(model, ds, cfg, out / "reference", strategy=SingleDevice())
    return {"history": result.history}, [np.asarray(x) for x in jax.tree.leaves(result.state)]


def test_two_processes_match_one(tmp_path):
    port = free_port()
    procs = [
        run_worker(
            {
                "devices": 2,
                "out": str(tmp_path),
                "runs": ["sharded"],
                "coordinator": f"127.0.0.1:{port}",
                "num_processes": 2,
                "process_id": i,
            }
        )
        for i in range(2)
    ]
    try:
        reference = reference_run(tmp_path)  # while the two processes run
    finally:
        for p in procs:
            finish(p)
    for i in range(2):
        result = load_run(tmp_path, "sharded", process=i)
        diff = largest_difference(reference, result)
        print(f"one process vs process {i} of two: largest difference {diff}")
        assert diff["metrics"] < TOL and diff["state"] < TOL, (i, diff)
    meta = [json.loads((tmp_path / f"result-p{i}.json").read_text()) for i in range(2)]
    assert [
        (m["process_index"], m["process_count"], m["devices"], m["local_devices"], m["default"])
        for m in meta
    ] == [(0, 2, 4, 2, "sharded"), (1, 2, 4, 2, "sharded")]
    # Both share one work folder, as on a shared file system; only process 0 writes the logs, so
    # metrics.jsonl holds each row once.
    run = meta[0]["runs"]["sharded"]
    assert {"config.json", "metrics.jsonl"} <= set(run["wrote"])
    rows = [
        json.loads(line)
        for line in (tmp_path / "run-sharded" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows == json.loads(json.dumps(run["history"]))


def test_two_processes_resume_past_a_corrupt_checkpoint(tmp_path):
    """Two processes resume from a run whose latest checkpoint is unreadable: both fall back to the
    one before, process 0 moves the bad one aside (the others wait for it before listing the steps
    again, or they would skip saving that step number while process 0 saves it), and the resumed run
    ends where the uninterrupted one did."""

    def two_processes(out: Path, **config) -> None:
        port = free_port()
        procs = [
            run_worker(
                {
                    "devices": 2,
                    "out": str(out),
                    "runs": ["sharded"],
                    "workdir": str(tmp_path / "run"),
                    "checkpoint_every": 2,
                    "coordinator": f"127.0.0.1:{port}",
                    "num_processes": 2,
                    "process_id": i,
                    **config,
                }
            )
            for i in range(2)
        ]
        for p in procs:
            finish(p)

    two_processes(tmp_path / "first")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(int(d.name) for d in checkpoints.iterdir() if d.name.isdigit()) == [6, 8, 10]
    shutil.rmtree(checkpoints / "10" / "state")  # the latest checkpoint is damaged
    two_processes(tmp_path / "again", resume=True)

    assert sorted(d.name for d in (tmp_path / "run" / "checkpoints.bad").iterdir()) == ["10"]
    assert sorted(int(d.name) for d in checkpoints.iterdir() if d.name.isdigit()) == [6, 8, 10]
    for i in range(2):
        (_, first), (resumed, again) = (
            load_run(tmp_path / d, "sharded", i) for d in ("first", "again")
        )
        # process 0 keeps the rows logged up to the restored step 8; the others hold this run's only
        steps = [r["step"] for r in resumed["history"] if r["kind"] == "train"]
        assert steps == (list(range(1, 11)) if i == 0 else [9, 10]), (i, steps)
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)
