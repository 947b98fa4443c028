"""One fused LSTM step: recurrent matmul, precomputed input projection, gate nonlinearities and
the cell and hidden updates in one kernel, blocked over batch, hidden and the contraction.

Gate-major layout inside: x_proj and w_h are viewed as [4, ..., hidden] so that program (b, j)
reads gate k's columns of hidden block j as ``ref[k]``::

    pre_k = x_proj[k][b, j] + Σ_r h[b, r] w_h[k][r, j]      k = i, f, g, o; r over slices of hidden
    C_t = σ(pre_f) ⊙ C_{t-1} + σ(pre_i) ⊙ tanh(pre_g)       h_t = σ(pre_o) ⊙ tanh(C_t)

The contraction runs over slices of ``block_contraction`` rows of w_h, so a program holds
4·block_contraction·block_hidden weights at a time whatever the hidden size: on GPU that keeps
shared memory and registers bounded (4 x 64 x 64 weights a slice by default); on TPU one slice
spans all of hidden, whose [4, hidden, block_hidden] weight block sits in VMEM.

Backward: δgates from the saved activations (``common.lstm_gate_gradients``), then
δh_{t-1} = δgates w_hᵀ and δw_h = h_{t-1}ᵀ δgates with the fused dense kernel's matmul (its default
blocks); δx_proj = δgates.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxmodels.kernels import dense
from jaxmodels.kernels.common import (
    check_block_sizes,
    check_float,
    check_lstm_operands,
    compiler_params,
    dot_f32,
    lstm_gate_gradients,
    on_platforms,
    pad_to,
    round_up,
    sigmoid,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the LSTM step kernel (``lstm_cell``, and ``lstm_stepwise``, which runs it once a
    step), each a power of two; batch and hidden are zero-padded to whole tiles inside.

    Attributes:
      block_batch: batch rows per program.
      block_hidden: hidden units per program: the columns of each gate's block, of h_t and of C_t.
      block_contraction: units of h_{t-1} (rows of w_h) per slice of the recurrent matmul
        Σ_r h[b, r] w_h[k][r, j]; None for the whole contraction (all of hidden) in one slice.
    """

    block_batch: int
    block_hidden: int
    block_contraction: int | None

    def __post_init__(self):
        check_block_sizes(self, whole=("block_contraction",))

    @classmethod
    def get_default(cls, backend: str) -> BlockSizes:
        """Tiles for ``backend`` (see ``common.BACKENDS``). Triton: 16 x 64 with slices of 64
        (4 x 64 x 64 weights a slice), chosen by compiling every shape of tests/test_compile.py
        for H100 and A100 without a register spill (slices of 32 spilled in bfloat16 on H100 at
        hidden 768). Mosaic and the interpreter: 16 x 128 with the whole contraction at once (a
        [4, hidden, 128] weight block fits VMEM up to hidden 4096 in float32)."""
        if backend == "triton":
            return cls(block_batch=16, block_hidden=64, block_contraction=64)
        return cls(block_batch=16, block_hidden=128, block_contraction=None)


def _lstm_cell_kernel(
    xp_ref, h_ref, c_ref, w_ref, h_out_ref, c_out_ref, acts_ref, *, block_contraction, upcast
):
    """xp_ref [4, rows, cols], h_ref [rows, H], c_ref [rows, cols], w_ref [4, H, cols] ->
    h_out, c_out [rows, cols] and the activated gates acts [4, rows, cols] (float32); the
    contraction over H in slices of ``block_contraction`` (a divisor of H)."""
    slices = h_ref.shape[1] // block_contraction

    def accumulate(r, acc):
        h = h_ref[:, pl.ds(r * block_contraction, block_contraction)].astype(w_ref.dtype)
        return [
            a + dot_f32(h, w_ref[k, pl.ds(r * block_contraction, block_contraction), :], upcast)
            for k, a in enumerate(acc)
        ]

    pre = [xp_ref[k].astype(jnp.float32) for k in range(4)]
    if slices == 1:
        pre = accumulate(0, pre)
    else:
        pre = lax.fori_loop(0, slices, accumulate, pre)
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
      block_sizes: the tiles (``BlockSizes``); default: ``BlockSizes.get_default`` of the
        backend.
      interpret: True to interpret everywhere; None interprets on CPU only.
    Returns:
      (h_t, c_t), each [batch, hidden] in x_proj's dtype (gate math in float32).
    """
    check_float("x_proj", x_proj)
    if x_proj.ndim != 2 or x_proj.shape[-1] % 4:
        raise ValueError(f"expected x_proj of rank 2 [batch, 4*hidden], got shape {x_proj.shape}")
    check_lstm_operands(x_proj, w_h, carry, "carry")
    h, c = (a.astype(x_proj.dtype) for a in carry)
    branch = lambda backend: functools.partial(
        _lstm_cell, block_sizes=block_sizes or BlockSizes.get_default(backend), backend=backend
    )
    return on_platforms(branch, interpret, x_proj, w_h, h, c)


def contraction_slice(hidden_p: int, block_sizes: BlockSizes) -> int:
    """Rows of w_h per slice of the contraction over ``hidden_p`` (padded) units: all of them
    for ``block_contraction`` None or at least ``hidden_p``."""
    if block_sizes.block_contraction is None:
        return hidden_p
    return min(block_sizes.block_contraction, hidden_p)


def padded_hidden(hidden: int, block_sizes: BlockSizes) -> int:
    """hidden padded to whole hidden blocks and whole contraction slices."""
    hidden_p = round_up(hidden, block_sizes.block_hidden)
    return round_up(hidden_p, contraction_slice(hidden_p, block_sizes))


def gate_major(a: Array, rows: int, hidden_p: int) -> Array:
    """[..., rows, 4*hidden] -> [..., 4, rows_p, hidden_p]: gate k's columns as [k], zero-padded
    to ``rows`` rows (rounded up by the caller) and ``hidden_p`` columns."""
    *lead, n, gates = a.shape
    hidden = gates // 4
    a = jnp.moveaxis(a.reshape(*lead, n, 4, hidden), -2, -3)
    return pad_to(a, (*lead, 4, rows, hidden_p))


def padded_shapes(batch: int, hidden: int, block_sizes: BlockSizes) -> tuple[int, int]:
    """(batch_p, hidden_p) of the kernel's operands."""
    return round_up(batch, block_sizes.block_batch), padded_hidden(hidden, block_sizes)


def step(xp, h, c, w, block_sizes: BlockSizes, backend: str):
    """The kernel on padded gate-major operands: xp [4, batch_p, hidden_p] (``gate_major`` of
    x_proj), h [batch_p, hidden_p] in w's dtype, c [batch_p, hidden_p], w [4, hidden_p, hidden_p]
    (``gate_major`` of w_h) -> (h_t in xp's dtype, c_t in c's dtype, activated gates
    [4, batch_p, hidden_p] in float32). Padded rows and columns stay zero."""
    _, batch_p, hidden_p = xp.shape
    rows, cols = block_sizes.block_batch, block_sizes.block_hidden
    block = pl.BlockSpec((rows, cols), lambda b, j: (b, j))
    by_gate = pl.BlockSpec((4, rows, cols), lambda b, j: (0, b, j))
    interpret = backend == "interpret"
    return pl.pallas_call(
        functools.partial(
            _lstm_cell_kernel,
            block_contraction=contraction_slice(hidden_p, block_sizes),
            upcast=interpret,
        ),
        grid=(batch_p // rows, hidden_p // cols),
        in_specs=[
            by_gate,
            pl.BlockSpec((rows, hidden_p), lambda b, j: (b, 0)),
            block,
            pl.BlockSpec((4, hidden_p, cols), lambda b, j: (0, 0, j)),
        ],
        out_specs=[block, block, by_gate],
        out_shape=[
            jax.ShapeDtypeStruct((batch_p, hidden_p), xp.dtype),
            jax.ShapeDtypeStruct((batch_p, hidden_p), c.dtype),
            jax.ShapeDtypeStruct((4, batch_p, hidden_p), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=compiler_params(backend),
    )(xp, h, c, w)


def forward(x_proj, w_h, h, c, block_sizes: BlockSizes, backend: str):
    """One step on unpadded operands: (h_t, c_t, activated gates [4, batch, hidden] in float32)."""
    batch, gates = x_proj.shape
    hidden = gates // 4
    batch_p, hidden_p = padded_shapes(batch, hidden, block_sizes)
    h_new, c_new, acts = step(
        gate_major(x_proj, batch_p, hidden_p),
        pad_to(h, (batch_p, hidden_p)),
        pad_to(c, (batch_p, hidden_p)),
        gate_major(w_h, hidden_p, hidden_p),
        block_sizes,
        backend,
    )
    return h_new[:batch, :hidden], c_new[:batch, :hidden], acts[:, :batch, :hidden]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lstm_cell(x_proj, w_h, h, c, block_sizes, backend):
    h_new, c_new, _ = forward(x_proj, w_h, h, c, block_sizes, backend)
    return h_new, c_new


def _lstm_cell_fwd(x_proj, w_h, h, c, block_sizes, backend):
    h_new, c_new, acts = forward(x_proj, w_h, h, c, block_sizes, backend)
    return (h_new, c_new), (w_h, h, c, acts)


def _lstm_cell_bwd(block_sizes, backend, saved, cotangents):
    w_h, h, c, acts = saved
    dh, dc_next = (a.astype(jnp.float32) for a in cotangents)
    dpre, dc_prev = lstm_gate_gradients(dh, dc_next, acts, c.astype(jnp.float32))
    dtype = w_h.dtype
    dgates = jnp.concatenate(dpre, axis=-1).astype(dtype)
    hidden = w_h.shape[0]
    dense_blocks = dense.BlockSizes.get_default(backend)
    dh_prev = dense.matmul_bias_act(
        dgates, w_h.T, jnp.zeros((hidden,), dtype), "identity", dense_blocks, backend
    )
    dw_h = dense.matmul_bias_act(
        h.T, dgates, jnp.zeros((4 * hidden,), dtype), "identity", dense_blocks, backend
    )
    return dgates, dw_h, dh_prev, dc_prev.astype(dtype)


_lstm_cell.defvjp(_lstm_cell_fwd, _lstm_cell_bwd)


def lstm_cell_reference(
    x_proj: Array, w_h: Array, carry: tuple[Array, Array]
) -> tuple[Array, Array]:
    """The specification in plain jnp (same arguments and results as ``lstm_cell``)."""
    h, c = carry
    pre = x_proj.astype(jnp.float32) + dot_f32(h.astype(w_h.dtype), w_h, upcast=True)
    i, f, g, o = jnp.split(pre, 4, axis=-1)
    c = sigmoid(f) * c.astype(jnp.float32) + sigmoid(i) * jnp.tanh(g)
    return (sigmoid(o) * jnp.tanh(c)).astype(x_proj.dtype), c.astype(x_proj.dtype)
