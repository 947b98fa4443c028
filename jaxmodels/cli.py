"""The ``jaxmodels`` command.

    jaxmodels train cnn                       # the seed CNN on digits: >= 97% test accuracy on 2 CPU cores
    jaxmodels train cnn --dataset mnist --data-dir ~/data --epochs 5
    jaxmodels train lstm-classifier --dataset seq-digits   # image rows as time steps, offline
    jaxmodels train char-lstm --dataset text --data-file input.txt --seq-len 100
    jaxmodels train cnn --checkpoint-every 100 --resume   # continue from runs/cnn-digits/checkpoints
    jaxmodels eval cnn                        # test metrics of the latest checkpoint (JSON)
    jaxmodels info                            # versions, backend, devices
    jaxmodels bench lstm --repeats 10         # timings vs Flax, PyTorch: benchmarks/results/lstm.{json,md,png}

``main(argv)`` returns the exit status: 0 on success, 1 for a run that cannot start or fails with
a clear message (missing data, batch larger than the data, NaN loss), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from jaxmodels.data import list_datasets
from jaxmodels.models import list_models
from jaxmodels.optim import OPTIMIZERS, SCHEDULES
from jaxmodels.parallel import STRATEGIES
from jaxmodels.train import TrainConfig

DTYPES = ("float32", "bfloat16")
_PACKAGE = Path(__file__).resolve().parent
_DEFAULTS = TrainConfig()


def positive_int(text: str) -> int:
    """argparse type: an integer above 0 (the one such type of the project's commands and scripts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _add_model_and_data_options(parser: argparse.ArgumentParser) -> None:
    """MODEL and the options that choose the data set and the model config (train and eval)."""
    parser.add_argument(
        "model", metavar="MODEL", choices=list_models(), help=f"one of: {', '.join(list_models())}"
    )
    parser.add_argument(
        "--dataset", default="digits", choices=list_datasets(), help="data set (default: digits)"
    )
    parser.add_argument(
        "--data-dir", default=None, help="data folder (mnist, seq-mnist; default: $JAXMODELS_DATA)"
    )
    parser.add_argument(
        "--download", action="store_true", help="fetch missing MNIST files into the data folder"
    )
    parser.add_argument(
        "--data-file", default=None, help="UTF-8 text file (text; default: $JAXMODELS_TEXT)"
    )
    parser.add_argument(
        "--seq-len",
        type=positive_int,
        default=None,
        help="the delay T (adding, copy); window (text)",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="compute dtype (parameters stay float32)"
    )


def _add_bench_options(parser: argparse.ArgumentParser) -> None:
    """SUITE and the options of ``jaxmodels bench`` (benchmarks/lstm.py and cnn.py pass theirs on)."""
    from jaxmodels.bench import ISOLATIONS, SHAPE_SETS, SUITES

    parser.add_argument("suite", choices=(*SUITES, "all"), help="which suite")
    parser.add_argument(
        "--repeats", type=positive_int, default=10, help="rounds over the contenders (default: 10)"
    )
    parser.add_argument(
        "--shapes",
        default="full",
        choices=SHAPE_SETS,
        help="full: the standard shapes; small: tiny ones, a smoke run (default: full)",
    )
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    parser.add_argument(
        "--torch-threads",
        type=positive_int,
        default=None,
        help="PyTorch's intra-op threads (default: the CPU count); one thread is timed too",
    )
    parser.add_argument(
        "--isolation",
        default="process",
        choices=ISOLATIONS,
        help="process: each framework configuration (JAX; PyTorch per allocator and thread count) "
        "in its own worker process; shared: everything in this process, PyTorch as installed "
        "(default: process)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxmodels", description="Train and inspect jaxmodels models."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train a model on a data set", description="Train a model on a data set."
    )
    _add_model_and_data_options(train)
    train.add_argument("--epochs", type=positive_int, default=_DEFAULTS.epochs)
    train.add_argument("--batch-size", type=positive_int, default=_DEFAULTS.batch_size)
    train.add_argument(
        "--lr", type=_positive_float, default=_DEFAULTS.lr, help="peak learning rate"
    )
    train.add_argument("--optimizer", default=_DEFAULTS.optimizer, choices=OPTIMIZERS)
    train.add_argument("--schedule", default=_DEFAULTS.schedule, choices=SCHEDULES)
    train.add_argument("--warmup-steps", type=int, default=_DEFAULTS.warmup_steps)
    train.add_argument(
        "--clip-norm", type=_positive_float, default=None, help="clip gradients to this global norm"
    )
    train.add_argument("--weight-decay", type=float, default=_DEFAULTS.weight_decay)
    train.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    train.add_argument(
        "--max-steps", type=positive_int, default=None, help="stop after this many steps"
    )
    train.add_argument(
        "--log-every", type=positive_int, default=_DEFAULTS.log_every, help="steps per metrics row"
    )
    train.add_argument(
        "--workdir", default=None, help="output folder (default: runs/MODEL-DATASET)"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=None,
        metavar="N",
        help="save a checkpoint every N steps (always after the last step)",
    )
    train.add_argument(
        "--keep",
        type=positive_int,
        default=_DEFAULTS.keep,
        metavar="K",
        help=f"keep the latest K checkpoints (default: {_DEFAULTS.keep})",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in --workdir (none yet: start afresh)",
    )
    train.add_argument(
        "--strategy",
        default=None,
        choices=STRATEGIES,
        help="how steps use the devices (default: sharded with more than one device, else single)",
    )
    hosts = train.add_argument_group(
        "multi-host",
        "start jax.distributed (default: from $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, "
        "$JAX_PROCESS_ID; none set: one process)",
    )
    hosts.add_argument(
        "--coordinator-address", default=None, metavar="HOST:PORT", help="process 0's address"
    )
    hosts.add_argument("--num-processes", type=positive_int, default=None)
    hosts.add_argument(
        "--process-id", type=int, default=None, help="this process, 0 .. num-processes - 1"
    )

    evaluate = commands.add_parser(
        "eval",
        help="test metrics of a run's latest checkpoint",
        description="Restore the latest checkpoint in --workdir and print its test metrics as JSON "
        "(also written to WORKDIR/eval.json).",
    )
    _add_model_and_data_options(evaluate)
    evaluate.add_argument(
        "--workdir", default=None, help="the run's folder (default: runs/MODEL-DATASET)"
    )
    evaluate.add_argument(
        "--step", type=positive_int, default=None, help="this checkpoint instead of the latest"
    )
    evaluate.add_argument("--batch-size", type=positive_int, default=_DEFAULTS.eval_batch_size)
    evaluate.add_argument(
        "--output", default=None, help="JSON file to write (default: WORKDIR/eval.json)"
    )

    bench = commands.add_parser(
        "bench",
        help="time models side by side with their peers",
        description="Run benchmark suites (jaxmodels.bench): contenders interleaved, each framework "
        "configuration in its own process, medians, ratios to a baseline and to the strongest "
        "PyTorch configuration, GFLOP/s; writes OUT/SUITE.json, .md and .png.",
    )
    _add_bench_options(bench)

    info_help = "versions, backend and devices"
    commands.add_parser("info", help=info_help, description=f"Print {info_help}.")
    return parser


def _model_and_dataset(args: argparse.Namespace):
    """The data set and the model (its classes or vocabulary sized to the data) that ``args`` name."""
    import jax.numpy as jnp

    from jaxmodels.data import get_dataset
    from jaxmodels.models import get_model

    try:  # a bad option (e.g. --data-dir for a built-in data set) is a usage error, not a bug
        given = dict(
            data_dir=args.data_dir,
            download=args.download or None,
            path=args.data_file,
            seq_len=args.seq_len,
        )
        dataset = get_dataset(args.dataset, **{k: v for k, v in given.items() if v is not None})
        model_config = {"dtype": jnp.bfloat16} if args.dtype == "bfloat16" else {}
        task = get_model(args.model).task
        if task == "classification" and dataset.num_classes is not None:
            model_config["num_classes"] = dataset.num_classes
        elif task == "language_model" and dataset.num_classes is not None:
            model_config["vocab_size"] = dataset.num_classes
        model = get_model(args.model, **model_config)
    except TypeError as err:
        raise ValueError(str(err)) from None
    return model, dataset


def _train(args: argparse.Namespace) -> int:
    import jax

    from jaxmodels.parallel import get_strategy, initialize_distributed
    from jaxmodels.train import fit

    start = time.perf_counter()
    initialize_distributed(
        args.coordinator_address, args.num_processes, args.process_id
    )  # before any JAX work
    model, dataset = _model_and_dataset(args)
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        schedule=args.schedule,
        warmup_steps=args.warmup_steps,
        clip_norm=args.clip_norm,
        weight_decay=args.weight_decay,
        seed=args.seed,
        log_every=args.log_every,
        max_steps=args.max_steps,
        progress=not args.no_progress,
        checkpoint_every=args.checkpoint_every,
        keep=args.keep,
    )
    workdir = args.workdir or f"runs/{args.model}-{args.dataset}"
    result = fit(
        model, dataset, config, workdir, strategy=get_strategy(args.strategy), resume=args.resume
    )
    elapsed = time.perf_counter() - start
    shown = "  ".join(f"{k} {v:.4f}" for k, v in result.test_metrics.items()) or "(no test split)"
    steps = int(result.state.step)
    if jax.process_index() == 0:  # the process that wrote the files
        print(f"{args.model} on {args.dataset}: test {shown}  ({steps} steps, {elapsed:.1f} s)")
        print(f"wrote {workdir}/config.json, metrics.jsonl, learning_curves.png, checkpoints/")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    import jax

    from jaxmodels.train import evaluate_checkpoint

    model, dataset = _model_and_dataset(args)
    workdir = Path(args.workdir or f"runs/{args.model}-{args.dataset}")
    step, metrics = evaluate_checkpoint(
        model, dataset, workdir, step=args.step, batch_size=args.batch_size
    )
    result = {
        "model": args.model,
        "dataset": dataset.name,
        "workdir": str(workdir),
        "step": step,
        "test": metrics,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if jax.process_index() == 0:
        Path(args.output or workdir / "eval.json").write_text(text + "\n")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from jaxmodels import bench

    suites = bench.SUITES if args.suite == "all" else (args.suite,)
    bench.run(
        suites,
        shapes=args.shapes,
        repeats=args.repeats,
        out=args.out or "benchmarks/results",
        torch_threads=args.torch_threads,
        isolation=args.isolation,
    )
    return 0


def _info() -> int:
    import jax

    for package in (
        "jaxmodels",
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "chex",
        "orbax-checkpoint",
        "numpy",
    ):
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{package:18} {version}")
    print(f"{'python':18} {sys.version.split()[0]}")
    print(f"{'backend':18} {jax.default_backend()}")
    print(f"{'processes':18} {jax.process_count()} (this is process {jax.process_index()})")
    print(f"{'devices':18} {jax.device_count()} ({jax.local_device_count()} local)")
    for device in jax.devices():
        print(
            f"  {device.id}: {device.platform} {device.device_kind} (process {device.process_index})"
        )
    return 0


def _raised_here(err: BaseException) -> bool:
    """Whether ``err`` was raised by jaxmodels' own code (its messages are written for users)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(
        _PACKAGE
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in ``argv`` (default: sys.argv[1:]); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return {"train": _train, "eval": _eval, "bench": _bench}.get(
            args.command, lambda _: _info()
        )(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        if not _raised_here(err):
            raise  # an error inside jax, flax or numpy is a bug to see in full, not a usage error
        print(f"jaxmodels: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
