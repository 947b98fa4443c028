"""Multi-host: two real processes (``jax.distributed`` on 127.0.0.1, gloo CPU collectives, 2 fake
devices each, the sharded strategy over the 4-device global mesh, each process feeding only its
half of every batch) match a one-process run of the same global batches; only process 0 writes."""

import importlib.util
import json
import socket
from pathlib import Path

import jax
import numpy as np

from jaxmodels.train import SingleDevice, fit
from test_parallel import TOL, WORKER, finish, largest_difference, load_run, run_worker


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
        run_worker({"devices": 2, "out": str(tmp_path), "runs": ["sharded"],
                    "coordinator": f"127.0.0.1:{port}", "num_processes": 2, "process_id": i})
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
    assert [(m["process_index"], m["process_count"], m["devices"], m["local_devices"], m["default"]) for m in meta] == [
        (0, 2, 4, 2, "sharded"), (1, 2, 4, 2, "sharded")
    ]
    # Both share one work folder, as on a shared file system; only process 0 writes the logs, so
    # metrics.jsonl holds each row once.
    run = meta[0]["runs"]["sharded"]
    assert {"config.json", "metrics.jsonl"} <= set(run["wrote"])
    rows = [json.loads(line) for line in (tmp_path / "run-sharded" / "metrics.jsonl").read_text().splitlines()]
    assert rows == json.loads(json.dumps(run["history"]))
