"""The whole LSTM recurrence in one kernel, recurrent weights loaded once and kept on chip.

A persistent-RNN design (Diamos et al. 2016): the grid runs over batch blocks; each program loads
the four [hidden, hidden] gate blocks of w_h once (VMEM on TPU, registers/shared memory on GPU),
keeps h and c in float32 for all steps, and walks time inside the kernel, reading the
precomputed input projection x_t W_x + b of each step from its time-major block. Steps at
t >= seq_lengths[b] leave the carry unchanged and output zeros (packed-sequence semantics).

The backward pass is a kernel too: the reverse-time recurrence that turns output and carry
gradients into gate gradients δgates [time, batch, 4*hidden], again with w_hᵀ on chip. The weight
gradient is then one large matmul outside, δw_h = Σ_t h_{t-1}ᵀ δgates_t, and δ(x_proj) = δgates.

Shapes handed to the kernels are padded (``plan``): batch to a multiple of ``block_batch``, hidden
to a power of two on GPU (Triton's block shapes), a multiple of 128 on TPU, a multiple of
``hidden_multiple`` when interpreted; zero weights keep padded units at exactly zero.

The input projections stream in by blocks of ``block_time`` steps: grid axis 1 walks the time
blocks in order (backwards for ``reverse``) and h and c pass from one block to the next in the
kernel's float32 carry outputs, which stay on chip between consecutive grid steps on TPU. Triton
runs a grid's programs concurrently, so on GPU one block spans all of time and each step reads
its projection straight from global memory.

Whether w_h fits on chip depends on the device compiled for, and ``plan`` decides it the way
the compilers do (tests/test_compile.py checks both sides of each limit): on GPU all of w_h sits
in one program's shared memory (hidden padded to a power of two, 56 KiB more for the backward
kernel's other operands), so float32 takes hidden <= 64 and bfloat16 hidden <= 128 on H100; on
TPU the VMEM budget is the chip's (128 MiB on v5e and v6e), set explicitly as
``vmem_limit_bytes``, with w_h single-buffered and ``block_time`` shortened until the blocks fit.
Beyond that, ``lstm_stepwise`` runs the recurrence one blocked kernel per step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxmodels.kernels import lstm_stepwise
from jaxmodels.kernels.common import (
    check_block_sizes,
    check_sequence_operands,
    compiler_params,
    dot_f32,
    gpu_shared_memory,
    lstm_gate_gradients,
    lstm_recurrence_reference,
    on_platforms,
    pad_gates,
    pad_to,
    round_up,
    sigmoid,
    target_device_kind,
    target_platform,
    tpu_vmem,
    un_pad_gates,
)

Array = jax.Array

# Triton: shared memory the kernels use beside w_h (bytes; measured by compiling for H100 and A100:
# the forward asks for w_h + 16 KiB, the backward for w_h + 52 KiB), and their warps per program
# (4 warps spilled registers in bfloat16 at hidden 128).
GPU_EXTRA_SHARED_MEMORY = 56 * 2**10
GPU_NUM_WARPS = 8
# Triton: the smallest padded hidden, as a dot's operands must be at least 16 on each side.
GPU_MIN_HIDDEN = 16
# Triton: the fewest steps of the kernels' time loop (the extra step masked): with a one-step loop
# Triton keeps the whole unrolled step live, and the residual-saving kernel spilled registers at
# hidden 64 on H100.
GPU_MIN_TIME_STEPS = 2
# Mosaic: the share of VMEM to compile with (vmem_limit_bytes), and what the compiler allocates in
# it beyond the blocks (measured on v5e: up to 7.7 MiB, in the backward kernel at hidden 2432).
TPU_VMEM_SHARE = 0.75
TPU_COMPILER_SCRATCH = 8 * 2**20
# Mosaic tiles a 32-bit array by 8 sublanes x 128 lanes (a 16-bit one by 16 x 128: two rows packed
# a sublane); the last axis of a block is padded to whole lanes.
TPU_SUBLANES = 8
TPU_LANES = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Blocks of the persistent kernels, each a power of two. A program holds all of w_h and all
    of hidden, so the kernels are blocked over batch and time only; hidden is padded as the
    backend needs (see the module's docstring).

    Attributes:
      block_batch: batch rows per program (at least a whole tile on Mosaic: 8 rows in float32,
        16 in bfloat16).
      block_time: the most time steps per grid step on Mosaic and in the interpreter (time is
        padded to a multiple, the padded steps masked; Mosaic shortens it until the blocks fit
        VMEM). Triton runs a grid's programs concurrently, so there one block spans all of time
        whatever block_time says.
      hidden_multiple: when interpreted, hidden is padded to a multiple of this (compiled, the
        compiler decides: a power of two for Triton, whole lanes for Mosaic).
    """

    block_batch: int
    block_time: int
    hidden_multiple: int

    def __post_init__(self):
        check_block_sizes(self)

    @classmethod
    def get_default(cls) -> BlockSizes:
        """The same on every backend: 16 batch rows (a whole bfloat16 tile on TPU), 16 time steps
        a grid step, hidden padded to whole TPU lanes when interpreted."""
        return cls(block_batch=16, block_time=16, hidden_multiple=TPU_LANES)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the kernels run for one shape on one backend: ``block_batch`` rows per program, hidden
    padded to ``hidden_p``, ``block_time`` steps per grid step (None: all of time in one block, as
    on Triton), and (Mosaic) the VMEM limit to compile with."""

    backend: str
    block_batch: int
    hidden_p: int
    block_time: int | None
    vmem_limit_bytes: int | None = None


def _tpu_bytes(rows: int, hidden_p: int, block_time: int, itemsize: int) -> int:
    """VMEM of the larger of the two kernels (forward with residuals, backward): each streamed
    block twice (double-buffered), w_h once, and the compiler's scratch. Blocks of float32 (4
    bytes) and of x_proj's dtype (``itemsize``); the lengths [rows, 1] int32 fill whole lanes."""
    seq = block_time * rows * hidden_p  # elements of one [block_time, rows, hidden] block
    state = rows * hidden_p
    carries = 2 * state * (itemsize + 4)
    forward = 4 * seq * itemsize + seq * itemsize + 4 * seq * 4 + 2 * seq * 4 + carries
    backward = seq * itemsize + 4 * seq * 4 + seq * 4 + 4 * seq * 4 + carries
    lengths = rows * TPU_LANES * 4
    weights = 4 * hidden_p * hidden_p * itemsize
    return 2 * (max(forward, backward) + lengths) + weights + TPU_COMPILER_SCRATCH


def plan(hidden: int, dtype, backend: str, block_sizes: BlockSizes | None = None) -> Plan | None:
    """The kernels' plan for ``hidden`` and ``dtype`` on ``backend`` ("interpret", "triton",
    "mosaic"), for the device being compiled for; None where w_h does not fit on chip.

    Triton: hidden padded to a power of two (at least ``GPU_MIN_HIDDEN``), fits when
    4·hidden_p²·itemsize plus ``GPU_EXTRA_SHARED_MEMORY`` is within the GPU's shared memory per
    program (``common.gpu_shared_memory``); all of time in one block. Mosaic: hidden padded to
    whole lanes, the longest ``block_time`` (up to block_sizes.block_time) whose blocks and the
    compiler's scratch fill at most ``TPU_VMEM_SHARE`` of the TPU's VMEM (``common.tpu_vmem``);
    the limit is set to that share. Interpreted: always. ``block_sizes``:
    ``BlockSizes.get_default()`` when None.
    """
    block_sizes = block_sizes or BlockSizes.get_default()
    itemsize = jnp.dtype(dtype).itemsize
    if backend == "interpret":
        hidden_p = round_up(hidden, block_sizes.hidden_multiple)
        return Plan(backend, block_sizes.block_batch, hidden_p, block_sizes.block_time)
    if backend == "triton":
        hidden_p = max(GPU_MIN_HIDDEN, 1 << (hidden - 1).bit_length())
        if 4 * hidden_p * hidden_p * itemsize + GPU_EXTRA_SHARED_MEMORY > gpu_shared_memory():
            return None
        return Plan(backend, block_sizes.block_batch, hidden_p, None)
    # whole tiles: 8 rows of 32-bit values, 16 of bfloat16
    rows = max(block_sizes.block_batch, TPU_SUBLANES * 4 // itemsize)
    hidden_p = round_up(hidden, TPU_LANES)
    budget = int(TPU_VMEM_SHARE * tpu_vmem())
    block_time = block_sizes.block_time
    while block_time >= 1:
        if _tpu_bytes(rows, hidden_p, block_time, itemsize) <= budget:
            return Plan(backend, rows, hidden_p, block_time, budget)
        block_time //= 2
    return None


def _gate(ref, t, k, hidden):
    """Gate block k of ref[t] as float32: ref [time, rows, 4*hidden] -> [rows, hidden]."""
    return ref[t, :, pl.ds(k * hidden, hidden)].astype(jnp.float32)


def _time_block(reverse: bool):
    """(index of this program's time block, its first global step) for grid axis 1 walked in
    order (reverse=False) or from the last block to the first."""
    step, blocks = pl.program_id(1), pl.num_programs(1)
    block = blocks - 1 - step if reverse else step
    return block, step


def _weights(ref, hidden, hoist: bool, by_rows: bool):
    """The four gate blocks of w_h (columns k*hidden.., by_rows=False) or of w_hᵀ (rows): loaded
    once before the time loop (``hoist``, Triton: kept in registers and shared memory) or, as
    functions, read from the ref at each step (Mosaic: the MXU reads VMEM directly, and a hoisted
    copy would double w_h's VMEM)."""
    read = [
        (lambda k=k: ref[pl.ds(k * hidden, hidden), :])
        if by_rows
        else (lambda k=k: ref[:, pl.ds(k * hidden, hidden)])
        for k in range(4)
    ]
    if hoist:
        loaded = [r() for r in read]
        return [lambda a=a: a for a in loaded]
    return read


def _lstm_forward_kernel(
    xp_ref,
    w_ref,
    h0_ref,
    c0_ref,
    len_ref,
    hs_ref,
    h_ref,
    c_ref,
    acts_ref,
    hprev_ref,
    cprev_ref,
    *,
    reverse: bool,
    save_residuals: bool,
    upcast: bool,
    hoist: bool,
):
    """One block of time: xp_ref [block_time, rows, 4H], w_ref [H, 4H], h0/c0 [rows, H],
    len_ref [rows, 1] -> hs [block_time, rows, H]; h/c [rows, H] (float32) hold the carry from one
    time block to the next and end as the final carry; with save_residuals also the activated gates
    acts [block_time, rows, 4H] and the carries entering each step hprev/cprev (float32)."""
    time, _, hidden = hs_ref.shape
    w = _weights(w_ref, hidden, hoist, by_rows=False)
    lengths = len_ref[...]
    block, step_index = _time_block(reverse)
    first = step_index == 0  # the carry starts from h0/c0 (no write-then-read of h_ref needed)

    def step(s, carry):
        h, c = carry
        t = time - 1 - s if reverse else s
        hw = h.astype(w_ref.dtype)
        pre = [_gate(xp_ref, t, k, hidden) + dot_f32(hw, w[k](), upcast) for k in range(4)]
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
    dhs_ref,
    dh_ref,
    dc_ref,
    acts_ref,
    cprev_ref,
    wt_ref,
    len_ref,
    dgates_ref,
    dh0_ref,
    dc0_ref,
    *,
    reverse: bool,
    upcast: bool,
    hoist: bool,
):
    """One block of the reverse-time recurrence: dhs [block_time, rows, H], dh/dc [rows, H]
    (gradients of the outputs and final carry), acts [block_time, rows, 4H], cprev [block_time,
    rows, H], wt_ref = w_hᵀ [4H, H] -> dgates [block_time, rows, 4H] (float32); dh0/dc0 [rows, H]
    carry the gradient between time blocks and end as the initial-carry gradients. ``reverse``
    is the forward pass's direction; this pass walks the other way."""
    time, _, hidden = dhs_ref.shape
    wt = _weights(wt_ref, hidden, hoist, by_rows=True)
    lengths = len_ref[...]
    block, step_index = _time_block(not reverse)
    first = step_index == 0

    def step(s, carry):
        dh_next, dc_next = carry
        t = s if reverse else time - 1 - s
        acts = [_gate(acts_ref, t, k, hidden) for k in range(4)]
        dh = dhs_ref[t].astype(jnp.float32) + dh_next
        dgates, dc_prev = lstm_gate_gradients(dh, dc_next, acts, cprev_ref[t])
        keep = block * time + t < lengths
        dgates = [jnp.where(keep, d, 0) for d in dgates]
        dh_prev = sum(
            dot_f32(d.astype(wt_ref.dtype), wt[k](), upcast) for k, d in enumerate(dgates)
        )
        for k, d in enumerate(dgates):
            dgates_ref[t, :, pl.ds(k * hidden, hidden)] = d
        return jnp.where(keep, dh_prev, dh_next), jnp.where(keep, dc_prev, dc_next)

    carry = (
        jnp.where(first, dh_ref[...].astype(jnp.float32), dh0_ref[...]),
        jnp.where(first, dc_ref[...].astype(jnp.float32), dc0_ref[...]),
    )
    dh0, dc0 = lax.fori_loop(0, time, step, carry)
    dh0_ref[...] = dh0
    dc0_ref[...] = dc0


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
      block_sizes: the blocks (``BlockSizes``); default: ``BlockSizes.get_default()``.
      interpret: True to interpret everywhere; None interprets on CPU only.
    Returns:
      ((h_T, c_T), hs) with h_T, c_T [batch, hidden] and hs [time, batch, hidden], in x_proj's dtype.
    Raises:
      ValueError when w_h does not fit on chip on the device being compiled for (``plan``);
      ``lstm_stepwise`` takes every hidden size.
    """
    time, batch, hidden = check_sequence_operands(x_proj, w_h, initial_carry, seq_lengths)
    platform = target_platform()
    if (
        not interpret
        and platform in ("triton", "mosaic")
        and plan(hidden, x_proj.dtype, platform, block_sizes) is None
    ):
        raise ValueError(
            f"expected w_h [hidden, 4*hidden] to fit on chip for the persistent kernel on "
            f"{target_device_kind()} ({_limit_text(platform, x_proj.dtype)}), got hidden={hidden} in "
            f"{x_proj.dtype}; use lstm_stepwise, or lstm_scan(impl='pallas'), which picks it"
        )
    if seq_lengths is None:
        seq_lengths = jnp.full((batch,), time, jnp.int32)
    h0, c0 = (a.astype(x_proj.dtype) for a in initial_carry)
    args = (x_proj, w_h, h0, c0, jnp.asarray(seq_lengths, jnp.int32))

    # The check above covers the target platform; another platform's branch (when lowering for
    # several) falls back to the stepwise kernels where w_h does not fit there.
    def branch(backend):
        persistent = sequence_kernel(backend, hidden, x_proj.dtype, reverse, block_sizes)
        return persistent or lstm_stepwise.stepwise_kernel(backend, reverse)

    return on_platforms(branch, interpret, *args)


def sequence_kernel(
    backend: str, hidden: int, dtype, reverse: bool, block_sizes: BlockSizes | None = None
):
    """The persistent kernels on ``backend`` as one differentiable function (x_proj, w_h, h0, c0,
    lengths) -> ((h_T, c_T), hs), or None where w_h does not fit on chip (``plan``)."""
    kernel_plan = plan(hidden, dtype, backend, block_sizes)
    if kernel_plan is None:
        return None
    return functools.partial(_lstm_sequence, reverse=reverse, plan=kernel_plan)


def _limit_text(backend: str, dtype) -> str:
    if backend == "triton":
        return (
            f"4*hidden_p^2*{jnp.dtype(dtype).itemsize} bytes + {GPU_EXTRA_SHARED_MEMORY} <= "
            f"{gpu_shared_memory()} bytes of shared memory, hidden_p the next power of two"
        )
    return f"the blocks within {TPU_VMEM_SHARE:.0%} of {tpu_vmem()} bytes of VMEM"


def _layout(time: int, batch: int, plan: Plan):
    """(time_p, batch_p, block_time) of the padded operands. A plan without ``block_time``
    (Triton, which runs a grid's programs concurrently while grid axis 1 must run in order) takes
    all of time as one block, at least ``GPU_MIN_TIME_STEPS`` long."""
    if plan.block_time is None:
        block_time = max(time, GPU_MIN_TIME_STEPS)
    else:
        block_time = min(plan.block_time, time)
    return round_up(time, block_time), round_up(batch, plan.block_batch), block_time


def _specs(time_p: int, batch_p: int, block_time: int, plan: Plan, reverse: bool):
    """(grid, BlockSpec maker for [time, batch, width] arrays, for [batch, width] state, for w_h).
    Grid axis 1 walks blocks of time in order, carrying h and c from one block to the next."""
    rows = plan.block_batch
    blocks = time_p // block_time
    time_block = (lambda t: blocks - 1 - t) if reverse else (lambda t: t)
    seq = lambda width: pl.BlockSpec((block_time, rows, width), lambda b, t: (time_block(t), b, 0))
    state = lambda width: pl.BlockSpec((rows, width), lambda b, t: (b, 0))
    # w_h's block never changes: Mosaic keeps one buffer of it, not two
    once = {"pipeline_mode": pl.Buffered(1)} if plan.backend == "mosaic" else {}

    def weights(shape):
        return pl.BlockSpec(shape, lambda b, t: (0, 0), **once)

    return (batch_p // rows, blocks), seq, state, weights


def _compiler_params(plan: Plan):
    return compiler_params(
        plan.backend, num_warps=GPU_NUM_WARPS, vmem_limit_bytes=plan.vmem_limit_bytes
    )


def _forward(x_proj, w_h, h0, c0, lengths, reverse, plan: Plan, save_residuals):
    time, batch, gates = x_proj.shape
    hidden, hidden_p = gates // 4, plan.hidden_p
    time_p, batch_p, block_time = _layout(time, batch, plan)
    xp = pad_to(pad_gates(x_proj, hidden_p), (time_p, batch_p, 4 * hidden_p))
    w = pad_gates(pad_to(w_h, (hidden_p, gates)), hidden_p)
    h0p, c0p = pad_to(h0, (batch_p, hidden_p)), pad_to(c0, (batch_p, hidden_p))
    lens = pad_to(lengths, (batch_p,)).reshape(batch_p, 1)  # padded rows and steps are masked
    f32 = jnp.float32
    out_shape = [
        jax.ShapeDtypeStruct((time_p, batch_p, hidden_p), x_proj.dtype),
        jax.ShapeDtypeStruct((batch_p, hidden_p), f32),
        jax.ShapeDtypeStruct((batch_p, hidden_p), f32),
    ]
    grid, seq, state, weights = _specs(time_p, batch_p, block_time, plan, reverse)
    interpret = plan.backend == "interpret"
    kernel = functools.partial(
        _lstm_forward_kernel,
        reverse=reverse,
        save_residuals=save_residuals,
        upcast=interpret,
        hoist=plan.backend != "mosaic",
    )
    out_specs = [seq(hidden_p), state(hidden_p), state(hidden_p)]
    if save_residuals:
        out_shape += [
            jax.ShapeDtypeStruct((time_p, batch_p, 4 * hidden_p), f32),
            jax.ShapeDtypeStruct((time_p, batch_p, hidden_p), f32),
            jax.ShapeDtypeStruct((time_p, batch_p, hidden_p), f32),
        ]
        out_specs += [seq(4 * hidden_p), seq(hidden_p), seq(hidden_p)]
    else:  # the kernel's residual refs are then absent
        kernel = functools.partial(_drop_residual_refs, kernel)
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            seq(4 * hidden_p),
            weights((hidden_p, 4 * hidden_p)),
            state(hidden_p),
            state(hidden_p),
            state(1),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=_compiler_params(plan),
    )(xp, w, h0p, c0p, lens)
    hs = outs[0][:time, :batch, :hidden]
    h, c = (a[:batch, :hidden].astype(x_proj.dtype) for a in outs[1:3])
    return (h, c), hs, outs[3:]


def _drop_residual_refs(kernel, xp_ref, w_ref, h0_ref, c0_ref, len_ref, hs_ref, h_ref, c_ref):
    kernel(xp_ref, w_ref, h0_ref, c0_ref, len_ref, hs_ref, h_ref, c_ref, None, None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _lstm_sequence(x_proj, w_h, h0, c0, lengths, reverse, plan):
    carry, hs, _ = _forward(x_proj, w_h, h0, c0, lengths, reverse, plan, save_residuals=False)
    return carry, hs


def _lstm_sequence_fwd(x_proj, w_h, h0, c0, lengths, reverse, plan):
    carry, hs, residuals = _forward(
        x_proj, w_h, h0, c0, lengths, reverse, plan, save_residuals=True
    )
    return (carry, hs), (w_h, lengths, residuals)


def _lstm_sequence_bwd(reverse, plan, saved, cotangents):
    w_h, lengths, (acts, hprev, cprev) = saved
    (dh_T, dc_T), dhs = cotangents
    time, batch, hidden = dhs.shape
    hidden_p = plan.hidden_p
    time_p, batch_p, block_time = _layout(time, batch, plan)
    wt = pad_gates(pad_to(w_h, (hidden_p, w_h.shape[1])), hidden_p).T  # [4*hidden_p, hidden_p]
    dhs_p = pad_to(dhs, (time_p, batch_p, hidden_p))
    dh_p, dc_p = pad_to(dh_T, (batch_p, hidden_p)), pad_to(dc_T, (batch_p, hidden_p))
    lens = pad_to(lengths, (batch_p,)).reshape(batch_p, 1)
    grid, seq, state, weights = _specs(time_p, batch_p, block_time, plan, not reverse)
    interpret = plan.backend == "interpret"
    dgates_p, dh0, dc0 = pl.pallas_call(
        functools.partial(
            _lstm_backward_kernel, reverse=reverse, upcast=interpret, hoist=plan.backend != "mosaic"
        ),
        grid=grid,
        in_specs=[
            seq(hidden_p),
            state(hidden_p),
            state(hidden_p),
            seq(4 * hidden_p),
            seq(hidden_p),
            weights((4 * hidden_p, hidden_p)),
            state(1),
        ],
        out_specs=[seq(4 * hidden_p), state(hidden_p), state(hidden_p)],
        out_shape=[
            jax.ShapeDtypeStruct((time_p, batch_p, 4 * hidden_p), jnp.float32),
            jax.ShapeDtypeStruct((batch_p, hidden_p), jnp.float32),
            jax.ShapeDtypeStruct((batch_p, hidden_p), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=_compiler_params(plan),
    )(dhs_p, dh_p, dc_p, acts, cprev, wt, lens)
    dtype = w_h.dtype
    dw_h = un_pad_gates(jnp.einsum("tbh,tbg->hg", hprev, dgates_p)[:hidden], hidden).astype(dtype)
    dgates = un_pad_gates(dgates_p[:time, :batch], hidden).astype(dtype)
    return (
        dgates,
        dw_h,
        dh0[:batch, :hidden].astype(dtype),
        dc0[:batch, :hidden].astype(dtype),
        None,
    )


_lstm_sequence.defvjp(_lstm_sequence_fwd, _lstm_sequence_bwd)


def lstm_sequence_reference(
    x_proj: Array,
    w_h: Array,
    initial_carry: tuple[Array, Array],
    seq_lengths: Array | None = None,
    *,
    reverse: bool = False,
) -> tuple[tuple[Array, Array], Array]:
    """The specification in plain jnp (same arguments and results as ``lstm_sequence``): the LSTM
    recurrence with h and c in float32 between steps (``lstm_recurrence_reference``)."""
    return lstm_recurrence_reference(
        x_proj, w_h, initial_carry, seq_lengths, reverse=reverse, h_dtype=jnp.float32
    )
