"""Character-level Tiny Shakespeare: an LSTM and a simple RNN against nanoGPT's published CPU run.

nanoGPT's README (Karpathy) trains character-level Transformers on Tiny Shakespeare (1,115,394
characters, 65 distinct; the first 90% for training, the last 10% for validation). Its CPU run
(4 layers, 4 heads, 128 channels, context 64, batch 12, 2,000 iterations, no dropout; "about 3
minutes" on a laptop) reaches a validation loss of 1.88 nats per character; its GPU run (6 layers,
384 channels, context 256, batch 64, 5,000 iterations, dropout 0.2) 1.4697.

This script trains ``char-lstm`` and ``char-rnn`` (``--layers`` recurrent layers of ``--hidden``
units over a ``--embed`` embedding) on the same split with the CPU run's data budget per step:
batches of 12 windows of 64 characters at random offsets (every offset is a window, shuffled), for
each of ``--steps`` budgets and ``--seeds``, Adam with a warm-up and a cosine decay, gradients
clipped by global norm. The validation loss is measured as nanoGPT measures it, mean cross-entropy
per character over windows of 64 characters each read from a zero state, but over the whole
validation split (1,742 adjacent windows) instead of 20 random batches. Each model of the longest
budget (first seed) writes a sample.

    python experiments/char_shakespeare.py --data-file tinyshakespeare/input.txt
    JAXMODELS_TEXT=input.txt python experiments/char_shakespeare.py --steps 2000 --seeds 0

Writes OUT/char_shakespeare.json (config, environment, references, per-run metrics and curves,
samples), .md (tables and samples) and .png (training loss against characters seen); each run's
config.json and metrics.jsonl go to WORKDIR/<model>-<steps>-seed<seed>/.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels import report
from jaxmodels.data.datasets import load_text
from jaxmodels.nn.models import generate, get_model
from jaxmodels.training.fit import TrainConfig, fit

STEM = "char_shakespeare"
MODELS = {"lstm": "char-lstm", "rnn": "char-rnn"}
HERE = Path(__file__).resolve().parent
# Published results the runs are compared with: nanoGPT's README and config/train_shakespeare_char.py.
REFERENCES = [
    {
        "name": "nanoGPT CPU run",
        "val_loss": 1.88,
        "characters_per_step": 12 * 64,
        "steps": 2000,
        "what": "Transformer, 4 layers, 4 heads, 128 channels, context 64, batch 12, 2,000 iterations, dropout 0",
    },
    {
        "name": "nanoGPT GPU run",
        "val_loss": 1.4697,
        "characters_per_step": 64 * 256,
        "steps": 5000,
        "what": "Transformer, 6 layers, 6 heads, 384 channels, context 256, batch 64, 5,000 iterations, dropout 0.2",
    },
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--data-file",
        type=Path,
        default=None,
        help="Tiny Shakespeare's input.txt (default: $JAXMODELS_TEXT)",
    )
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    p.add_argument("--hidden", type=int, default=256, help="hidden size of every recurrent layer")
    p.add_argument("--layers", type=int, default=2, help="recurrent layers")
    p.add_argument("--embed", type=int, default=64, help="character embedding size")
    p.add_argument("--seq-len", type=int, default=64, help="characters per window (context)")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[2000, 10000],
        help="training budgets, steps per run",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="seeds of initialisation and batch order",
    )
    p.add_argument("--lr", type=float, default=2e-3, help="Adam's peak learning rate")
    p.add_argument(
        "--warmup", type=int, default=100, help="linear warm-up steps before the cosine decay"
    )
    p.add_argument(
        "--clip-norm", type=float, default=1.0, help="clip gradients to this global norm"
    )
    p.add_argument(
        "--sample-chars", type=int, default=400, help="characters sampled from each model"
    )
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("runs") / STEM,
        help="folder of the per-run fit outputs",
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder of the result files")
    p.add_argument("--verbose", action="store_true", help="show fit's lines")
    args = p.parse_args(argv)
    for name in ("hidden", "layers", "embed", "seq_len", "batch_size", "sample_chars"):
        if getattr(args, name) < 1:
            p.error(f"expected --{name.replace('_', '-')} >= 1, got {getattr(args, name)}")
    if min(args.steps) <= args.warmup:
        p.error(f"expected every --steps value above --warmup={args.warmup}, got {args.steps}")
    return args


def load(args: argparse.Namespace):
    """Training windows at every offset (stride 1), validation windows adjacent (stride seq_len)."""
    train = load_text(args.data_file, seq_len=args.seq_len, stride=1)
    val = load_text(args.data_file, seq_len=args.seq_len)
    return dataclasses.replace(train, x_test=val.x_test, y_test=val.y_test)


def run_one(args: argparse.Namespace, key: str, ds, steps: int, seed: int):
    """Train one model for ``steps``: (its record: validation metrics, training curve; its variables; the model)."""
    cfg = TrainConfig(
        epochs=math.ceil(steps / (len(ds.x_train) // args.batch_size)),
        max_steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer="adam",
        schedule="warmup-cosine",
        warmup_steps=args.warmup,
        clip_norm=args.clip_norm,
        seed=seed,
        log_every=max(1, steps // 50),
        eval_batch_size=256,
        progress=False,
        plot=False,
        checkpoint=False,
    )
    model = get_model(
        MODELS[key],
        vocab_size=ds.num_classes,
        embed_size=args.embed,
        hidden_size=args.hidden,
        num_layers=args.layers,
    )
    workdir = args.workdir / f"{key}-{steps}-seed{seed}"
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stdout if args.verbose else io.StringIO()):
        result = fit(model, ds, cfg, workdir, overwrite=True)  # a rerun: the old run moved aside
    wall = time.perf_counter() - start
    trains = [r for r in result.history if r["kind"] == "train"]
    chars_per_step = args.batch_size * args.seq_len
    run = {
        "model": key,
        "registry_name": MODELS[key],
        "steps": steps,
        "seed": seed,
        "params": sum(int(np.size(x)) for x in jax.tree.leaves(result.state.params)),
        "characters_seen": steps * chars_per_step,
        "val_loss": result.test_metrics["loss"],
        "val_bits_per_char": result.test_metrics["loss"] / math.log(2),
        "val_accuracy": result.test_metrics["accuracy"],
        "final_train_loss": trains[-1]["loss"],
        "wall_s": wall,
        "train_curve": [[r["step"] * chars_per_step, r["loss"]] for r in trains],
        "workdir": str(workdir),
    }
    return run, {"params": result.state.params}, model


def sample(args: argparse.Namespace, ds, model, variables: dict) -> str:
    """``--sample-chars`` characters after a newline, at ``--temperature``, key 0."""
    prompt = jnp.asarray(ds.encode("\n"))[None, :]
    tokens = generate(
        model, variables, prompt, args.sample_chars, jax.random.key(0), temperature=args.temperature
    )
    return ds.decode(np.asarray(tokens[0]))


SUMMARY = {  # one row per (steps, model): validation loss per seed, means
    "params": report.first("params"),
    "characters_seen": report.first("characters_seen"),
    "seeds": report.each("seed"),
    "val_loss": report.each("val_loss"),
    "mean_val_loss": report.mean("val_loss"),
    "mean_val_bits_per_char": lambda runs: report.mean("val_loss")(runs) / math.log(2),
    "mean_val_accuracy": report.mean("val_accuracy"),
    "mean_wall_s": report.mean("wall_s"),
}


def setup(result: dict) -> list[str]:
    c, d = result["config"], result["data"]
    return [
        f"{d['characters']:,} characters, {d['vocab_size']} distinct; training {d['train_characters']:,}, "
        f"validation {d['validation_characters']:,} (the last 10%). {c['layers']} layers of {c['hidden']}, "
        f"embedding {c['embed']}; windows of {c['seq_len']} characters, batch {c['batch_size']}; Adam, peak lr "
        f"{c['lr']}, {c['warmup']} warm-up steps then cosine decay to 0; clip norm {c['clip_norm']}; seeds "
        f"{c['seeds']}. Validation loss: nats per character over the {d['validation_windows']:,} adjacent "
        f"{c['seq_len']}-character windows of the validation split, each from a zero state."
    ]


def references_and_samples(result: dict) -> list[str]:
    """The published references' table, then the samples."""
    columns = [
        report.Column("run", "{name}"),
        report.Column("val loss", "{val_loss}", right=True),
        report.Column(
            "characters seen",
            lambda ref: f"{ref['characters_per_step'] * ref['steps'] / 1e6:.1f}M",
            right=True,
        ),
        report.Column("what", "{what}"),
    ]
    lines = [
        "",
        "Published references (nanoGPT's README and its config/train_shakespeare_char.py):",
        "",
    ]
    lines += report.table(columns, result["references"])
    temperature = result["config"]["temperature"]
    for name, text in result["samples"].items():
        lines += [
            "",
            f"Sample, {name} (after a newline, temperature {temperature}):",
            "",
            "```",
            text,
            "```",
        ]
    return lines


REPORT = report.Report(
    title="Character-level Tiny Shakespeare: LSTM and simple RNN",
    setup=setup,
    columns=[
        report.Column("steps", "{steps:,}", right=True),
        report.Column(
            "characters seen", lambda row: f"{row['characters_seen'] / 1e6:.2f}M", right=True
        ),
        report.Column("model", "{model}"),
        report.Column("parameters", "{params:,}", right=True),
        report.Column("val loss per seed", report.joined("val_loss", ".3f")),
        report.Column("mean", "{mean_val_loss:.3f}", right=True),
        report.Column("bits/char", "{mean_val_bits_per_char:.3f}", right=True),
        report.Column("accuracy", "{mean_val_accuracy:.3f}", right=True),
        report.Column("s per run", "{mean_wall_s:.0f}", right=True),
    ],
    notes=references_and_samples,
    curves=report.Curves(  # training loss (lines) and final validation loss (dots), the references dashed
        curve=lambda run: tuple(zip(*run["train_curve"])),
        color_by="model",
        colors={"lstm": "tab:blue", "rnn": "tab:red"},
        dash_by="steps",
        label="{model}, {steps:,} steps",
        style={"alpha": 0.7},
        point=lambda run: (run["characters_seen"], run["val_loss"]),
        hlines=lambda result, panel: [
            (ref["val_loss"], color, f"{ref['name']} (val)")
            for ref, color in zip(result["references"], ("tab:gray", "black"))
        ],
        axes={"xscale": "log", "ylim": (1.0, 4.5)},
        grid="both",
        xlabel="training characters seen",
        ylabel="loss (nats/char)",
        title="Tiny Shakespeare: training loss (lines), validation loss (dots)",
        size=(7.5, 4.5),
    ),
)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = {k: v for k, v in vars(args).items() if k != "verbose"}
    study = report.Study(STEM, config, REPORT)
    ds = load(args)
    runs, samples = [], {}
    for steps in sorted(args.steps):
        for seed in args.seeds:
            for key in args.models:
                run, variables, model = run_one(args, key, ds, steps, seed)
                runs.append(run)
                if steps == max(args.steps) and seed == args.seeds[0]:
                    samples[f"{key}, {steps:,} steps, seed {seed}"] = sample(
                        args, ds, model, variables
                    )
                print(
                    f"{key:4s} {steps:6d} steps seed {seed}: val loss {run['val_loss']:.3f} "
                    f"({run['val_bits_per_char']:.3f} bits/char), {run['wall_s']:.0f} s",
                    flush=True,
                )
    result, _ = study.finish(
        args.out,
        data={
            "path": ds.info["path"],
            "characters": ds.info["characters"],
            "vocab_size": ds.num_classes,
            "train_characters": ds.info["train_characters"],
            "validation_characters": ds.info["validation_characters"],
            "validation_windows": len(ds.x_test),
        },
        references=REFERENCES,
        summary=report.summarise(runs, ("steps", "model"), SUMMARY),
        runs=runs,
        samples=samples,
    )
    return result


if __name__ == "__main__":
    main()
