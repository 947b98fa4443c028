"""What a command builds from its arguments before any work: the model and the data set with their
options (``--model-arg``, ``--data-arg`` and the data flags), checked first (a model on data it
cannot read, flags a data set does not take, values of the wrong type), then loaded.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from jaxmodels.data.datasets import DATASET_KINDS, dataset_options
from jaxmodels.data.mnist import MNIST_FILES
from jaxmodels.nn.models import DATA_SIZES, get_model, model_kind, model_options, tuples

# Train options whose default comes from the model and data set's recipe (jaxmodels.training.fit.RECIPES).
RECIPE_OPTIONS = ("epochs", "batch_size", "lr", "optimizer", "schedule")

# The get_dataset option behind each data flag.
DATA_FLAGS = {
    "data_dir": "--data-dir",
    "download": "--download",
    "path": "--data-file",
    "seq_len": "--seq-len",
}


def check_pairing(model: str, dataset: str) -> None:
    """ValueError naming the data sets ``model`` reads when ``dataset`` is not one of them."""
    task, inputs = model_kind(model)
    if DATASET_KINDS[dataset] != (task, inputs):
        fits = " or ".join(d for d, kind in DATASET_KINDS.items() if kind == (task, inputs))
        has = DATASET_KINDS[dataset]
        raise ValueError(
            f"{model} reads {inputs} ({task}), and {dataset} holds {has[1]} ({has[0]}): use "
            f"--dataset {fits}"
        )


def data_options(args: argparse.Namespace, dataset: str) -> dict:
    """The get_dataset options that the data flags in ``args`` give (``--data-arg`` pairs too,
    where the command has them); a flag that ``dataset`` does not take is a ValueError naming the
    ones it does."""
    given = dict(data_dir=args.data_dir, path=args.data_file, seq_len=args.seq_len)
    given = {k: v for k, v in given.items() if v is not None} | (
        {"download": True} if args.download else {}
    )
    given |= parse_data_args(dataset, getattr(args, "data_arg", None) or [])
    takes = dataset_options(dataset)
    wrong = [DATA_FLAGS[k] for k in given if k not in takes]
    if wrong:
        accepted = [flag for k, flag in DATA_FLAGS.items() if k in takes]
        which = ", ".join(accepted) if accepted else f"none of {', '.join(DATA_FLAGS.values())}"
        raise ValueError(
            f"{' and '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to --dataset "
            f"{dataset}, which takes {which}"
        )
    return given


def parse_data_args(dataset: str, pairs: Sequence[tuple[str, str]]) -> dict:
    """``--data-arg KEY=VALUE`` pairs as ``get_dataset`` options of ``dataset`` (a later KEY
    wins), VALUE read as in ``parse_model_args`` against the option's default. ValueError naming
    the data set's options for an unknown KEY, and the flag to use for one that has its own."""
    options = dataset_options(dataset)
    settable = {k: v for k, v in options.items() if k not in DATA_FLAGS}
    parsed = {}
    for key, text in pairs:
        if key in DATA_FLAGS and key in options:
            raise ValueError(f"--data-arg {key}: use {DATA_FLAGS[key]}")
        if key not in settable:
            raise ValueError(
                f"--data-arg {key}: dataset {dataset} has no option {key!r}; its options are "
                + (", ".join(f"{k} (default {v!r})" for k, v in settable.items()) or "none")
            )
        parsed[key] = _option_value("--data-arg", key, text, settable[key])
    return parsed


def parse_model_args(model: str, pairs: Sequence[tuple[str, str]]) -> dict:
    """``--model-arg KEY=VALUE`` pairs as ``get_model`` options of ``model`` (a later KEY wins).
    VALUE is read as JSON (``128``, ``true``, ``[32, 64]``), else taken as text (``pallas``), and
    must have the type of the option's default (``models.model_options``; lists become tuples).
    ValueError naming the model's options for an unknown KEY, and the expected type for a value."""
    options = model_options(model)
    parsed = {}
    for key, text in pairs:
        if key not in options:
            raise ValueError(
                f"--model-arg {key}: {model} has no option {key!r}; its options are "
                + ", ".join(f"{k} (default {v!r})" for k, v in options.items())
            )
        parsed[key] = _option_value("--model-arg", key, text, options[key])
    return parsed


def _option_value(flag: str, key: str, text: str, default):
    """VALUE of ``flag`` KEY=VALUE: JSON, else text, of the type of ``default`` (any without one)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    value = tuples(value)
    if default is None:
        return value
    kinds = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
    kind = next((k for k in kinds if isinstance(default, k)), tuple)
    accepted = {bool: (bool,), int: (int,), float: (int, float), str: (str,), tuple: (tuple,)}
    fits = isinstance(value, accepted[kind]) and (kind is bool or not isinstance(value, bool))
    if not fits:
        expected = kinds.get(kind, "a JSON list such as " + json.dumps(default))
        raise ValueError(f"{flag} {key}={text}: expected {expected} (default {default!r})")
    return float(value) if kind is float else value


def _missing_split(dataset, split: str) -> str:
    message = f"dataset {dataset.name} has no {split} split"
    if "data_dir" in dataset.info:  # MNIST's files
        files = " and ".join(f"{name}[.gz]" for name in MNIST_FILES[split])
        message += f": {files} are not in {dataset.info['data_dir']}; fetch them with --download"
    return message


def load(
    model_name: str,
    dataset_name: str,
    options: dict,
    dtype: str,
    splits: Sequence[str],
    model_args: dict | None = None,
):
    """The data set and the model (its classes or vocabulary sized to the data, and
    ``model_args``, its options) to run; each of ``splits`` ("train", "test") must be in the
    data."""
    import jax.numpy as jnp

    from jaxmodels.data.datasets import get_dataset

    dataset = get_dataset(dataset_name, **options)
    for split in splits:
        if getattr(dataset, f"x_{split}") is None:
            raise ValueError(_missing_split(dataset, split))
    config = {"dtype": jnp.bfloat16} if dtype == "bfloat16" else {}
    if dataset.num_classes is not None:  # a classifier's classes, a language model's vocabulary
        config[DATA_SIZES[dataset.task]] = dataset.num_classes
    return get_model(model_name, **config, **(model_args or {})), dataset
