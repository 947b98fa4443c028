"""LSTM vs simple RNN on the adding problem: do the LSTM's gates fix the RNN's long-range problem?

The seed claims that the LSTM's gates solve the simple RNN's long-range dependency problem. The
adding problem (Hochreiter & Schmidhuber 1997, in the form of Le et al. 2015 and Arjovsky et al.
2016) tests it: two values marked among T uniform ones, one in each half of the sequence; the
target is their sum. Answering 1 always scores MSE 1/6, so a model only beats 1/6 by carrying the
first marked value across up to T steps. For each T, ``lstm-regressor`` and ``rnn-regressor``
(same hidden size, same data, same batches, Adam, gradient clipping by global norm, same number of
steps) are trained with ``jaxmodels.training.fit.fit``, and their test MSE is compared with the baseline.

    python experiments/lstm_vs_rnn_adding.py                         # the default study, ~5 min on 2 CPUs
    python experiments/lstm_vs_rnn_adding.py --seq-lens 100 200 --steps 5000 --seeds 0 1 2 --out /tmp/adding

Writes OUT/lstm_vs_rnn_adding.json (config, environment, per-run final metrics and test curves),
.md (the table) and .png (test MSE against step, one panel per T); each run's config.json and
metrics.jsonl go to WORKDIR/<model>-T<T>-seed<seed>/.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxmodels import report
from jaxmodels.data.datasets import get_dataset
from jaxmodels.nn.models import get_model
from jaxmodels.training.fit import TrainConfig, fit

STEM = "lstm_vs_rnn_adding"
# "rnn-matched": the simple RNN with the hidden size whose parameter count is nearest the LSTM's.
MODELS = {"lstm": "lstm-regressor", "rnn": "rnn-regressor", "rnn-matched": "rnn-regressor"}
HERE = Path(__file__).resolve().parent
SOLVED_MSE = 0.01  # "solved": test MSE below 6% of the baseline's 1/6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--seq-lens", type=int, nargs="+", default=[10, 50, 100], help="sequence lengths T"
    )
    p.add_argument(
        "--models",
        nargs="+",
        choices=tuple(MODELS),
        default=["lstm", "rnn"],
        help="rnn-matched: a simple RNN with as many parameters as the LSTM of --hidden",
    )
    p.add_argument("--hidden", type=int, default=64, help="hidden size of lstm and rnn")
    p.add_argument("--steps", type=int, default=5000, help="training steps per run")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="seeds of initialisation and batch order",
    )
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument(
        "--schedule",
        default="constant",
        help="learning-rate schedule (jaxmodels.training.fit.SCHEDULES)",
    )
    p.add_argument(
        "--clip-norm", type=float, default=1.0, help="clip gradients to this global norm"
    )
    p.add_argument("--train-size", type=int, default=5000, help="training examples per T")
    p.add_argument(
        "--test-size", type=int, default=1000, help="test examples per T (evaluated once per epoch)"
    )
    p.add_argument(
        "--data-seed", type=int, default=0, help="seed of the data (the same for every run of a T)"
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("runs") / STEM,
        help="folder of the per-run fit outputs",
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder of the result files")
    p.add_argument("--verbose", action="store_true", help="show fit's per-epoch lines")
    return p.parse_args(argv)


def param_count(model, example: np.ndarray) -> int:
    """Parameters of ``model`` on inputs like ``example`` (shapes only; nothing is computed)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), example)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def matched_rnn_hidden(hidden: int, example: np.ndarray) -> int:
    """The simple RNN hidden size whose parameter count is nearest that of the LSTM of ``hidden``
    (about 2x: the LSTM has four gates' weights, the RNN one)."""
    target = param_count(get_model("lstm-regressor", hidden_size=hidden), example)
    sizes = range(hidden, 4 * hidden + 1)
    counts = [param_count(get_model("rnn-regressor", hidden_size=h), example) for h in sizes]
    return min(zip(sizes, counts), key=lambda hc: abs(hc[1] - target))[0]


def run_one(args: argparse.Namespace, key: str, ds, seed: int) -> dict:
    """Train one model on one data set; its final and best test MSE and its test curve."""
    seq_len = ds.info["seq_len"]
    steps_per_epoch = len(ds.x_train) // args.batch_size
    cfg = TrainConfig(
        epochs=math.ceil(args.steps / steps_per_epoch),
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer="adam",
        schedule=args.schedule,
        clip_norm=args.clip_norm,
        seed=seed,
        log_every=steps_per_epoch,
        progress=False,
        plot=False,
        checkpoint=False,
    )
    hidden = matched_rnn_hidden(args.hidden, ds.x_test[:1]) if key == "rnn-matched" else args.hidden
    model = get_model(MODELS[key], hidden_size=hidden)
    workdir = args.workdir / f"{key}-T{seq_len}-seed{seed}"
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stdout if args.verbose else io.StringIO()):
        result = fit(model, ds, cfg, workdir, overwrite=True)  # a rerun: the old run moved aside
    wall = time.perf_counter() - start
    evals = [r for r in result.history if r["kind"] == "eval"]
    trains = [r for r in result.history if r["kind"] == "train"]
    curve = [[r["step"], r["loss"]] for r in evals]
    solved_at = next((s for s, mse in curve if mse < SOLVED_MSE), None)
    params = sum(int(np.size(x)) for x in jax.tree.leaves(result.state.params))
    return {
        "model": key,
        "registry_name": MODELS[key],
        "seq_len": seq_len,
        "seed": seed,
        "hidden": hidden,
        "params": params,
        "steps": trains[-1]["step"],
        "final_test_mse": curve[-1][1],
        "best_test_mse": min(m for _, m in curve),
        "final_train_mse": trains[-1]["loss"],
        "first_step_below_solved_mse": solved_at,
        "wall_s": wall,
        "first_step_s": trains[0].get("first_step_s"),
        "test_curve": curve,
        "workdir": str(workdir),
    }


def summary_fields(baselines: dict) -> dict:
    """One row per (T, model): per-seed final MSEs, their mean, the mean over the baseline
    (``baselines``: per T as text, its "baseline_mse")."""
    final = "final_test_mse"
    over = lambda runs: (
        report.mean(final)(runs) / baselines[str(runs[0]["seq_len"])]["baseline_mse"]
    )
    return {
        "hidden": report.first("hidden"),
        "params": report.first("params"),
        "seeds": report.each("seed"),
        "final_test_mse": report.each(final),
        "mean_final_test_mse": report.mean(final),
        "mean_over_baseline": over,
        "best_test_mse": report.each("best_test_mse"),
        "solved_seeds": lambda runs: sum(r[final] < SOLVED_MSE for r in runs),
        "first_step_below_solved_mse": report.each("first_step_below_solved_mse"),
    }


def setup(result: dict) -> list[str]:
    c = result["config"]
    return [
        f"Hidden {c['hidden']}, {c['steps']} steps of batch {c['batch_size']}, Adam lr {c['lr']} ({c['schedule']}), "
        f"clip norm {c['clip_norm']}; {c['train_size']} training and {c['test_size']} test examples per T "
        f"(data seed {c['data_seed']}), seeds {c['seeds']}.",
        f"Baseline: always predicting 1, MSE 1/6 = {1 / 6:.4f} in expectation (per-T test-set value below). "
        f"Solved: final test MSE < {SOLVED_MSE}.",
    ]


def baseline_table(result: dict) -> list[str]:
    """Per T: the test set's MSE of predicting 1, and its expectation."""
    columns = [
        report.Column("T", "{T}", right=True),
        report.Column(
            "baseline MSE (predict 1) on the test set", "{test_mse_predict_1:.4f}", right=True
        ),
        report.Column("expected", "{baseline_mse:.4f}", right=True),
    ]
    return ["", *report.table(columns, [b | {"T": t} for t, b in result["baselines"].items()])]


REPORT = report.Report(
    title="LSTM vs simple RNN on the adding problem",
    setup=setup,
    columns=[
        report.Column("T", "{seq_len}", right=True),
        report.Column("model", "{model}"),
        report.Column("hidden", "{hidden}", right=True),
        report.Column("parameters", "{params:,}", right=True),
        report.Column("final test MSE per seed", report.joined("final_test_mse", ".4f")),
        report.Column("mean", "{mean_final_test_mse:.4f}", right=True),
        report.Column("mean / baseline", "{mean_over_baseline:.3f}", right=True),
        report.Column("best per seed", report.joined("best_test_mse", ".4f")),
        report.Column(
            "solved seeds", lambda row: f"{row['solved_seeds']}/{len(row['seeds'])}", right=True
        ),
        report.Column(
            f"first step < {SOLVED_MSE}",
            lambda row: ", ".join(
                "-" if s is None else str(s) for s in row["first_step_below_solved_mse"]
            ),
        ),
    ],
    notes=baseline_table,
    curves=report.Curves(  # test MSE against step, one panel per T, the baseline dashed
        curve=lambda run: tuple(zip(*run["test_curve"])),
        panel_by="seq_len",
        color_by="model",
        colors={"lstm": "tab:blue", "rnn": "tab:red", "rnn-matched": "tab:orange"},
        label="{model}",
        style={"alpha": 0.8},
        hlines=lambda result, t: [
            (result["baselines"][str(t)]["baseline_mse"], "black", "predict 1 (1/6)")
        ],
        axes={"yscale": "log"},
        grid="both",
        xlabel="step",
        ylabel="test MSE",
        title="adding, T = {panel}",
        size=(4.2, 3.6),
    ),
)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = {k: v for k, v in vars(args).items() if k != "verbose"} | {"solved_mse": SOLVED_MSE}
    study = report.Study(STEM, config, REPORT)
    datasets = {
        t: get_dataset(
            "adding",
            seq_len=t,
            train_size=args.train_size,
            test_size=args.test_size,
            seed=args.data_seed,
        )
        for t in args.seq_lens
    }
    baselines = {
        str(t): {
            "baseline_mse": ds.info["baseline_mse"],
            "test_mse_predict_1": float(np.mean((ds.y_test - 1.0) ** 2)),
        }
        for t, ds in datasets.items()
    }
    runs = []
    for seed in args.seeds:
        for t, ds in datasets.items():
            for key in args.models:
                run = run_one(args, key, ds, seed)
                runs.append(run)
                print(
                    f"T={t:4d} {key:4s} seed {seed}: final test MSE {run['final_test_mse']:.4f} "
                    f"(best {run['best_test_mse']:.4f}, baseline {baselines[str(t)]['baseline_mse']:.4f}), "
                    f"{run['wall_s']:.0f} s",
                    flush=True,
                )
    result, _ = study.finish(
        args.out,
        baselines=baselines,
        summary=report.summarise(runs, ("seq_len", "model"), summary_fields(baselines)),
        runs=runs,
    )
    return result


if __name__ == "__main__":
    main()
