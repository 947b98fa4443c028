"""The seed CNN on the whole of MNIST with the Keras example's recipe, and beside it PyTorch.

The seed's network is the Keras MNIST example (Chollet, *Deep Learning with Python*, 5.1): three
3x3 convolutions (32, 64, 64 filters; ReLU; 2x2 max pooling after the first two), a dense layer of
64 and a 10-way softmax, 93,322 parameters, trained with RMSprop (lr 1e-3), batch 64, for 5 epochs
on the 60,000 training images; the book reports 0.9913 test accuracy. Here ``CNN()`` is trained
with that recipe (``jaxmodels.training.fit.KERAS_CNN_MNIST``: RMSprop at a constant 1e-3, as
Keras; not the CLI's default for MNIST, which decays its rate, ``cli_seeds.py``) and with Adam at
the same constant rate, over several seeds, and tested on the 10,000 test images after every
epoch. The same network, recipe and data are trained in PyTorch in
a process of its own (no JAX runtime in it), for its time per epoch on this machine.

    python experiments/cnn_mnist.py --data-dir DIR    # MNIST's four IDX files; ~10 min on 2 CPUs

Writes OUT/cnn_mnist.json (config, environment, per-run curves and epoch times, PyTorch's), .md
(the table) and .png (test accuracy against epoch); each run's config.json and metrics.jsonl go to
WORKDIR/<optimizer>-seed<seed>/.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxmodels import records, report
from jaxmodels.bench import torch_models
from jaxmodels.data.datasets import get_dataset
from jaxmodels.nn.models import get_model
from jaxmodels.training import runlog
from jaxmodels.training.fit import KERAS_CNN_MNIST, TrainConfig, fit

STEM = "cnn_mnist"
HERE = Path(__file__).resolve().parent
ANCHOR = {"test_accuracy": 0.9913, "source": "Chollet, Deep Learning with Python (2017), 5.1"}
GOAL = 0.990  # mean test accuracy over seeds after 5 epochs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data-dir", default=None, help="MNIST's folder (default: $JAXMODELS_DATA)")
    p.add_argument(
        "--optimizers", nargs="+", choices=("rmsprop", "adam"), default=["rmsprop", "adam"]
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-size", type=int, default=None, help="first N training images (all)")
    p.add_argument("--test-size", type=int, default=None, help="first N test images (all)")
    p.add_argument(
        "--torch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train the PyTorch network too (skipped when torch is not installed)",
    )
    p.add_argument("--workdir", type=Path, default=Path("runs") / STEM)
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder of the result files")
    return p.parse_args(argv)


def keras_recipe(**overrides) -> TrainConfig:
    """The Keras example's recipe (``KERAS_CNN_MNIST``), with ``overrides``."""
    return TrainConfig(**(KERAS_CNN_MNIST | overrides))


def run_jax(args: argparse.Namespace, ds, optimizer: str, seed: int) -> dict:
    cfg = keras_recipe(
        optimizer=optimizer,
        seed=seed,
        epochs=args.epochs,
        log_every=100,
        progress=False,
        plot=False,
        checkpoint=False,
    )
    workdir = args.workdir / f"{optimizer}-seed{seed}"
    with contextlib.redirect_stdout(io.StringIO()):
        result = fit(get_model("cnn"), ds, cfg, workdir, overwrite=True)
    evals = [r for r in result.history if r["kind"] == "eval"]
    return {
        "framework": "jax",
        "optimizer": optimizer,
        "seed": seed,
        "recipe": {
            k: getattr(cfg, k) for k in ("epochs", "batch_size", "lr", "optimizer", "schedule")
        },
        "test_accuracy": [r["accuracy"] for r in evals],
        "test_loss": [r["loss"] for r in evals],
        "epoch_s": runlog.epoch_times(result.history),
        "workdir": str(workdir),
    }


def run_torch(args: argparse.Namespace, ds, optimizer: str, seed: int) -> dict:
    """``torch_models.train_seed_cnn`` in a fresh Python process that never imports JAX."""
    cfg = keras_recipe(optimizer=optimizer, epochs=args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "mnist.npz"
        nchw = lambda x: np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        np.savez(
            data,
            x_train=nchw(ds.x_train),
            y_train=ds.y_train,
            x_test=nchw(ds.x_test),
            y_test=ds.y_test,
        )
        kwargs = dict(
            epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=optimizer, lr=cfg.lr, seed=seed
        )
        code = (
            "import importlib.util, json, sys\n"
            f"spec = importlib.util.spec_from_file_location('torch_models', {torch_models.__file__!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            f"print(json.dumps(m.train_seed_cnn({str(data)!r}, **{kwargs!r})))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
    return {
        "framework": "torch",
        "optimizer": optimizer,
        "seed": seed,
        "recipe": kwargs,
        "torch": records.version("torch"),
        **json.loads(out.stdout.splitlines()[-1]),
    }


def steady_epoch_s(runs: list[dict]) -> float:
    """The median epoch time over epochs 2 on (the first compiles); the first epochs' with one."""
    steady = [s for r in runs for s in r["epoch_s"][1:]] or [r["epoch_s"][0] for r in runs]
    return float(np.median(steady))


final = lambda run: run["test_accuracy"][-1]
SUMMARY = {  # one row per (framework, optimizer): final accuracy per seed, mean, spread, epoch time
    "seeds": report.each("seed"),
    "final_test_accuracy": report.each(final),
    "mean": report.mean(final),
    "std": report.std(final),
    "min": report.minimum(final),
    "epoch_s_median": steady_epoch_s,
    "first_epoch_s": report.each(lambda run: run["epoch_s"][0]),
}


def setup(result: dict) -> list[str]:
    c = result["config"]
    return [
        f"Recipe: {result['recipe']}; {c['epochs']} epochs, seeds {c['seeds']}. Anchor: "
        f"{ANCHOR['test_accuracy']} test accuracy ({ANCHOR['source']}); goal: mean >= {GOAL}. "
        "Epoch time: training only, the median over epochs 2 on (the first compiles)."
    ]


def torch_over_ours(result: dict) -> list[str]:
    """PyTorch's epoch time over ours with the same recipe, where both ran."""
    rows = {(r["framework"], r["optimizer"]): r for r in result["summary"]}
    ours, torch = rows.get(("jax", "rmsprop")), rows.get(("torch", "rmsprop"))
    if not (ours and torch):
        return []
    return [
        "",
        f"PyTorch's epoch over ours: {torch['epoch_s_median'] / ours['epoch_s_median']:.2f}x "
        f"(PyTorch {torch['epoch_s_median']:.1f} s with {result['runs'][-1].get('threads')} "
        f"threads, ours {ours['epoch_s_median']:.1f} s).",
    ]


REPORT = report.Report(
    title="The seed CNN on MNIST (60,000 training, 10,000 test images)",
    setup=setup,
    columns=[
        report.Column("framework", "{framework}"),
        report.Column("optimizer", "{optimizer}"),
        report.Column("test accuracy per seed", report.joined("final_test_accuracy", ".4f")),
        report.Column("mean ± std", "{mean:.4f} ± {std:.4f}", right=True),
        report.Column("goal met", lambda row: "yes" if row["mean"] >= GOAL else "no"),
        report.Column("s per epoch", "{epoch_s_median:.1f}", right=True),
        report.Column("first epoch s", report.joined("first_epoch_s", ".1f")),
    ],
    notes=torch_over_ours,
    curves=report.Curves(  # test accuracy against epoch, one line per run
        curve=lambda run: (range(1, len(run["test_accuracy"]) + 1), run["test_accuracy"]),
        color_by=("framework", "optimizer"),
        colors={
            ("jax", "rmsprop"): "tab:blue",
            ("jax", "adam"): "tab:green",
            ("torch", "rmsprop"): "tab:red",
            ("torch", "adam"): "tab:orange",
        },
        label="{framework}, {optimizer}",
        style={"marker": "o", "alpha": 0.8},
        hlines=lambda result, panel: [(ANCHOR["test_accuracy"], "black", "Keras (book)")],
        xlabel="epoch",
        ylabel="test accuracy",
        title="seed CNN on MNIST",
        size=(6, 4),
    ),
)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    study = report.Study(STEM, vars(args), REPORT)
    ds = get_dataset("mnist", data_dir=args.data_dir)
    ds = ds.head(train=args.train_size, test=args.test_size)
    runs = []
    for optimizer in args.optimizers:
        for seed in args.seeds:
            start = time.perf_counter()
            runs.append(run_jax(args, ds, optimizer, seed))
            print(
                f"jax {optimizer} seed {seed}: test accuracy {runs[-1]['test_accuracy'][-1]:.4f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    if args.torch and records.version("torch"):
        runs.append(run_torch(args, ds, "rmsprop", args.seeds[0]))
        print(
            f"torch rmsprop seed {args.seeds[0]}: test accuracy {runs[-1]['test_accuracy'][-1]:.4f}"
        )
    result, _ = study.finish(
        args.out,
        recipe=runs[0]["recipe"],
        anchor=ANCHOR,
        goal=GOAL,
        summary=report.summarise(runs, ("framework", "optimizer"), SUMMARY),
        runs=runs,
    )
    return result


if __name__ == "__main__":
    main()
