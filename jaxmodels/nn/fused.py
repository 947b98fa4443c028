"""The fused recurrence under ``lstm_scan`` and ``rnn_scan``: one cell-generic ``lax.scan`` with a
hand-written backward pass (``custom_vjp``).

A cell, as the recurrence sees it (``Cell``), is the step after the matmuls: ``forward`` turns the
fused pre-activations x_t W_x + b + h_{t-1} W_h [batch, G*hidden] and the carry (h, *rest) into the
new carry and what its ``backward`` needs; the recurrence does the matmuls, a time step or a chunk
of steps at a time, and the backward loop propagates only the gate gradients.

The loops read xs and the gradient of hs a time step or a chunk of steps at a time and write the
gradient of xs in place, a chunk at a time; hs and the per-step residuals are stacked time-major,
hs then transposed once. The backward pass is a reverse-time loop over the gate gradients δpre_t
with δh_{t-1} = δpre_t W_hᵀ, saving per step only what the cell's backward needs (the LSTM: its
activated gates and tanh(C_t), with the C_{t-1} entering the step; h_{t-1} comes back from the
outputs). The weight and input gradients are matmuls over chunks of steps (δW_h = Σ_t h_{t-1}ᵀ
δpre_t as [hidden, chunk*batch] x [chunk*batch, G*hidden]): the whole sequence at once on GPU/TPU,
a few steps at a time on CPU, where they stay in cache (see ``recurrence``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxmodels.kernels.common import lstm_gate_gradients
from jaxmodels.nn import cells

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# Cells as seen by the recurrence: carry (h, *rest); forward from fused pre-activations, and the
# matching backward step


class Cell(NamedTuple):
    """forward(pre [batch, G*hidden], carry) -> (new carry, saved): the step after the matmuls,
    ``saved`` being what backward needs. backward(dh, drest, saved, rest_in) -> (dpre, drest_in):
    dh the gradient reaching h_t, drest the gradients of the rest of the carry after the step,
    rest_in the rest of the carry before it."""

    forward: Callable
    backward: Callable


def _lstm_forward_step(pre, carry):
    h, c, gates, tanh_c = cells.lstm_update(pre, carry[1])
    return (h, c), jnp.concatenate([*gates, tanh_c], axis=-1)


def _lstm_backward_step(dh, drest, saved, rest_in):
    """saved: [batch, 5*hidden], the activated gates i, f, g, o and tanh(C_t), saved by the forward
    step rather than recomputed here from the pre-activations (which would repeat its gate math)."""
    (dc_next,), (c_in,) = drest, rest_in
    i, f, g, o, tc = jnp.split(saved, 5, axis=-1)
    dpre, dc_prev = lstm_gate_gradients(dh, dc_next, (i, f, g, o), c_in, tc)
    return jnp.concatenate(dpre, axis=-1), (dc_prev,)


LSTM_CELL = Cell(_lstm_forward_step, _lstm_backward_step)


@functools.cache
def rnn_cell_ops(activation: Callable[[Array], Array]) -> Cell:
    def forward(pre, carry):
        return (activation(pre),), pre

    def backward(dh, drest, pre, rest_in):
        return jax.vjp(activation, pre)[1](dh)[0], ()

    return Cell(forward, backward)


# ---------------------------------------------------------------------------------------------
# The recurrence, with a hand-written backward pass


# Backward chunks on CPU: at most this many rows (steps x batch), see recurrence.
CPU_BACKWARD_ROWS = 800


def recurrence(cell, w_x, w_h, b, carry, xs, mask, reverse, unroll):
    """Run ``cell`` over xs [batch, time, features] from carry (h, *rest), each [batch, hidden];
    mask [time, batch] or None. Returns (final carry, hs [batch, time, hidden]).

    Time is cut into chunks of equal length, one length for the forward pass and one for the
    backward. Per forward chunk, the input projection of its steps is one matmul before its loop;
    per backward chunk, the weight and input gradients are matmuls over its steps after its loop.
    Only h_{t-1} W_h (forward) and δpre_t W_hᵀ (backward) remain per step. The lengths are chosen
    per lowering platform: the whole sequence on GPU/TPU (one large matmul each); on CPU, one step
    forward (the whole sequence for batch 1) and backward the longest chunk (a divisor of time) of
    at most ``CPU_BACKWARD_ROWS`` // batch steps, so that its matmuls have up to 800 rows.
    Why on CPU: a whole-sequence [time*batch, 4*hidden] projection does not stay in cache and goes
    to memory and back, while one step's x_t W_x runs on one core beside h_{t-1} W_h on the other;
    at batch 1, though, each step's x_t W_x is a matrix-vector product reading all of W_x, so one
    projection for the whole sequence reads it once. Backward, matmuls over chunks of steps replace
    per-step weight-gradient matmuls and their sums, and chunks of up to 800 rows keep their
    operands in cache. Symbolic sizes (an export with any batch or time) take one step at a time,
    forward and backward, on every platform.

    xs is read, and its gradient written, a step or a chunk at a time rather than transposed
    whole, which would copy it; hs is stacked time-major, each step writing one contiguous
    [batch, hidden] slice, and transposed once.
    """
    batch, time, _ = xs.shape
    args = (w_x, w_h, b, carry, xs, mask)

    def run(chunks):  # chunks: (forward chunk length, backward chunk length), each dividing time
        return lambda *args: recurrence_in_chunks(cell, *args, reverse, unroll, chunks)

    if not isinstance(batch, int) or not isinstance(time, int):  # symbolic sizes (jax.export)
        return run((1, 1))(*args)

    cpu_forward_chunk = time if batch == 1 else 1
    cpu_backward_chunk = chunk_length(time, max(1, CPU_BACKWARD_ROWS // batch))
    return lax.platform_dependent(
        *args, cpu=run((cpu_forward_chunk, cpu_backward_chunk)), default=run((time, time))
    )


def chunk_length(time: int, most: int) -> int:
    """The largest divisor of ``time`` that is at most ``most`` (1 for a prime time > most)."""
    return max(k for k in range(1, min(time, most) + 1) if time % k == 0) if time else 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 7, 8, 9))
def recurrence_in_chunks(cell, w_x, w_h, b, carry, xs, mask, reverse, unroll, chunks):
    carry, hs, _ = _forward(cell, w_x, w_h, b, carry, xs, mask, reverse, unroll, chunks[0])
    return carry, jnp.swapaxes(hs, 0, 1)


def _in_chunks(a: Array | None, chunk: int) -> Array | None:
    """[time, ...] -> [time // chunk, chunk, ...]."""
    return None if a is None else a.reshape(a.shape[0] // chunk, chunk, *a.shape[1:])


def _chunk_starts(time: int, chunk: int) -> Array:
    return jnp.arange(0, time, chunk)


def _forward(cell, w_x, w_h, b, carry, xs, mask, reverse, unroll, chunk):
    """The loop. Returns (final carry, hs [time, batch, hidden], residuals): the cell's ``saved``
    and the rest of the carry entering each step, each [time, batch, ...]."""
    time = xs.shape[1]
    bias = b.reshape(1, -1)

    def step(carry, inputs):
        t, pre_x, m_t = inputs
        if pre_x is None:  # per-step projection
            pre_x = lax.dynamic_index_in_dim(xs, t, axis=1, keepdims=False) @ w_x + bias
        new, saved = cell.forward(pre_x + carry[0] @ w_h, carry)
        h_out = new[0]
        if m_t is not None:
            keep = m_t[:, None]
            new = tuple(jnp.where(keep, n, c) for n, c in zip(new, carry))
            h_out = jnp.where(keep, new[0], 0)
        return new, (h_out, saved, carry[1:])

    def run_chunk(carry, inputs):
        start, m_c = inputs  # m_c: [chunk, batch]
        x_c = lax.dynamic_slice_in_dim(xs, start, chunk, axis=1)
        pre_x = cells.add_bias(jnp.einsum("btf,fg->tbg", x_c, w_x), b)
        return lax.scan(
            step, carry, (start + jnp.arange(chunk), pre_x, m_c), reverse=reverse, unroll=unroll
        )

    if chunk == 1:
        carry, per_step = lax.scan(
            step, tuple(carry), (jnp.arange(time), None, mask), reverse=reverse, unroll=unroll
        )
    else:
        chunks = (_chunk_starts(time, chunk), _in_chunks(mask, chunk))
        carry, per_step = lax.scan(run_chunk, tuple(carry), chunks, reverse=reverse)
        per_step = jax.tree.map(lambda a: a.reshape(time, *a.shape[2:]), per_step)
    hs, saved, rest_in = per_step
    return carry, hs, (saved, rest_in)


def _recurrence_fwd(cell, w_x, w_h, b, carry, xs, mask, reverse, unroll, chunks):
    carry_out, hs, residuals = _forward(
        cell, w_x, w_h, b, carry, xs, mask, reverse, unroll, chunks[0]
    )
    return (carry_out, jnp.swapaxes(hs, 0, 1)), (w_x, w_h, carry[0], xs, mask, hs, residuals)


def _recurrence_bwd(cell, reverse, unroll, chunks, saved_values, cotangents):
    """Reverse-time loop over the gate gradients δpre_t with δh_{t-1} = δpre_t W_hᵀ; per chunk,
    then, δW_x += Σ_t x_tᵀ δpre_t, δW_h += Σ_t h_{t-1}ᵀ δpre_t, δb += Σ_t δpre_t and
    δx_t = δpre_t W_xᵀ as matmuls over the chunk's steps."""
    w_x, w_h, h0, xs, mask, hs, (saved, rest_in) = saved_values
    dcarry, dhs = cotangents
    time = xs.shape[1]
    w_x_t, w_h_t, chunk = w_x.T, w_h.T, chunks[1]

    def step(dcarry, inputs):
        dh_out, saved_t, rest_in_t, m_t = inputs
        dpre, drest_in = cell.backward(dh_out + dcarry[0], dcarry[1:], saved_t, rest_in_t)
        if m_t is not None:
            keep = m_t[:, None]
            dpre = jnp.where(keep, dpre, 0)
        dh_in = dpre @ w_h_t
        if m_t is not None:
            dh_in = jnp.where(keep, dh_in, dcarry[0])
            drest_in = tuple(jnp.where(keep, d, dn) for d, dn in zip(drest_in, dcarry[1:]))
        return (dh_in, *drest_in), dpre

    def run_chunk(state, inputs):
        dcarry, (dw_x, dw_h, db), dxs = state
        start, per_step = inputs
        dh_c = jnp.swapaxes(lax.dynamic_slice_in_dim(dhs, start, chunk, axis=1), 0, 1)
        dcarry, dpre = lax.scan(step, dcarry, (dh_c, *per_step), reverse=not reverse, unroll=unroll)
        x_c = lax.dynamic_slice_in_dim(xs, start, chunk, axis=1)
        h_in_c = _entering(hs, h0, start, chunk, reverse, mask)
        sums = (
            dw_x + jnp.einsum("btf,tbg->fg", x_c, dpre),
            dw_h + jnp.einsum("tbh,tbg->hg", h_in_c, dpre),
            db + jnp.sum(dpre, axis=(0, 1)),
        )
        dxs = lax.dynamic_update_slice_in_dim(dxs, jnp.swapaxes(dpre @ w_x_t, 0, 1), start, axis=1)
        return (dcarry, sums, dxs), None

    sums = (jnp.zeros_like(w_x), jnp.zeros_like(w_h), jnp.zeros((w_h.shape[1],), w_h.dtype))
    per_step = jax.tree.map(lambda a: _in_chunks(a, chunk), (saved, rest_in, mask))
    state = (tuple(dcarry), sums, jnp.zeros_like(xs))
    (dcarry0, (dw_x, dw_h, db), dxs), _ = lax.scan(
        run_chunk, state, (_chunk_starts(time, chunk), per_step), reverse=not reverse
    )
    return dw_x, dw_h, db, dcarry0, dxs, None


recurrence_in_chunks.defvjp(_recurrence_fwd, _recurrence_bwd)


def _entering(
    hs: Array, h0: Array, start: Array, length: int, reverse: bool, mask: Array | None
) -> Array:
    """h entering the steps start .. start+length-1, [length, batch, hidden], from the outputs hs
    [time, batch, hidden]: the neighbour's output (t-1, or t+1 when reverse), h0 at the first
    step. With ``mask``, a step whose neighbour is masked starts from h0: read backwards, that is
    a sequence's last real step (its outputs are zero beyond); read forwards, such a step is
    masked itself and its value is never used."""
    time = hs.shape[0]
    if not reverse:
        before = lax.dynamic_index_in_dim(hs, jnp.maximum(start - 1, 0), keepdims=False)
        first = jnp.where(start == 0, h0, before)[None]
        return jnp.concatenate([first, lax.dynamic_slice_in_dim(hs, start, length - 1)])
    end = start + length
    after = lax.dynamic_index_in_dim(hs, jnp.minimum(end, time - 1), keepdims=False)
    last = jnp.where(end >= time, h0, after)[None]
    before = jnp.concatenate([lax.dynamic_slice_in_dim(hs, start + 1, length - 1), last])
    if mask is None:
        return before
    neighbour_real = lax.dynamic_slice_in_dim(
        jnp.concatenate([mask[1:], jnp.zeros_like(mask[:1])]), start, length
    )
    return jnp.where(neighbour_real[:, :, None], before, h0[None])
