"""MNIST read as a sequence: the LSTM against the simple RNN, row by row and pixel by pixel.

Each 28x28 image is read one row per step (T = 28, 28 features) or one pixel per step (T = 784, the
task of Le et al. 2015), optionally with one fixed random permutation of the pixels (permuted
MNIST). ``lstm-classifier`` and ``rnn-classifier`` (hidden 128, a dense head on the last hidden
state) are trained with the same recipe (Adam, cosine decay, gradients clipped to global norm 1,
batch 128) for a budget of epochs per task, and tested on the 10,000 test images after every epoch.
The pixel tasks were run at a peak lr of 5e-4: at 1e-3 the pixel LSTM fell back to chance in its
third epoch (gradient norms spiking) and was stopped.
The papers train for hundreds of epochs on accelerators; a pixel epoch of the LSTM takes minutes on
2 CPU cores, so a pixel budget of tens of epochs spans several sittings: with ``--resume`` each run
saves a checkpoint at the end of every epoch in its folder under WORKDIR and a later call continues
it from there (exactly: ``jaxmodels.training.fit``), so the command can be stopped and run again.
``--dtype bfloat16`` computes in bfloat16 with the parameters in float32, like the CLI's.

    python experiments/sequential_mnist.py --data-dir DIR            # rows, 3 seeds: ~10 min
    python experiments/sequential_mnist.py --data-dir DIR --tasks pixels --epochs 10 --seeds 0 \
        --lr 5e-4 --resume --workdir runs/seqmnist-pixels            # hours: stop and rerun

Writes OUT/sequential_mnist[-TASKS].json (config, environment, per-run curves), .md (the table,
with each run's equivalent ``jaxmodels train`` command) and .png (test accuracy against epoch).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from pathlib import Path

import jax.numpy as jnp

from jaxmodels import report
from jaxmodels.data.datasets import get_dataset
from jaxmodels.nn.models import get_model
from jaxmodels.training import runlog
from jaxmodels.training.fit import TrainConfig, fit

STEM = "sequential_mnist"
HERE = Path(__file__).resolve().parent
MODELS = {"lstm": "lstm-classifier", "rnn": "rnn-classifier"}
TASKS = {  # task: get_dataset("seq-mnist", ...) options
    "rows": {"steps": "rows"},
    "pixels": {"steps": "pixels"},
    "permuted": {"steps": "pixels", "permute": 0},
}
# Published test accuracies, with what their training budget was.
ANCHORS = {
    ("rows", "lstm"): {"accuracy": 0.985, "source": "the goal set for this library (no paper)"},
    ("pixels", "lstm"): {"accuracy": 0.982, "source": "Arjovsky et al. 2016, Table 1"},
    ("pixels", "rnn"): {"accuracy": 0.35, "source": "Le et al. 2015, Fig. 3 (tanh RNN, about)"},
    ("permuted", "lstm"): {"accuracy": 0.880, "source": "Arjovsky et al. 2016, Table 1"},
    ("permuted", "rnn"): {"accuracy": 0.35, "source": "Le et al. 2015, Fig. 3 (tanh RNN, about)"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data-dir", default=None, help="MNIST's folder (default: $JAXMODELS_DATA)")
    p.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=["rows"])
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (the budget)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's peak learning rate")
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="checkpoint every epoch and continue each run from its latest checkpoint in WORKDIR",
    )
    p.add_argument("--train-size", type=int, default=None, help="first N training images (all)")
    p.add_argument("--test-size", type=int, default=None, help="first N test images (all)")
    p.add_argument("--workdir", type=Path, default=Path("runs") / STEM)
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder of the result files")
    return p.parse_args(argv)


def cli_command(args: argparse.Namespace, task: str, model: str) -> str:
    """The ``jaxmodels train`` command that trains the same model on the same data."""
    data = "".join(
        f" --data-arg {k}={v}" for k, v in TASKS[task].items() if k != "steps" or v != "rows"
    )
    dtype = "" if args.dtype == "float32" else f" --dtype {args.dtype}"
    return (
        f"jaxmodels train {MODELS[model]} --dataset seq-mnist --data-dir DIR{data}{dtype} "
        f"--epochs {args.epochs} --batch-size {args.batch_size} --lr {args.lr} --clip-norm "
        f"{args.clip_norm} --model-arg hidden_size={args.hidden}"
    )


def run_one(args: argparse.Namespace, ds, task: str, model: str, seed: int) -> dict:
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer="adam",
        schedule="cosine",
        clip_norm=args.clip_norm,
        seed=seed,
        log_every=100,
        progress=False,
        plot=False,
        checkpoint=args.resume,
        checkpoint_every=len(ds.x_train)
        // args.batch_size,  # an epoch (the iterator drops the rest)
        keep=2,  # the last two epochs: a run can be taken back one epoch
    )
    workdir = args.workdir / f"{task}-{model}-seed{seed}"
    options = {"dtype": jnp.bfloat16} if args.dtype == "bfloat16" else {}
    net = get_model(MODELS[model], hidden_size=args.hidden, **options)
    with contextlib.redirect_stdout(io.StringIO()):
        result = fit(net, ds, cfg, workdir, resume=args.resume, overwrite=not args.resume)
    evals = [r for r in result.history if r["kind"] == "eval"]
    return {
        "task": task,
        "model": model,
        "seed": seed,
        "seq_len": ds.input_shape[0],
        "test_accuracy": [r["accuracy"] for r in evals],
        "test_loss": [r["loss"] for r in evals],
        "epoch_s": runlog.epoch_times(result.history),
        "workdir": str(workdir),
    }


def summary_fields(args: argparse.Namespace) -> dict:
    """One row per (task, model): final accuracy per seed, mean, spread, the anchor, the command."""
    final = lambda run: run["test_accuracy"][-1]
    return {
        "seq_len": report.first("seq_len"),
        "epochs": report.first(lambda run: len(run["test_accuracy"])),
        "seeds": report.each("seed"),
        "final_test_accuracy": report.each(final),
        "mean": report.mean(final),
        "std": report.std(final),
        "best_epoch_accuracy": report.each(lambda run: max(run["test_accuracy"])),
        "epoch_s_median": report.median("epoch_s"),
        "anchor": report.first(lambda run: ANCHORS.get((run["task"], run["model"]))),
        "command": report.first(lambda run: cli_command(args, run["task"], run["model"])),
    }


def setup(result: dict) -> list[str]:
    c = result["config"]
    lines = [
        f"Hidden {c['hidden']}; {c['epochs']} epochs of batch {c['batch_size']} over "
        f"{result['train_examples']:,} training images; Adam, peak lr {c['lr']}, cosine decay to 0, "
        f"clip norm {c['clip_norm']}; compute in {c.get('dtype', 'float32')} (parameters float32); "
        f"seeds {c['seeds']}; test accuracy on {result['test_examples']:,} test images."
    ]
    if c.get("resume"):
        lines.append(
            "Each run was saved at the end of every epoch and resumed where a sitting stopped "
            "(`--resume`); each sitting's first epoch, like the first, includes compilation."
        )
    return lines


def commands(result: dict) -> list[str]:
    """Each row's equivalent ``jaxmodels train`` command."""
    lines = ["", "The same runs from the command line:", ""]
    return lines + [f"- {r['task']}, {r['model']}: `{r['command']}`" for r in result["summary"]]


def anchor(row: dict) -> str:
    a = row["anchor"]
    return f"{a['accuracy']:.3f} ({a['source']})" if a else "-"


REPORT = report.Report(
    title="Sequential MNIST: LSTM and simple RNN",
    setup=setup,
    columns=[
        report.Column("task", "{task}"),
        report.Column("T", "{seq_len}", right=True),
        report.Column("model", "{model}"),
        report.Column("epochs", "{epochs}", right=True),
        report.Column("test accuracy per seed", report.joined("final_test_accuracy", ".4f")),
        report.Column("mean ± std", "{mean:.4f} ± {std:.4f}", right=True),
        report.Column("anchor", anchor),
        report.Column("s per epoch", "{epoch_s_median:.0f}", right=True),
    ],
    notes=commands,
    curves=report.Curves(  # test accuracy against epoch, one panel per task, a line per run
        curve=lambda run: (range(1, len(run["test_accuracy"]) + 1), run["test_accuracy"]),
        panel_by="task",
        color_by="model",
        colors={"lstm": "tab:blue", "rnn": "tab:red"},
        label="{model}",
        style={"marker": "o", "alpha": 0.8},
        xlabel="epoch",
        ylabel="test accuracy",
        title="sequential MNIST, {panel}",
        size=(4.5, 3.6),
    ),
)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    name = STEM if args.tasks == ["rows"] else f"{STEM}-{'-'.join(args.tasks)}"
    name += "" if args.dtype == "float32" else f"-{args.dtype}"
    study = report.Study(name, vars(args), REPORT)
    runs, train_examples, test_examples = [], None, None
    for task in args.tasks:
        ds = get_dataset("seq-mnist", data_dir=args.data_dir, **TASKS[task])
        ds = ds.head(train=args.train_size, test=args.test_size)
        train_examples, test_examples = len(ds.x_train), len(ds.x_test)
        for seed in args.seeds:
            for model in args.models:
                start = time.perf_counter()
                runs.append(run_one(args, ds, task, model, seed))
                print(
                    f"{task} {model} seed {seed}: test accuracy {runs[-1]['test_accuracy'][-1]:.4f} "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    result, _ = study.finish(
        args.out,
        train_examples=train_examples,
        test_examples=test_examples,
        summary=report.summarise(runs, ("task", "model"), summary_fields(args)),
        runs=runs,
    )
    return result


if __name__ == "__main__":
    main()
