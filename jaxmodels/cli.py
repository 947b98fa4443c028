"""The ``jaxmodels`` command.

    jaxmodels train cnn                       # the seed CNN on digits: >= 97% test accuracy on 2 CPU cores
    jaxmodels train cnn --dataset mnist --data-dir ~/data --epochs 5
    jaxmodels train lstm-classifier --dataset seq-digits   # image rows as time steps, offline
    jaxmodels train char-lstm --dataset text --data-file input.txt --seq-len 100
    jaxmodels train lstm-classifier --dataset seq-digits --model-arg hidden_size=64 --model-arg num_layers=2
    jaxmodels train cnn --checkpoint-every 100 --resume   # continue from runs/cnn-digits/checkpoints
    jaxmodels train cnn --overwrite           # a fresh run; the one in runs/cnn-digits moved aside
    jaxmodels eval --workdir runs/cnn-digits  # test metrics of the latest checkpoint (JSON)
    jaxmodels sample --workdir runs/char-lstm-text --prompt "ROMEO:" --length 300 --temperature 0.8
    jaxmodels export --workdir runs/cnn-digits --out cnn.jax   # jax.export artifact: cpu, cuda, tpu
    jaxmodels export --workdir runs/cnn-digits --out cnn.safetensors  # variables and config
    jaxmodels eval --weights cnn.safetensors --dataset digits
    jaxmodels info                            # versions, backend, devices
    jaxmodels bench lstm --repeats 10         # timings vs Flax, PyTorch: benchmarks/results/lstm.{json,md,png}

``main(argv)`` returns the exit status: 0 on success, 1 for a run that cannot start or fails with
a clear message (missing data, batch larger than the data, NaN loss, a used or unwritable work
folder, a full disk), 2 for bad arguments, 130 when interrupted (Ctrl-C). A user's problem is one
line on stderr, ``jaxmodels: error: ...`` (warnings: ``jaxmodels: warning: ...``); an internal
error shows its traceback and a last line asking to report it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from jaxmodels.arguments import (
    host_port,
    key_value,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from jaxmodels.commands import run_bench, run_eval, run_export, run_info, run_sample, run_train
from jaxmodels.data.datasets import list_datasets
from jaxmodels.export import PLATFORMS
from jaxmodels.nn.models import list_models
from jaxmodels.training.compat import IncompatibleCheckpointError
from jaxmodels.training.fit import RECIPES, TrainConfig
from jaxmodels.training.optim import OPTIMIZERS, SCHEDULES
from jaxmodels.training.parallel import STRATEGIES

DTYPES = ("float32", "bfloat16")
_PACKAGE = Path(__file__).resolve().parent
_DEFAULTS = TrainConfig()


def _add_model_and_data_options(parser: argparse.ArgumentParser, *, run: bool = True) -> None:
    """MODEL and the options that choose the data set and the model config: ``run`` (train), with
    their defaults; else (eval) all optional, None when not given (the run's config.json has them)."""
    models = ", ".join(list_models())
    if run:
        parser.add_argument(
            "model", metavar="MODEL", choices=list_models(), help=f"one of: {models}"
        )
    else:
        parser.add_argument(
            "model",
            metavar="MODEL",
            nargs="?",
            choices=list_models(),
            help=f"one of: {models} (default: the run's, from WORKDIR/config.json)",
        )
    parser.add_argument(
        "--dataset",
        default="digits" if run else None,
        choices=list_datasets(),
        help="data set (default: digits)" if run else "data set (default: the run's)",
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
        "--dtype",
        default="float32" if run else None,
        choices=DTYPES,
        help="compute dtype (parameters stay float32)",
    )


def _add_run_options(parser: argparse.ArgumentParser, default_workdir: str) -> None:
    """The options of the commands that read a trained run (eval, sample): MODEL and the data
    options (all optional: the run's config.json has them), --workdir and --step."""
    _add_model_and_data_options(parser, run=False)
    parser.add_argument(
        "--workdir", default=None, help=f"the run's folder (default: {default_workdir})"
    )
    parser.add_argument(
        "--step", type=positive_int, default=None, help="this checkpoint instead of the latest"
    )


def _add_weights_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights",
        default=None,
        metavar="FILE",
        help="a .safetensors file of variables (jaxmodels export --out FILE.safetensors) instead "
        "of a run's checkpoint; the data set: --dataset (default for the cnn: digits)",
    )


def _add_bench_options(parser: argparse.ArgumentParser) -> None:
    """SUITE and the options of ``jaxmodels bench`` (benchmarks/lstm.py and cnn.py pass theirs on)."""
    from jaxmodels.bench import DTYPES, ISOLATIONS, SHAPE_SETS, SUITES

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
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=list(DTYPES),
        choices=DTYPES,
        help="the compute dtypes timed (default: both; PyTorch's bfloat16 LSTM training step takes "
        "minutes per call on a CPU without bfloat16 instructions)",
    )
    parser.add_argument(
        "--budget",
        type=positive_float,
        default=60.0,
        metavar="SECONDS",
        help="seconds of samples one contender may take per workload: a slower one is sampled in "
        "fewer rounds, at least 3 (default: 60)",
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
    """The ``jaxmodels`` parser: a subcommand from each ``_add_*_command``."""
    parser = argparse.ArgumentParser(
        prog="jaxmodels", description="Train and inspect jaxmodels models."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_command(commands)
    _add_eval_command(commands)
    _add_sample_command(commands)
    _add_export_command(commands)
    _add_bench_command(commands)
    _add_info_command(commands)
    return parser


def _add_train_command(commands: argparse._SubParsersAction) -> None:
    """``jaxmodels train MODEL``: the model, data, recipe, run folder and multi-host options."""
    train = commands.add_parser(
        "train", help="train a model on a data set", description="Train a model on a data set."
    )
    _add_model_and_data_options(train)
    train.add_argument(
        "--model-arg",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an option of the model (repeatable), e.g. hidden_size=128, num_layers=2, "
        "features=[32,64,64]; VALUE is JSON or text; recorded in config.json",
    )
    train.add_argument(
        "--data-arg",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an option of the data set (repeatable), e.g. steps=pixels, permute=0 "
        "(seq-mnist), train_size=20000 (adding); recorded in config.json",
    )
    _add_recipe_options(train)
    train.add_argument("--warmup-steps", type=non_negative_int, default=_DEFAULTS.warmup_steps)
    train.add_argument(
        "--clip-norm", type=positive_float, default=None, help="clip gradients to this global norm"
    )
    train.add_argument("--weight-decay", type=non_negative_float, default=_DEFAULTS.weight_decay)
    train.add_argument("--seed", type=non_negative_int, default=_DEFAULTS.seed)
    train.add_argument(
        "--max-steps", type=positive_int, default=None, help="stop after this many steps"
    )
    train.add_argument(
        "--log-every", type=positive_int, default=_DEFAULTS.log_every, help="steps per metrics row"
    )
    _add_run_folder_options(train)
    train.add_argument(
        "--strategy",
        default=None,
        choices=STRATEGIES,
        help="how steps use the devices (default: sharded with more than one device, else single)",
    )
    _add_multi_host_options(train)


def _add_recipe_options(train: argparse.ArgumentParser) -> None:
    """The training recipe's options: their defaults come from the model and data set (``RECIPES``)."""
    recipes = train.add_argument_group(
        "training recipe",
        "defaults: the model and data set's recipe (jaxmodels.training.fit.RECIPES)",
    )
    for flag, kind, choices, help in (
        ("--epochs", positive_int, None, ""),
        ("--batch-size", positive_int, None, ""),
        ("--lr", positive_float, None, "peak learning rate; "),
        ("--optimizer", str, OPTIMIZERS, ""),
        ("--schedule", str, SCHEDULES, ""),
    ):
        key = flag[2:].replace("-", "_")
        defaults = [f"default {getattr(_DEFAULTS, key)}"] + [
            f"{model} on {data}: {values[key]}"
            for (model, data), values in RECIPES.items()
            if key in values
        ]
        recipes.add_argument(
            flag, type=kind, choices=choices, default=None, help=help + "; ".join(defaults)
        )


def _add_run_folder_options(train: argparse.ArgumentParser) -> None:
    """The run's output: --workdir, the progress bar, checkpoints, --resume or --overwrite."""
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
    fresh = train.add_mutually_exclusive_group()
    fresh.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --workdir from its latest checkpoint (none yet: start afresh)",
    )
    fresh.add_argument(
        "--overwrite",
        action="store_true",
        help="--workdir holds another run: move it aside to WORKDIR.old-DATE-TIME, start afresh",
    )


def _add_multi_host_options(train: argparse.ArgumentParser) -> None:
    """The jax.distributed options of a multi-host run."""
    hosts = train.add_argument_group(
        "multi-host",
        "start jax.distributed (default: from $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, "
        "$JAX_PROCESS_ID; none set: one process)",
    )
    hosts.add_argument(
        "--coordinator-address",
        type=host_port,
        default=None,
        metavar="HOST:PORT",
        help="process 0's address",
    )
    hosts.add_argument("--num-processes", type=positive_int, default=None)
    hosts.add_argument(
        "--process-id",
        type=non_negative_int,
        default=None,
        help="this process, 0 .. num-processes - 1",
    )


def _add_eval_command(commands: argparse._SubParsersAction) -> None:
    """``jaxmodels eval``: test metrics of a run's checkpoint or a weights file."""
    evaluate = commands.add_parser(
        "eval",
        help="test metrics of a run's latest checkpoint",
        description="Restore the latest checkpoint in --workdir and print its test metrics as JSON "
        "(also written to WORKDIR/eval.json). The model, data set and data options are the run's "
        "(WORKDIR/config.json); options given must agree with them, except the data's location.",
    )
    _add_run_options(evaluate, "runs/MODEL-DATASET")
    _add_weights_option(evaluate)
    evaluate.add_argument("--batch-size", type=positive_int, default=_DEFAULTS.eval_batch_size)
    evaluate.add_argument(
        "--output", default=None, help="JSON file to write (default: WORKDIR/eval.json)"
    )


def _add_sample_command(commands: argparse._SubParsersAction) -> None:
    """``jaxmodels sample``: text from a character model's checkpoint."""
    sample = commands.add_parser(
        "sample",
        help="text from a character model's checkpoint",
        description="Restore the latest checkpoint of a char-lstm or char-rnn run in --workdir and "
        "print the prompt followed by sampled characters. The model, data set (its vocabulary) and "
        "data options are the run's (WORKDIR/config.json).",
    )
    _add_run_options(sample, "runs/MODEL-text")
    sample.add_argument(
        "--prompt", default=None, help="text to continue (default: the vocabulary's first token)"
    )
    sample.add_argument(
        "--length", type=positive_int, default=200, help="characters to sample (default: 200)"
    )
    sample.add_argument(
        "--temperature",
        type=non_negative_float,
        default=1.0,
        help="softmax temperature; 0 takes the most likely character (default: 1.0)",
    )
    sample.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed")


def _add_export_command(commands: argparse._SubParsersAction) -> None:
    """``jaxmodels export``: a run's checkpoint as a jax.export artifact or safetensors."""
    export = commands.add_parser(
        "export",
        help="a run's checkpoint as a jax.export artifact",
        description="Restore the latest checkpoint in --workdir and write its model's inference "
        "function, parameters included, as a serialized jax.export artifact: any batch size (and "
        "any time length for sequence and character models), lowered for each of --platforms. "
        "jax.export.deserialize(data).call(x) runs it with jax alone. The model, data set and "
        "data options are the run's (WORKDIR/config.json).",
    )
    _add_run_options(export, "runs/MODEL-DATASET")
    _add_weights_option(export)
    export.add_argument(
        "--out",
        required=True,
        help="the file: a jax.export artifact, or with the suffix .safetensors the variables and "
        "config (jaxmodels.interop.safetensors)",
    )
    export.add_argument(
        "--platforms",
        nargs="+",
        choices=PLATFORMS,
        default=list(PLATFORMS),
        help=f"platforms it runs on (default: {' '.join(PLATFORMS)})",
    )


def _add_bench_command(commands: argparse._SubParsersAction) -> None:
    """``jaxmodels bench SUITE``: timings against the models' peers."""
    bench = commands.add_parser(
        "bench",
        help="time models side by side with their peers",
        description="Run benchmark suites (jaxmodels.bench): contenders interleaved, each framework "
        "configuration in its own process, medians, ratios to a baseline and to the strongest "
        "PyTorch configuration, GFLOP/s; writes OUT/SUITE.json, .md and .png.",
    )
    _add_bench_options(bench)


def _add_info_command(commands: argparse._SubParsersAction) -> None:
    """``jaxmodels info``: versions, backend and devices."""
    info_help = "versions, backend and devices"
    commands.add_parser("info", help=info_help, description=f"Print {info_help}.")


def _raised_here(err: BaseException) -> bool:
    """Whether ``err`` was raised by jaxmodels' own code (its messages are written for users)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(
        _PACKAGE
    )


def describe_os_error(err: OSError) -> str:
    """One line for an OSError: "PATH: reason" (a full disk says so), or its own message."""
    text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror or str(err)
    return f"disk full ({text})" if err.errno == errno.ENOSPC else text


@contextlib.contextmanager
def _one_line_warnings():
    """jaxmodels' own warnings (a skipped corrupt checkpoint) as ``jaxmodels: warning: ...``."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("jaxmodels"):
            print(f"jaxmodels: warning: {message}", file=sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in ``argv`` (default: sys.argv[1:]); returns the exit status."""
    args = build_parser().parse_args(argv)
    args.run_folder = None  # set by train once it runs: where its checkpoints are

    def error(text: str, status: int = 1) -> int:
        if args.run_folder is not None:
            from jaxmodels.training.rundir import describe_checkpoints

            text += f"; {describe_checkpoints(args.run_folder)}"
        print(f"jaxmodels: {text}", file=sys.stderr)
        return status

    commands = {
        "train": run_train,
        "eval": run_eval,
        "sample": run_sample,
        "export": run_export,
        "bench": run_bench,
        "info": run_info,
    }
    with _one_line_warnings():
        try:
            return commands[args.command](args)
        except KeyboardInterrupt:
            return error("interrupted", 130)
        except OSError as err:  # a missing file, a read-only folder, a full disk: the user's to fix
            return error(f"error: {describe_os_error(err)}")
        except (ValueError, TypeError, FloatingPointError) as err:
            if _raised_here(err):
                if isinstance(err, IncompatibleCheckpointError):
                    args.run_folder = (
                        None  # a refused resume: "continue with --resume" would mislead
                    )
                return error(f"error: {err}")
            err.add_note(_REPORT)  # an error inside jax, flax or numpy is a bug to see in full
            raise
        except Exception as err:
            err.add_note(_REPORT)
            raise


_REPORT = (
    "jaxmodels: internal error: the traceback above is a bug; please report it with the command "
    "that failed"
)


if __name__ == "__main__":
    sys.exit(main())
