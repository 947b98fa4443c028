"""Runs training under chosen strategies in a fresh process with N fake CPU devices, for
test_parallel.py and test_multihost.py (XLA_FLAGS must be set before jax is imported, so these runs
cannot share the pytest process).

    python tests/_parallel_worker.py '{"devices": 8, "out": "/tmp/x", "runs": ["single", "pmap", "sharded"]}'

Writes OUT/result-p<process>.json ({"devices", "process_index", "process_count", "runs": {name:
{"history", "test_metrics", "seconds", "wrote"}}, "steps", "errors", "cli"}) and
OUT/<run>-p<process>.npz (the final state's leaves in tree order). Multi-host: "coordinator",
"num_processes", "process_id". Checkpoints: "checkpoint_every", "resume", and "workdir" (the run's
folder instead of OUT/run-<name>). ``setup`` gives the model, data and settings every run uses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path


def main(config: dict) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={config['devices']}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import jax

    jax.config.update("jax_numpy_dtype_promotion", "strict")  # as tests/conftest.py
    jax.config.update("jax_numpy_rank_promotion", "raise")

    from jaxmodels.training import parallel

    if "coordinator" in config:
        parallel.initialize_distributed(
            config["coordinator"], config["num_processes"], config["process_id"]
        )
    # No JAX computation may run before initialize: everything below comes after it.
    import numpy as np

    from jaxmodels.training.fit import fit

    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    model, ds, cfg = setup()
    cfg = dataclasses.replace(cfg, checkpoint_every=config.get("checkpoint_every"))
    result = {
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "default": parallel.get_strategy().name,
        "runs": {},
    }
    for name in config.get("runs", []):
        start = time.perf_counter()
        # one folder for all processes, as on a shared file system
        workdir = Path(config["workdir"]) if "workdir" in config else out / f"run-{name}"
        fitted = fit(
            model,
            ds,
            cfg,
            workdir,
            strategy=parallel.get_strategy(name),
            resume=config.get("resume", False),
        )
        leaves = [np.asarray(x) for x in jax.tree.leaves(fitted.state)]
        np.savez(out / f"{name}-p{jax.process_index()}.npz", *leaves)
        result["runs"][name] = {
            "history": fitted.history,
            "test_metrics": fitted.test_metrics,
            "seconds": time.perf_counter() - start,
            "wrote": sorted(p.name for p in workdir.iterdir()) if workdir.exists() else [],
        }
    if config.get("steps"):
        result["steps"] = uneven_padding_steps(model, ds)
        result["errors"] = {}
        for name in ("pmap", "sharded"):
            try:
                parallel.get_strategy(name).put_batch({"x": ds.x_train[:30], "y": ds.y_train[:30]})
            except ValueError as err:
                result["errors"][name] = str(err)
    if config.get("cli"):
        from jaxmodels.cli import main as cli_main

        workdir = out / "cli"
        code = cli_main(
            [
                "train",
                "cnn",
                "--strategy",
                "pmap",
                "--epochs",
                "1",
                "--max-steps",
                "3",
                "--batch-size",
                "32",
                "--no-progress",
                "--workdir",
                str(workdir),
            ]
        )
        rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        result["cli"] = {
            "code": code,
            "rows": rows,
            "strategy": json.loads((workdir / "config.json").read_text())["strategy"],
        }
    (out / f"result-p{jax.process_index()}.json").write_text(json.dumps(result))


def setup():
    """(model, dataset, TrainConfig) of every run: 136 digits to train on (batch 32: four full
    batches and one padded one with 8 real rows per epoch, two epochs), 100 to test on (one padded
    evaluation batch), a narrow CNN of the seed's layout so compiling and 8-way CPU steps are quick."""
    from jaxmodels.data.datasets import get_dataset
    from jaxmodels.nn.models import get_model
    from jaxmodels.training.fit import TrainConfig

    ds = get_dataset("digits")
    ds = dataclasses.replace(
        ds,
        x_train=ds.x_train[:136],
        y_train=ds.y_train[:136],
        x_test=ds.x_test[:100],
        y_test=ds.y_test[:100],
    )
    model = get_model("cnn", features=(8, 16), pool_after=(True, True), dense_features=(32,))
    cfg = TrainConfig(
        epochs=2,
        batch_size=32,
        lr=3e-3,
        schedule="constant",
        remainder="pad",
        log_every=1,
        progress=False,
        plot=False,
        seed=0,
    )
    return model, ds, cfg


def uneven_padding_steps(model, ds) -> dict:
    """Three train steps on batches whose real rows sit on the first devices only (the rest
    padding), under each strategy; losses and final parameters for comparison."""
    import jax
    import numpy as np

    from jaxmodels.training import parallel
    from jaxmodels.training.optim import make_optimizer
    from jaxmodels.training.steps import create_train_state, make_train_step

    tx = make_optimizer("adam", 3e-3)
    x, y = ds.x_train[:32], ds.y_train[:32]
    masks = [
        np.r_[np.ones(real, np.float32), np.zeros(32 - real, np.float32)] for real in (5, 32, 12)
    ]
    out = {}
    for name in parallel.STRATEGIES:
        strategy = parallel.get_strategy(name)
        state = strategy.put_state(create_train_state(model, tx, x, seed=0))
        step = strategy.compile(make_train_step(model, tx, axis_name=strategy.axis_name))
        losses = []
        for mask in masks:
            state, metrics = step(state, strategy.put_batch({"x": x, "y": y, "mask": mask}))
            losses.append(float(strategy.fetch(metrics)["loss"]))
        params = strategy.fetch(state.params)
        out[name] = {
            "losses": losses,
            "params": [np.asarray(p).ravel().tolist() for p in jax.tree.leaves(params)],
        }
    return out


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
