"""One fused LSTM step: recurrent matmul, precomputed input projection, gate nonlinearities and
the cell and hidden updates in one kernel, blocked over batch and hidden.

Gate-major layout inside: x_proj and w_h are viewed as [4, ..., hidden] so that program (b, j)
reads gate k's columns of hidden block j as ``ref[k]``::

    pre_k = x_proj[k][b, j] + h[b, :] w_h[k][:, j]          k = i, f, g, o
    C_t = σ(pre_f) ⊙ C_{t-1} + σ(pre_i) ⊙ tanh(pre_g)       h_t = σ(pre_o) ⊙ tanh(C_t)

Backward: δgates from the saved activations (elementwise), then δh_{t-1} = δgates w_hᵀ and
δw_h = h_{t-1}ᵀ δgates with the fused dense kernel's matmul; δx_proj = δgates.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxmodels.kernels.common import (
    BlockSizes,
    check_float,
    check_lstm_operands,
    dot_f32,
    pad_to,
    round_up,
    run_on_platform,
    sigmoid,
)
from jaxmodels.kernels.dense import matmul_bias_act

Array = jax.Array


def _lstm_cell_kernel(xp_ref, h_ref, c_ref, w_ref, h_out_ref, c_out_ref, acts_ref, *, upcast: bool):
    """xp_ref [4, rows, cols], h_ref [rows, H], c_ref [rows, cols], w_ref [4, H, cols] ->
    h_out, c_out [rows, cols] and the activated gates acts [4, rows, cols] (float32)."""
    h = h_ref[...].astype(w_ref.dtype)
    pre = [xp_ref[k].astype(jnp.float32) + dot_f32(h, w_ref[k], upcast) for k in range(4)]
    i, f, g, o = sigmoid(pre[0]), sigmoid(pre[1]), jnp.tanh(pre[2]), sigmoid(pre[3])
    c = f * c_ref[...].astype(jnp.float32) + i * g
    c_out_ref[...] = c.astype(c_out_ref.dtype)
    h_out_ref[...] = (o * jnp.tanh(c)).astype(h_out_ref.dtype)
    for k, a in enumerate((i, f, g, o)):
        acts_ref[k] = a


def lstm_cell(
    x_proj: Array,
    w_h: Array,
    carry: tuple[Array, Array],
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> tuple[Array, Array]:
    """One LSTM step in one kernel.

    Args:
      x_proj: [batch, 4*hidden], x_t W_x + b (gates i, f, g, o), float32 or bfloat16.
      w_h: [hidden, 4*hidden], same dtype.
      carry: (h, c), each [batch, hidden].
      block_sizes: block_rows (batch) and block_cols (hidden) per program; other sizes are padded.
      interpret: True to interpret everywhere; None interprets on CPU only.
    Returns:
      (h_t, c_t), each [batch, hidden] in x_proj's dtype (gate math in float32).
    """
    check_float("x_proj", x_proj)
    if x_proj.ndim != 2 or x_proj.shape[-1] % 4:
        raise ValueError(f"expected x_proj of rank 2 [batch, 4*hidden], got shape {x_proj.shape}")
    check_lstm_operands(x_proj, w_h, carry, "carry")
    h, c = (a.astype(x_proj.dtype) for a in carry)
    return _lstm_cell(x_proj, w_h, h, c, block_sizes or BlockSizes(), interpret)


def _forward(x_proj, w_h, h, c, block_sizes, interpret):
    batch, gates = x_proj.shape
    hidden = gates // 4
    rows, cols = block_sizes.block_rows, block_sizes.block_cols
    batch_p, hidden_p = round_up(batch, rows), round_up(hidden, cols)
    xp = pad_to(x_proj.reshape(batch, 4, hidden).transpose(1, 0, 2), (4, batch_p, hidden_p))
    w = pad_to(w_h.reshape(hidden, 4, hidden).transpose(1, 0, 2), (4, hidden_p, hidden_p))
    hp, cp = pad_to(h, (batch_p, hidden_p)), pad_to(c, (batch_p, hidden_p))
    block = pl.BlockSpec((rows, cols), lambda b, j: (b, j))
    by_gate = pl.BlockSpec((4, rows, cols), lambda b, j: (0, b, j))

    def call(xp, hp, cp, w, *, interpret, compiler_params):
        return pl.pallas_call(
            functools.partial(_lstm_cell_kernel, upcast=interpret),
            grid=(batch_p // rows, hidden_p // cols),
            in_specs=[by_gate, pl.BlockSpec((rows, hidden_p), lambda b, j: (b, 0)), block,
                      pl.BlockSpec((4, hidden_p, cols), lambda b, j: (0, 0, j))],
            out_specs=[block, block, by_gate],
            out_shape=[
                jax.ShapeDtypeStruct((batch_p, hidden_p), x_proj.dtype),
                jax.ShapeDtypeStruct((batch_p, hidden_p), x_proj.dtype),
                jax.ShapeDtypeStruct((4, batch_p, hidden_p), jnp.float32),
            ],
            interpret=interpret,
            compiler_params=compiler_params,
        )(xp, hp, cp, w)

    h_new, c_new, acts = run_on_platform(call, interpret, xp, hp, cp, w)
    return h_new[:batch, :hidden], c_new[:batch, :hidden], acts[:, :batch, :hidden]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lstm_cell(x_proj, w_h, h, c, block_sizes, interpret):
    h_new, c_new, _ = _forward(x_proj, w_h, h, c, block_sizes, interpret)
    return h_new, c_new


def _lstm_cell_fwd(x_proj, w_h, h, c, block_sizes, interpret):
    h_new, c_new, acts = _forward(x_proj, w_h, h, c, block_sizes, interpret)
    return (h_new, c_new), (w_h, h, c, acts)


def _lstm_cell_bwd(block_sizes, interpret, saved, cotangents):
    w_h, h, c, (i, f, g, o) = saved
    dh, dc_next = (a.astype(jnp.float32) for a in cotangents)
    c_in = c.astype(jnp.float32)
    tc = jnp.tanh(f * c_in + i * g)
    dc = dc_next + dh * o * (1 - tc * tc)
    dtype = w_h.dtype
    dgates = jnp.concatenate(
        [dc * g * i * (1 - i), dc * c_in * f * (1 - f), dc * i * (1 - g * g), dh * tc * o * (1 - o)], axis=-1
    ).astype(dtype)
    hidden = w_h.shape[0]
    dh_prev = matmul_bias_act(dgates, w_h.T, jnp.zeros((hidden,), dtype), "identity", block_sizes, interpret)
    dw_h = matmul_bias_act(h.T, dgates, jnp.zeros((4 * hidden,), dtype), "identity", block_sizes, interpret)
    return dgates, dw_h, dh_prev, (dc * f).astype(dtype)


_lstm_cell.defvjp(_lstm_cell_fwd, _lstm_cell_bwd)


def lstm_cell_reference(x_proj: Array, w_h: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
    """The specification in plain jnp (same arguments and results as ``lstm_cell``)."""
    h, c = carry
    pre = x_proj.astype(jnp.float32) + dot_f32(h.astype(w_h.dtype), w_h, upcast=True)
    i, f, g, o = jnp.split(pre, 4, axis=-1)
    c = sigmoid(f) * c.astype(jnp.float32) + sigmoid(i) * jnp.tanh(g)
    return (sigmoid(o) * jnp.tanh(c)).astype(x_proj.dtype), c.astype(x_proj.dtype)
