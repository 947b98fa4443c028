"""Keras 3 weights in and out of jaxmodels: ``from_keras``, ``to_keras`` and ``flax_module_for``.

Supported Keras layers and models and the Flax module their variables are for (``flax_module_for``):

    keras.layers.LSTM(units)                   -> jaxmodels.LSTM(hidden_size=units)
    keras.layers.SimpleRNN(units, activation)  -> jaxmodels.SimpleRNN(units, activation=...),
        activation "tanh", "relu", "sigmoid" or "linear" (ours: "identity")
    keras.layers.Conv2D(filters, kernel_size, strides, padding, dilation_rate, groups)
        -> flax.linen.Conv(filters, kernel_size, strides, padding.upper(), kernel_dilation=
           dilation_rate, feature_group_count=groups)
    keras.layers.Dense(units)                  -> flax.linen.Dense(units)
    the seed CNN, Chollet's MNIST convnet as a keras.Sequential([Input((28, 28, 1)), Conv2D(32, 3,
        "relu"), MaxPooling2D(2), Conv2D(64, 3, "relu"), MaxPooling2D(2), Conv2D(64, 3, "relu"),
        Flatten(), Dense(64, "relu"), Dense(10, "softmax")])                -> jaxmodels.CNN()

The mapping. Keras keeps its parameters in our layout: each one is copied as it is.

    LSTM, SimpleRNN (G = 4, 1): params["layer_0"] = {"w_x": kernel [in, G*units],
        "w_h": recurrent_kernel [units, G*units], "b": bias [G*units]}. Keras' LSTM gate blocks
        i, f, c, o are our i, f, g, o (its c, the candidate tanh(...), is our g), with the same
        equations for activation tanh and recurrent_activation sigmoid.
    Conv2D, Dense: params = {"kernel": kernel [kh, kw, in/groups, out] (HWIO, as Flax's) or
        [in, out], "bias": bias [out]}.
    The seed CNN: Conv_k is Conv2D k's (k = 0, 1, 2: layers 0, 2, 4), Dense_k is Dense k's (layers
        6, 7). Keras' Flatten (channels_last) reads NHWC feature maps in (h, w, c) order as ours
        does: Dense_0's kernel is copied unpermuted (unlike PyTorch's). Any input size the model
        is built for converts (CNN() reads it from x).

use_bias=False: the bias is zeros (a zero bias computes the same); back, such a layer takes only
a zero bias. Activations: a Dense's or Conv2D's (any) is not in its Flax module, which computes
the affine part: apply ``layer.activation`` to its outputs. The seed CNN's last Dense may be
"softmax" or "linear": CNN() returns the logits, the values before the softmax.

Not supported (ValueError naming it): LSTM, SimpleRNN with go_backwards=True (our modules run
backwards only within bidirectional=True), stateful=True, or other activations than the above;
Conv2D with data_format="channels_first"; layers holding other variables (LoRA, quantized) or not
built yet; other types (GRU, Bidirectional, Conv1D, ...); a keras.Sequential with other layers or
layer sizes than the seed CNN's. ``dropout`` and ``recurrent_dropout`` act in training only and
are not carried over. Tested with the JAX backend. Keras is imported only inside the functions:
this module imports without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from jaxmodels.nn.layers import CNN, LSTM, SimpleRNN

SUPPORTED = (
    "keras.layers.LSTM, keras.layers.SimpleRNN, keras.layers.Conv2D, keras.layers.Dense, and the "
    "seed CNN as a keras.Sequential (Chollet's MNIST convnet)"
)
_RNN_ACTIVATIONS = {"tanh": "tanh", "relu": "relu", "sigmoid": "sigmoid", "linear": "identity"}
# Options our modules cannot express: {layer type: {attribute: (values taken, why)}}.
_RECURRENT = {
    "go_backwards": ((False,), "our modules run backwards only within bidirectional=True"),
    "stateful": ((False,), "our modules keep no state between calls (pass initial_carry)"),
}
_OPTIONS = {
    "LSTM": {
        "activation": (("tanh",), "jaxmodels.LSTM computes tanh"),
        "recurrent_activation": (("sigmoid",), "jaxmodels.LSTM's gates are sigmoids"),
        **_RECURRENT,
    },
    "SimpleRNN": {
        "activation": (tuple(_RNN_ACTIVATIONS), "not one of jaxmodels.SimpleRNN's"),
        **_RECURRENT,
    },
    "Conv2D": {"data_format": (("channels_last",), "Flax's Conv reads NHWC")},
    "Dense": {},
}
# The seed CNN layer by layer: (type name, the attributes that must match).
_CONV = {"kernel_size": (3, 3), "strides": (1, 1), "padding": "valid", "dilation_rate": (1, 1)}
_CONV |= {"groups": 1, "use_bias": True, "activation": "relu", "data_format": "channels_last"}
_POOL = {"pool_size": (2, 2), "strides": (2, 2), "padding": "valid", "data_format": "channels_last"}
_SEED_CNN = (
    ("Conv2D", {"filters": 32, **_CONV}),
    ("MaxPooling2D", _POOL),
    ("Conv2D", {"filters": 64, **_CONV}),
    ("MaxPooling2D", _POOL),
    ("Conv2D", {"filters": 64, **_CONV}),
    ("Flatten", {"data_format": "channels_last"}),
    ("Dense", {"units": 64, "use_bias": True, "activation": "relu"}),
    ("Dense", {"units": 10, "use_bias": True, "activation": "softmax"}),
)
_ATTRS = {kind: tuple(attrs) for kind, attrs in _SEED_CNN}
_CNN_LAYERS = {0: "Conv_0", 2: "Conv_1", 4: "Conv_2", 6: "Dense_0", 7: "Dense_1"}
# Our parameter names -> Keras' variable names, the bias last.
_AFFINE = {"kernel": "kernel", "bias": "bias"}
_CELL = {"w_x": "kernel", "w_h": "recurrent_kernel", "b": "bias"}


class _Entry(NamedTuple):
    path: tuple[str, ...]  # ours, under "params"
    variable: Any  # the Keras variable copied; for a missing bias, the kernel sizing its zeros
    zeros: bool = False


def flax_module_for(layer: Any) -> nn.Module:
    """The Flax module that ``from_keras(layer)``'s variables are for, so that
    ``flax_module_for(m).apply(from_keras(m), x)`` computes what ``m(x)`` does, but for the
    activations of Dense and Conv2D (see the module docstring).

    Inputs and outputs: x is the same array for both ([batch, time, features] for the recurrent
    layers, NHWC [batch, height, width, channels] images). Ours return (outputs, final state):
    outputs [batch, time, units], the final state h_n (the LSTM: (h_n, c_n)), each
    [1, batch, units]. Keras' LSTM / SimpleRNN return outputs (return_sequences=True) or the
    last step's outputs[:, -1] (the default), followed by h_n[0] (and c_n[0]) with
    return_state=True. The seed CNN: CNN() returns logits [batch, 10], the Keras model softmax of
    them (or the logits, where its last Dense is "linear").

    Returns: ``jaxmodels.LSTM(hidden_size=units)``, ``jaxmodels.SimpleRNN(hidden_size=units,
    activation=...)``, ``flax.linen.Conv(...)``, ``flax.linen.Dense(units)`` or
    ``jaxmodels.CNN()``. Raises ValueError for an unsupported layer (see the module docstring).
    """
    kind = _kind(layer)
    if kind == "Sequential":
        return CNN()
    if kind == "Dense":
        return nn.Dense(layer.units)
    if kind == "Conv2D":
        return nn.Conv(
            layer.filters,
            tuple(layer.kernel_size),
            strides=tuple(layer.strides),
            padding=layer.padding.upper(),
            kernel_dilation=tuple(layer.dilation_rate),
            feature_group_count=layer.groups,
        )
    if kind == "LSTM":
        return LSTM(hidden_size=layer.units)
    return SimpleRNN(layer.units, activation=_RNN_ACTIVATIONS[_activation(layer.activation)])


def from_keras(layer: Any) -> dict:
    """Flax variables {"params": ...} for ``flax_module_for(layer)``, copied from the built Keras
    layer's (or model's) variables as the module docstring maps them: {"layer_0": {"w_x", "w_h",
    "b"}}, {"kernel", "bias"}, or the CNN's {"Conv_k": {"kernel", "bias"}, "Dense_k": {...}}.
    Raises ValueError for an unsupported layer."""
    import keras

    params: dict = {}
    for entry in _entries(layer):
        node = params
        for key in entry.path[:-1]:
            node = node.setdefault(key, {})
        value = keras.ops.convert_to_numpy(entry.variable.value)
        node[entry.path[-1]] = jnp.array(
            np.zeros(value.shape[-1:], value.dtype) if entry.zeros else value
        )
    return {"params": params}


def to_keras(variables: Mapping, layer: Any) -> Any:
    """Load ``variables`` (as ``from_keras`` returns them for ``layer``) into the built Keras
    layer (or model) in place, cast to its variables' dtypes, and return it.

    Raises ValueError, before writing anything, for an unsupported layer, variables missing a
    parameter or having one more, a shape other than the layer's (naming the parameter and both
    shapes), or a nonzero bias for a layer with use_bias=False.
    """
    entries, what = _entries(layer), _describe(layer)
    ours = flatten_dict(variables)
    wanted = {("params", *entry.path) for entry in entries}
    if set(ours) != wanted:
        missing = sorted("/".join(p) for p in wanted - set(ours))
        extra = sorted("/".join(p) for p in set(ours) - wanted)
        raise ValueError(
            f"expected the variables of {what}; missing: {missing}, not in it: {extra}"
        )
    values = []
    for entry in entries:
        name = "/".join(("params", *entry.path))
        value = np.asarray(ours[("params", *entry.path)])
        shape = tuple(entry.variable.shape)[-1:] if entry.zeros else tuple(entry.variable.shape)
        if value.shape != shape:
            raise ValueError(
                f"{name} has shape {value.shape}, but {what} needs {shape} (from "
                f"Keras' {entry.variable.path})"
            )
        if entry.zeros:
            if np.any(value != 0):
                raise ValueError(
                    f"{name} is not all zeros, but {what} has no bias to take it (use_bias=False)"
                )
            continue
        values.append((entry.variable, value.astype(entry.variable.dtype)))
    for variable, value in values:
        variable.assign(value)
    return layer


def _kind(layer: Any) -> str:
    """The type name, one of _OPTIONS or 'Sequential' (the seed CNN); ValueError for any other
    type, or an option our module cannot express."""
    import keras

    if isinstance(layer, keras.Sequential):
        _check_seed_cnn(layer)
        return "Sequential"
    kinds = [k for k in _OPTIONS if isinstance(layer, getattr(keras.layers, k))]
    if not kinds:
        kind = type(layer)
        raise ValueError(
            f"unsupported Keras layer type {kind.__module__}.{kind.__qualname__}; supported: "
            f"{SUPPORTED}"
        )
    for key, (taken, why) in _OPTIONS[kinds[0]].items():
        value = _attribute(layer, key)
        if value not in taken:
            raise ValueError(
                f"unsupported keras.layers.{kinds[0]} option {key}={value!r}: {why} "
                f"({key} in {taken} only)"
            )
    return kinds[0]


def _check_seed_cnn(model: Any) -> None:
    """ValueError unless the Sequential's layers are the seed CNN's, type and attributes."""
    layers = list(model.layers)
    for index, ((kind, attrs), layer) in enumerate(zip(_SEED_CNN, layers)):
        name = type(layer).__name__
        got = (name, {key: _attribute(layer, key) for key in _ATTRS.get(name, ())})
        logits = [(kind, attrs | {"activation": "linear"})] if index == len(_SEED_CNN) - 1 else []
        if got not in [(kind, attrs), *logits]:
            raise ValueError(
                f"unsupported keras.Sequential: only the seed CNN converts; its layer {index} is "
                f"{_layer(*got)}, the seed CNN's is {_layer(kind, attrs)}"
            )
    if len(layers) != len(_SEED_CNN):
        raise ValueError(
            f"unsupported keras.Sequential: only the seed CNN converts, of {len(_SEED_CNN)} "
            f"layers; got {len(layers)}"
        )


def _activation(function: Any) -> str:
    """The name of a Keras activation function ("tanh", ...), else its module and name."""
    import keras

    name = getattr(function, "__name__", "")
    try:
        if keras.activations.get(name) is function:
            return name
    except ValueError:  # not a Keras activation's name
        pass
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', function)}"


def _attribute(layer: Any, key: str) -> Any:
    value = getattr(layer, key)
    if key.endswith("activation"):
        return _activation(value)
    return tuple(value) if isinstance(value, list) else value


def _layer(kind: str, attrs: dict) -> str:
    return f"{kind}({', '.join(f'{key}={value!r}' for key, value in attrs.items())})"


def _describe(layer: Any) -> str:
    kind = _kind(layer)
    return "the seed CNN" if kind == "Sequential" else f"keras.layers.{kind} {layer.name!r}"


def _entries(layer: Any) -> list[_Entry]:
    """Our parameters, each with the Keras variable it is copied from."""
    kind = _kind(layer)
    if kind == "Sequential":
        parts = [((ours,), layer.layers[index], _AFFINE) for index, ours in _CNN_LAYERS.items()]
    else:
        parts = [
            ((), layer, _AFFINE) if kind in ("Conv2D", "Dense") else (("layer_0",), layer, _CELL)
        ]
    return [entry for part in parts for entry in _layer_entries(*part)]


def _layer_entries(prefix: tuple[str, ...], layer: Any, names: dict[str, str]) -> list[_Entry]:
    """Our parameters ``names`` (ours -> Keras', the bias last) under ``prefix``, from the built
    ``layer``'s variables; a missing bias (use_bias=False) as zeros."""
    wanted = list(names.values())[: None if layer.use_bias else -1]
    if not layer.built:
        raise ValueError(
            f"keras.layers.{type(layer).__name__} {layer.name!r} is not built: call it once (or "
            "its build(input_shape)) before converting it"
        )
    found = {variable.name: variable for variable in layer.weights}
    if sorted(found) != sorted(wanted):
        raise ValueError(
            f"unsupported keras.layers.{type(layer).__name__} {layer.name!r}: its variables are "
            f"{sorted(found)}, convertible are {sorted(wanted)} (no LoRA or quantized ones)"
        )
    return [
        _Entry((*prefix, ours), found.get(theirs, found["kernel"]), zeros=theirs not in found)
        for ours, theirs in names.items()
    ]
