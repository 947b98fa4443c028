"""Tests of jaxmodels.nn.cells: the step functions against an independent numpy float64 implementation of
the seed's equations (tests/_oracles.py, which slices the pinned layout into W_xi, W_hi, b_i, ...
and writes each gate out separately), the initialisers, gradients and input validation.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracles import np_dense, np_lstm_step, np_rnn_step, np_sigmoid
from jax.test_util import check_grads

import jaxmodels
from jaxmodels.kernels.common import ACTIVATIONS

# Per-dtype tolerances for a cell against the float64 numpy reference.
TOL = {
    jnp.float32: dict(rtol=1e-5, atol=1e-6),
    jnp.bfloat16: dict(rtol=2e-2, atol=2e-2),
}

SHAPES = [  # (batch, features, hidden)
    (1, 1, 1),
    (2, 3, 5),
    (4, 7, 8),
]
# bfloat16 on one shape only (every new shape/dtype costs compilations, the file must stay fast)
CASES = [pytest.param(*shape, jnp.float32, id=f"{shape}-f32") for shape in SHAPES] + [
    pytest.param(3, 8, 2, jnp.bfloat16, id="(3, 8, 2)-bf16")
]


# ---------------------------------------------------------------------------------------------
# Helpers


def _rand(rng, shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float64)


def _cast(tree, dtype):
    """numpy float64 leaves -> jnp arrays of dtype, and the float64 values of what was cast (so the
    reference sees exactly the library's inputs)."""
    arrays = jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)
    exact = jax.tree.map(lambda a: np.asarray(a.astype(jnp.float32), np.float64), arrays)
    return arrays, exact


def _lstm_inputs(seed, batch, features, hidden):
    rng = np.random.default_rng(seed)
    params = {
        "w_x": _rand(rng, (features, 4 * hidden), 0.5),
        "w_h": _rand(rng, (hidden, 4 * hidden), 0.5),
        "b": _rand(rng, (4 * hidden,), 0.5),
    }
    carry = (_rand(rng, (batch, hidden), 0.7), _rand(rng, (batch, hidden), 1.5))
    x = _rand(rng, (batch, features))
    return params, carry, x


def _rnn_inputs(seed, batch, features, hidden):
    rng = np.random.default_rng(seed)
    params = {
        "w_x": _rand(rng, (features, hidden), 0.5),
        "w_h": _rand(rng, (hidden, hidden), 0.5),
        "b": _rand(rng, (hidden,), 0.5),
    }
    return params, _rand(rng, (batch, hidden), 0.7), _rand(rng, (batch, features))


def _assert_close(actual, expected, dtype):
    assert actual.dtype == jnp.dtype(dtype), (actual.dtype, dtype)
    np.testing.assert_allclose(
        np.asarray(actual.astype(jnp.float32), np.float64), expected, **TOL[dtype]
    )


# ---------------------------------------------------------------------------------------------
# Steps against the numpy reference


@pytest.mark.parametrize("batch,features,hidden,dtype", CASES)
def test_lstm_cell_matches_numpy(batch, features, hidden, dtype):
    params, carry, x = _lstm_inputs(0, batch, features, hidden)
    (params, carry, x), (p64, (h64, c64), x64) = zip(*[_cast(t, dtype) for t in (params, carry, x)])
    (h, c), out = jax.jit(jaxmodels.lstm_cell)(params, carry, x)
    h_ref, c_ref = np_lstm_step(p64["w_x"], p64["w_h"], p64["b"], h64, c64, x64)
    assert h.shape == c.shape == out.shape == (batch, hidden)
    _assert_close(h, h_ref, dtype)
    _assert_close(c, c_ref, dtype)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(h))  # returns ((h_t, C_t), h_t)


def test_lstm_cell_gate_order():
    """Drive one gate block at a time hard, to pin the block order i, f, g, o independently of the
    reference's slicing: with x = 0 and h = 0 the pre-activations are exactly b."""
    hidden, batch = 3, 2
    zeros_h = jnp.zeros((batch, hidden), jnp.float32)
    c0 = jnp.full((batch, hidden), 0.5, jnp.float32)
    params = {
        "w_x": jnp.zeros((2, 4 * hidden), jnp.float32),
        "w_h": jnp.zeros((hidden, 4 * hidden), jnp.float32),
    }
    x = jnp.zeros((batch, 2), jnp.float32)
    big = 30.0

    def run(b_blocks):
        p = dict(
            params,
            b=jnp.asarray(np.concatenate([np.full(hidden, v) for v in b_blocks]), jnp.float32),
        )
        (h, c), _ = jaxmodels.lstm_cell(p, (zeros_h, c0), x)
        return np.asarray(h), np.asarray(c)

    # i open, f shut, g = +1, o open: C = 0*0.5 + 1*1 = 1, h = tanh(1)
    h, c = run([big, -big, big, big])
    np.testing.assert_allclose(c, 1.0, rtol=1e-6)
    np.testing.assert_allclose(h, np.tanh(1.0), rtol=1e-6)
    # i shut, f open: C = C_prev = 0.5 whatever g; o shut: h = 0
    h, c = run([-big, big, big, -big])
    np.testing.assert_allclose(c, 0.5, rtol=1e-6)
    np.testing.assert_allclose(h, 0.0, atol=1e-6)
    # i open, f open, g = -1: C = 0.5 - 1 = -0.5, o open
    h, c = run([big, big, -big, big])
    np.testing.assert_allclose(c, -0.5, rtol=1e-6)
    np.testing.assert_allclose(h, np.tanh(-0.5), rtol=1e-6)


@pytest.mark.parametrize(
    "batch,features,hidden,dtype,activation",
    [pytest.param(*c.values, "tanh", id=c.id + "-tanh") for c in CASES]
    + [
        pytest.param(2, 3, 5, jnp.float32, a, id=f"(2, 3, 5)-f32-{a}") for a in ("relu", "identity")
    ],
)
def test_rnn_cell_matches_numpy(batch, features, hidden, dtype, activation):
    jax_act, np_act = {
        "tanh": (jnp.tanh, np.tanh),
        "relu": (jax.nn.relu, lambda v: np.maximum(v, 0.0)),
        "identity": (lambda v: v, lambda v: v),
    }[activation]
    params, h, x = _rnn_inputs(1, batch, features, hidden)
    (params, h, x), (p64, h64, x64) = zip(*[_cast(t, dtype) for t in (params, h, x)])
    if activation == "tanh":
        h_new, out = jax.jit(jaxmodels.rnn_cell)(params, h, x)  # tanh is the default
    else:
        step = functools.partial(jaxmodels.rnn_cell, activation=jax_act)
        h_new, out = jax.jit(step)(params, h, x)
    assert out.shape == (batch, hidden)
    _assert_close(out, np_rnn_step(p64["w_x"], p64["w_h"], p64["b"], h64, x64, np_act), dtype)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(h_new))  # returns (h_t, h_t)


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_cells_scan_with_one_protocol(cell):
    """Every cell is (params, carry, x) -> (carry, y), so ``lax.scan`` runs each unchanged, and
    over a whole sequence it gives what ``lstm_scan`` / ``rnn_scan`` give (ys time-major there)."""
    batch, time, features, hidden = 2, 4, 3, 5
    key = jax.random.key(13)
    init, step, scan = {
        "lstm": (jaxmodels.init_lstm, jaxmodels.lstm_cell, jaxmodels.lstm_scan),
        "rnn": (jaxmodels.init_rnn, jaxmodels.rnn_cell, jaxmodels.rnn_scan),
    }[cell]
    params = init(key, features, hidden)
    xs = jax.random.normal(jax.random.key(14), (batch, time, features))
    zeros = jnp.zeros((batch, hidden), jnp.float32)
    carry0 = (zeros, zeros) if cell == "lstm" else zeros
    carry, ys = jax.lax.scan(functools.partial(step, params), carry0, jnp.swapaxes(xs, 0, 1))
    scan_carry, hs = scan(params, xs, carry0, impl="scan")
    chex.assert_trees_all_close((carry, jnp.swapaxes(ys, 0, 1)), (scan_carry, hs), atol=1e-6)


@pytest.mark.parametrize(
    "lead,features,out,dtype",
    [
        ((1,), 1, 1, jnp.float32),
        ((4,), 3, 5, jnp.float32),
        ((2, 3), 6, 4, jnp.float32),
        ((), 5, 2, jnp.float32),
        ((4,), 3, 5, jnp.bfloat16),
    ],
)
def test_dense_matches_numpy(lead, features, out, dtype):
    rng = np.random.default_rng(2)
    params = {"w": _rand(rng, (features, out)), "b": _rand(rng, (out,))}
    x = _rand(rng, (*lead, features))
    (params, x), (p64, x64) = zip(*[_cast(t, dtype) for t in (params, x)])
    y = jax.jit(jaxmodels.dense)(params, x)  # identity by default
    assert y.shape == (*lead, out)
    _assert_close(y, np_dense(p64["w"], p64["b"], x64, lambda v: v), dtype)
    y = jax.jit(functools.partial(jaxmodels.dense, activation=jnp.tanh))(params, x)
    _assert_close(y, np_dense(p64["w"], p64["b"], x64, np.tanh), dtype)


def test_sigmoid_matches_logistic():
    """The cells' σ, ``ACTIVATIONS["sigmoid"]`` (0.5·tanh(x/2) + 0.5), is 1 / (1 + e^-x),
    including far in the tails."""
    x = np.linspace(-40.0, 40.0, 801)
    sigmoid = ACTIVATIONS["sigmoid"][0]
    np.testing.assert_allclose(
        np.asarray(sigmoid(jnp.asarray(x, jnp.float32)), np.float64),
        np_sigmoid(x),
        rtol=1e-6,
        atol=2e-7,
    )


# ---------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("batch,features,hidden", [(2, 3, 4)])
def test_lstm_cell_check_grads(batch, features, hidden):
    params, carry, x = _lstm_inputs(3, batch, features, hidden)
    with jax.enable_x64(True):
        params, carry, x = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, carry, x))
        check_grads(jax.jit(jaxmodels.lstm_cell), (params, carry, x), order=1, modes=["fwd", "rev"])


@pytest.mark.parametrize("batch,features,hidden", [(2, 3, 4)])
def test_rnn_cell_check_grads(batch, features, hidden):
    params, h, x = _rnn_inputs(4, batch, features, hidden)
    with jax.enable_x64(True):
        params, h, x = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, h, x))
        check_grads(jax.jit(jaxmodels.rnn_cell), (params, h, x), order=1, modes=["fwd", "rev"])


def test_dense_check_grads():
    rng = np.random.default_rng(5)
    params = {"w": _rand(rng, (3, 4)), "b": _rand(rng, (4,))}
    x = _rand(rng, (2, 3))
    with jax.enable_x64(True):
        params, x = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, x))
        check_grads(
            jax.jit(lambda p, v: jaxmodels.dense(p, v, jnp.tanh)),
            (params, x),
            order=1,
            modes=["fwd", "rev"],
        )


# ---------------------------------------------------------------------------------------------
# Bad input


def test_lstm_cell_rejects_feature_mismatch():
    params, carry, _ = _lstm_inputs(8, 2, 5, 3)
    params = jax.tree.map(jnp.asarray, params)
    with pytest.raises(ValueError, match=r"features=5") as info:
        jaxmodels.lstm_cell(params, carry, jnp.zeros((2, 4), jnp.float32))
    assert "(2, 4)" in str(info.value)


def test_rnn_cell_rejects_feature_mismatch():
    params, h, _ = _rnn_inputs(9, 2, 6, 3)
    params = jax.tree.map(jnp.asarray, params)
    with pytest.raises(ValueError, match=r"features=6") as info:
        jaxmodels.rnn_cell(params, jnp.asarray(h), jnp.zeros((2, 7), jnp.float32))
    assert "(2, 7)" in str(info.value)


def test_dense_rejects_feature_mismatch():
    params = {"w": jnp.zeros((3, 4), jnp.float32), "b": jnp.zeros((4,), jnp.float32)}
    with pytest.raises(ValueError, match=r"features=3") as info:
        jaxmodels.dense(params, jnp.zeros((5, 2), jnp.float32))
    assert "(5, 2)" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Initialisers


def _glorot_bound(fan_in, fan_out):
    return np.sqrt(6.0 / (fan_in + fan_out))


def _assert_glorot_uniform(w, fan_in, fan_out):
    """Inside the bound, and actually spread over it (max near the bound, std near bound/√3)."""
    slack = 1e-6 if w.dtype == jnp.float32 else 8e-3  # rounding of the bound itself to bfloat16
    w = np.asarray(w.astype(jnp.float32), np.float64)
    bound = _glorot_bound(fan_in, fan_out)
    assert np.all(np.abs(w) <= bound * (1 + slack)), (np.abs(w).max(), bound)
    if w.size >= 16:
        assert np.abs(w).max() > 0.5 * bound, (np.abs(w).max(), bound)
    if w.size >= 256:
        np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.15)
        assert abs(w.mean()) < 0.1 * bound


def _assert_orthogonal(block, atol):
    block = np.asarray(block.astype(jnp.float32), np.float64)
    n = block.shape[0]
    assert block.shape == (n, n)
    np.testing.assert_allclose(block.T @ block, np.eye(n), atol=atol)
    np.testing.assert_allclose(block @ block.T, np.eye(n), atol=atol)


ORTH_ATOL = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}


@pytest.mark.parametrize(
    "features,hidden,dtype",
    [
        (3, 5, jnp.float32),
        (16, 8, jnp.float32),
        (3, 5, jnp.bfloat16),
    ],
)
def test_init_lstm(features, hidden, dtype):
    params = jaxmodels.init_lstm(jax.random.key(0), features, hidden, dtype=dtype)
    assert set(params) == {"w_x", "w_h", "b"}
    assert params["w_x"].shape == (features, 4 * hidden)
    assert params["w_h"].shape == (hidden, 4 * hidden)
    assert params["b"].shape == (4 * hidden,)
    for v in params.values():
        assert v.dtype == jnp.dtype(dtype)
    _assert_glorot_uniform(params["w_x"], features, 4 * hidden)
    blocks = [params["w_h"][:, k * hidden : (k + 1) * hidden] for k in range(4)]
    for block in blocks:
        _assert_orthogonal(block, ORTH_ATOL[dtype])
    if hidden > 1:  # independent blocks, not one matrix repeated
        for a in range(4):
            for b in range(a + 1, 4):
                assert not np.allclose(
                    np.asarray(blocks[a], np.float32), np.asarray(blocks[b], np.float32)
                )
    # forget_bias defaults to FORGET_BIAS (1.0), the LSTM module's default too: rows i, f, g, o
    b = np.asarray(params["b"], np.float32).reshape(4, hidden)
    np.testing.assert_array_equal(b[1], 1.0)
    np.testing.assert_array_equal(b[[0, 2, 3]], 0.0)
    assert jaxmodels.LSTM(hidden).forget_bias == jaxmodels.nn.cells.FORGET_BIAS == 1.0


@pytest.mark.parametrize("forget_bias", [0.0, 1.0, -2.5])
def test_init_lstm_forget_bias_only_in_f_block(forget_bias):
    hidden = 5
    params = jaxmodels.init_lstm(jax.random.key(1), 3, hidden, forget_bias=forget_bias)
    b = np.asarray(params["b"]).reshape(4, hidden)  # rows i, f, g, o
    np.testing.assert_array_equal(b[1], forget_bias)
    np.testing.assert_array_equal(b[[0, 2, 3]], 0.0)
    # the weights do not depend on forget_bias
    base = jaxmodels.init_lstm(jax.random.key(1), 3, hidden, forget_bias=7.0)
    np.testing.assert_array_equal(np.asarray(params["w_x"]), np.asarray(base["w_x"]))
    np.testing.assert_array_equal(np.asarray(params["w_h"]), np.asarray(base["w_h"]))


def test_init_lstm_forget_bias_opens_forget_gate():
    """With forget_bias=large the cell keeps its memory on a zero input: C_t ≈ C_{t-1} (semantics of
    the f block, checked through lstm_cell rather than through an index)."""
    params = jaxmodels.init_lstm(jax.random.key(2), 3, 5, forget_bias=20.0)
    c0 = jnp.full((2, 5), 0.75, jnp.float32)
    (_, c1), _ = jaxmodels.lstm_cell(
        params, (jnp.zeros((2, 5), jnp.float32), c0), jnp.zeros((2, 3), jnp.float32)
    )
    # i = σ(0) = 0.5, g = tanh(0) = 0, f ≈ 1 -> C_1 ≈ C_0
    np.testing.assert_allclose(np.asarray(c1), 0.75, rtol=1e-6)


@pytest.mark.parametrize(
    "features,hidden,dtype",
    [
        (3, 5, jnp.float32),
        (32, 8, jnp.float32),
        (3, 5, jnp.bfloat16),
    ],
)
def test_init_rnn(features, hidden, dtype):
    params = jaxmodels.init_rnn(jax.random.key(3), features, hidden, dtype=dtype)
    assert set(params) == {"w_x", "w_h", "b"}
    assert params["w_x"].shape == (features, hidden)
    assert params["w_h"].shape == (hidden, hidden)
    assert params["b"].shape == (hidden,)
    for v in params.values():
        assert v.dtype == jnp.dtype(dtype)
    _assert_glorot_uniform(params["w_x"], features, hidden)
    _assert_orthogonal(params["w_h"], ORTH_ATOL[dtype])
    np.testing.assert_array_equal(np.asarray(params["b"], np.float32), 0.0)


@pytest.mark.parametrize(
    "features,out,dtype",
    [
        (3, 5, jnp.float32),
        (32, 16, jnp.float32),
        (1, 1, jnp.float32),
        (3, 5, jnp.bfloat16),
    ],
)
def test_init_dense(features, out, dtype):
    params = jaxmodels.init_dense(jax.random.key(4), features, out, dtype=dtype)
    assert set(params) == {"w", "b"}
    assert params["w"].shape == (features, out)
    assert params["b"].shape == (out,)
    assert params["w"].dtype == params["b"].dtype == jnp.dtype(dtype)
    _assert_glorot_uniform(params["w"], features, out)
    np.testing.assert_array_equal(np.asarray(params["b"], np.float32), 0.0)


@pytest.mark.parametrize(
    "init",
    [
        lambda k: jaxmodels.init_lstm(k, 3, 5),
        lambda k: jaxmodels.init_rnn(k, 3, 5),
        lambda k: jaxmodels.init_dense(k, 3, 5),
    ],
    ids=["lstm", "rnn", "dense"],
)
def test_init_deterministic_per_key(init):
    a, b, c = init(jax.random.key(10)), init(jax.random.key(10)), init(jax.random.key(11))
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
    weights = [k for k in a if k != "b"]
    for name in weights:
        assert not np.allclose(np.asarray(a[name]), np.asarray(c[name])), name
    if len(weights) == 2:  # w_x and w_h drawn from different keys
        assert not np.allclose(np.asarray(a["w_x"])[:4, :4], np.asarray(a["w_h"])[:3, :4])


def test_init_params_run_through_cells():
    """The initialisers' output is accepted by the steps (pinned layout end to end)."""
    key = jax.random.key(12)
    x = jnp.ones((2, 3), jnp.float32)
    (h, c), _ = jaxmodels.lstm_cell(
        jaxmodels.init_lstm(key, 3, 5), (jnp.zeros((2, 5)), jnp.zeros((2, 5))), x
    )
    assert h.shape == c.shape == (2, 5)
    h, _ = jaxmodels.rnn_cell(jaxmodels.init_rnn(key, 3, 5), jnp.zeros((2, 5)), x)
    assert h.shape == (2, 5)
    assert jaxmodels.dense(jaxmodels.init_dense(key, 3, 5), x).shape == (2, 5)
