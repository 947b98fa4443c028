"""What the ``jaxmodels`` commands do once their arguments are parsed (``jaxmodels.cli``): train,
eval, sample, bench and info. Each ``run_*`` takes the parsed arguments and returns the exit status; a
user's problem is raised as ValueError or OSError before anything is computed where it can be
known then (a model on data it cannot read, data flags a data set does not take, a used or
unwritable work folder, multi-host flags without their coordinator).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from jaxmodels.inputs import RECIPE_OPTIONS, check_pairing, data_options, load, parse_model_args
from jaxmodels.nn.models import model_kind, model_options
from jaxmodels.training.fit import recipe


def _check_distributed(args: argparse.Namespace) -> None:
    """Multi-host flags come as a set (each or its variable); none: JAX's cluster detection."""
    from jaxmodels.training.parallel import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID

    given = {
        "--coordinator-address": (args.coordinator_address, ENV_COORDINATOR),
        "--num-processes": (args.num_processes, ENV_NUM_PROCESSES),
        "--process-id": (args.process_id, ENV_PROCESS_ID),
    }
    if all(value is None for value, _ in given.values()):
        return
    missing = [
        f"{flag} (or ${env})"
        for flag, (v, env) in given.items()
        if v is None and not os.environ.get(env)
    ]
    if missing:
        raise ValueError(
            f"a multi-host run needs {', '.join(missing)} too; on a SLURM, Open MPI, Kubernetes "
            f"or Cloud TPU cluster leave out all three and JAX finds them"
        )


def run_train(args: argparse.Namespace) -> int:
    import jax

    from jaxmodels.training.parallel import initialize_distributed
    from jaxmodels.training.rundir import RUN_FILES
    from jaxmodels.training.runlock import claim

    start = time.perf_counter()
    options = data_options(args, args.dataset)
    check_pairing(args.model, args.dataset)
    model_args = parse_model_args(args.model, args.model_arg)
    _check_distributed(args)
    initialize_distributed(
        args.coordinator_address, args.num_processes, args.process_id
    )  # before any JAX work
    workdir = Path(args.workdir or f"runs/{args.model}-{args.dataset}")
    # The folder is claimed before the data is loaded, and held until fit's own claim ends.
    with claim(
        workdir,
        model=args.model,
        dataset=args.dataset,
        resume=args.resume,
        overwrite=args.overwrite,
    ):
        result = _train(args, workdir, options, model_args)
    elapsed = time.perf_counter() - start
    shown = "  ".join(f"{k} {v:.4f}" for k, v in result.test_metrics.items()) or "(no test split)"
    steps = int(result.state.step)
    if jax.process_index() == 0:  # the process that wrote the files
        print(f"{args.model} on {args.dataset}: test {shown}  ({steps} steps, {elapsed:.1f} s)")
        written = ", ".join(RUN_FILES)
        print(f"wrote {workdir}/{written}")
    return 0


def _train(args: argparse.Namespace, workdir: Path, options: dict, model_args: dict):
    """``run_train``'s work inside the claimed folder: load the model and data, then ``fit``."""
    from jaxmodels.training.fit import fit
    from jaxmodels.training.parallel import get_strategy

    model, dataset = load(args.model, args.dataset, options, args.dtype, ("train",), model_args)
    given = {key: getattr(args, key) for key in RECIPE_OPTIONS if getattr(args, key) is not None}
    config = recipe(
        args.model,
        args.dataset,
        **given,
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
    if config.batch_size > len(dataset.x_train):
        n = len(dataset.x_train)
        raise ValueError(
            f"--batch-size {config.batch_size} is larger than the {n} training examples of "
            f"{dataset.name}; use --batch-size N with N <= {n}"
        )
    args.run_folder = workdir  # from here on, an interruption names its last checkpoint
    return fit(
        model, dataset, config, workdir, strategy=get_strategy(args.strategy), resume=args.resume
    )


def _eval_settings(args: argparse.Namespace, workdir: Path) -> tuple[str, str, dict, str, dict]:
    """(model, dataset, dataset options, dtype, model options) of the run in ``workdir``: from its
    config.json, which the command line may repeat but not contradict (the data may have moved:
    --data-dir and --data-file replace its locations), else from the command line."""
    from jaxmodels.training.rundir import CONFIG_FILE, load_run_settings

    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(f"--workdir {workdir} is a file, not a run's folder")
    if not (workdir / CONFIG_FILE).is_file():
        if not workdir.is_dir():
            raise FileNotFoundError(f"no run in {workdir}: the folder does not exist")
        if args.model is None:
            raise ValueError(f"{workdir} has no {CONFIG_FILE} naming the run's model: give MODEL")
        dataset = args.dataset or "digits"
        return args.model, dataset, data_options(args, dataset), args.dtype or "float32", {}
    run = load_run_settings(workdir)
    recorded = run.dataset_options
    for flag, given, saved in (
        ("MODEL", args.model, run.model),
        ("--dataset", args.dataset, run.dataset),
        ("--dtype", args.dtype, run.dtype),
        ("--seq-len", args.seq_len, recorded.get("seq_len", args.seq_len)),
    ):
        if given is not None and given != saved:
            raise ValueError(
                f"{flag} {given} contradicts the run in {workdir}, which has {saved}; leave it "
                f"out to use the run's"
            )
    options = recorded | data_options(args, run.dataset)
    return run.model, run.dataset, options, run.dtype, run.model_options


def _require_checkpoint(workdir: Path, step: int | None, purpose: str) -> None:
    """FileNotFoundError naming the saved steps unless ``workdir`` has checkpoint ``step`` (None:
    any)."""
    from jaxmodels.training.rundir import checkpoint_dir, saved_steps

    steps = saved_steps(workdir)
    if not steps or step not in (None, *steps):
        wanted = "no checkpoint" if step is None else f"no checkpoint for step {step}"
        raise FileNotFoundError(
            f"{wanted} in {checkpoint_dir(workdir)} (saved: {steps or 'none'}): nothing to {purpose}"
        )


def run_eval(args: argparse.Namespace) -> int:
    import jax

    from jaxmodels.training.evaluate import evaluate_checkpoint, evaluate_params
    from jaxmodels.training.rundir import EVAL_FILE, check_writable, eval_text, write_eval

    if args.weights is None:  # the run first: nothing is created for a folder that holds none
        workdir = _run_folder(args, "eval")
        model_name, dataset_name, options, dtype, model_args = _eval_settings(args, workdir)
        check_pairing(model_name, dataset_name)
        _require_checkpoint(workdir, args.step, "evaluate")
        default_output = workdir / EVAL_FILE
    else:
        default_output = None
    output = Path(args.output).expanduser() if args.output else default_output
    lead = jax.process_index() == 0
    if output is not None and output.is_dir():
        raise IsADirectoryError(f"--output {output} is a folder; expected a file name")
    if output is not None and lead:  # before the evaluation, not after it
        check_writable(output.parent, "output folder")
    if args.weights is not None:
        model, dataset, variables = _from_weights(args, ("test",))
        metrics = evaluate_params(model, dataset, variables["params"], batch_size=args.batch_size)
        source = {"weights": str(Path(args.weights).expanduser())}
    else:
        model, dataset = load(model_name, dataset_name, options, dtype, ("test",), model_args)
        step, metrics = evaluate_checkpoint(
            model, dataset, workdir, step=args.step, batch_size=args.batch_size
        )
        source = {"workdir": str(workdir), "step": step}
    result = {"model": model.name, "dataset": dataset.name, **source, "test": metrics}
    text = eval_text(result)
    if output is not None and lead:
        write_eval(output, result)  # on disk before it is shown
    print(text)
    return 0


def run_sample(args: argparse.Namespace) -> int:
    """Text from a character model's checkpoint: the prompt, then ``--length`` sampled
    characters (``models.generate`` at ``--temperature``), printed."""
    import jax
    import numpy as np

    from jaxmodels.nn.models import generate
    from jaxmodels.training.evaluate import restore_params
    from jaxmodels.training.rundir import CONFIG_FILE

    if args.workdir is None and args.model is None:
        raise ValueError("sample needs --workdir (the run's folder) or MODEL (runs/MODEL-DATASET)")
    default = f"runs/{args.model}-{args.dataset or 'text'}"
    workdir = Path(args.workdir or default).expanduser()
    if args.dataset is None and not (workdir / CONFIG_FILE).is_file():
        args.dataset = "text"
    model_name, dataset_name, options, dtype, model_args = _eval_settings(args, workdir)
    if model_kind(model_name)[0] != "language_model":
        raise ValueError(
            f"sample needs a character model (char-lstm, char-rnn); {workdir} holds a run of "
            f"{model_name}"
        )
    check_pairing(model_name, dataset_name)
    _require_checkpoint(workdir, args.step, "sample")
    model, dataset = load(model_name, dataset_name, options, dtype, (), model_args)
    prompt = dataset.vocab[0] if args.prompt is None else args.prompt
    if not prompt:
        raise ValueError("--prompt is empty; give at least one character")
    tokens = np.asarray(dataset.encode(prompt))[None]
    _, state = restore_params(model, tokens, workdir, step=args.step)
    key = jax.random.key(args.seed)
    sampled = generate(
        model, {"params": state.params}, tokens, args.length, key, temperature=args.temperature
    )
    print(prompt + dataset.decode(np.asarray(sampled[0])))
    return 0


def run_export(args: argparse.Namespace) -> int:
    """A run's checkpoint as a ``jax.export`` artifact (``jaxmodels.export``) in ``--out``."""
    import jax

    from jaxmodels.export import export_model
    from jaxmodels.files import write_atomic
    from jaxmodels.interop.safetensors import SUFFIX as SAFETENSORS
    from jaxmodels.interop.safetensors import save_variables
    from jaxmodels.nn.models import config_of
    from jaxmodels.training.evaluate import restore_params
    from jaxmodels.training.rundir import check_writable

    out = Path(args.out).expanduser()
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; expected a file name")
    if args.weights is None:
        workdir = _run_folder(args, "export")
        model_name, dataset_name, options, dtype, model_args = _eval_settings(args, workdir)
        check_pairing(model_name, dataset_name)
        _require_checkpoint(workdir, args.step, "export")
    check_writable(out.parent, "output folder")  # before the work, not after it
    if args.weights is not None:
        model, dataset, variables = _from_weights(args, ())
        what = f"{model.name} from {args.weights}"
    else:
        model, dataset = load(model_name, dataset_name, options, dtype, (), model_args)
        step, state = restore_params(model, _example(model, dataset), workdir, step=args.step)
        variables, what = {"params": state.params}, f"{model_name} step {step}"
    if out.suffix == SAFETENSORS:
        save_variables(out, variables, model.name, config_of(model))
        print(
            f"wrote {out}: {what}, its variables and config; jaxmodels eval --weights {out} reads it"
        )
        return 0
    data = export_model(model, variables, dataset.input_shape, platforms=args.platforms)
    write_atomic(out, data)  # whole or not at all: an old artifact stays on a failed write
    exported = jax.export.deserialize(data)
    print(
        f"wrote {out} ({len(data):,} bytes): {what}, "
        f"{exported.in_avals[0].str_short()} -> {exported.out_avals[0].str_short()} "
        f"on {', '.join(exported.platforms)}; run it with "
        f"jax.export.deserialize(open({str(out)!r}, 'rb').read()).call(x)"
    )
    return 0


def _example(model, dataset):
    """One zero input of ``dataset``'s shape for ``model`` (token ids int32, else float32): what
    checks restored parameters against the model."""
    import numpy as np

    tokens = model_kind(model.name)[1] == "tokens"
    return np.zeros((1, *dataset.input_shape), np.int32 if tokens else np.float32)


def _run_folder(args: argparse.Namespace, command: str) -> Path:
    """--workdir, else runs/MODEL-DATASET; ValueError when neither it nor MODEL is given."""
    if args.workdir is None and args.model is None:
        raise ValueError(
            f"{command} needs --workdir (the run's folder), --weights FILE.safetensors or MODEL "
            "(runs/MODEL-DATASET)"
        )
    return Path(args.workdir or f"runs/{args.model}-{args.dataset or 'digits'}").expanduser()


def _from_weights(args: argparse.Namespace, splits: Sequence[str]):
    """(model, dataset, variables) from ``--weights FILE.safetensors`` (``interop.safetensors``):
    the model and its config from the file, the data set from --dataset (default for an image
    model: digits) and the data flags; the variables checked against the model built for it."""
    import jax

    from jaxmodels.interop.safetensors import load_variables
    from jaxmodels.training.compat import check_structure

    if args.workdir is not None or args.step is not None:
        raise ValueError("--weights replaces --workdir and --step: give one source of parameters")
    path = Path(args.weights).expanduser()
    variables, model_name, config = load_variables(path)
    if args.model not in (None, model_name):
        raise ValueError(f"MODEL is {args.model}, but {path} holds the variables of {model_name}")
    dataset_name = args.dataset or ("digits" if model_kind(model_name)[1] == "images" else None)
    if dataset_name is None:
        raise ValueError(f"{path} holds a {model_name}: give the data set with --dataset")
    check_pairing(model_name, dataset_name)
    model_args = {k: v for k, v in config.items() if k in model_options(model_name)}
    options = data_options(args, dataset_name)
    model, dataset = load(
        model_name, dataset_name, options, args.dtype or "float32", splits, model_args
    )
    target = jax.eval_shape(model.init, jax.random.key(0), _example(model, dataset))
    check_structure(variables.get("params"), target["params"], f"--weights {path}")
    return model, dataset, variables


def run_bench(args: argparse.Namespace) -> int:
    from jaxmodels import bench
    from jaxmodels.training.rundir import check_writable

    suites = bench.SUITES if args.suite == "all" else (args.suite,)
    out = check_writable(args.out or "benchmarks/results", "results folder")  # before timing
    bench.run(
        suites,
        shapes=args.shapes,
        repeats=args.repeats,
        budget_s=args.budget,
        out=out,
        torch_threads=args.torch_threads,
        isolation=args.isolation,
        dtypes=args.dtypes,
    )
    return 0


def run_info(args: argparse.Namespace) -> int:
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
