"""``jaxmodels.interop.safetensors``: a model's variables in a .safetensors file and back.

Round trips of registered models' variables bitwise, with the model rebuilt from the file's name
and config computing the same outputs; the file's tensor names and metadata; dtypes; and every
refusal named, before anything is written.
"""

from __future__ import annotations

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _diffs import assert_same_bits

safetensors = pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from jaxmodels.interop.safetensors import DTYPES, load_variables, save_variables  # noqa: E402
from jaxmodels.nn.models import get_model, list_models  # noqa: E402

# name -> (config, example input); configs off the defaults, the CNN's with tuples.
CASES = {
    "cnn": (
        {
            "features": (8, 16),
            "pool_after": (True, False),
            "dense_features": (32,),
            "num_classes": 7,
        },
        np.random.default_rng(0).standard_normal((2, 28, 28, 1)).astype(np.float32),
    ),
    "lstm-classifier": (
        {"hidden_size": 24, "num_layers": 2, "bidirectional": True, "num_classes": 5},
        np.random.default_rng(1).standard_normal((2, 6, 3)).astype(np.float32),
    ),
    "char-lstm": (
        {"vocab_size": 11, "embed_size": 8, "hidden_size": 16},
        np.random.default_rng(2).integers(0, 11, (2, 7)).astype(np.int32),
    ),
}


def paths(tree) -> dict[str, jax.Array]:
    """{"params/layer_0/w_x": leaf, ...}."""
    return {
        "/".join(k.key for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def assert_same_tree(loaded, saved):
    assert jax.tree.structure(loaded) == jax.tree.structure(jax.tree.map(np.asarray, saved))
    for name, leaf in paths(saved).items():
        assert isinstance(paths(loaded)[name], jax.Array), name
        assert_same_bits(paths(loaded)[name], leaf, name)


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_rebuilds_the_model(name, tmp_path):
    config, x = CASES[name]
    model = get_model(name, **config)
    variables = model.init(jax.random.key(0), x)
    path = tmp_path / f"{name}.safetensors"
    save_variables(path, variables, name, config)

    loaded, loaded_name, loaded_config = load_variables(path)
    assert (loaded_name, loaded_config) == (name, config)
    assert_same_tree(loaded, variables)
    np.testing.assert_array_equal(
        get_model(loaded_name, **loaded_config).apply(loaded, x), model.apply(variables, x)
    )


def test_file_holds_paths_and_metadata(tmp_path):
    config, x = CASES["lstm-classifier"]
    variables = get_model("lstm-classifier", **config).init(jax.random.key(0), x)
    path = tmp_path / "lstm.safetensors"
    save_variables(path, variables, "lstm-classifier", config)
    with safe_open(path, framework="np") as file:
        names, metadata = set(file.keys()), file.metadata()
    assert names == set(paths(variables))
    assert {"params/LSTM_0/layer_1_reverse/w_x", "params/Dense_0/kernel"} <= names
    assert metadata == {
        "format": "jaxmodels.variables",
        "format_version": "1",
        "model_name": "lstm-classifier",
        "config": json.dumps(config),
    }


def test_lists_in_the_config_come_back_as_tuples(tmp_path):
    config, x = CASES["cnn"]
    variables = get_model("cnn", **config).init(jax.random.key(0), x)
    save_variables(tmp_path / "cnn.safetensors", variables, "cnn", dict(config, features=[8, 16]))
    assert load_variables(tmp_path / "cnn.safetensors")[2]["features"] == (8, 16)


def test_every_dtype_round_trips_bitwise(tmp_path):
    """bfloat16 model parameters, and a leaf of each dtype in DTYPES but float64 (JAX holds it
    only with jax_enable_x64; see test_float64_needs_x64)."""
    config, x = CASES["lstm-classifier"]
    variables = get_model("lstm-classifier", **config).init(jax.random.key(0), x)
    variables = jax.tree.map(lambda a: a.astype(jnp.bfloat16), variables)
    rng = np.random.default_rng(3)
    held = [d for d in DTYPES if jnp.asarray(np.zeros(1, d)).dtype == np.dtype(d)]
    extra = {d: (np.abs(rng.standard_normal((2, 3))) * 20).astype(d) for d in held}
    variables = {**variables, "extra": extra}
    save_variables(tmp_path / "v.safetensors", variables, "lstm-classifier", config)
    assert_same_tree(load_variables(tmp_path / "v.safetensors")[0], variables)


@pytest.mark.skipif(jax.config.jax_enable_x64, reason="jax_enable_x64 holds float64")
def test_float64_needs_x64(tmp_path):
    path = tmp_path / "v.safetensors"
    save_variables(path, {"params": {"w": np.ones(3, np.float64)}}, "cnn", {})
    with pytest.raises(ValueError, match=r"params/w is float64, .*jax_enable_x64"):
        load_variables(path)


def test_any_file_name_loads(tmp_path):
    save_variables(tmp_path / "v.safetensors", {"params": {"w": jnp.ones(3)}}, "cnn", {})
    shutil.copy(tmp_path / "v.safetensors", tmp_path / "weights.bin")
    assert_same_tree(load_variables(tmp_path / "weights.bin")[0], {"params": {"w": jnp.ones(3)}})


# ---------------------------------------------------------------------------------------------
# Refusals


GOOD = {"params": {"w": jnp.ones(3)}}


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (("v.npz", GOOD, "cnn", {}), ValueError, r"ending in '\.safetensors', got '.*v\.npz'"),
        (
            ("v.safetensors", GOOD, "vgg", {}),
            ValueError,
            "unknown model 'vgg'; expected one of " + re.escape(str(list_models())),
        ),
        (("v.safetensors", GOOD, "cnn", {"num_classes": np.int64(3)}), ValueError, "JSON"),
        (("v.safetensors", GOOD, "cnn", {"dropout_rate": float("nan")}), ValueError, "JSON"),
        (("v.safetensors", GOOD, "cnn", [("num_classes", 3)]), ValueError, "mapping"),
        (("v.safetensors", GOOD, "cnn", {"hidden_size": 3}), TypeError, "'cnn'"),
        (("v.safetensors", GOOD, "char-lstm", {}), TypeError, "'char-lstm'"),
        (("v.safetensors", {"params": {"w": 1.0}}, "cnn", {}), ValueError, "params/w is a float"),
        (("v.safetensors", {"params": {"w": [1.0]}}, "cnn", {}), ValueError, "params/w is a list"),
        (
            ("v.safetensors", {"params": {"w": np.ones(2, np.complex128)}}, "cnn", {}),
            ValueError,
            r"params/w has dtype complex128; safetensors holds \('bool'",
        ),
        (("v.safetensors", {"params": {"a/b": jnp.ones(2)}}, "cnn", {}), ValueError, "'a/b'"),
        (("v.safetensors", {"params": {"": jnp.ones(2)}}, "cnn", {}), ValueError, r"\[''\]"),
        (("v.safetensors", {"params": {1: jnp.ones(2)}}, "cnn", {}), ValueError, r"\[1\]"),
        (("v.safetensors", {"params": {"w": {}}}, "cnn", {}), ValueError, "params/w is an empty"),
        (("v.safetensors", {}, "cnn", {}), ValueError, "variables is an empty"),
    ],
)
def test_save_refuses_before_writing(args, error, match, tmp_path):
    path, *rest = args
    with pytest.raises(error, match=match):
        save_variables(tmp_path / path, *rest)
    assert not list(tmp_path.iterdir())


def write(path, tensors=None, **metadata):
    """A safetensors file of ``tensors`` (one array by default) with ``metadata`` as strings."""
    save_file(tensors or {"params/w": np.ones(3, np.float32)}, path, metadata=metadata or None)


OURS = dict(format="jaxmodels.variables", format_version="1", model_name="cnn", config="{}")


def test_a_file_of_our_format_written_by_hand_loads(tmp_path):
    write(tmp_path / "v.safetensors", **OURS)
    variables, name, config = load_variables(tmp_path / "v.safetensors")
    assert (name, config) == ("cnn", {})
    assert_same_tree(variables, {"params": {"w": np.ones(3, np.float32)}})


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p.write_bytes(b"not a safetensors file"), "is not a safetensors file"),
        (lambda p: p.write_bytes(b""), "is not a safetensors file"),
        (write, r"metadata lacks \['format', 'format_version', 'model_name', 'config'\]"),
        (lambda p: write(p, **{k: v for k, v in OURS.items() if k != "config"}), r"\['config'\]"),
        (lambda p: write(p, **dict(OURS, format="other")), "its format is 'other'"),
        (lambda p: write(p, **dict(OURS, format_version="2")), "format_version '2'; .* reads '1'"),
        (lambda p: write(p, **dict(OURS, model_name="vgg")), r"model 'vgg'; expected one of"),
        (
            lambda p: write(p, {"params/a": np.ones(1), "params/a/b": np.ones(1)}, **OURS),
            r"tensor names \['params/a'\] are not paths",
        ),
        (lambda p: write(p, {"params//w": np.ones(1)}, **OURS), r"\['params//w'\]"),
    ],
)
def test_load_names_the_file_and_what_is_wrong(make, match, tmp_path):
    path = tmp_path / "v.safetensors"
    make(path)
    with pytest.raises(ValueError, match=match) as raised:
        load_variables(path)
    assert str(path) in str(raised.value)


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        load_variables(tmp_path / "nope.safetensors")
