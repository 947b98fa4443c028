"""PyTorch weights in and out of jaxmodels: ``from_torch``, ``to_torch`` and ``flax_module_for``.

Supported torch modules and the Flax module their variables are for (``flax_module_for``):

    torch.nn.LSTM(features, hidden, num_layers, bias, batch_first, dropout, bidirectional)
        -> jaxmodels.LSTM(hidden, num_layers, bidirectional, dropout_rate=dropout)
    torch.nn.RNN(..., nonlinearity="tanh" | "relu")
        -> jaxmodels.SimpleRNN(..., activation=nonlinearity)
    torch.nn.Linear(in, out, bias)                           -> flax.linen.Dense(out)
    the seed CNN, a torch.nn.Sequential as jaxmodels.bench.torch_models.seed_cnn() -> jaxmodels.CNN()

The mapping. Recurrent layer k, direction suffix "" (forward) or "_reverse" (backward), G = 4
(gates i, f, g, o in both) for the LSTM and 1 for the RNN; p = params["layer_{k}{suffix}"]:

    p["w_x"] = weight_ih_l{k}{suffix}.T                              [in, G*hidden]
    p["w_h"] = weight_hh_l{k}{suffix}.T                              [hidden, G*hidden]
    p["b"]   = bias_ih_l{k}{suffix} + bias_hh_l{k}{suffix}           [G*hidden], zeros for bias=False

Back, ``to_torch`` writes bias_ih = b and bias_hh = -0.0 (negative zero: x + (-0.0) is x bitwise for
every x, so ``from_torch(to_torch(v, m))`` gives b back exactly, zeros of either sign included).
A torch module with bias=False takes only b = 0 (else ValueError).

    torch.nn.Linear: params["kernel"] = weight.T [in, out], params["bias"] = bias [out]. With
        bias=False, bias = zeros: Flax's Dense, as the CNN uses it, always has a bias, and a zero
        one computes the same; back, such a module takes only a zero bias.
    The seed CNN, Conv_k (k = 0, 1, 2; torch layers 0, 3, 6) and Dense_k (torch layers 9, 11):
        Conv_k["kernel"] = weight.transpose(2, 3, 1, 0)    [kh, kw, in, out] (HWIO) from OIHW
        Dense_1["kernel"] = weight.T, every "bias" = bias
        Dense_0["kernel"][(h*W + w)*C + c, o] = weight[o, (c*H + h)*W + w]   (C, H, W = 64, 3, 3)
    The last: torch's Flatten reads NCHW feature maps in (c, h, w) order, ours NHWC in (h, w, c),
    so the first dense layer's input rows are permuted, not just transposed:
    kernel = weight.reshape(out, C, H, W).transpose(2, 3, 1, 0).reshape(H*W*C, out).

Not supported (ValueError naming it): LSTM proj_size > 0, any other module type (torch.nn.GRU, ...),
a torch.nn.Sequential with other layers or layer sizes than the seed CNN's. Torch is imported only
inside the functions: this module imports without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxmodels.nn.layers import CNN, LSTM, SimpleRNN

SUPPORTED = (
    "torch.nn.LSTM, torch.nn.RNN (tanh or relu), torch.nn.Linear, and the seed CNN as a "
    "torch.nn.Sequential (jaxmodels.bench.torch_models.seed_cnn())"
)

# The seed CNN layer by layer: (type name, the attributes that must match).
_CONV = {"kernel_size": (3, 3), "stride": (1, 1), "padding": (0, 0), "dilation": (1, 1)}
_CONV |= {"groups": 1, "bias": True, "padding_mode": "zeros"}
_POOL = {"kernel_size": (2, 2), "stride": (2, 2), "padding": (0, 0), "dilation": (1, 1)}
_POOL |= {"ceil_mode": False, "return_indices": False}
_RELU = ("ReLU", {})
_SEED_CNN = (
    ("Conv2d", {"in_channels": 1, "out_channels": 32, **_CONV}),
    _RELU,
    ("MaxPool2d", _POOL),
    ("Conv2d", {"in_channels": 32, "out_channels": 64, **_CONV}),
    _RELU,
    ("MaxPool2d", _POOL),
    ("Conv2d", {"in_channels": 64, "out_channels": 64, **_CONV}),
    _RELU,
    ("Flatten", {"start_dim": 1, "end_dim": -1}),
    ("Linear", {"in_features": 576, "out_features": 64, "bias": True}),
    _RELU,
    ("Linear", {"in_features": 64, "out_features": 10, "bias": True}),
)
_ATTRS = {kind: tuple(attrs) for kind, attrs in _SEED_CNN}
_PAIRS = ("kernel_size", "stride", "padding", "dilation")  # an int n means (n, n)
# Torch's layer index -> our name, and how its weight maps (a key of _FORWARD below).
_CNN_LAYERS = {0: ("Conv_0", "conv"), 3: ("Conv_1", "conv"), 6: ("Conv_2", "conv")}
_CNN_LAYERS |= {9: ("Dense_0", "flatten"), 11: ("Dense_1", "transpose")}
# The feature maps that Flatten reads, (C, H, W): 28 -conv-> 26 -pool-> 13 -conv-> 11 -pool-> 5
# -conv-> 3, with 64 channels.
_FLAT_CHW = (64, 3, 3)


def _rows_to_nhwc(weight: np.ndarray) -> np.ndarray:
    """[out, C*H*W] reading NCHW's flatten -> kernel [H*W*C, out] reading NHWC's."""
    c, h, w = _FLAT_CHW
    return weight.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)


def _rows_to_nchw(kernel: np.ndarray) -> np.ndarray:
    """The inverse of ``_rows_to_nhwc``: kernel [H*W*C, out] -> weight [out, C*H*W]."""
    c, h, w = _FLAT_CHW
    return kernel.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * w)


# How one of our parameters is made from torch's parameters (FORWARD) and back (BACK, one array
# per torch name). "zeros": a missing torch bias, its torch name the weight giving its size.
_FORWARD = {
    "copy": lambda a: a,
    "transpose": lambda w: w.T,
    "conv": lambda w: w.transpose(2, 3, 1, 0),
    "flatten": _rows_to_nhwc,
    "sum": lambda ih, hh: ih + hh,
    "zeros": lambda w: np.zeros(w.shape[:1], w.dtype),
}
_BACK = {
    "copy": lambda a: (a,),
    "transpose": lambda k: (k.T,),
    "conv": lambda k: (k.transpose(3, 2, 0, 1),),
    "flatten": lambda k: (_rows_to_nchw(k),),
    "sum": lambda b: (b, np.full_like(b, -0.0)),
}


class _Entry(NamedTuple):
    path: tuple[str, ...]  # ours, under "params"
    torch: tuple[str, ...]  # the torch parameters it is made of
    how: str  # a key of _FORWARD (and _BACK, but for "zeros")


def flax_module_for(module: Any) -> nn.Module:
    """The Flax module that ``from_torch(module)``'s variables are for, so that
    ``flax_module_for(m).apply(from_torch(m), xs)`` computes what ``m`` does.

    Inputs and outputs: our recurrent modules are batch-major, xs [batch, time, features] ->
    outputs [batch, time, directions*hidden]. A torch module with batch_first=False reads
    [time, batch, features] and returns [time, batch, directions*hidden]: swap the first two axes
    of its xs to feed ours (``xs.swapaxes(0, 1)``), and of our outputs to compare. The final state
    (h_n, or (h_n, c_n) for the LSTM) is [num_layers*directions, batch, hidden] in both. The CNN
    reads NHWC images [batch, 28, 28, 1]: torch's NCHW x is ``x.transpose(0, 2, 3, 1)``.

    Returns: ``jaxmodels.LSTM(hidden_size, num_layers, bidirectional, dropout_rate=dropout)``,
    ``jaxmodels.SimpleRNN(..., activation=nonlinearity)``, ``flax.linen.Dense(out_features)`` or
    ``jaxmodels.CNN()``. Raises ValueError for an unsupported module (see the module docstring).
    """
    kind = _kind(module)
    if kind == "cnn":
        return CNN()
    if kind == "linear":
        return nn.Dense(module.out_features)
    sizes = dict(hidden_size=module.hidden_size, num_layers=module.num_layers)
    sizes |= dict(bidirectional=module.bidirectional, dropout_rate=module.dropout)
    return LSTM(**sizes) if kind == "lstm" else SimpleRNN(**sizes, activation=module.nonlinearity)


def from_torch(module: Any) -> dict:
    """Flax variables {"params": ...} for ``flax_module_for(module)`` from the torch module's
    parameters (copied; the mapping is in the module docstring). Recurrent: {"layer_{k}[_reverse]":
    {"w_x" [in, G*hidden], "w_h" [hidden, G*hidden], "b" [G*hidden]}}; Linear: {"kernel" [in, out],
    "bias" [out]}; the CNN: {"Conv_k": {"kernel" [3, 3, in, out], "bias"}, "Dense_k": {...}}.
    Raises ValueError for an unsupported module."""
    arrays = {name: p.detach().cpu().numpy().copy() for name, p in module.named_parameters()}
    params: dict = {}
    for entry in _entries(module):
        node = params
        for key in entry.path[:-1]:
            node = node.setdefault(key, {})
        node[entry.path[-1]] = jnp.asarray(_FORWARD[entry.how](*(arrays[n] for n in entry.torch)))
    return {"params": params}


def to_torch(variables: Mapping, module: Any) -> Any:
    """Load ``variables`` (as ``from_torch`` returns them for ``module``) into the torch module in
    place (cast to its parameters' dtypes) and return it. The biases: see the module docstring.

    Raises ValueError, before writing anything, for an unsupported module, variables missing a
    parameter or having one more, a shape other than the module's (naming the parameter and both
    shapes), or a nonzero bias for a module with bias=False.
    """
    import torch

    entries = _entries(module)
    ours = _flatten(variables)
    wanted = {("params", *entry.path) for entry in entries}
    if set(ours) != wanted:
        missing = sorted("/".join(p) for p in wanted - set(ours))
        extra = sorted("/".join(p) for p in set(ours) - wanted)
        raise ValueError(
            f"expected the variables of {_describe(module)}; missing: {missing}, not in it: {extra}"
        )
    state = {name: p.detach() for name, p in module.named_parameters()}
    values = {}
    for entry in entries:
        name = "/".join(("params", *entry.path))
        value = np.asarray(ours[("params", *entry.path)])
        shape = _FORWARD[entry.how](*(np.zeros(state[n].shape) for n in entry.torch)).shape
        if value.shape != shape:
            raise ValueError(
                f"{name} has shape {value.shape}, but {_describe(module)} needs {shape} "
                f"(from torch's {', '.join(entry.torch)})"
            )
        if entry.how == "zeros":
            if np.any(value != 0):
                raise ValueError(
                    f"{name} is not all zeros, but {_describe(module)} has no bias to take it "
                    "(bias=False)"
                )
            continue
        values |= dict(zip(entry.torch, _BACK[entry.how](value)))
    with torch.no_grad():
        for name, value in values.items():
            state[name].copy_(torch.from_numpy(np.array(value, order="C")))
    return module


def _kind(module: Any) -> str:
    """'lstm', 'rnn', 'linear' or 'cnn'; ValueError for anything else."""
    import torch

    if isinstance(module, torch.nn.LSTM):
        if module.proj_size > 0:
            raise ValueError(
                f"unsupported torch.nn.LSTM option proj_size={module.proj_size}: jaxmodels.LSTM "
                "has no output projection (proj_size=0 only)"
            )
        return "lstm"
    if isinstance(module, torch.nn.RNN):
        return "rnn"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Sequential):
        _check_seed_cnn(module)
        return "cnn"
    kind = type(module)
    raise ValueError(
        f"unsupported torch module type {kind.__module__}.{kind.__qualname__}; supported: {SUPPORTED}"
    )


def _check_seed_cnn(module: Any) -> None:
    """ValueError unless the Sequential's layers are the seed CNN's, type and attributes."""
    layers = list(module)
    for index, ((kind, attrs), layer) in enumerate(zip(_SEED_CNN, layers)):
        name = type(layer).__name__
        got = (name, {key: _attribute(layer, key) for key in _ATTRS.get(name, ())})
        if got != (kind, attrs):
            raise ValueError(
                f"unsupported torch.nn.Sequential: only the seed CNN converts; its layer {index} "
                f"is {_layer(*got)}, the seed CNN's is {_layer(kind, attrs)}"
            )
    if len(layers) != len(_SEED_CNN):
        raise ValueError(
            f"unsupported torch.nn.Sequential: only the seed CNN converts, of {len(_SEED_CNN)} "
            f"layers; got {len(layers)}"
        )


def _attribute(layer: Any, key: str) -> Any:
    """layer.key as the seed CNN's table writes it (bias: present or not; sizes as pairs)."""
    value = getattr(layer, key, None)
    if key == "bias":
        return value is not None and value is not False
    if key == "padding" and value == "valid":
        return (0, 0)
    if key in _PAIRS and isinstance(value, int):
        return (value, value)
    return tuple(value) if isinstance(value, list) else value


def _layer(kind: str, attrs: dict) -> str:
    return f"{kind}({', '.join(f'{key}={value!r}' for key, value in attrs.items())})"


def _describe(module: Any) -> str:
    return "the seed CNN" if _kind(module) == "cnn" else f"torch.nn.{module!r}"


def _entries(module: Any) -> list[_Entry]:
    """Our parameters, each with the torch parameters it is made of and how."""
    kind = _kind(module)
    if kind == "linear":
        bias = ("bias",) if module.bias is not None else ()
        return [_Entry(("kernel",), ("weight",), "transpose"), _bias(("bias",), bias, "weight")]
    if kind == "cnn":
        names = [name for name, _ in module.named_children()]
        entries = []
        for index, (ours, how) in _CNN_LAYERS.items():
            entries.append(_Entry((ours, "kernel"), (f"{names[index]}.weight",), how))
            entries.append(_Entry((ours, "bias"), (f"{names[index]}.bias",), "copy"))
        return entries
    entries = []
    for k in range(module.num_layers):
        for suffix in ("", "_reverse")[: 2 if module.bidirectional else 1]:
            ours, theirs = f"layer_{k}{suffix}", f"l{k}{suffix}"
            bias = (f"bias_ih_{theirs}", f"bias_hh_{theirs}") if module.bias else ()
            entries += [
                _Entry((ours, "w_x"), (f"weight_ih_{theirs}",), "transpose"),
                _Entry((ours, "w_h"), (f"weight_hh_{theirs}",), "transpose"),
                _bias((ours, "b"), bias, f"weight_ih_{theirs}"),
            ]
    return entries


def _bias(path: tuple[str, ...], torch_bias: tuple[str, ...], weight: str) -> _Entry:
    """A bias made of torch's one (copied) or two (summed), or zeros, sized by torch's ``weight``,
    where torch has none."""
    if not torch_bias:
        return _Entry(path, (weight,), "zeros")
    return _Entry(path, torch_bias, "copy" if len(torch_bias) == 1 else "sum")


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """{path: leaf} of nested mappings."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    return {
        path: leaf
        for key, sub in tree.items()
        for path, leaf in _flatten(sub, (*prefix, key)).items()
    }
