"""The whole LSTM recurrence in one kernel, recurrent weights loaded once and kept on chip.

A persistent-RNN design (Diamos et al. 2016): the grid runs over batch blocks; each program loads
the four [hidden, hidden] gate blocks of w_h once (VMEM on TPU, registers/shared memory on GPU),
keeps h and c in float32 for all steps, and walks time inside the kernel, reading the
precomputed input projection x_t W_x + b of each step from its time-major block. Steps at
t >= seq_lengths[b] leave the carry unchanged and output zeros (packed-sequence semantics).

The backward pass is a kernel too: the reverse-time recurrence that turns output and carry
gradients into gate gradients δgates [time, batch, 4*hidden], again with w_hᵀ on chip. The weight
gradient is then one large matmul outside, δw_h = Σ_t h_{t-1}ᵀ δgates_t, and δ(x_proj) = δgates.

Shapes handed to the kernels are padded: batch to a multiple of ``block_rows``, hidden to a
multiple of ``block_cols`` (zero weights keep padded units at exactly zero).

The input projections stream in by blocks of ``block_time`` steps: grid axis 1 walks the time
blocks in order (backwards for ``reverse``) and h and c pass from one block to the next in the
kernel's float32 carry outputs, which stay on chip between consecutive grid steps on TPU. Triton
runs a grid's programs concurrently, so on GPU one block spans all of time and each step reads
its projection straight from global memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

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

Array = jax.Array

# On-chip budget for the four gate blocks of w_h (bytes). A GPU SM has ~228 KiB of shared memory
# and a TPU core 16+ MiB of VMEM; the recurrence needs all of w_h resident in every program.
MAX_ON_CHIP_WEIGHT_BYTES = 16 * 2**20


def _gate(ref, t, k, hidden):
    """Gate block k of ref[t] as float32: ref [time, rows, 4*hidden] -> [rows, hidden]."""
    return ref[t, :, pl.ds(k * hidden, hidden)].astype(jnp.float32)


def _time_block(reverse: bool):
    """(index of this program's time block, its first global step) for grid axis 1 walked in
    order (reverse=False) or from the last block to the first."""
    step, blocks = pl.program_id(1), pl.num_programs(1)
    block = blocks - 1 - step if reverse else step
    return block, step


def _lstm_forward_kernel(
    xp_ref, w_ref, h0_ref, c0_ref, len_ref,  # inputs
    hs_ref, h_ref, c_ref, acts_ref, hprev_ref, cprev_ref,  # outputs
    *, reverse: bool, save_residuals: bool, upcast: bool,
):
    """One block of time: xp_ref [block_time, rows, 4H], w_ref [H, 4H], h0/c0 [rows, H],
    len_ref [rows, 1] -> hs [block_time, rows, H]; h/c [rows, H] (float32) hold the carry from one
    time block to the next and end as the final carry; with save_residuals also the activated gates
    acts [block_time, rows, 4H] and the carries entering each step hprev/cprev (float32)."""
    time, _, hidden = hs_ref.shape
    w = [w_ref[:, pl.ds(k * hidden, hidden)] for k in range(4)]  # loaded once, on chip
    lengths = len_ref[...]
    block, step_index = _time_block(reverse)
    first = step_index == 0  # the carry starts from h0/c0 (no write-then-read of h_ref needed)

    def step(s, carry):
        h, c = carry
        t = time - 1 - s if reverse else s
        hw = h.astype(w[0].dtype)
        pre = [_gate(xp_ref, t, k, hidden) + dot_f32(hw, w[k], upcast) for k in range(4)]
        i, f, g, o = sigmoid(pre[0]), sigmoid(pre[1]), jnp.tanh(pre[2]), sigmoid(pre[3])
        new_c = f * c + i * g
        new_h = o * jnp.tanh(new_c)
        keep = block * time + t < lengths
        hs_ref[t] = jnp.where(keep, new_h, 0).astype(hs_ref.dtype)
        if save_residuals:
            for k, a in enumerate((i, f, g, o)):
                acts_ref[t, :, pl.ds(k * hidden, hidden)] = a
            hprev_ref[t] = h
            cprev_ref[t] = c
        return jnp.where(keep, new_h, h), jnp.where(keep, new_c, c)

    carry = (
        jnp.where(first, h0_ref[...].astype(jnp.float32), h_ref[...]),
        jnp.where(first, c0_ref[...].astype(jnp.float32), c_ref[...]),
    )
    h, c = lax.fori_loop(0, time, step, carry)
    h_ref[...] = h
    c_ref[...] = c


def _lstm_backward_kernel(
    dhs_ref, dh_ref, dc_ref, acts_ref, cprev_ref, wt_ref, len_ref,  # inputs
    dgates_ref, dh0_ref, dc0_ref,  # outputs
    *, reverse: bool, upcast: bool,
):
    """One block of the reverse-time recurrence: dhs [block_time, rows, H], dh/dc [rows, H]
    (gradients of the outputs and final carry), acts [block_time, rows, 4H], cprev [block_time,
    rows, H], wt_ref = w_hᵀ [4H, H] -> dgates [block_time, rows, 4H] (float32); dh0/dc0 [rows, H]
    carry the gradient between time blocks and end as the initial-carry gradients. ``reverse``
    is the forward pass's direction; this pass walks the other way."""
    time, _, hidden = dhs_ref.shape
    wt = [wt_ref[pl.ds(k * hidden, hidden), :] for k in range(4)]  # w_hᵀ loaded once, on chip
    lengths = len_ref[...]
    block, step_index = _time_block(not reverse)
    first = step_index == 0

    def step(s, carry):
        dh_next, dc_next = carry
        t = s if reverse else time - 1 - s
        i, f, g, o = (_gate(acts_ref, t, k, hidden) for k in range(4))
        c_in = cprev_ref[t]
        tc = jnp.tanh(f * c_in + i * g)
        dh = dhs_ref[t].astype(jnp.float32) + dh_next
        dc = dc_next + dh * o * (1 - tc * tc)
        keep = block * time + t < lengths
        dgates = [
            dc * g * i * (1 - i),
            dc * c_in * f * (1 - f),
            dc * i * (1 - g * g),
            dh * tc * o * (1 - o),
        ]
        dgates = [jnp.where(keep, d, 0) for d in dgates]
        dh_prev = sum(dot_f32(d.astype(wt[k].dtype), wt[k], upcast) for k, d in enumerate(dgates))
        for k, d in enumerate(dgates):
            dgates_ref[t, :, pl.ds(k * hidden, hidden)] = d
        return jnp.where(keep, dh_prev, dh_next), jnp.where(keep, dc * f, dc_next)

    carry = (
        jnp.where(first, dh_ref[...].astype(jnp.float32), dh0_ref[...]),
        jnp.where(first, dc_ref[...].astype(jnp.float32), dc0_ref[...]),
    )
    dh0, dc0 = lax.fori_loop(0, time, step, carry)
    dh0_ref[...] = dh0
    dc0_ref[...] = dc0


def fits_on_chip(hidden: int, dtype, block_sizes: BlockSizes | None = None) -> bool:
    """Whether w_h [hidden, 4*hidden] of ``dtype``, padded, fits the on-chip budget of this kernel."""
    hidden_p = round_up(hidden, (block_sizes or BlockSizes()).block_cols)
    return 4 * hidden_p * hidden_p * jnp.dtype(dtype).itemsize <= MAX_ON_CHIP_WEIGHT_BYTES


def supports(hidden: int, dtype) -> bool:
    """Whether ``lstm_sequence`` takes this hidden size and dtype with default block sizes."""
    return jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16) and fits_on_chip(hidden, dtype)


def lstm_sequence(
    x_proj: Array,
    w_h: Array,
    initial_carry: tuple[Array, Array],
    seq_lengths: Array | None = None,
    *,
    reverse: bool = False,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> tuple[tuple[Array, Array], Array]:
    """Run the LSTM recurrence over precomputed input projections in one kernel.

    Args:
      x_proj: [time, batch, 4*hidden], x_t W_x + b for every step (gates i, f, g, o), float32 or bfloat16.
      w_h: [hidden, 4*hidden], same dtype.
      initial_carry: (h_0, c_0), each [batch, hidden].
      seq_lengths: [batch] integers in [0, time], or None for full length.
      reverse: walk time from the last step to the first.
      block_sizes: block_rows (batch per program), block_cols (hidden padding multiple) and
        block_time (time steps per grid step on TPU and when interpreted; time is padded to a
        multiple, the padded steps masked).
      interpret: True to interpret everywhere; None interprets on CPU only.
    Returns:
      ((h_T, c_T), hs) with h_T, c_T [batch, hidden] and hs [time, batch, hidden], in x_proj's dtype.
    """
    check_float("x_proj", x_proj)
    if x_proj.ndim != 3 or x_proj.shape[-1] % 4:
        raise ValueError(f"expected x_proj of rank 3 [time, batch, 4*hidden], got shape {x_proj.shape}")
    time, batch, _ = x_proj.shape
    hidden = check_lstm_operands(x_proj, w_h, initial_carry, "initial carry")
    block_sizes = block_sizes or BlockSizes()
    if not fits_on_chip(hidden, x_proj.dtype, block_sizes):
        raise ValueError(
            f"expected hidden small enough for w_h to stay on chip (4*hidden_padded^2*{x_proj.dtype.itemsize} "
            f"bytes <= {MAX_ON_CHIP_WEIGHT_BYTES}), got hidden={hidden}; use lstm_scan(impl='scan')"
        )
    if seq_lengths is None:
        seq_lengths = jnp.full((batch,), time, jnp.int32)
    if seq_lengths.shape != (batch,):
        raise ValueError(f"expected seq_lengths of shape [batch]=({batch},), got {seq_lengths.shape}")
    h0, c0 = initial_carry
    return _lstm_sequence(
        x_proj, w_h, h0.astype(x_proj.dtype), c0.astype(x_proj.dtype), seq_lengths.astype(jnp.int32),
        reverse, block_sizes, interpret,
    )


def _pad_gates(a: Array, hidden_p: int) -> Array:
    """[..., 4*hidden] -> [..., 4*hidden_p], zero-padding each gate block separately."""
    lead, hidden = a.shape[:-1], a.shape[-1] // 4
    a = a.reshape(*lead, 4, hidden)
    return pad_to(a, (*lead, 4, hidden_p)).reshape(*lead, 4 * hidden_p)


def _unpad_gates(a: Array, hidden: int) -> Array:
    lead, hidden_p = a.shape[:-1], a.shape[-1] // 4
    return a.reshape(*lead, 4, hidden_p)[..., :hidden].reshape(*lead, 4 * hidden)


def _grid(time_p: int, rows: int, batch_p: int, block_time: int, compiler_params, reverse: bool):
    """(grid, BlockSpec maker for [time, batch, width] arrays, BlockSpec of [batch, width] state).

    Grid axis 1 walks blocks of time in order, carrying h and c from one block to the next. That
    needs programs along it to run one after another: true for Mosaic (TPU) and the interpreter,
    not for Triton, which runs a grid's programs concurrently; there one block spans all of time
    and each step reads straight from global memory.
    """
    if isinstance(compiler_params, pl_triton.CompilerParams):
        block_time = time_p
    blocks = time_p // block_time
    time_block = (lambda t: blocks - 1 - t) if reverse else (lambda t: t)
    grid = (batch_p // rows, blocks)
    seq = lambda width: pl.BlockSpec((block_time, rows, width), lambda b, t: (time_block(t), b, 0))
    state = lambda width: pl.BlockSpec((rows, width), lambda b, t: (b, 0))
    return grid, seq, state


def _padded_sizes(time, batch, hidden, block_sizes):
    block_time = min(block_sizes.block_time, time)
    return (
        round_up(time, block_time),
        round_up(batch, block_sizes.block_rows),
        round_up(hidden, block_sizes.block_cols),
        block_time,
    )


def _forward(x_proj, w_h, h0, c0, lengths, reverse, block_sizes, interpret, save_residuals):
    time, batch, gates = x_proj.shape
    hidden = gates // 4
    rows = block_sizes.block_rows
    time_p, batch_p, hidden_p, block_time = _padded_sizes(time, batch, hidden, block_sizes)
    xp = pad_to(_pad_gates(x_proj, hidden_p), (time_p, batch_p, 4 * hidden_p))
    w = _pad_gates(pad_to(w_h, (hidden_p, gates)), hidden_p)
    h0p, c0p = pad_to(h0, (batch_p, hidden_p)), pad_to(c0, (batch_p, hidden_p))
    lens = pad_to(lengths, (batch_p,)).reshape(batch_p, 1)  # padded rows and steps are masked
    f32 = jnp.float32
    out_shape = [
        jax.ShapeDtypeStruct((time_p, batch_p, hidden_p), x_proj.dtype),
        jax.ShapeDtypeStruct((batch_p, hidden_p), f32),
        jax.ShapeDtypeStruct((batch_p, hidden_p), f32),
    ]
    if save_residuals:
        out_shape += [
            jax.ShapeDtypeStruct((time_p, batch_p, 4 * hidden_p), f32),
            jax.ShapeDtypeStruct((time_p, batch_p, hidden_p), f32),
            jax.ShapeDtypeStruct((time_p, batch_p, hidden_p), f32),
        ]

    def call(xp, w, h0p, c0p, lens, *, interpret, compiler_params):
        grid, seq, state = _grid(time_p, rows, batch_p, block_time, compiler_params, reverse)
        kernel = functools.partial(
            _lstm_forward_kernel, reverse=reverse, save_residuals=save_residuals, upcast=interpret
        )
        out_specs = [seq(hidden_p), state(hidden_p), state(hidden_p)]
        if save_residuals:
            out_specs += [seq(4 * hidden_p), seq(hidden_p), seq(hidden_p)]
        else:  # the kernel's residual refs are then absent
            kernel = functools.partial(_drop_residual_refs, kernel)
        return pl.pallas_call(
            kernel,
            grid=grid,
            in_specs=[
                seq(4 * hidden_p),
                pl.BlockSpec((hidden_p, 4 * hidden_p), lambda b, t: (0, 0)),
                state(hidden_p),
                state(hidden_p),
                state(1),
            ],
            out_specs=out_specs,
            out_shape=out_shape,
            interpret=interpret,
            compiler_params=compiler_params,
        )(xp, w, h0p, c0p, lens)

    outs = run_on_platform(call, interpret, xp, w, h0p, c0p, lens)
    hs = outs[0][:time, :batch, :hidden]
    h, c = (a[:batch, :hidden].astype(x_proj.dtype) for a in outs[1:3])
    return (h, c), hs, outs[3:]


def _drop_residual_refs(kernel, xp_ref, w_ref, h0_ref, c0_ref, len_ref, hs_ref, h_ref, c_ref):
    kernel(xp_ref, w_ref, h0_ref, c0_ref, len_ref, hs_ref, h_ref, c_ref, None, None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _lstm_sequence(x_proj, w_h, h0, c0, lengths, reverse, block_sizes, interpret):
    carry, hs, _ = _forward(x_proj, w_h, h0, c0, lengths, reverse, block_sizes, interpret, save_residuals=False)
    return carry, hs


def _lstm_sequence_fwd(x_proj, w_h, h0, c0, lengths, reverse, block_sizes, interpret):
    carry, hs, residuals = _forward(x_proj, w_h, h0, c0, lengths, reverse, block_sizes, interpret, save_residuals=True)
    return (carry, hs), (w_h, lengths, residuals)


def _lstm_sequence_bwd(reverse, block_sizes, interpret, saved, cotangents):
    w_h, lengths, (acts, hprev, cprev) = saved
    (dh_T, dc_T), dhs = cotangents
    time, batch, hidden = dhs.shape
    rows = block_sizes.block_rows
    time_p, batch_p, hidden_p, block_time = _padded_sizes(time, batch, hidden, block_sizes)
    wt = _pad_gates(pad_to(w_h, (hidden_p, w_h.shape[1])), hidden_p).T  # [4*hidden_p, hidden_p]
    dhs_p = pad_to(dhs, (time_p, batch_p, hidden_p))
    dh_p, dc_p = pad_to(dh_T, (batch_p, hidden_p)), pad_to(dc_T, (batch_p, hidden_p))
    lens = pad_to(lengths, (batch_p,)).reshape(batch_p, 1)

    def call(dhs_p, dh_p, dc_p, acts, cprev, wt, lens, *, interpret, compiler_params):
        grid, seq, state = _grid(time_p, rows, batch_p, block_time, compiler_params, not reverse)
        return pl.pallas_call(
            functools.partial(_lstm_backward_kernel, reverse=reverse, upcast=interpret),
            grid=grid,
            in_specs=[
                seq(hidden_p), state(hidden_p), state(hidden_p), seq(4 * hidden_p), seq(hidden_p),
                pl.BlockSpec((4 * hidden_p, hidden_p), lambda b, t: (0, 0)),
                state(1),
            ],
            out_specs=[seq(4 * hidden_p), state(hidden_p), state(hidden_p)],
            out_shape=[
                jax.ShapeDtypeStruct((time_p, batch_p, 4 * hidden_p), jnp.float32),
                jax.ShapeDtypeStruct((batch_p, hidden_p), jnp.float32),
                jax.ShapeDtypeStruct((batch_p, hidden_p), jnp.float32),
            ],
            interpret=interpret,
            compiler_params=compiler_params,
        )(dhs_p, dh_p, dc_p, acts, cprev, wt, lens)

    dgates_p, dh0, dc0 = run_on_platform(call, interpret, dhs_p, dh_p, dc_p, acts, cprev, wt, lens)
    dtype = w_h.dtype
    dw_h = _unpad_gates(jnp.einsum("tbh,tbg->hg", hprev, dgates_p)[:hidden], hidden).astype(dtype)
    dgates = _unpad_gates(dgates_p[:time, :batch], hidden).astype(dtype)
    return dgates, dw_h, dh0[:batch, :hidden].astype(dtype), dc0[:batch, :hidden].astype(dtype), None


_lstm_sequence.defvjp(_lstm_sequence_fwd, _lstm_sequence_bwd)


def lstm_sequence_reference(
    x_proj: Array,
    w_h: Array,
    initial_carry: tuple[Array, Array],
    seq_lengths: Array | None = None,
    *,
    reverse: bool = False,
) -> tuple[tuple[Array, Array], Array]:
    """The specification in plain jnp (same arguments and results as ``lstm_sequence``): a
    ``lax.scan`` of the seed's LSTM step with h and c in float32."""
    time, batch, gates = x_proj.shape
    hidden = gates // 4
    lengths = jnp.full((batch,), time, jnp.int32) if seq_lengths is None else seq_lengths

    def step(carry, inputs):
        h, c = carry
        x_t, t = inputs
        pre = x_t.astype(jnp.float32) + dot_f32(h.astype(w_h.dtype), w_h, upcast=True)
        i, f, g, o = (pre[:, k * hidden:(k + 1) * hidden] for k in range(4))
        new_c = sigmoid(f) * c + sigmoid(i) * jnp.tanh(g)
        new_h = sigmoid(o) * jnp.tanh(new_c)
        keep = (t < lengths)[:, None]
        return (jnp.where(keep, new_h, h), jnp.where(keep, new_c, c)), jnp.where(keep, new_h, 0).astype(x_proj.dtype)

    h0, c0 = (a.astype(jnp.float32) for a in initial_carry)
    (h, c), hs = lax.scan(step, (h0, c0), (x_proj, jnp.arange(time)), reverse=reverse)
    return (h.astype(x_proj.dtype), c.astype(x_proj.dtype)), hs
