"""Pure step functions of the seed's equations, and their initialisers.

Every cell follows one protocol, Flax's: ``cell(params, carry, x) -> (carry, y)``, the carry after
the step and the step's output (``rnn_cell``: (h_t, h_t); ``lstm_cell``: ((h_t, C_t), h_t)), so a
cell runs over time as ``lax.scan(functools.partial(cell, params), carry, xs_time_major)``.

Shapes use one vocabulary: batch, time, features (input size), hidden. Parameters are plain dicts
in the pinned layout (docs/guides/math.md), gate blocks along the last axis in the order i, f, g, o::

    dense:  {"w": [features, out],       "b": [out]}
    rnn:    {"w_x": [features, hidden],   "w_h": [hidden, hidden],   "b": [hidden]}
    lstm:   {"w_x": [features, 4*hidden], "w_h": [hidden, 4*hidden], "b": [4*hidden]}
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxmodels.kernels.common import ACTIVATIONS
from jaxmodels.nn import checks

Array = jax.Array
Activation = Callable[[Array], Array]

GATES = ("i", "f", "g", "o")  # order of the 4 blocks of an LSTM's gate axis


# σ(x) = 1 / (1 + e^-x), computed as 0.5·tanh(x/2) + 0.5: the same function in exact arithmetic,
# one tanh instead of an exp and a division, which XLA fuses into the surrounding gate math.
_SIGMOID = ACTIVATIONS["sigmoid"][0]


# ---------------------------------------------------------------------------------------------
# Steps


def dense(params: dict, x: Array, activation: Activation | str = "identity") -> Array:
    """y = f(x W + b).  x: [..., features] -> y: [..., out].

    ``activation``: a callable, or a name in ``kernels.common.ACTIVATIONS`` ('identity', 'relu',
    'tanh', 'sigmoid'). Validated: x's last axis against w's rows, the activation.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> params = init_dense(jax.random.key(0), 3, 2)
      >>> dense(params, jnp.ones((4, 3)), "relu").shape
      (4, 2)
    """
    x = jnp.asarray(x)
    _check_features(x, jnp.shape(params["w"])[0], "x")
    return checks.activation(activation)(add_bias(x @ params["w"], params["b"]))


def rnn_cell(
    params: dict, carry: Array, x: Array, activation: Activation | str = jnp.tanh
) -> tuple[Array, Array]:
    """One simple-RNN step, h_t = f(x_t W + h_{t-1} U + b).

    carry: h_{t-1} [batch, hidden]; x: [batch, features]. Returns (h_t, h_t), the new carry and
    the output, each [batch, hidden]. ``activation`` as for ``dense``. Validated: x's rank and
    features, the carry's shape, the activation.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> params = init_rnn(jax.random.key(0), 3, 5)
      >>> h, y = rnn_cell(params, jnp.zeros((2, 5)), jnp.ones((2, 3)))
      >>> h.shape, bool((h == y).all())
      ((2, 5), True)
    """
    x = jnp.asarray(x)
    (h,) = _check_step(params, (carry,), x, blocks=1, cell="RNN")
    h = checks.activation(activation)(add_bias(x @ params["w_x"], params["b"]) + h @ params["w_h"])
    return h, h


def lstm_cell(
    params: dict, carry: tuple[Array, Array], x: Array
) -> tuple[tuple[Array, Array], Array]:
    """One LSTM step, the seed's equations with gate order i, f, g, o::

        i_t = σ(W_xi x_t + W_hi h_{t-1} + b_i)      f_t = σ(W_xf x_t + W_hf h_{t-1} + b_f)
        g_t = tanh(W_xc x_t + W_hc h_{t-1} + b_c)   o_t = σ(W_xo x_t + W_ho h_{t-1} + b_o)
        C_t = f_t ⊙ C_{t-1} + i_t ⊙ g_t             h_t = o_t ⊙ tanh(C_t)

    carry: (h, c), each [batch, hidden]; x: [batch, features].
    Returns ((h_t, C_t), h_t). Validated: x's rank and features, the carry's shapes.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> params = init_lstm(jax.random.key(0), 3, 5)
      >>> zeros = jnp.zeros((2, 5))
      >>> (h, c), y = lstm_cell(params, (zeros, zeros), jnp.ones((2, 3)))
      >>> h.shape, c.shape
      ((2, 5), (2, 5))
    """
    x = jnp.asarray(x)
    if not (isinstance(carry, (tuple, list)) and len(carry) == 2):
        raise ValueError("expected carry to be a pair (h, c), each [batch, hidden]")
    h, c = _check_step(params, carry, x, blocks=4, cell="LSTM")
    h, c, _, _ = lstm_update(add_bias(x @ params["w_x"], params["b"]) + h @ params["w_h"], c)
    return (h, c), h


def add_bias(y: Array, b: Array) -> Array:
    """y + b with b [out] broadcast explicitly over y's leading axes [..., out]."""
    return y + b.reshape((1,) * (y.ndim - 1) + b.shape)


def lstm_update(
    pre: Array, c: Array
) -> tuple[Array, Array, tuple[Array, Array, Array, Array], Array]:
    """The step after the matmuls: fused pre-activations pre [batch, 4*hidden] (blocks i, f, g, o)
    and C_{t-1} [batch, hidden] -> (h_t, C_t, (i, f, g, o) activated, tanh(C_t))."""
    i, f, g, o = jnp.split(pre, 4, axis=-1)
    i, f, g, o = _SIGMOID(i), _SIGMOID(f), jnp.tanh(g), _SIGMOID(o)
    c = f * c + i * g
    tanh_c = jnp.tanh(c)
    return o * tanh_c, c, (i, f, g, o), tanh_c


def _check_features(x: Array, features: int, name: str) -> None:
    if x.ndim < 1 or x.shape[-1] != features:
        raise ValueError(
            f"expected {name} with last axis features={features} (the weights' input size), "
            f"got shape {tuple(x.shape)}"
        )


def _check_step(params: dict, carry, x: Array, *, blocks: int, cell: str) -> tuple[Array, ...]:
    """A step's params (``checks.layer_params``), x [batch, features] and carry parts, each
    [batch, hidden]; returns the carry."""
    features, hidden = checks.layer_params(params, blocks=blocks, cell=cell)
    if x.ndim != 2:
        raise ValueError(f"expected x of rank 2 [batch, features], got shape {x.shape}")
    _check_features(x, features, "x")
    expected = (x.shape[0], hidden)
    if not isinstance(carry, tuple | list) or len(carry) != blocks // 4 + 1:
        want = "(h, c), each" if blocks == 4 else "h"
        raise TypeError(f"expected the {cell} carry {want} [batch, hidden]={expected}")
    carry = tuple(jnp.asarray(part) for part in carry)
    for part, name in zip(carry, "hc"):
        if part.shape != expected:
            raise ValueError(
                f"expected carry {name} of shape [batch, hidden]={expected}, got shape {part.shape}"
            )
    return carry


# ---------------------------------------------------------------------------------------------
# Initialisers


def glorot_uniform(key: Array, shape: tuple[int, int], dtype=jnp.float32) -> Array:
    """U(-a, a), a = sqrt(6 / (fan_in + fan_out)), for a [fan_in, fan_out] matrix."""
    return jax.nn.initializers.glorot_uniform()(key, shape, dtype)


def orthogonal_blocks(key: Array, hidden: int, blocks: int, dtype=jnp.float32) -> Array:
    """[hidden, blocks*hidden]: each [hidden, hidden] block an independent orthogonal matrix
    (made in float32, whose QR every backend has, then cast to ``dtype``)."""
    keys = jax.random.split(key, blocks)
    init = jax.nn.initializers.orthogonal()
    return jnp.concatenate([init(k, (hidden, hidden), jnp.float32) for k in keys], axis=-1).astype(
        dtype
    )


def init_dense(key: Array, features: int, out: int, dtype=jnp.float32) -> dict:
    """{"w": [features, out] Glorot-uniform, "b": [out] zeros}. Sizes: integers >= 1.

    Examples:
      >>> import jax
      >>> {k: v.shape for k, v in init_dense(jax.random.key(0), 3, 2).items()}
      {'w': (3, 2), 'b': (2,)}
    """
    features, out = checks.size("features", features), checks.size("out", out)
    return {"w": glorot_uniform(key, (features, out), dtype), "b": jnp.zeros((out,), dtype)}


def init_rnn(key: Array, features: int, hidden: int, dtype=jnp.float32) -> dict:
    """Simple RNN layer: Glorot-uniform w_x, orthogonal w_h, zero b. Sizes: integers >= 1.

    Examples:
      >>> import jax
      >>> {k: v.shape for k, v in init_rnn(jax.random.key(0), 3, 5).items()}
      {'w_x': (3, 5), 'w_h': (5, 5), 'b': (5,)}
    """
    features, hidden = checks.size("features", features), checks.size("hidden", hidden)
    kx, kh = jax.random.split(key)
    return {
        "w_x": glorot_uniform(kx, (features, hidden), dtype),
        "w_h": orthogonal_blocks(kh, hidden, 1, dtype),
        "b": jnp.zeros((hidden,), dtype),
    }


# The initial forget-gate bias of init_lstm and the LSTM module: 1.0 keeps the cell's memory open at
# the start of training (Gers et al. 2000; Jozefowicz et al. 2015), the default of Keras' LSTM.
FORGET_BIAS = 1.0


def init_lstm(
    key: Array, features: int, hidden: int, *, forget_bias: float = FORGET_BIAS, dtype=jnp.float32
) -> dict:
    """LSTM layer: Glorot-uniform w_x over all 4 gates, an orthogonal block per gate in w_h, zero b
    except the forget block, which is ``forget_bias`` (``FORGET_BIAS`` = 1.0 by default, as in
    Jozefowicz et al. 2015 and Keras; the ``LSTM`` module uses the same default; pass 0.0 for
    PyTorch's and Flax's all-zero initial bias). Sizes: integers >= 1.

    Examples:
      >>> import jax
      >>> params = init_lstm(jax.random.key(0), 3, 5)
      >>> {k: v.shape for k, v in params.items()}
      {'w_x': (3, 20), 'w_h': (5, 20), 'b': (20,)}
      >>> params["b"].reshape(4, 5)[:, 0].tolist()  # gate blocks i, f, g, o: forget bias 1.0
      [0.0, 1.0, 0.0, 0.0]
    """
    features, hidden = checks.size("features", features), checks.size("hidden", hidden)
    kx, kh = jax.random.split(key)
    b = jnp.zeros((4, hidden), dtype).at[GATES.index("f")].set(forget_bias).reshape(4 * hidden)
    return {
        "w_x": glorot_uniform(kx, (features, 4 * hidden), dtype),
        "w_h": orthogonal_blocks(kh, hidden, 4, dtype),
        "b": b,
    }
