"""MNIST read as a sequence: the LSTM against the simple RNN, row by row and pixel by pixel.

Each 28x28 image is read one row per step (T = 28, 28 features) or one pixel per step (T = 784, the
task of Le et al. 2015), optionally with one fixed random permutation of the pixels (permuted
MNIST). ``lstm-classifier`` and ``rnn-classifier`` (hidden 128, a dense head on the last hidden
state) are trained with the same recipe (Adam, cosine decay, gradients clipped to global norm 1,
batch 128) for a budget of epochs per task, and tested on the 10,000 test images after every epoch.
The papers train for hundreds of epochs on accelerators; a pixel epoch of the LSTM takes minutes on
2 CPU cores, so the pixel budget here is a few epochs and the results say where that falls short.

    python experiments/sequential_mnist.py --data-dir DIR            # rows, 3 seeds: ~10 min
    python experiments/sequential_mnist.py --data-dir DIR --tasks pixels --epochs 2 --seeds 0

Writes OUT/sequential_mnist[-TASKS].json (config, environment, per-run curves), .md (the table,
with each run's equivalent ``jaxmodels train`` command) and .png (test accuracy against epoch).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from pathlib import Path

import numpy as np

from jaxmodels import records
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
    return (
        f"jaxmodels train {MODELS[model]} --dataset seq-mnist --data-dir DIR{data} "
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
        checkpoint=False,
    )
    workdir = args.workdir / f"{task}-{model}-seed{seed}"
    with contextlib.redirect_stdout(io.StringIO()):
        result = fit(
            get_model(MODELS[model], hidden_size=args.hidden), ds, cfg, workdir, overwrite=True
        )
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


def summarise(runs: list[dict], args: argparse.Namespace) -> list[dict]:
    rows = []
    for task, model in dict.fromkeys((r["task"], r["model"]) for r in runs):
        mine = [r for r in runs if r["task"] == task and r["model"] == model]
        finals = [r["test_accuracy"][-1] for r in mine]
        rows.append(
            {
                "task": task,
                "model": model,
                "seq_len": mine[0]["seq_len"],
                "epochs": len(mine[0]["test_accuracy"]),
                "seeds": [r["seed"] for r in mine],
                "final_test_accuracy": finals,
                "mean": float(np.mean(finals)),
                "std": float(np.std(finals)),
                "best_epoch_accuracy": [max(r["test_accuracy"]) for r in mine],
                "epoch_s_median": float(np.median([s for r in mine for s in r["epoch_s"]])),
                "anchor": ANCHORS.get((task, model)),
                "command": cli_command(args, task, model),
            }
        )
    return rows


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [
        "# Sequential MNIST: LSTM and simple RNN",
        "",
        records.provenance(result),
        f"Hidden {c['hidden']}; {c['epochs']} epochs of batch {c['batch_size']} over "
        f"{result['train_examples']:,} training images; Adam, peak lr {c['lr']}, cosine decay to 0, "
        f"clip norm {c['clip_norm']}; seeds {c['seeds']}; test accuracy on {result['test_examples']:,} "
        "test images.",
        "",
        "| task | T | model | epochs | test accuracy per seed | mean ± std | anchor | s per epoch |",
        "|---|---:|---|---:|---|---:|---|---:|",
    ]
    for r in result["summary"]:
        anchor = f"{r['anchor']['accuracy']:.3f} ({r['anchor']['source']})" if r["anchor"] else "-"
        lines.append(
            f"| {r['task']} | {r['seq_len']} | {r['model']} | {r['epochs']} "
            f"| {', '.join(f'{a:.4f}' for a in r['final_test_accuracy'])} "
            f"| {r['mean']:.4f} ± {r['std']:.4f} | {anchor} | {r['epoch_s_median']:.0f} |"
        )
    lines += ["", "The same runs from the command line:", ""]
    lines += [f"- {r['task']}, {r['model']}: `{r['command']}`" for r in result["summary"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Test accuracy against epoch, one panel per task, one line per (model, seed)."""
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r["task"] for r in result["runs"]))
    fig = Figure(figsize=(4.5 * len(tasks), 3.6), layout="constrained")
    colors = {"lstm": "tab:blue", "rnn": "tab:red"}
    for ax, task in zip(fig.subplots(1, len(tasks), squeeze=False)[0], tasks):
        seen = set()
        for run in (r for r in result["runs"] if r["task"] == task):
            epochs = range(1, len(run["test_accuracy"]) + 1)
            ax.plot(
                epochs,
                run["test_accuracy"],
                color=colors[run["model"]],
                marker="o",
                alpha=0.8,
                label=None if run["model"] in seen else run["model"],
            )
            seen.add(run["model"])
        ax.set(xlabel="epoch", ylabel="test accuracy", title=f"sequential MNIST, {task}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    study = records.Study(
        STEM if args.tasks == ["rows"] else f"{STEM}-{'-'.join(args.tasks)}", vars(args)
    )
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
        markdown,
        plot,
        train_examples=train_examples,
        test_examples=test_examples,
        summary=summarise(runs, args),
        runs=runs,
    )
    return result


if __name__ == "__main__":
    main()
