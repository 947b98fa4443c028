"""The LSTM recurrence as one ``lstm_cell`` kernel per step inside a ``lax.scan``: for recurrent
weights too large to stay on chip in one program (see ``lstm_sequence.plan``).

Each step's kernel is blocked over batch, hidden and the contraction (``lstm_cell``, whose
``BlockSizes`` are this kernel's tiles), so it fits any hidden size; w_h streams from device memory
(L2 on GPU) at every step. w_h and x_proj are laid out for the kernel (gate-major, padded) once,
before the loop, and the carry stays in that layout from step to step; the cell state c is carried
in float32, as in the persistent kernel. Steps at t >= seq_lengths[b] leave the carry unchanged
and output zeros (packed-sequence semantics).

Backward (a ``custom_vjp`` over the whole sequence, not per step): a reverse-time ``lax.scan`` of
the gate gradients (``common.lstm_gate_gradients``) and δh_{t-1} = δpre_t w_hᵀ, one matmul a step
left to XLA (cuBLAS / the MXU); then δw_h = Σ_t h_{t-1}ᵀ δpre_t as one matmul over all steps, and
δx_proj = δpre.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxmodels.kernels import lstm_cell
from jaxmodels.kernels.common import (
    check_sequence_operands,
    lstm_gate_gradients,
    on_platforms,
    pad_to,
    recurrence_reference,
)

Array = jax.Array


def lstm_stepwise(
    x_proj: Array,
    w_h: Array,
    initial_carry: tuple[Array, Array],
    seq_lengths: Array | None = None,
    *,
    reverse: bool = False,
    block_sizes: lstm_cell.BlockSizes | None = None,
    interpret: bool | None = None,
) -> tuple[tuple[Array, Array], Array]:
    """Run the LSTM recurrence with one fused kernel per step, for any hidden size. Arguments and
    results as ``lstm_sequence.lstm_sequence`` (x_proj [time, batch, 4*hidden], w_h [hidden,
    4*hidden], carry (h_0, c_0) [batch, hidden] -> ((h_T, c_T), hs [time, batch, hidden])), except
    ``block_sizes``: the step kernel's tiles, ``lstm_cell.BlockSizes.get_default`` of the backend
    when None.
    """
    time, batch, _ = check_sequence_operands(x_proj, w_h, initial_carry, seq_lengths)
    if seq_lengths is None:
        seq_lengths = jnp.full((batch,), time, jnp.int32)
    h0, c0 = (a.astype(x_proj.dtype) for a in initial_carry)
    args = (x_proj, w_h, h0, c0, jnp.asarray(seq_lengths, jnp.int32))
    return on_platforms(
        lambda backend: stepwise_kernel(backend, reverse, block_sizes), interpret, *args
    )


def stepwise_kernel(backend: str, reverse: bool, block_sizes: lstm_cell.BlockSizes | None = None):
    """The stepwise recurrence on ``backend`` as one differentiable function (x_proj, w_h, h0,
    c0, lengths) -> ((h_T, c_T), hs)."""
    return functools.partial(
        _lstm_stepwise,
        reverse=reverse,
        block_sizes=block_sizes or lstm_cell.BlockSizes.get_default(backend),
        backend=backend,
    )


def _forward(x_proj, w_h, h0, c0, lengths, reverse, block_sizes, backend):
    """The scan, on operands laid out once for the kernel (gate-major, padded; the carry stays
    padded, its padding zero). Returns ((h_T, c_T), hs [time, batch, hidden], residuals): the
    mask, and per step the activated gates [4, batch_p, hidden_p] and the padded h and c
    entering it."""
    time, batch, gates = x_proj.shape
    hidden = gates // 4
    batch_p, hidden_p = lstm_cell.padded_shapes(batch, hidden, block_sizes)
    xp = lstm_cell.gate_major(x_proj, batch_p, hidden_p)  # [time, 4, batch_p, hidden_p]
    w = lstm_cell.gate_major(w_h, hidden_p, hidden_p)
    mask = jnp.arange(time)[:, None] < pad_to(lengths, (batch_p,))[None, :]  # [time, batch_p]

    def step(carry, inputs):
        h, c = carry
        xp_t, m_t = inputs
        h_new, c_new, acts = lstm_cell.step(xp_t, h, c, w, block_sizes, backend)
        keep = m_t[:, None]
        return (jnp.where(keep, h_new, h), jnp.where(keep, c_new, c)), (
            jnp.where(keep, h_new, 0),
            acts,
            h,
            c,
        )

    carry = (pad_to(h0, (batch_p, hidden_p)), pad_to(c0.astype(jnp.float32), (batch_p, hidden_p)))
    (h, c), (hs, acts, h_in, c_in) = lax.scan(step, carry, (xp, mask), reverse=reverse)
    final = (h[:batch, :hidden], c[:batch, :hidden].astype(x_proj.dtype))
    return final, hs[:, :batch, :hidden], (mask, acts, h_in, c_in)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _lstm_stepwise(x_proj, w_h, h0, c0, lengths, reverse, block_sizes, backend):
    carry, hs, _ = _forward(x_proj, w_h, h0, c0, lengths, reverse, block_sizes, backend)
    return carry, hs


def _lstm_stepwise_fwd(x_proj, w_h, h0, c0, lengths, reverse, block_sizes, backend):
    carry, hs, residuals = _forward(x_proj, w_h, h0, c0, lengths, reverse, block_sizes, backend)
    return (carry, hs), (w_h, residuals)


def _lstm_stepwise_bwd(reverse, block_sizes, backend, saved, cotangents):
    """In the padded layout of the forward: gradients of padded rows and columns are zero."""
    w_h, (mask, acts, h_in, c_in) = saved
    (dh_T, dc_T), dhs = cotangents
    time, batch, hidden = dhs.shape
    batch_p, hidden_p = h_in.shape[1:]
    w = lstm_cell.gate_major(w_h, hidden_p, hidden_p)  # [4, hidden_p, hidden_p]
    w_t = w.transpose(0, 2, 1).reshape(4 * hidden_p, hidden_p)

    def step(carry, inputs):
        dh_next, dc_next = carry
        dh_out, acts_t, c_in_t, m_t = inputs
        dh = dh_out.astype(jnp.float32) + dh_next
        dpre, dc_prev = lstm_gate_gradients(dh, dc_next, list(acts_t), c_in_t)
        keep = m_t[:, None]
        dpre = jnp.where(keep, jnp.concatenate(dpre, axis=-1), 0)  # [batch_p, 4*hidden_p]
        dh_prev = jnp.dot(dpre.astype(w_h.dtype), w_t, preferred_element_type=jnp.float32)
        return (jnp.where(keep, dh_prev, dh_next), jnp.where(keep, dc_prev, dc_next)), dpre

    padded = lambda a: pad_to(a.astype(jnp.float32), (*a.shape[:-2], batch_p, hidden_p))
    carry = (padded(dh_T), padded(dc_T))
    (dh0, dc0), dpre = lax.scan(step, carry, (padded(dhs), acts, c_in, mask), reverse=not reverse)
    dtype = w_h.dtype
    # [time, batch_p, 4, hidden]
    dpre = dpre.astype(dtype).reshape(time, batch_p, 4, hidden_p)[..., :hidden]
    dw_h = jnp.einsum(
        "tbh,tbkg->hkg", h_in[:, :, :hidden], dpre, preferred_element_type=jnp.float32
    )
    dx_proj = dpre[:, :batch].reshape(time, batch, 4 * hidden)
    unpad = lambda a: a[:batch, :hidden].astype(dtype)
    return dx_proj, dw_h.reshape(hidden, 4 * hidden).astype(dtype), unpad(dh0), unpad(dc0), None


_lstm_stepwise.defvjp(_lstm_stepwise_fwd, _lstm_stepwise_bwd)


def lstm_stepwise_reference(
    x_proj: Array,
    w_h: Array,
    initial_carry: tuple[Array, Array],
    seq_lengths: Array | None = None,
    *,
    reverse: bool = False,
) -> tuple[tuple[Array, Array], Array]:
    """The specification in plain jnp (same arguments and results as ``lstm_stepwise``): the LSTM
    recurrence carried as this kernel carries it, h in x_proj's dtype between steps
    (``recurrence_reference``)."""
    return recurrence_reference(
        x_proj, w_h, initial_carry, seq_lengths, reverse=reverse, h_dtype=x_proj.dtype
    )
