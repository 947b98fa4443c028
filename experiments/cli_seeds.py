"""The README's `jaxmodels train` one-liners that it quotes with a figure, over seeds.

A command the README quotes with a test accuracy must reach that goal on every seed, not on one
draw: each one-liner here runs as a user runs it (a fresh ``jaxmodels`` process, its recipe and
defaults, only ``--seed``, ``--workdir`` and ``--no-progress`` added), for each seed, and the
report gives the final test accuracy per seed with its min, mean and max against the goal:

- ``cnn-digits``: ``jaxmodels train cnn`` (the quick start: the bundled digits, 25 epochs), goal
  0.97;
- ``cnn-mnist``: ``jaxmodels train cnn --dataset mnist --data-dir DIR`` (the CLI's MNIST recipe,
  ``jaxmodels.training.fit.RECIPES``: Adam 1e-3 with cosine decay, batch 64, 5 epochs), goal 0.990;
- ``cnn-digits-bf16``, ``cnn-mnist-bf16``: the same with ``--dtype bfloat16`` (parameters float32,
  compute bfloat16), the same goals: what bfloat16 costs in accuracy, recipe and seeds unchanged.
  Not run unless named in ``--commands``.

Seed 0 of the commands in ``--repeat`` runs twice: the report says whether the two runs' logs
(every loss, accuracy and gradient norm; the test metrics) are bitwise equal, as they must be on
one machine with the same versions.

    python experiments/cli_seeds.py --data-dir DIR      # both, seeds 0-4: ~15 min on 2 CPUs
    python experiments/cli_seeds.py --commands cnn-digits --out /tmp/cli   # seconds
    python experiments/cli_seeds.py --data-dir DIR --commands cnn-digits-bf16 cnn-mnist-bf16 \
        --repeat --out experiments/results/cli_seeds_bf16    # bfloat16

Writes OUT/cli_seeds.json (config, environment, per-run curves, recipes and times), .md (the
table) and .png (test accuracy against epoch, a panel per command); each run's folder is
WORKDIR/<command>-seed<seed>/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from jaxmodels import report
from jaxmodels.training.rundir import read_rows

STEM = "cli_seeds"
HERE = Path(__file__).resolve().parent
# The one-liners: the arguments after `jaxmodels` as the README writes them ("DIR": --data-dir)
# and the test accuracy the README says each reaches.
COMMANDS = {
    "cnn-digits": (["train", "cnn"], 0.97),
    "cnn-mnist": (["train", "cnn", "--dataset", "mnist", "--data-dir", "DIR"], 0.990),
}
README_COMMANDS = list(COMMANDS)
COMMANDS |= {
    f"{name}-bf16": ([*argv, "--dtype", "bfloat16"], goal)
    for name, (argv, goal) in COMMANDS.items()
}
RECIPE_KEYS = ("epochs", "batch_size", "lr", "optimizer", "schedule", "warmup_steps", "clip_norm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data-dir", default=None, help="MNIST's folder (default: $JAXMODELS_DATA)")
    p.add_argument("--commands", nargs="+", choices=tuple(COMMANDS), default=README_COMMANDS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument(
        "--repeat",
        nargs="*",
        choices=tuple(COMMANDS),
        default=["cnn-digits"],
        help="commands whose first seed runs twice, to compare the two runs bitwise",
    )
    p.add_argument(
        "--extra",
        nargs=argparse.REMAINDER,
        default=[],
        help="flags added to every command (after the others; e.g. --max-steps 2 for a test)",
    )
    p.add_argument("--workdir", type=Path, default=Path("runs") / STEM)
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder of the result files")
    return p.parse_args(argv)


def command_line(name: str, data_dir: str | None) -> list[str]:
    """The one-liner's arguments after ``jaxmodels``, DIR replaced by ``data_dir``."""
    argv = list(COMMANDS[name][0])
    if "DIR" in argv:
        data_dir = data_dir or os.environ.get("JAXMODELS_DATA")
        if not data_dir:
            raise FileNotFoundError(f"{name} needs MNIST: give --data-dir DIR or $JAXMODELS_DATA")
        argv = [data_dir if a == "DIR" else a for a in argv]
    return argv


def run_cli(args: argparse.Namespace, name: str, seed: int, workdir: Path) -> dict:
    """The one-liner with ``--seed`` in a fresh process (``python -m jaxmodels.cli``: the
    ``jaxmodels`` entry point); its recipe, per-epoch test accuracy and times from its folder."""
    argv = command_line(name, args.data_dir)
    argv += ["--seed", str(seed), "--workdir", str(workdir), "--no-progress", "--overwrite"]
    argv += args.extra
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jaxmodels.cli", *argv], check=True, capture_output=True)
    wall = time.perf_counter() - start
    train = json.loads((workdir / "config.json").read_text())["train"]
    rows = read_rows(workdir)
    evals = [r for r in rows if r["kind"] == "eval"]
    return {
        "command": name,
        "seed": seed,
        "argv": ["jaxmodels", *COMMANDS[name][0], "--seed", str(seed)],
        "goal": COMMANDS[name][1],
        "recipe": {k: train[k] for k in RECIPE_KEYS},
        "steps": evals[-1]["step"],
        "test_accuracy": [r["accuracy"] for r in evals],
        "final_test_accuracy": evals[-1]["accuracy"],
        "train_s": evals[-1]["time_s"],  # fit's clock at the last evaluation
        "wall_s": wall,  # the whole process: start-up, data, compilation, training
        "workdir": str(workdir),
    }


def same_run(a: Path, b: Path) -> bool:
    """Whether two run folders logged bitwise the same numbers (every metrics row but its times,
    and the test metrics)."""
    untimed = lambda rows: [
        {k: v for k, v in r.items() if not (k.endswith("_s") or k.endswith("_per_sec"))}
        for r in rows
    ]
    tests = [json.loads((d / "test_metrics.json").read_text()) for d in (a, b)]
    return untimed(read_rows(a)) == untimed(read_rows(b)) and tests[0] == tests[1]


SUMMARY = {
    "goal": report.first("goal"),
    "recipe": report.first("recipe"),
    "steps": report.first("steps"),
    "seeds": report.each("seed"),
    "final_test_accuracy": report.each("final_test_accuracy"),
    "min": report.minimum("final_test_accuracy"),
    "mean": report.mean("final_test_accuracy"),
    "max": lambda runs: float(max(r["final_test_accuracy"] for r in runs)),
    "std": report.std("final_test_accuracy"),
    "every_seed_meets_goal": lambda runs: all(r["final_test_accuracy"] >= r["goal"] for r in runs),
    "train_s_median": report.median("train_s"),
    "wall_s_median": report.median("wall_s"),
}


def setup(result: dict) -> list[str]:
    lines = [
        "Each command as the README writes it (a `-bf16` twin adds `--dtype bfloat16`), with "
        "`--seed S`, in a fresh process. Recipes:"
    ]
    for row in result["summary"]:
        argv = " ".join(COMMANDS[row["command"]][0])
        lines.append(f"- `jaxmodels {argv}`: {row['recipe']}, {row['steps']} steps.")
    for name, same in result["repeats"].items():
        verdict = "bitwise equal" if same else "NOT bitwise equal"
        lines.append(f"Seed 0 of {name} run twice: logs and test metrics {verdict}.")
    return lines


REPORT = report.Report(
    title="The README's `jaxmodels train` one-liners over seeds",
    setup=setup,
    columns=[
        report.Column("command", "{command}"),
        report.Column("goal", "{goal}", right=True),
        report.Column("test accuracy per seed", report.joined("final_test_accuracy", ".4f")),
        report.Column("min", "{min:.4f}", right=True),
        report.Column("mean", "{mean:.4f}", right=True),
        report.Column("max", "{max:.4f}", right=True),
        report.Column(
            "goal met on every seed", lambda r: "yes" if r["every_seed_meets_goal"] else "no"
        ),
        report.Column("training s (median)", "{train_s_median:.0f}", right=True),
        report.Column("process s (median)", "{wall_s_median:.0f}", right=True),
    ],
    curves=report.Curves(
        curve=lambda run: (range(1, len(run["test_accuracy"]) + 1), run["test_accuracy"]),
        panel_by="command",
        color_by="command",
        colors={
            "cnn-digits": "tab:green",
            "cnn-mnist": "tab:blue",
            "cnn-digits-bf16": "tab:olive",
            "cnn-mnist-bf16": "tab:purple",
        },
        label="{command}",
        style={"marker": "o", "alpha": 0.7},
        hlines=lambda result, panel: [(COMMANDS[panel][1], "black", "goal")],
        xlabel="epoch",
        ylabel="test accuracy",
        title="{panel}",
        size=(5, 3.6),
    ),
)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    study = report.Study(STEM, vars(args), REPORT)
    runs, repeats = [], {}
    for name in args.commands:
        for seed in args.seeds:
            runs.append(run_cli(args, name, seed, args.workdir / f"{name}-seed{seed}"))
            print(
                f"{name} seed {seed}: test accuracy {runs[-1]['final_test_accuracy']:.4f} "
                f"({runs[-1]['wall_s']:.0f} s)",
                flush=True,
            )
        if name in args.repeat:
            seed = args.seeds[0]
            again = args.workdir / f"{name}-seed{seed}-again"
            run_cli(args, name, seed, again)
            repeats[name] = same_run(args.workdir / f"{name}-seed{seed}", again)
    result, _ = study.finish(
        args.out,
        commands={k: {"argv": v[0], "goal": v[1]} for k, v in COMMANDS.items()},
        repeats=repeats,
        summary=report.summarise(runs, ("command",), SUMMARY),
        runs=runs,
    )
    return result


if __name__ == "__main__":
    main()
