"""cuDNN's flat LSTM weights, as ``jax.experimental.rnn`` takes them, in and out of jaxmodels:
``to_cudnn`` and ``from_cudnn``.

``jax.experimental.rnn.lstm(x, h_0, c_0, weights, seq_lengths, input_size=I, hidden_size=H,
num_layers=N, dropout=0.0, bidirectional=bi)`` reads one vector ``weights``; ours are the variables
{"params": {"layer_{k}[_reverse]": {"w_x", "w_h", "b"}}} of ``jaxmodels.LSTM(H, N, bi)``, gates
i, f, g, o in both. Both are batch-major and compute the same: with ``w = to_cudnn(v, ...)``,

    y, h_n, c_n = jax.experimental.rnn.lstm(x, h_0, c_0, w, seq_lengths, ...)
    y, (h_n, c_n) = jaxmodels.LSTM(H, N, bi).apply(v, x, (h_0, c_0), seq_lengths=seq_lengths)

x [batch, time, I], y [batch, time, D*H], h_0, c_0, h_n, c_n [N*D, batch, H] (D = 2 if
bidirectional else 1, index k*D + d), seq_lengths [batch] int32 in [1, time] (padded steps output
zeros, the final state is each sequence's at its last real step, the reverse direction reads each
sequence from its own last real step). Within a model (e.g. "lstm-classifier") the LSTM's
variables are a subtree: pass {"params": variables["params"]["LSTM_0"]}.

The layout (jax.experimental.rnn's module docstring and ``unpack_lstm_weights``). Pseudo-layer
l = k*D + d is layer k in direction d (0 forward, 1 "_reverse"), L = N*D pseudo-layers; I_k = I for
k = 0, else D*H. The vector is the concatenation of, each flattened in C order,

    W_ih^0, W_hh^0, W_ih^1, W_hh^1, ..., W_ih^{L-1}, W_hh^{L-1}     W_ih^l [4H, I_k], W_hh^l [4H, H]
    b_ih^0, b_hh^0, b_ih^1, b_hh^1, ..., b_ih^{L-1}, b_hh^{L-1}     each [4H]

of length sum_l 4H (I_k + H + 2) (= ``jax.experimental.rnn.get_num_params_in_lstm``). With
p = params["layer_{k}{suffix}"]:

    W_ih^l = p["w_x"].T      W_hh^l = p["w_h"].T
    b_ih^l = p["b"]          b_hh^l = -0.0 (all negative zeros)      to_cudnn
    p["b"] = b_ih^l + b_hh^l                                         from_cudnn

The biases: cuDNN adds two to every gate's pre-activation, x W_ih^T + b_ih + h W_hh^T + b_hh,
ours one, x w_x + b + h w_h: only the sum counts. x + (-0.0) is x bitwise for every x, so
``from_cudnn(to_cudnn(v))`` gives v back exactly (zeros of either sign too), and
``to_cudnn(from_cudnn(w))`` is w with each b_ih^l replaced by b_ih^l + b_hh^l and b_hh^l by -0.0.

Dtypes: the vector has the dtype of the parameters (all of one floating dtype) and back. jax's
``lstm`` takes float32 only (0.10 and 0.12), and runs only where cuDNN does (a GPU); on the CPU
``jax.experimental.rnn.lstm_ref`` computes the same from ``unpack_lstm_weights(w, ...)``. Not
supported: dropout (ours ``dropout_rate``, theirs ``dropout``: masks differ), other cells (the
simple RNN), and cuDNN's projection (``proj_size``), which jax's layout has not.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxmodels.nn import checks

Array = jax.Array


def to_cudnn(
    variables: Mapping, *, input_size: int, hidden_size: int, num_layers: int, bidirectional: bool
) -> Array:
    """The flat weight vector [n] (n = ``get_num_params_in_lstm(...)``) that
    ``jax.experimental.rnn.lstm`` takes, from the variables of ``jaxmodels.LSTM(hidden_size,
    num_layers, bidirectional)`` on inputs of ``input_size`` features: {"params": {"layer_{k}"
    and, if bidirectional, "layer_{k}_reverse": {"w_x" [I_k, 4*hidden], "w_h" [hidden, 4*hidden],
    "b" [4*hidden]}}}, I_k = input_size for k = 0, else directions*hidden. Layout and biases: see
    the module docstring.

    Raises TypeError / ValueError for bad sizes (as ``jaxmodels.nn.checks.size``; bidirectional a
    bool), ValueError for variables missing a parameter or having one more, a shape other than the
    sizes give (naming the parameter and both shapes), or parameters not all of one floating dtype.
    """
    layers = _layers(input_size, hidden_size, num_layers, bidirectional)
    if not (isinstance(variables, Mapping) and isinstance(variables.get("params"), Mapping)):
        raise ValueError(f"expected Flax variables {{'params': ...}}, got {type(variables)}")
    params = variables["params"]
    wanted = {(name, key): shape for name, i_k in layers for key, shape in _ours(i_k, hidden_size)}
    got = {
        (name, key): leaf
        for name, layer in params.items()
        for key, leaf in (layer.items() if isinstance(layer, Mapping) else [(None, layer)])
    }
    if set(got) != set(wanted) or set(variables) != {"params"}:
        missing = sorted(_name(path) for path in set(wanted) - set(got))
        extra = sorted(_name(path) for path in set(got) - set(wanted))
        extra += sorted(key for key in variables if key != "params")
        raise ValueError(
            f"expected the variables of {_describe(layers, hidden_size, bidirectional)}; "
            f"missing: {missing}, not in it: {extra}"
        )
    got = {path: jnp.asarray(leaf) for path, leaf in got.items()}
    for path, shape in wanted.items():
        if got[path].shape != shape:
            raise ValueError(
                f"{_name(path)} has shape {got[path].shape}, but "
                f"{_describe(layers, hidden_size, bidirectional)} needs {shape}"
            )
    dtypes = {leaf.dtype for leaf in got.values()}
    if len(dtypes) != 1 or not jnp.issubdtype(next(iter(dtypes)), jnp.floating):
        raise ValueError(
            "expected parameters all of one floating dtype (cuDNN's weights are one vector), got "
            + ", ".join(sorted({f"{_name(p)} {leaf.dtype}" for p, leaf in got.items()}))
        )
    weights, biases = [], []
    for name, _ in layers:
        weights += [got[name, "w_x"].T.ravel(), got[name, "w_h"].T.ravel()]
        biases += [got[name, "b"], jnp.full_like(got[name, "b"], -0.0)]
    return jnp.concatenate(weights + biases)


def from_cudnn(
    weights: Array, *, input_size: int, hidden_size: int, num_layers: int, bidirectional: bool
) -> dict:
    """The variables of ``jaxmodels.LSTM(hidden_size, num_layers, bidirectional)`` (as
    ``to_cudnn`` reads them, in the dtype of ``weights``) from the flat vector [n] that
    ``jax.experimental.rnn.lstm`` takes. Each b = b_ih + b_hh (see the module docstring).

    Raises TypeError / ValueError for bad sizes, ValueError for weights not a floating vector of
    the length the sizes give (naming it).
    """
    layers = _layers(input_size, hidden_size, num_layers, bidirectional)
    weights = jnp.asarray(weights)
    expected = sum(4 * hidden_size * (i_k + hidden_size + 2) for _, i_k in layers)
    if weights.shape != (expected,) or not jnp.issubdtype(weights.dtype, jnp.floating):
        raise ValueError(
            f"expected weights of shape ({expected},) (floating) for "
            f"{_describe(layers, hidden_size, bidirectional)}, got shape {weights.shape} "
            f"dtype {weights.dtype}"
        )
    offset = 0

    def take(*shape: int) -> Array:
        nonlocal offset
        size = shape[0] * (shape[1] if len(shape) > 1 else 1)
        offset += size
        return weights[offset - size : offset].reshape(shape)

    params: dict = {}
    for name, i_k in layers:
        params[name] = {"w_x": take(4 * hidden_size, i_k).T}
        params[name]["w_h"] = take(4 * hidden_size, hidden_size).T
    for name, _ in layers:
        params[name]["b"] = take(4 * hidden_size) + take(4 * hidden_size)
    return {"params": params}


def _layers(
    input_size: int, hidden_size: int, num_layers: int, bidirectional: bool
) -> list[tuple[str, int]]:
    """(our layer name, its input features I_k) per pseudo-layer, in cuDNN's order; the sizes
    validated."""
    input_size = checks.size("input_size", input_size)
    hidden_size = checks.size("hidden_size", hidden_size)
    num_layers = checks.size("num_layers", num_layers)
    if not isinstance(bidirectional, bool):
        raise TypeError(f"expected bidirectional to be a bool, got {bidirectional!r}")
    directions = 2 if bidirectional else 1
    return [
        (f"layer_{k}{suffix}", input_size if k == 0 else directions * hidden_size)
        for k in range(num_layers)
        for suffix in ("", "_reverse")[:directions]
    ]


def _ours(i_k: int, hidden: int) -> list[tuple[str, tuple[int, ...]]]:
    """Our parameters of one layer of input features i_k, with their shapes."""
    return [("w_x", (i_k, 4 * hidden)), ("w_h", (hidden, 4 * hidden)), ("b", (4 * hidden,))]


def _name(path: tuple) -> str:
    return "/".join(("params", *(str(key) for key in path if key is not None)))


def _describe(layers: list[tuple[str, int]], hidden_size: int, bidirectional: bool) -> str:
    directions = 2 if bidirectional else 1
    return (
        f"an LSTM of input_size={layers[0][1]}, hidden_size={hidden_size}, "
        f"num_layers={len(layers) // directions}, bidirectional={bidirectional}"
    )
