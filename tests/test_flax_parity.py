"""Parity with Flax's own cells run by ``flax.linen.RNN``: outputs, final carry and gradients.

Mapping from our pinned layout (docs/guides/math.md), hidden H, gate blocks i, f, g, o along the last axis:

    OptimizedLSTMCell:  i{z}.kernel = w_x[:, block z]       (input kernels, no bias)
                        h{z}.kernel = w_h[:, block z]       (hidden kernels)
                        h{z}.bias   = b[block z]            for z in i, f, g, o
                        carry (c, h)  <->  ours (h, c)
    SimpleCell:         i.kernel = w_x, i.bias = b, h.kernel = w_h

Variable lengths: ``nn.RNN(..., seq_lengths=...)`` agrees with us on the outputs at real steps and
on the final carry of every sequence of length >= 1 (``keep_order=True`` for reverse). It differs
on the rest, which these tests therefore do not compare across libraries: Flax leaves whatever the
cell computes from the padding in the padded outputs (ours are zero), and for a length-0 sequence
it returns the carry after running over all the padding (it indexes step ``length - 1 = -1``),
where ours returns the initial carry, as PyTorch's packed sequences would.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _diffs import DiffLog

import jaxmodels

BATCH, TIME, FEATURES, HIDDEN = 4, 7, 5, 6
TOL_OUT, TOL_GRAD = 1e-5, 1e-4  # float32, absolute
GATES = ("i", "f", "g", "o")

DIFFS = DiffLog("Largest |ours - Flax| per quantity (tests/test_flax_parity.py)")
assert_close = DIFFS.assert_close


@pytest.fixture(scope="module", autouse=True)
def _print_max_diffs():
    yield
    DIFFS.report()


# ---------------------------------------------------------------------------------------------
# Parameter mapping


def to_flax_lstm(p: dict) -> dict:
    """Pinned LSTM layer -> OptimizedLSTMCell params (under nn.RNN's "cell")."""
    wx, wh, b = (jnp.split(p[k], 4, axis=-1) for k in ("w_x", "w_h", "b"))
    cell = {}
    for z, gate in enumerate(GATES):
        cell[f"i{gate}"] = {"kernel": wx[z]}
        cell[f"h{gate}"] = {"kernel": wh[z], "bias": b[z]}
    return {"cell": cell}


def from_flax_lstm(fp: dict) -> dict:
    """OptimizedLSTMCell params (or their gradients) -> pinned layout."""
    cell = fp["cell"]
    return {
        "w_x": jnp.concatenate([cell[f"i{g}"]["kernel"] for g in GATES], axis=-1),
        "w_h": jnp.concatenate([cell[f"h{g}"]["kernel"] for g in GATES], axis=-1),
        "b": jnp.concatenate([cell[f"h{g}"]["bias"] for g in GATES], axis=-1),
    }


def to_flax_rnn(p: dict) -> dict:
    return {"cell": {"i": {"kernel": p["w_x"], "bias": p["b"]}, "h": {"kernel": p["w_h"]}}}


def from_flax_rnn(fp: dict) -> dict:
    cell = fp["cell"]
    return {"w_x": cell["i"]["kernel"], "w_h": cell["h"]["kernel"], "b": cell["i"]["bias"]}


KINDS = {
    # kind: (our scan, flax cell, to_flax, from_flax)
    "lstm": (jaxmodels.lstm_scan, nn.OptimizedLSTMCell, to_flax_lstm, from_flax_lstm),
    "rnn": (jaxmodels.rnn_scan, nn.SimpleCell, to_flax_rnn, from_flax_rnn),
}


def random_params(rng, kind):
    g = (4 if kind == "lstm" else 1) * HIDDEN
    return {
        "w_x": jnp.asarray(0.5 * rng.standard_normal((FEATURES, g)), jnp.float32),
        "w_h": jnp.asarray(0.5 * rng.standard_normal((HIDDEN, g)), jnp.float32),
        "b": jnp.asarray(0.5 * rng.standard_normal((g,)), jnp.float32),
    }


def make_problem(rng, kind):
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    prob = {
        "xs": f32(BATCH, TIME, FEATURES),
        "r_out": f32(BATCH, TIME, HIDDEN),
        "h0": 0.5 * f32(BATCH, HIDDEN),
        "r_h": f32(BATCH, HIDDEN),
    }
    if kind == "lstm":
        prob["c0"], prob["r_c"] = 0.5 * f32(BATCH, HIDDEN), f32(BATCH, HIDDEN)
    return prob


# ---------------------------------------------------------------------------------------------
# Runs of the same scalar loss on both sides


def loss_terms(kind, prob, out, final, out_weight):
    """Σ out·r_out + Σ h·r_h (+ Σ c·r_c); final in our (h, c) order."""
    h, c = final if kind == "lstm" else (final, None)
    loss = jnp.sum(out * out_weight) + jnp.sum(h * prob["r_h"])
    if kind == "lstm":
        loss = loss + jnp.sum(c * prob["r_c"])
    return loss


def run_ours(kind, params, prob, *, reverse=False, seq_lengths=None, out_weight=None):
    scan = KINDS[kind][0]
    out_weight = prob["r_out"] if out_weight is None else out_weight

    def loss_fn(params, xs, carry):
        final, out = scan(params, xs, carry, reverse=reverse, seq_lengths=seq_lengths)
        return loss_terms(kind, prob, out, final, out_weight), (out, final)

    carry = (prob["h0"], prob["c0"]) if kind == "lstm" else prob["h0"]
    (d_p, d_xs, d_carry), (out, final) = jax.jit(jax.grad(loss_fn, (0, 1, 2), has_aux=True))(
        params, prob["xs"], carry
    )
    return out, final, d_p, d_xs, d_carry


def run_flax(kind, params, prob, *, reverse=False, seq_lengths=None, out_weight=None):
    _, cell_cls, to_flax, from_flax = KINDS[kind]
    rnn = nn.RNN(cell_cls(HIDDEN), return_carry=True, reverse=reverse, keep_order=True)
    out_weight = prob["r_out"] if out_weight is None else out_weight

    def loss_fn(fparams, xs, carry):
        flax_carry = (carry[1], carry[0]) if kind == "lstm" else carry  # ours (h, c) -> flax (c, h)
        final, out = rnn.apply(
            {"params": fparams}, xs, initial_carry=flax_carry, seq_lengths=seq_lengths
        )
        final = (final[1], final[0]) if kind == "lstm" else final
        return loss_terms(kind, prob, out, final, out_weight), (out, final)

    carry = (prob["h0"], prob["c0"]) if kind == "lstm" else prob["h0"]
    (d_fp, d_xs, d_carry), (out, final) = jax.jit(jax.grad(loss_fn, (0, 1, 2), has_aux=True))(
        to_flax(params), prob["xs"], carry
    )
    return out, final, from_flax(d_fp), d_xs, d_carry


def compare(case, kind, ours, theirs, *, out_mask=None, finals=True):
    out, final, d_p, d_xs, d_carry = ours
    t_out, t_final, t_d_p, t_d_xs, t_d_carry = theirs
    if out_mask is not None:
        out, t_out = out[out_mask], t_out[out_mask]
    assert_close(case, "outputs", out, t_out, TOL_OUT)
    names = ("h", "c") if kind == "lstm" else ("h",)
    if finals:
        pairs = zip(final, t_final) if kind == "lstm" else [(final, t_final)]
        for n, (a, b) in zip(names, pairs):
            assert_close(case, f"final {n}", a, b, TOL_OUT)
    for k in ("w_x", "w_h", "b"):
        assert_close(case, "d params", d_p[k], t_d_p[k], TOL_GRAD)
    assert_close(case, "d xs", d_xs, t_d_xs, TOL_GRAD)
    d_carries = zip(d_carry, t_d_carry) if kind == "lstm" else [(d_carry, t_d_carry)]
    for n, (a, b) in zip(names, d_carries):
        assert_close(case, f"d {n}0", a, b, TOL_GRAD)


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_param_mapping_matches_flax_structure(kind):
    """The mapping produces exactly Flax's parameter tree, and round-trips."""
    _, cell_cls, to_flax, from_flax = KINDS[kind]
    xs = jnp.zeros((BATCH, TIME, FEATURES), jnp.float32)
    flax_shapes = jax.eval_shape(nn.RNN(cell_cls(HIDDEN)).init, jax.random.key(0), xs)["params"]
    params = random_params(np.random.default_rng(3), kind)
    mapped = to_flax(params)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), mapped) == jax.tree.map(
        lambda a: (a.shape, a.dtype), flax_shapes
    )
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), from_flax(mapped), params)
    assert all(jax.tree.leaves(same))


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_scan_matches_flax(kind, reverse):
    rng = np.random.default_rng(0)
    params, prob = random_params(rng, kind), make_problem(rng, kind)
    ours = run_ours(kind, params, prob, reverse=reverse)
    theirs = run_flax(kind, params, prob, reverse=reverse)
    compare(f"{kind}_scan {'reverse' if reverse else 'forward'}", kind, ours, theirs)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_scan_seq_lengths_match_flax(kind, reverse):
    """Lengths [5, 0, 1, 7] (unsorted, with 0, 1 and full length; padding filled with 50.0).

    Compared with Flax: outputs at real steps, final carries of the rows of length >= 1, and all
    gradients of a loss that reads only those (outputs at real steps, carries of rows >= 1).
    Checked on ours alone: padded outputs are zero, and the length-0 row's final carry is exactly
    its initial carry (Flax returns the carry after the padding there; that distance is recorded)."""
    rng = np.random.default_rng(1)
    params, prob = random_params(rng, kind), make_problem(rng, kind)
    lengths_np = np.array([5, 0, 1, 7], dtype=np.int32)
    valid = np.arange(TIME)[None, :] < lengths_np[:, None]  # [batch, time]
    prob["xs"] = jnp.where(jnp.asarray(valid)[:, :, None], prob["xs"], jnp.float32(50.0))
    out_weight = prob["r_out"] * jnp.asarray(valid, jnp.float32)[:, :, None]
    nonempty = jnp.asarray(lengths_np > 0, jnp.float32)[:, None]  # [batch, 1]
    for r in ("r_h", "r_c"):
        if r in prob:
            prob[r] = prob[r] * nonempty
    lengths = jnp.asarray(lengths_np)
    ours = run_ours(kind, params, prob, reverse=reverse, seq_lengths=lengths, out_weight=out_weight)
    theirs = run_flax(
        kind, params, prob, reverse=reverse, seq_lengths=lengths, out_weight=out_weight
    )
    case = f"{kind}_scan {'reverse' if reverse else 'forward'} seq_lengths"

    assert np.all(np.asarray(ours[0])[~valid] == 0), "our outputs past seq_lengths must be zero"
    # Input gradients vanish on the padding on both sides (nothing compared reads it).
    assert np.all(np.asarray(ours[3])[~valid] == 0) and np.all(np.asarray(theirs[3])[~valid] == 0)
    init = (prob["h0"], prob["c0"]) if kind == "lstm" else (prob["h0"],)
    finals = ours[1] if kind == "lstm" else (ours[1],)
    t_finals = theirs[1] if kind == "lstm" else (theirs[1],)
    rows = lengths_np > 0
    for name, ours_f, flax_f, init_f in zip("hc", finals, t_finals, init):
        ours_f, flax_f, init_f = np.asarray(ours_f), np.asarray(flax_f), np.asarray(init_f)
        np.testing.assert_array_equal(
            ours_f[~rows], init_f[~rows], err_msg=f"{case}: len-0 final {name}"
        )
        assert_close(case, f"final {name}", ours_f[rows], flax_f[rows], TOL_OUT)
        # Recorded, not asserted: Flax's length-0 carry is not the initial carry.
        key = (case, f"flax len-0 final {name} vs h0/c0")
        DIFFS.largest[key] = max(
            DIFFS.largest.get(key, 0.0), float(np.max(np.abs(flax_f[~rows] - init_f[~rows])))
        )

    # Final carries already compared on rows >= 1: compare the rest as a whole.
    compare(case, kind, ours, theirs, out_mask=valid, finals=False)
