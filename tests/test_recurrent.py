"""Tests of jaxmodels.lstm_scan / rnn_scan.

References:
  * a python loop of ``lstm_cell`` / ``rnn_cell`` that walks each sequence on its own, over its
    real steps only (forwards, or from its own last real step backwards with ``reverse=True``),
    writing zeros at the padded steps: PyTorch's packed-sequence semantics written out directly,
    differentiated by plain autodiff (so it checks the scans' hand-written ``custom_vjp``);
  * ``jax.experimental.rnn.lstm_ref``, with its own weight layout ([4*hidden, in] blocks i, f, g, o,
    two biases) and ``seq_lengths``;
  * ``jax.test_util.check_grads`` (finite differences, float64).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import rnn as jax_rnn
from jax.test_util import check_grads

import jaxmodels
from jaxmodels.nn import fused

B, T, F, H = 3, 7, 3, 5  # batch, time, features, hidden

# Per-dtype tolerances: outputs / final carry, and gradients of the scalar loss.
TOL = {
    jnp.float32: dict(rtol=1e-5, atol=1e-6),
    jnp.bfloat16: dict(rtol=5e-2, atol=5e-2),
}
GRAD_TOL = {
    jnp.float32: dict(rtol=2e-5, atol=2e-5),
}


# ---------------------------------------------------------------------------------------------
# Data


def make_params(cell, features=F, hidden=H, seed=0, dtype=jnp.float32):
    g = 4 if cell == "lstm" else 1
    rng = np.random.default_rng(seed)
    params = {
        "w_x": 0.5 * rng.standard_normal((features, g * hidden)),
        "w_h": 0.5 * rng.standard_normal((hidden, g * hidden)),
        "b": 0.3 * rng.standard_normal((g * hidden,)),
    }
    return {k: jnp.asarray(v, dtype) for k, v in params.items()}


def make_xs(batch=B, time=T, features=F, seed=1, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, time, features)), dtype)


def make_carry(cell, batch=B, hidden=H, seed=2, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(0.8 * rng.standard_normal((batch, hidden)), dtype)
    if cell == "rnn":
        return h
    return h, jnp.asarray(1.5 * rng.standard_normal((batch, hidden)), dtype)


def zero_carry(cell, batch=B, hidden=H, dtype=jnp.float32):
    z = jnp.zeros((batch, hidden), dtype)
    return z if cell == "rnn" else (z, z)


def make_loss_weights(batch=B, time=T, hidden=H, seed=3):
    rng = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(rng.standard_normal(s), jnp.float32)
        for s in [(batch, time, hidden), (batch, hidden), (batch, hidden)]
    )


def scalar_loss(cell, carry, hs, weights):
    """A nontrivial scalar of the outputs and the final carry (both h and, for an LSTM, c)."""
    w_y, w_h, w_c = (w.astype(hs.dtype) for w in weights)
    if cell == "rnn":
        return jnp.sum(hs * w_y) + jnp.sum(jnp.tanh(carry) * w_h)
    h, c = carry
    return jnp.sum(hs * w_y) + jnp.sum(jnp.tanh(h) * w_h) + jnp.sum(c * w_c)


SCANS = {"lstm": jaxmodels.lstm_scan, "rnn": jaxmodels.rnn_scan}


# ---------------------------------------------------------------------------------------------
# The reference: a python loop of the cells, one sequence at a time


def reference_scan(cell, params, xs, initial_carry, lengths, reverse, activation=jnp.tanh):
    """Packed-sequence semantics, spelled out: sequence b runs over its steps 0..L_b-1 only
    (L_b-1..0 when reverse), the padded outputs are zeros, the final carry is the state after its
    last processed step (the initial carry when L_b = 0)."""
    batch, time, _ = xs.shape
    lengths = [time] * batch if lengths is None else [int(n) for n in lengths]
    step = (
        jaxmodels.lstm_cell
        if cell == "lstm"
        else functools.partial(jaxmodels.rnn_cell, activation=activation)
    )
    finals, rows = [], []
    for b in range(batch):
        carry = jax.tree.map(lambda a: a[b : b + 1], initial_carry)
        hidden = jax.tree.leaves(carry)[0].shape[-1]
        outs = [jnp.zeros((1, hidden), xs.dtype)] * time
        steps = range(lengths[b] - 1, -1, -1) if reverse else range(lengths[b])
        for t in steps:
            carry, outs[t] = step(params, carry, xs[b : b + 1, t])
        finals.append(carry)
        rows.append(jnp.stack(outs, axis=1))
    final = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *finals)
    return final, jnp.concatenate(rows, axis=0)


def reference_value_and_grads(
    params, xs, initial_carry, weights, *, cell, lengths, reverse, activation=jnp.tanh
):
    """Value, final carry, hs and gradients w.r.t. (params, xs, initial_carry) of scalar_loss
    through reference_scan, by plain autodiff."""

    def loss(p, x, c):
        carry, hs = reference_scan(cell, p, x, c, lengths, reverse, activation)
        return scalar_loss(cell, carry, hs, weights), (carry, hs)

    (value, (carry, hs)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        params, xs, initial_carry
    )
    return carry, hs, value, grads


# Eager on purpose: the loop's small primitives are compiled once and cached across all the tests
# (same shapes everywhere), where jit would compile a new unrolled program per configuration.
assert not hasattr(reference_value_and_grads, "lower")


def library_value_and_grads(cell, params, xs, initial_carry, weights, **kwargs):
    """Not jitted: the custom_vjp of the scans runs eagerly here (jit is covered by the variants)."""
    scan = SCANS[cell]

    if initial_carry is None:

        def loss(p, x):
            carry, hs = scan(p, x, None, **kwargs)
            return scalar_loss(cell, carry, hs, weights), (carry, hs)

        argnums = (0, 1)
    else:

        def loss(p, x, c):
            carry, hs = scan(p, x, c, **kwargs)
            return scalar_loss(cell, carry, hs, weights), (carry, hs)

        argnums = (0, 1, 2)
    args = (params, xs) if initial_carry is None else (params, xs, initial_carry)
    (value, (carry, hs)), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(*args)
    return carry, hs, value, grads


def assert_trees_close(actual, expected, tol, what):
    chex.assert_trees_all_equal_shapes_and_dtypes(actual, expected)
    for path, a, e in zip(
        [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(actual)[0]],
        jax.tree.leaves(actual),
        jax.tree.leaves(expected),
    ):
        np.testing.assert_allclose(
            np.asarray(a, np.float64), np.asarray(e, np.float64), err_msg=f"{what}{path}", **tol
        )


# ---------------------------------------------------------------------------------------------
# (a) against the loop of cells: outputs, final carry, gradients


LOOP_CASES = [  # id, seq_lengths, reverse, initial carry ("zero" = None passed), unroll, impl
    ("full", None, False, "zero", 1, "auto"),
    ("lengths_impl_scan_unroll3", (7, 0, 4), False, "random", 3, "scan"),
    ("reverse", None, True, "random", 1, "auto"),
    ("reverse_lengths_unroll3", (3, 7, 0), True, "random", 3, "auto"),
]
# With seq_lengths, the padded steps of xs hold NaN: the reference never reads them, and the scans
# promise that padding reaches neither the outputs nor any gradient.


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
@pytest.mark.parametrize(
    "lengths,reverse,carry_kind,unroll,impl",
    [c[1:] for c in LOOP_CASES],
    ids=[c[0] for c in LOOP_CASES],
)
def test_scan_matches_loop_of_cells(cell, lengths, reverse, carry_kind, unroll, impl):
    params, xs, weights = make_params(cell), make_xs(), make_loss_weights()
    carry0 = make_carry(cell) if carry_kind == "random" else None
    seq_lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    if lengths is not None:
        padded = np.arange(T)[None, :] >= np.asarray(lengths)[:, None]  # [batch, time]
        xs = jnp.where(jnp.asarray(padded)[:, :, None], jnp.nan, xs)

    carry, hs, value, grads = library_value_and_grads(
        cell,
        params,
        xs,
        carry0,
        weights,
        seq_lengths=seq_lengths,
        reverse=reverse,
        unroll=unroll,
        impl=impl,
    )
    ref_carry, ref_hs, ref_value, ref_grads = reference_value_and_grads(
        params,
        xs,
        zero_carry(cell) if carry0 is None else carry0,
        weights,
        cell=cell,
        lengths=lengths,
        reverse=reverse,
    )
    if carry0 is None:
        ref_grads = ref_grads[:2]

    assert hs.shape == (B, T, H)
    assert_trees_close(hs, ref_hs, TOL[jnp.float32], "hs")
    assert_trees_close(carry, ref_carry, TOL[jnp.float32], "final carry")
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
    assert_trees_close(grads, ref_grads, GRAD_TOL[jnp.float32], "grad")

    # Exactly: padded outputs are zero, so is the gradient w.r.t. padded inputs, and a length-0
    # sequence keeps its initial carry.
    if lengths is not None:
        hs_np, dxs = np.asarray(hs), np.asarray(grads[1])
        c0 = zero_carry(cell) if carry0 is None else carry0
        for b, n in enumerate(lengths):
            np.testing.assert_array_equal(hs_np[b, n:], 0.0)
            np.testing.assert_array_equal(dxs[b, n:], 0.0)
            assert np.all(np.abs(hs_np[b, :n]) > 0), (b, n)
            if n == 0:
                for got, init in zip(jax.tree.leaves(carry), jax.tree.leaves(c0)):
                    np.testing.assert_array_equal(np.asarray(got)[b], np.asarray(init)[b])


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
@pytest.mark.parametrize("length,reverse", [(None, False), (4, True)])
def test_batch_of_one_matches_loop_of_cells(cell, length, reverse):
    """Batch 1 takes its own path on CPU (the input projection hoisted over the whole sequence)."""
    params, xs, weights = make_params(cell), make_xs(batch=1), make_loss_weights(batch=1)
    carry0 = make_carry(cell, batch=1)
    lengths = None if length is None else (length,)
    seq_lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    got = library_value_and_grads(
        cell, params, xs, carry0, weights, seq_lengths=seq_lengths, reverse=reverse
    )
    want = reference_value_and_grads(
        params, xs, carry0, weights, cell=cell, lengths=lengths, reverse=reverse
    )
    for g, w, what in zip(got, want, ("final carry", "hs", "value", "grad")):
        assert_trees_close(g, w, (GRAD_TOL if what == "grad" else TOL)[jnp.float32], what)


def test_rnn_scan_custom_activation_matches_loop():
    """The hand-written RNN backward differentiates the given activation, not tanh."""
    params, xs, weights, carry0 = (
        make_params("rnn"),
        make_xs(),
        make_loss_weights(),
        make_carry("rnn"),
    )
    lengths, reverse = (7, 0, 5), True
    carry, hs, _, grads = library_value_and_grads(
        "rnn",
        params,
        xs,
        carry0,
        weights,
        seq_lengths=jnp.asarray(lengths),
        reverse=reverse,
        activation=jnp.sin,
    )
    ref_carry, ref_hs, _, ref_grads = reference_value_and_grads(
        params,
        xs,
        carry0,
        weights,
        cell="rnn",
        lengths=lengths,
        reverse=reverse,
        activation=jnp.sin,
    )
    assert_trees_close((carry, hs), (ref_carry, ref_hs), TOL[jnp.float32], "forward")
    assert_trees_close(grads, ref_grads, GRAD_TOL[jnp.float32], "grad")


def test_lstm_scan_impl_pallas_matches_loop():
    """impl="pallas" (the whole-sequence kernel, interpreted on CPU) keeps the same semantics:
    forward against the loop (its gradients against its own reference are in test_kernels.py)."""
    params, xs, carry0 = make_params("lstm"), make_xs(), make_carry("lstm")
    lengths = (3, 7, 0)
    carry, hs = jaxmodels.lstm_scan(
        params, xs, carry0, seq_lengths=jnp.asarray(lengths, jnp.int32), reverse=True, impl="pallas"
    )
    ref_carry, ref_hs = reference_scan("lstm", params, xs, carry0, lengths, reverse=True)
    assert_trees_close((carry, hs), (ref_carry, ref_hs), TOL[jnp.float32], "pallas forward")


# ---------------------------------------------------------------------------------------------
# (b) the LSTM against jax.experimental.rnn.lstm_ref


def to_lstm_ref_weights(params):
    """Pinned layout -> lstm_ref's: W_ih [4*hidden, in] = w_xᵀ, W_hh = w_hᵀ (same gate order i, f, g,
    o along the 4*hidden axis); b is split into b_ih + b_hh (lstm_ref adds both)."""
    b_hh = jnp.asarray(
        np.random.default_rng(9).standard_normal(params["b"].shape), params["b"].dtype
    )
    return params["w_x"].T, params["w_h"].T, params["b"] - b_hh, b_hh


def test_lstm_scan_matches_lstm_ref():
    """lstm_ref picks the final carry at index seq_lengths-1, so a length-0 sequence (which it
    does not support: index -1 gives the last step) is left out here; the loop test covers it."""
    params, xs, (h0, c0), weights = (
        make_params("lstm"),
        make_xs(),
        make_carry("lstm"),
        make_loss_weights(),
    )
    seq_lengths = jnp.asarray([T, 1, 4], jnp.int32)  # full, shortest nonzero, in between

    def ref_loss(w_ih, w_hh, b_ih, b_hh, x, h, c):
        y, h_n, c_n = jax_rnn.lstm_ref(
            x,
            h[None],
            c[None],
            {0: w_ih},
            {0: w_hh},
            {0: b_ih},
            {0: b_hh},
            seq_lengths,
            F,
            H,
            1,
            0.0,
            False,
        )
        return scalar_loss("lstm", (h_n[0], c_n[0]), y, weights), (y, h_n[0], c_n[0])

    w_ih, w_hh, b_ih, b_hh = to_lstm_ref_weights(params)
    (ref_value, (y, h_n, c_n)), g = jax.value_and_grad(
        ref_loss, argnums=(0, 1, 2, 3, 4, 5, 6), has_aux=True
    )(w_ih, w_hh, b_ih, b_hh, xs, h0, c0)
    (h, c), hs, value, grads = library_value_and_grads(
        "lstm", params, xs, (h0, c0), weights, seq_lengths=seq_lengths
    )
    assert_trees_close((hs, h, c), (y, h_n, c_n), TOL[jnp.float32], "lstm_ref forward")
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
    dw_ih, dw_hh, db_ih, db_hh, dxs, dh0, dc0 = g
    np.testing.assert_allclose(
        np.asarray(db_ih), np.asarray(db_hh), rtol=1e-6
    )  # both are d/d(gate bias)
    expected_grads = ({"w_x": dw_ih.T, "w_h": dw_hh.T, "b": db_ih}, dxs, (dh0, dc0))
    assert_trees_close(grads, expected_grads, GRAD_TOL[jnp.float32], "lstm_ref grad")


def test_lstm_scan_matches_bidirectional_lstm_ref():
    """lstm_ref's backward direction reads each sequence from its own last real step backwards
    (padding kept at the end): that is lstm_scan(reverse=True, seq_lengths=...)."""
    lengths = (7, 2, 1)
    seq_lengths = jnp.asarray(lengths, jnp.int32)
    p_fwd, p_bwd = make_params("lstm", seed=10), make_params("lstm", seed=11)
    xs = make_xs()
    (h0f, c0f), (h0b, c0b) = make_carry("lstm", seed=12), make_carry("lstm", seed=13)
    wf, wb = to_lstm_ref_weights(p_fwd), to_lstm_ref_weights(p_bwd)
    y, h_n, c_n = jax_rnn.lstm_ref(
        xs,
        jnp.stack([h0f, h0b]),
        jnp.stack([c0f, c0b]),
        {0: wf[0], 1: wb[0]},
        {0: wf[1], 1: wb[1]},
        {0: wf[2], 1: wb[2]},
        {0: wf[3], 1: wb[3]},
        seq_lengths,
        F,
        H,
        1,
        0.0,
        True,
    )
    (hf, cf), hs_f = jaxmodels.lstm_scan(p_fwd, xs, (h0f, c0f), seq_lengths=seq_lengths)
    (hb, cb), hs_b = jaxmodels.lstm_scan(
        p_bwd, xs, (h0b, c0b), seq_lengths=seq_lengths, reverse=True
    )
    assert_trees_close(
        (hs_f, hs_b, hf, cf, hb, cb),
        (y[..., :H], y[..., H:], h_n[0], c_n[0], h_n[1], c_n[1]),
        TOL[jnp.float32],
        "bidirectional lstm_ref",
    )


# ---------------------------------------------------------------------------------------------
# (c) check_grads (finite differences) in float64


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_scan_check_grads(cell):
    """impl="scan" explicitly: see test_lstm_scan_float64_under_jit_default_impl for "auto"."""
    batch, time, features, hidden = 3, 4, 2, 3
    lengths, reverse, unroll = (1, 4, 0), True, 1
    with jax.enable_x64(True):
        params = make_params(cell, features, hidden, dtype=jnp.float64)
        xs = make_xs(batch, time, features, dtype=jnp.float64)
        carry0 = make_carry(cell, batch, hidden, dtype=jnp.float64)
        seq_lengths = jnp.asarray(lengths)
        fn = jax.jit(
            lambda p, x, c: SCANS[cell](
                p, x, c, seq_lengths=seq_lengths, reverse=reverse, unroll=unroll, impl="scan"
            )
        )
        check_grads(fn, (params, xs, carry0), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_lstm_scan_float64_under_jit_default_impl():
    """float64 is a floating-point xs like any other: the default impl must run it under jit on CPU
    (the scan; the Pallas kernel only takes float32/bfloat16) and agree with impl="scan"."""
    with jax.enable_x64(True):
        params = make_params("lstm", dtype=jnp.float64)
        xs = make_xs(dtype=jnp.float64)
        expected = jaxmodels.lstm_scan(params, xs, impl="scan")
        got = jax.jit(jaxmodels.lstm_scan)(params, xs)
        assert_trees_close(got, expected, dict(rtol=1e-12, atol=1e-12), "float64 jit auto")


# ---------------------------------------------------------------------------------------------
# (d) jit and no-jit


@functools.cache
def cached_reference(cell, lengths, reverse):
    """The loop reference for the variants (computed once for with_jit and without_jit)."""
    params, xs, carry0, weights = (
        make_params(cell),
        make_xs(),
        make_carry(cell),
        make_loss_weights(),
    )
    return reference_value_and_grads(
        params, xs, carry0, weights, cell=cell, lengths=lengths, reverse=reverse
    )


class ScanVariantsTest(chex.TestCase):
    """Traced seq_lengths under jit take the path without the range check; results must not move."""

    def _check(self, cell, reverse, unroll, lengths):
        params, xs, carry0, weights = (
            make_params(cell),
            make_xs(),
            make_carry(cell),
            make_loss_weights(),
        )
        ref_carry, ref_hs, _, ref_grads = cached_reference(cell, lengths, reverse)

        def run(p, x, c, n):
            return SCANS[cell](p, x, c, seq_lengths=n, reverse=reverse, unroll=unroll)

        def loss(p, x, c, n):
            carry, hs = run(p, x, c, n)
            return scalar_loss(cell, carry, hs, weights)

        n = jnp.asarray(lengths, jnp.int32)
        carry, hs = self.variant(run)(params, xs, carry0, n)
        assert_trees_close((carry, hs), (ref_carry, ref_hs), TOL[jnp.float32], "forward")
        grads = self.variant(jax.grad(loss, argnums=(0, 1, 2)))(params, xs, carry0, n)
        assert_trees_close(grads, ref_grads, GRAD_TOL[jnp.float32], "grad")

    @chex.variants(with_jit=True, without_jit=True)
    def test_lstm_scan(self):
        self._check("lstm", reverse=True, unroll=1, lengths=(5, 0, 7))

    @chex.variants(with_jit=True, without_jit=True)
    def test_rnn_scan(self):
        self._check("rnn", reverse=False, unroll=1, lengths=(2, 7, 0))


# ---------------------------------------------------------------------------------------------
# (e) no retrace on the second call


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_no_retrace_on_second_call(cell):
    chex.clear_trace_counter()
    weights = make_loss_weights()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def train_step(params, xs, carry, seq_lengths):
        def loss(p):
            final, hs = SCANS[cell](p, xs, carry, seq_lengths=seq_lengths, reverse=True)
            return scalar_loss(cell, final, hs, weights)

        value, grads = jax.value_and_grad(loss)(params)
        return value, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    params, carry = make_params(cell), make_carry(cell)
    v1, params1 = train_step(params, make_xs(seed=20), carry, jnp.asarray([7, 3, 0], jnp.int32))
    v2, params2 = train_step(params1, make_xs(seed=21), carry, jnp.asarray([1, 7, 6], jnp.int32))
    assert np.isfinite(float(v1)) and np.isfinite(float(v2)) and float(v1) != float(v2)
    chex.assert_trees_all_equal_shapes_and_dtypes(params1, params2)
    # negative control: a new shape does retrace, and the counter sees it
    with pytest.raises(AssertionError, match="traced > 1"):
        train_step(params, make_xs(time=T + 1, seed=22), carry, jnp.asarray([7, 3, 0], jnp.int32))


# ---------------------------------------------------------------------------------------------
# (f) bfloat16


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_bfloat16_close_to_float32(cell):
    lengths = jnp.asarray([7, 3, 0], jnp.int32)
    weights = make_loss_weights()
    params16, xs16 = make_params(cell, dtype=jnp.bfloat16), make_xs(dtype=jnp.bfloat16)
    # the float32 run sees exactly the bfloat16 values
    params32, xs32 = jax.tree.map(lambda a: a.astype(jnp.float32), (params16, xs16))

    # jitted: eager, impl="auto" traces the (bfloat16-capable) kernel branch as well, which is slow
    run = jax.jit(
        lambda p, x, n: library_value_and_grads(
            cell, p, x, None, weights, seq_lengths=n, reverse=True
        )
    )
    carry16, hs16, _, grads16 = run(params16, xs16, lengths)
    carry32, hs32, _, grads32 = run(params32, xs32, lengths)
    for leaf in jax.tree.leaves((carry16, hs16, grads16)):
        assert leaf.dtype == jnp.bfloat16, leaf.dtype
    assert_trees_close(
        jax.tree.map(lambda a: a.astype(jnp.float32), (carry16, hs16)),
        (carry32, hs32),
        TOL[jnp.bfloat16],
        "bf16 forward",
    )
    for g16, g32 in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads32)):
        scale = float(jnp.max(jnp.abs(g32)))
        np.testing.assert_allclose(
            np.asarray(g16.astype(jnp.float32)), np.asarray(g32), rtol=5e-2, atol=5e-2 * scale
        )


# ---------------------------------------------------------------------------------------------
# (g) bad input


def _bad_inputs(cell):
    """(id, call kwargs overrides, exception, regex the message must match)."""
    g = "4\\*hidden" if cell == "lstm" else "hidden"
    params = make_params(cell)
    wrong_carry = jnp.zeros((B, H + 1), jnp.float32)
    cases = [
        (
            "xs_rank2",
            dict(xs=jnp.zeros((B, F), jnp.float32)),
            ValueError,
            r"rank 3 \[batch, time, features\].*\(3, 3\)",
        ),
        (
            "xs_features",
            dict(xs=jnp.zeros((B, T, F + 1), jnp.float32)),
            ValueError,
            r"features=3.*\(3, 7, 4\)",
        ),
        ("xs_int", dict(xs=jnp.zeros((B, T, F), jnp.int32)), TypeError, r"floating.*int32"),
        (
            "lengths_shape",
            dict(seq_lengths=jnp.full((B + 1,), 2, jnp.int32)),
            ValueError,
            r"\[batch\]=\(3,\).*\(4,\)",
        ),
        (
            "lengths_2d",
            dict(seq_lengths=jnp.full((B, 1), 2, jnp.int32)),
            ValueError,
            r"\[batch\]=\(3,\).*\(3, 1\)",
        ),
        (
            "lengths_negative",
            dict(seq_lengths=jnp.asarray([1, -1, 2], jnp.int32)),
            ValueError,
            r"\[0, time=7\].*-1",
        ),
        (
            "lengths_too_long",
            dict(seq_lengths=jnp.asarray([1, 8, 2], jnp.int32)),
            ValueError,
            r"\[0, time=7\].*8",
        ),
        (
            "lengths_float",
            dict(seq_lengths=jnp.asarray([1.0, 2.0, 3.0], jnp.float32)),
            TypeError,
            r"integer.*float32",
        ),
        (
            "missing_w_h",
            dict(params={k: v for k, v in params.items() if k != "w_h"}),
            ValueError,
            r"missing \['w_h'\]",
        ),
        (
            "missing_b_wx",
            dict(params={"w_h": params["w_h"]}),
            ValueError,
            r"missing \['b', 'w_x'\]",
        ),
        ("b_shape", dict(params=dict(params, b=params["b"][:-1])), ValueError, rf"b \[{g}\]"),
        (
            "w_x_cols",
            dict(params=dict(params, w_x=params["w_x"][:, :-1])),
            ValueError,
            rf"w_x \[features, {g}\]",
        ),
        (
            "w_h_rows",
            dict(params=dict(params, w_h=params["w_h"][:-1])),
            ValueError,
            rf"w_h \[hidden, {g}\]",
        ),
        (
            "w_h_rank1",
            dict(params=dict(params, w_h=params["w_h"][0])),
            ValueError,
            rf"w_h \[hidden, {g}\]",
        ),
        ("impl", dict(impl="cudnn"), ValueError, r"impl.*'auto', 'scan'.*'cudnn'"),
    ]
    if cell == "rnn":  # the compiled CPU kernel is the LSTM's only
        cases += [
            (
                "impl_cpu",
                dict(impl="cpu"),
                ValueError,
                r"impl.*\('auto', 'scan', 'pallas'\), got 'cpu'",
            )
        ]
    if cell == "lstm":
        cases += [
            (
                "carry_h_shape",
                dict(initial_carry=(wrong_carry, jnp.zeros((B, H), jnp.float32))),
                ValueError,
                r"h of shape \[batch, hidden\]=\(3, 5\).*\(3, 6\)",
            ),
            (
                "carry_c_shape",
                dict(initial_carry=(jnp.zeros((B, H), jnp.float32), wrong_carry[:2])),
                ValueError,
                r"c of shape \[batch, hidden\]=\(3, 5\).*\(2, 6\)",
            ),
            (
                "carry_not_pair",
                dict(initial_carry=jnp.zeros((B, H), jnp.float32)),
                ValueError,
                r"pair \(h, c\)",
            ),
        ]
    else:
        cases += [
            (
                "carry_shape",
                dict(initial_carry=wrong_carry),
                ValueError,
                r"\[batch, hidden\]=\(3, 5\).*\(3, 6\)",
            ),
            (
                "carry_batch",
                dict(initial_carry=jnp.zeros((B + 1, H), jnp.float32)),
                ValueError,
                r"\[batch, hidden\]=\(3, 5\).*\(4, 5\)",
            ),
        ]
    return [pytest.param(cell, *c[1:], id=f"{cell}-{c[0]}") for c in cases]


@pytest.mark.parametrize("cell,overrides,exc,match", _bad_inputs("lstm") + _bad_inputs("rnn"))
def test_bad_input_raises(cell, overrides, exc, match):
    kwargs = dict(params=make_params(cell), xs=make_xs(), initial_carry=None)
    kwargs.update(overrides)
    scan = SCANS[cell]
    with pytest.raises(exc, match=match):
        scan(kwargs.pop("params"), kwargs.pop("xs"), kwargs.pop("initial_carry"), **kwargs)


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
@pytest.mark.parametrize(
    "chunks", [(6, 6), (1, 6), (1, 2), (3, 1), (2, 3)], ids=lambda c: f"fwd{c[0]}-bwd{c[1]}"
)
@pytest.mark.parametrize("reverse", [False, True])
def test_chunked_recurrence_matches_per_step(cell, chunks, reverse):
    """Every cut of time into forward and backward chunks (whole sequence: GPU/TPU; 1 step forward
    and a few backward: CPU) gives the outputs and gradients of the per-step loop, with masks."""

    ks = jax.random.split(jax.random.key(7), 3)
    params = make_params(cell, features=3, hidden=5, seed=7)
    xs = jax.random.normal(ks[0], (4, 6, 3))
    h0 = jax.random.normal(ks[1], (4, 5))
    carry = (h0, jax.random.normal(ks[2], (4, 5))) if cell == "lstm" else (h0,)
    step = fused.LSTM_CELL if cell == "lstm" else fused.rnn_cell_ops(jnp.tanh)
    mask = jnp.arange(6)[:, None] < jnp.array([6, 2, 0, 4])[None, :]

    def loss(chunks):
        def f(p, xs, carry):
            final, hs = fused.recurrence_in_chunks(
                step, p["w_x"], p["w_h"], p["b"], carry, xs, mask, reverse, 1, chunks
            )
            return jnp.sum(jnp.sin(hs)) + sum(jnp.sum(jnp.cos(c)) for c in final)

        return jax.jit(jax.value_and_grad(f, (0, 1, 2)))

    for a, b in zip(
        jax.tree.leaves(loss(chunks)(params, xs, carry)),
        jax.tree.leaves(loss((1, 1))(params, xs, carry)),
    ):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    "time,most,expected",
    [(150, 12, 10), (100, 12, 10), (28, 12, 7), (97, 12, 1), (8, 12, 8), (0, 12, 1)],
)
def test_chunk_length_is_the_largest_divisor_within_bound(time, most, expected):

    assert fused.chunk_length(time, most) == expected


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_scan_path_lowers_for_accelerators(cell, platform):
    """The scan's GPU/TPU placement (one chunk: whole-sequence matmuls) lowers, gradients included;
    the CPU here can only run the other placement, checked against it in the chunk tests."""
    from jax import export

    scan = SCANS[cell]
    lengths = jnp.asarray([7, 2, 0], jnp.int32)
    loss = lambda p, x: jnp.sum(
        jnp.sin(scan(p, x, seq_lengths=lengths, reverse=True, impl="scan")[1])
    )
    exported = export.export(jax.jit(jax.grad(loss, (0, 1))), platforms=[platform])(
        make_params(cell), make_xs()
    )
    assert "stablehlo.while" in exported.mlir_module()
