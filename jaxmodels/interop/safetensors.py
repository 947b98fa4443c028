"""A model's variables in a .safetensors file, with what rebuilds the model: ``save_variables`` and
``load_variables``.

    >>> import os, tempfile, jax, jax.numpy as jnp
    >>> path = os.path.join(tempfile.mkdtemp(), "lstm.safetensors")
    >>> config, xs = {"hidden_size": 8, "num_classes": 10}, jnp.ones((2, 5, 3))
    >>> model = get_model("lstm-classifier", **config)
    >>> save_variables(path, model.init(jax.random.key(0), xs), "lstm-classifier", config)
    >>> variables, name, config = load_variables(path)
    >>> get_model(name, **config).apply(variables, xs).shape          # as the saved model's
    (2, 10)

The file, in the safetensors format (safetensors.numpy's ``save_file`` / ``safe_open``):

    tensors   one per leaf of the variables, named by its path joined with "/" (e.g.
              "params/layer_0/w_x", "params/Dense_0/kernel"), dtype and shape the leaf's
    metadata  "format": "jaxmodels.variables", "format_version": "1",
              "model_name": a name of ``jaxmodels.nn.models.list_models()``,
              "config": the ``get_model`` options as JSON, e.g. {"hidden_size": 64, "num_classes": 10}

JSON has no tuples: every list in the config comes back as a tuple (``jaxmodels.nn.models.tuples``, as
a run's recorded options), so tuples round-trip and lists come back as tuples.

Written: variables as nested mappings (Flax's) of arrays (jax or numpy) of the dtypes in ``DTYPES``
under keys that are non-empty strings without "/"; no empty mapping (it would not come back).
Read back: nested dicts of jax arrays, bitwise as written; a 64-bit tensor needs
``jax_enable_x64`` (ValueError rather than a silent cast). The variables are not checked against
the model here (``apply`` does that). The safetensors package is imported only inside the two
functions: this module imports without it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.files import replacing
from jaxmodels.nn.models import get_model, list_models, tuples

FORMAT = "jaxmodels.variables"
FORMAT_VERSION = "1"
SUFFIX = ".safetensors"
# What safetensors writes and its numpy API reads back (it writes float8 too, but cannot read it).
DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
DTYPES += ("float16", "bfloat16", "float32", "float64", "complex64")
_KEYS = ("format", "format_version", "model_name", "config")


def save_variables(
    path: str | os.PathLike, variables: Mapping, model_name: str, config: Mapping[str, Any]
) -> None:
    """Write ``variables`` (of ``get_model(model_name, **config)``) to ``path``, a file name ending
    in ".safetensors" (replaced whole if it exists: through a temporary file in its folder, renamed
    over it, ``jaxmodels.files.replacing``). The layout: see the module docstring.

    Raises, before writing: ValueError for another suffix, a model name not registered (listing
    the names), a config not a mapping of strings to JSON values (naming the value), a key other
    than a non-empty string without "/", an empty mapping, or a leaf not an array of a dtype in
    ``DTYPES`` (naming its path); TypeError (from ``get_model``) for options the model has not.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix != SUFFIX:
        raise ValueError(f"expected a file name ending in {SUFFIX!r}, got {str(path)!r}")
    if model_name not in list_models():
        raise ValueError(f"unknown model {model_name!r}; expected one of {list_models()}")
    if not (isinstance(config, Mapping) and all(isinstance(key, str) for key in config)):
        raise ValueError(f"expected config to be a mapping of option names, got {config!r}")
    try:
        config_json = json.dumps(dict(config), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config of {model_name!r} is not JSON-able: {err}") from None
    get_model(model_name, **config)
    tensors = {}
    for keys, leaf in _leaves(variables, ()):
        name = "/".join(keys)
        if not isinstance(leaf, (np.ndarray, jax.Array)):
            raise ValueError(f"{name} is a {type(leaf).__name__}, expected an array")
        if leaf.dtype.name not in DTYPES:
            raise ValueError(f"{name} has dtype {leaf.dtype}; safetensors holds {DTYPES}")
        tensors[name] = np.ascontiguousarray(np.asarray(leaf))
    metadata = dict(format=FORMAT, format_version=FORMAT_VERSION, model_name=model_name)
    with replacing(path) as tmp:  # whole or not at all: an old file stays on a failed write
        save_file(tensors, tmp, metadata=metadata | {"config": config_json})


def load_variables(path: str | os.PathLike) -> tuple[dict, str, dict[str, Any]]:
    """(variables, model_name, config) from a file that ``save_variables`` wrote (any file name):
    variables as nested dicts of jax arrays, bitwise as saved; config with lists as tuples.

    Raises FileNotFoundError for a missing file, ValueError naming the file for one that is not a
    safetensors file, lacks our metadata (naming what is missing), has another format version, a
    model name not registered, a tensor name that is not a path, or a 64-bit tensor while
    ``jax_enable_x64`` is off.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file {str(path)!r}")
    try:
        with safe_open(path, framework="np") as file:
            metadata = file.metadata() or {}
            arrays = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    except SafetensorError as err:
        raise ValueError(f"{str(path)!r} is not a safetensors file: {err}") from None
    missing = [key for key in _KEYS if key not in metadata]
    if missing or metadata["format"] != FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a jaxmodels variables file (format {FORMAT!r}): its metadata "
            f"lacks {missing}" + ("" if missing else f", its format is {metadata['format']!r}")
        )
    if metadata["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has format_version {metadata['format_version']!r}; this jaxmodels "
            f"reads {FORMAT_VERSION!r}"
        )
    name = metadata["model_name"]
    if name not in list_models():
        raise ValueError(f"{str(path)!r} names model {name!r}; expected one of {list_models()}")
    config = {key: tuples(value) for key, value in json.loads(metadata["config"]).items()}
    split = {tensor: tensor.split("/") for tensor in arrays}
    inner = {"/".join(keys[:i]) for keys in split.values() for i in range(1, len(keys))}
    bad = sorted(tensor for tensor, keys in split.items() if tensor in inner or not all(keys))
    if bad:
        raise ValueError(f"{str(path)!r}: tensor names {bad} are not paths of leaves")
    variables: dict = {}
    for tensor, array in arrays.items():
        *parents, leaf = split[tensor]
        node = variables
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(array)
        if node[leaf].dtype != array.dtype:
            raise ValueError(
                f"{str(path)!r}: {tensor} is {array.dtype}, which JAX holds only with "
                "jax_enable_x64 (jax.config.update('jax_enable_x64', True))"
            )
    return variables, name, config


def _leaves(tree: Any, keys: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
    """(path, leaf) of nested mappings; ValueError for a bad key or an empty mapping."""
    if not isinstance(tree, Mapping):
        return [(keys, tree)]
    where = "/".join(keys) or "variables"
    if not tree:
        raise ValueError(f"{where} is an empty mapping: safetensors files hold arrays only")
    bad = [key for key in tree if not (isinstance(key, str) and key and "/" not in key)]
    if bad:
        raise ValueError(f"{where} has keys {bad}; expected non-empty strings without '/'")
    return [pair for key, sub in tree.items() for pair in _leaves(sub, (*keys, key))]
