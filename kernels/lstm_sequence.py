"""The whole LSTM or simple-RNN recurrence in one kernel, recurrent weights loaded once and kept
on chip.

A persistent-RNN design (Diamos et al. 2016): the grid runs over batch blocks; each program loads
the G [hidden, hidden] gate blocks of w_h once (VMEM on TPU, registers/shared memory on GPU),
keeps the carry in float32 for all steps, and walks time inside the kernel, reading the
precomputed input projection x_t W_x + b of each step from its time-major block. Steps at
t >= seq_lengths[b] leave the carry unchanged and output zeros (packed-sequence semantics).

One kernel body serves both cells (``common.Cell``), over pre = x_t + h_{t-1} w_h: the LSTM
(``lstm_sequence``; G = 4 gates i, f, g, o and the carry (h, C): C_t = σ(f)⊙C_{t-1} +
σ(i)⊙tanh(g), h_t = σ(o)⊙tanh(C_t)) and the simple RNN (``rnn_sequence``; G = 1, carry h alone,
h_t = f(pre) for f a name in ``common.ACTIVATIONS``; the C refs are absent,
``common.with_absent``).

The backward pass is a kernel too: the reverse-time recurrence that turns output and carry
gradients into gate gradients δgates [time, batch, G*hidden], again with w_hᵀ on chip. The weight
gradient is then one large matmul outside, δw_h = Σ_t h_{t-1}ᵀ δgates_t, and δ(x_proj) = δgates.

Shapes handed to the kernels are padded (``plan``): batch to a multiple of ``block_batch``, hidden
to a power of two on GPU (Triton's block shapes), a multiple of 128 on TPU, a multiple of
``hidden_multiple`` when interpreted; zero rows and columns of w_h keep padded units out of the
real ones (padded units stay at zero, except the RNN's under sigmoid, at σ(0) = 0.5, which meet
only zero rows of w_h).

The input projections stream in by blocks of ``block_time`` steps: grid axis 1 walks the time
blocks in order (backwards for ``reverse``) and the carry passes from one block to the next in
the kernel's float32 carry outputs, which stay on chip between consecutive grid steps on TPU.
Triton runs a grid's programs concurrently, so on GPU one block spans all of time and each step
reads its projection straight from global memory.

Whether w_h fits on chip depends on the device compiled for, and ``plan`` decides it the way
the compilers do (tests/test_compile.py checks both sides of each limit): on GPU all of w_h sits
in one program's shared memory (hidden padded to a power of two, 56 KiB more for the backward
kernel's other operands, measured for the LSTM), so on H100 the LSTM takes hidden <= 64 in
float32 and <= 128 in bfloat16, the RNN (a quarter of the weights) <= 128 and <= 256; on TPU the
VMEM budget is the chip's (128 MiB on v5e and v6e), set explicitly as ``vmem_limit_bytes``, with
w_h single-buffered and ``block_time`` shortened until the blocks fit. Beyond that,
``lstm_stepwise`` runs the LSTM one blocked kernel per step, and on GPU ``lstm_grid`` splits w_h
over the SMs.
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
    LSTM,
    Cell,
    check_block_sizes,
    check_sequence_operands,
    compiler_params,
    dot_f32,
    gpu_shared_memory,
    kept,
    on_platforms,
    pad_gates,
    pad_to,
    recurrence_reference,
    rnn_cell,
    round_up,
    target_device_kind,
    target_platform,
    tpu_vmem,
    un_pad_gates,
    with_absent,
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


def _tpu_bytes(rows: int, hidden_p: int, block_time: int, itemsize: int, cell: Cell = LSTM) -> int:
    """VMEM of the larger of the two kernels (forward with residuals, backward): each streamed
    block twice (double-buffered), w_h once, and the compiler's scratch. Blocks of float32 (4
    bytes) and of x_proj's dtype (``itemsize``); the lengths [rows, 1] int32 fill whole lanes.
    ``cell``: G = cell.gates blocks of gates, and the carry (h, C) or (h,)."""
    seq = block_time * rows * hidden_p  # elements of one [block_time, rows, hidden] block
    g, n = cell.gates, 2 if cell.has_c else 1
    carries = n * rows * hidden_p * (itemsize + 4)
    forward = g * seq * itemsize + seq * itemsize + g * seq * 4 + n * seq * 4 + carries
    backward = seq * itemsize + g * seq * 4 + (n - 1) * seq * 4 + g * seq * 4 + carries
    lengths = rows * TPU_LANES * 4
    weights = g * hidden_p * hidden_p * itemsize
    return 2 * (max(forward, backward) + lengths) + weights + TPU_COMPILER_SCRATCH


def plan(
    hidden: int, dtype, backend: str, block_sizes: BlockSizes | None = None, cell: Cell = LSTM
) -> Plan | None:
    """The kernels' plan for ``hidden`` and ``dtype`` on ``backend`` ("interpret", "triton",
    "mosaic"), for the device being compiled for and the recurrence of ``cell`` (G = cell.gates
    blocks of w_h: 4 for the LSTM, 1 for the simple RNN); None where w_h does not fit on chip.

    Triton: hidden padded to a power of two (at least ``GPU_MIN_HIDDEN``), fits when
    G·hidden_p²·itemsize plus ``GPU_EXTRA_SHARED_MEMORY`` is within the GPU's shared memory per
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
        weights = cell.gates * hidden_p * hidden_p * itemsize
        if weights + GPU_EXTRA_SHARED_MEMORY > gpu_shared_memory():
            return None
        return Plan(backend, block_sizes.block_batch, hidden_p, None)
    # whole tiles: 8 rows of 32-bit values, 16 of bfloat16
    rows = max(block_sizes.block_batch, TPU_SUBLANES * 4 // itemsize)
    hidden_p = round_up(hidden, TPU_LANES)
    budget = int(TPU_VMEM_SHARE * tpu_vmem())
    block_time = block_sizes.block_time
    while block_time >= 1:
        if _tpu_bytes(rows, hidden_p, block_time, itemsize, cell) <= budget:
            return Plan(backend, rows, hidden_p, block_time, budget)
        block_time //= 2
    return None


def _gate(ref, t, k, hidden):
    """Gate block k of ref[t] as float32: ref [time, rows, G*hidden] -> [rows, hidden]."""
    return ref[t, :, pl.ds(k * hidden, hidden)].astype(jnp.float32)


def _time_block(reverse: bool):
    """(index of this program's time block, its first global step) for grid axis 1 walked in
    order (reverse=False) or from the last block to the first."""
    step, blocks = pl.program_id(1), pl.num_programs(1)
    block = blocks - 1 - step if reverse else step
    return block, step


def _weights(ref, hidden, gates: int, hoist: bool, by_rows: bool):
    """The ``gates`` blocks of w_h (columns k*hidden.., by_rows=False) or of w_hᵀ (rows): loaded
    once before the time loop (``hoist``, Triton: kept in registers and shared memory) or, as
    functions, read from the ref at each step (Mosaic: the MXU reads VMEM directly, and a hoisted
    copy would double w_h's VMEM)."""
    read = [
        (lambda k=k: ref[pl.ds(k * hidden, hidden), :])
        if by_rows
        else (lambda k=k: ref[:, pl.ds(k * hidden, hidden)])
        for k in range(gates)
    ]
    if hoist:
        loaded = [r() for r in read]
        return [lambda a=a: a for a in loaded]
    return read


def _forward_kernel(
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
    cell: Cell,
    reverse: bool,
    save_residuals: bool,
    upcast: bool,
    hoist: bool,
):
    """One block of time: xp_ref [block_time, rows, GH] (G = cell.gates), w_ref [H, GH], h0/c0
    [rows, H], len_ref [rows, 1] -> hs [block_time, rows, H]; h/c [rows, H] (float32) hold the
    carry from one time block to the next and end as the final carry; with save_residuals also
    the cell's activated gates acts [block_time, rows, GH] and the carries entering each step
    hprev/cprev (float32). The C refs are None for a cell without C (the RNN)."""
    time, _, hidden = hs_ref.shape
    w = _weights(w_ref, hidden, cell.gates, hoist, by_rows=False)
    lengths = len_ref[...]
    block, step_index = _time_block(reverse)
    first = step_index == 0  # the carry starts from h0/c0 (no write-then-read of h_ref needed)

    def step(s, carry):
        h, c = carry
        t = time - 1 - s if reverse else s
        hw = h.astype(w_ref.dtype)
        pre = [_gate(xp_ref, t, k, hidden) + dot_f32(hw, w[k](), upcast) for k in range(cell.gates)]
        new_h, new_c, acts = cell.forward(pre, c)
        keep = block * time + t < lengths
        hs_ref[t] = jnp.where(keep, new_h, 0).astype(hs_ref.dtype)
        if save_residuals:
            for k, a in enumerate(acts):
                acts_ref[t, :, pl.ds(k * hidden, hidden)] = a
            hprev_ref[t] = h
            if cell.has_c:
                cprev_ref[t] = c
        return jnp.where(keep, new_h, h), kept(keep, new_c, c)

    h_in = jnp.where(first, h0_ref[...].astype(jnp.float32), h_ref[...])
    c_in = None
    if cell.has_c:
        c_in = jnp.where(first, c0_ref[...].astype(jnp.float32), c_ref[...])
    h, c = lax.fori_loop(0, time, step, (h_in, c_in))
    h_ref[...] = h
    if cell.has_c:
        c_ref[...] = c


def _backward_kernel(
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
    cell: Cell,
    reverse: bool,
    upcast: bool,
    hoist: bool,
):
    """One block of the reverse-time recurrence: dhs [block_time, rows, H], dh/dc [rows, H]
    (gradients of the outputs and final carry), acts [block_time, rows, GH], cprev [block_time,
    rows, H], wt_ref = w_hᵀ [GH, H] -> dgates [block_time, rows, GH] (float32); dh0/dc0 [rows, H]
    carry the gradient between time blocks and end as the initial-carry gradients (the C refs
    None for a cell without C). ``reverse`` is the forward pass's direction; this pass walks the
    other way."""
    time, _, hidden = dhs_ref.shape
    wt = _weights(wt_ref, hidden, cell.gates, hoist, by_rows=True)
    lengths = len_ref[...]
    block, step_index = _time_block(not reverse)
    first = step_index == 0

    def step(s, carry):
        dh_next, dc_next = carry
        t = s if reverse else time - 1 - s
        acts = [_gate(acts_ref, t, k, hidden) for k in range(cell.gates)]
        dh = dhs_ref[t].astype(jnp.float32) + dh_next
        c_in = cprev_ref[t] if cell.has_c else None
        dgates, dc_prev = cell.backward(dh, dc_next, acts, c_in)
        keep = block * time + t < lengths
        dgates = [jnp.where(keep, d, 0) for d in dgates]
        dh_prev = sum(
            dot_f32(d.astype(wt_ref.dtype), wt[k](), upcast) for k, d in enumerate(dgates)
        )
        for k, d in enumerate(dgates):
            dgates_ref[t, :, pl.ds(k * hidden, hidden)] = d
        return jnp.where(keep, dh_prev, dh_next), kept(keep, dc_prev, dc_next)

    dh_in = jnp.where(first, dh_ref[...].astype(jnp.float32), dh0_ref[...])
    dc_in = None
    if cell.has_c:
        dc_in = jnp.where(first, dc_ref[...].astype(jnp.float32), dc0_ref[...])
    dh0, dc0 = lax.fori_loop(0, time, step, (dh_in, dc_in))
    dh0_ref[...] = dh0
    if cell.has_c:
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
    _, _, hidden = check_sequence_operands(x_proj, w_h, initial_carry, seq_lengths)
    _check_fits(LSTM, hidden, x_proj.dtype, block_sizes, interpret)

    # Another platform's branch (when lowering for several) falls back to the stepwise kernels
    # where w_h does not fit there.
    def branch(backend):
        persistent = sequence_kernel(backend, hidden, x_proj.dtype, reverse, block_sizes)
        return persistent or lstm_stepwise.stepwise_kernel(backend, reverse)

    return _run(branch, x_proj, w_h, initial_carry, seq_lengths, interpret)


def rnn_sequence(
    x_proj: Array,
    w_h: Array,
    h0: Array,
    seq_lengths: Array | None = None,
    *,
    activation: str = "tanh",
    reverse: bool = False,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> tuple[Array, Array]:
    """Run the simple RNN's recurrence h_t = f(x_t + h_{t-1} w_h) over precomputed input
    projections in one kernel (the LSTM's kernels with ``common.rnn_cell(activation)``).

    Args:
      x_proj: [time, batch, hidden], x_t W_x + b for every step, float32 or bfloat16.
      w_h: [hidden, hidden], same dtype.
      h0: [batch, hidden].
      seq_lengths: [batch] integers in [0, time], or None for full length.
      activation: f, a name in ``common.ACTIVATIONS`` ('identity', 'relu', 'tanh', 'sigmoid').
      reverse, block_sizes, interpret: as for ``lstm_sequence``.
    Returns:
      (h_T, hs) with h_T [batch, hidden] and hs [time, batch, hidden], in x_proj's dtype (f and
      the sums in float32, h carried in float32 between steps: ``rnn_sequence_reference``).
    Raises:
      ValueError for an unknown activation, and when w_h does not fit on chip on the device
      being compiled for (``plan``); ``lstm_grid.rnn_grid`` takes larger ones on GPU.
    """
    cell = rnn_cell(activation)
    _, _, hidden = check_sequence_operands(x_proj, w_h, (h0,), seq_lengths, gates=1)
    _check_fits(cell, hidden, x_proj.dtype, block_sizes, interpret)

    def branch(backend):  # another platform's branch where w_h does not fit there: the scan
        persistent = sequence_kernel(backend, hidden, x_proj.dtype, reverse, block_sizes, cell)
        return persistent or functools.partial(_reference_kernel, cell=cell, reverse=reverse)

    (h,), hs = _run(branch, x_proj, w_h, (h0,), seq_lengths, interpret)
    return h, hs


def _check_fits(cell: Cell, hidden: int, dtype, block_sizes, interpret) -> None:
    """Raise where the kernels do not fit on chip of the device compiled for."""
    platform = target_platform()
    if (
        not interpret
        and platform in ("triton", "mosaic")
        and plan(hidden, dtype, platform, block_sizes, cell) is None
    ):
        g = cell.gates
        name, other = ("lstm", "lstm_stepwise") if cell.has_c else ("rnn", "lstm_grid.rnn_grid")
        raise ValueError(
            f"expected w_h [hidden, {g}*hidden] to fit on chip for the persistent kernel on "
            f"{target_device_kind()} ({limit_text(platform, dtype, g)}), got hidden={hidden} in "
            f"{jnp.dtype(dtype).name}; use {other}, or {name}_scan(impl='pallas'), which picks it"
        )


def _run(branch, x_proj, w_h, initial_carry, seq_lengths, interpret):
    """``branch(backend)``'s kernel (x_proj, w_h, *carry, lengths) -> (carry, hs) on the
    platform lowered for, the carry cast to x_proj's dtype, full length for seq_lengths None."""
    time, batch, _ = x_proj.shape
    if seq_lengths is None:
        seq_lengths = jnp.full((batch,), time, jnp.int32)
    carry = [a.astype(x_proj.dtype) for a in initial_carry]
    args = (x_proj, w_h, *carry, jnp.asarray(seq_lengths, jnp.int32))
    return on_platforms(branch, interpret, *args)


def _reference_kernel(x_proj, w_h, *carry_and_lengths, cell: Cell, reverse: bool):
    """``recurrence_reference`` as a kernel function (x_proj, w_h, *carry, lengths)."""
    *carry, lengths = carry_and_lengths
    return recurrence_reference(
        x_proj, w_h, carry, lengths, reverse=reverse, h_dtype=jnp.float32, cell=cell
    )


def sequence_kernel(
    backend: str,
    hidden: int,
    dtype,
    reverse: bool,
    block_sizes: BlockSizes | None = None,
    cell: Cell = LSTM,
):
    """The persistent kernels of ``cell``'s recurrence on ``backend`` as one differentiable
    function ``(x_proj, w_h, *carry, lengths) -> (carry, hs)``, the carry (h, c) for the LSTM and
    (h,) for the RNN, or None where w_h does not fit on chip (``plan``)."""
    kernel_plan = plan(hidden, dtype, backend, block_sizes, cell)
    if kernel_plan is None:
        return None
    run = functools.partial(_sequence, reverse=reverse, plan=kernel_plan, cell=cell)
    return lambda x_proj, w_h, *rest: run(x_proj, w_h, tuple(rest[:-1]), rest[-1])


def limit_text(backend: str, dtype, gates: int = 4) -> str:
    """The plan's limit on ``backend`` ("triton" or "mosaic") in words, for errors; ``gates``:
    4 for the LSTM, 1 for the simple RNN."""
    if backend == "triton":
        return (
            f"{gates}*hidden_p^2*{jnp.dtype(dtype).itemsize} bytes + {GPU_EXTRA_SHARED_MEMORY} <= "
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


def _forward(x_proj, w_h, carry, lengths, reverse, plan: Plan, cell: Cell, save_residuals):
    """Padded operands through the forward kernel. Returns (final carry, hs [time, batch,
    hidden]) and the residuals (acts [time_p, batch_p, G*hidden_p], hprev and, with C, cprev
    [time_p, batch_p, hidden_p], float32), empty without save_residuals."""
    time, batch, width = x_proj.shape
    g, n, has_c = cell.gates, len(carry), cell.has_c
    hidden, hidden_p = width // g, plan.hidden_p
    time_p, batch_p, block_time = _layout(time, batch, plan)
    xp = pad_to(pad_gates(x_proj, hidden_p, g), (time_p, batch_p, g * hidden_p))
    w = pad_gates(pad_to(w_h, (hidden_p, width)), hidden_p, g)
    carry_p = [pad_to(a, (batch_p, hidden_p)) for a in carry]
    lens = pad_to(lengths, (batch_p,)).reshape(batch_p, 1)  # padded rows and steps are masked
    f32 = jnp.float32
    out_shape = [jax.ShapeDtypeStruct((time_p, batch_p, hidden_p), x_proj.dtype)]
    out_shape += [jax.ShapeDtypeStruct((batch_p, hidden_p), f32)] * n
    grid, seq, state, weights = _specs(time_p, batch_p, block_time, plan, reverse)
    interpret = plan.backend == "interpret"
    kernel = functools.partial(
        _forward_kernel,
        cell=cell,
        reverse=reverse,
        save_residuals=save_residuals,
        upcast=interpret,
        hoist=plan.backend != "mosaic",
    )
    out_specs = [seq(hidden_p)] + [state(hidden_p)] * n
    if save_residuals:
        out_shape += [jax.ShapeDtypeStruct((time_p, batch_p, g * hidden_p), f32)]
        out_shape += [jax.ShapeDtypeStruct((time_p, batch_p, hidden_p), f32)] * n
        out_specs += [seq(g * hidden_p)] + [seq(hidden_p)] * n
    saved = (save_residuals, save_residuals, save_residuals and has_c)
    present = (True, True, True, has_c, True, True, True, has_c, *saved)
    outs = pl.pallas_call(
        functools.partial(with_absent, kernel, present),
        grid=grid,
        in_specs=[
            seq(g * hidden_p),
            weights((hidden_p, g * hidden_p)),
            *[state(hidden_p)] * n,
            state(1),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        name=f"{cell.name}_sequence_forward",
        compiler_params=_compiler_params(plan),
    )(xp, w, *carry_p, lens)
    hs = outs[0][:time, :batch, :hidden]
    final = tuple(a[:batch, :hidden].astype(x_proj.dtype) for a in outs[1 : 1 + n])
    return final, hs, tuple(outs[1 + n :])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _sequence(x_proj, w_h, carry, lengths, reverse, plan, cell):
    carry, hs, _ = _forward(x_proj, w_h, carry, lengths, reverse, plan, cell, False)
    return carry, hs


def _sequence_fwd(x_proj, w_h, carry, lengths, reverse, plan, cell):
    carry, hs, residuals = _forward(x_proj, w_h, carry, lengths, reverse, plan, cell, True)
    return (carry, hs), (w_h, lengths, residuals)


def _sequence_bwd(reverse, plan, cell, saved, cotangents):
    w_h, lengths, (acts, hprev, *cprev) = saved
    dcarry, dhs = cotangents
    time, batch, hidden = dhs.shape
    g, n, has_c = cell.gates, len(dcarry), cell.has_c
    hidden_p = plan.hidden_p
    time_p, batch_p, block_time = _layout(time, batch, plan)
    wt = pad_gates(pad_to(w_h, (hidden_p, w_h.shape[1])), hidden_p, g).T  # [G*hidden_p, hidden_p]
    dhs_p = pad_to(dhs, (time_p, batch_p, hidden_p))
    dcarry_p = [pad_to(d, (batch_p, hidden_p)) for d in dcarry]
    lens = pad_to(lengths, (batch_p,)).reshape(batch_p, 1)
    grid, seq, state, weights = _specs(time_p, batch_p, block_time, plan, not reverse)
    interpret = plan.backend == "interpret"
    kernel = functools.partial(
        _backward_kernel,
        cell=cell,
        reverse=reverse,
        upcast=interpret,
        hoist=plan.backend != "mosaic",
    )
    present = (True, True, has_c, True, has_c, True, True, True, True, has_c)
    dgates_p, *dcarry0 = pl.pallas_call(
        functools.partial(with_absent, kernel, present),
        grid=grid,
        in_specs=[
            seq(hidden_p),
            *[state(hidden_p)] * n,
            seq(g * hidden_p),
            *[seq(hidden_p)] * (n - 1),
            weights((g * hidden_p, hidden_p)),
            state(1),
        ],
        out_specs=[seq(g * hidden_p)] + [state(hidden_p)] * n,
        out_shape=[jax.ShapeDtypeStruct((time_p, batch_p, g * hidden_p), jnp.float32)]
        + [jax.ShapeDtypeStruct((batch_p, hidden_p), jnp.float32)] * n,
        interpret=interpret,
        name=f"{cell.name}_sequence_backward",
        compiler_params=_compiler_params(plan),
    )(dhs_p, *dcarry_p, acts, *cprev, wt, lens)
    dtype = w_h.dtype
    dw_h = jnp.einsum("tbh,tbg->hg", hprev, dgates_p)[:hidden]
    dw_h = un_pad_gates(dw_h, hidden, g).astype(dtype)
    dgates = un_pad_gates(dgates_p[:time, :batch], hidden, g).astype(dtype)
    dcarry0 = tuple(d[:batch, :hidden].astype(dtype) for d in dcarry0)
    return dgates, dw_h, dcarry0, None


_sequence.defvjp(_sequence_fwd, _sequence_bwd)


def lstm_sequence_reference(
    x_proj: Array,
    w_h: Array,
    initial_carry: tuple[Array, Array],
    seq_lengths: Array | None = None,
    *,
    reverse: bool = False,
) -> tuple[tuple[Array, Array], Array]:
    """The specification in plain jnp (same arguments and results as ``lstm_sequence``): the LSTM
    recurrence with h and c in float32 between steps (``recurrence_reference``)."""
    return recurrence_reference(
        x_proj, w_h, initial_carry, seq_lengths, reverse=reverse, h_dtype=jnp.float32
    )


def rnn_sequence_reference(
    x_proj: Array,
    w_h: Array,
    h0: Array,
    seq_lengths: Array | None = None,
    *,
    activation: str = "tanh",
    reverse: bool = False,
) -> tuple[Array, Array]:
    """The specification in plain jnp (same arguments and results as ``rnn_sequence``):
    h_t = f(x_t + h_{t-1} w_h), f and the sums in float32, h in float32 between steps
    (``recurrence_reference``)."""
    (h,), hs = recurrence_reference(
        x_proj,
        w_h,
        (h0,),
        seq_lengths,
        reverse=reverse,
        h_dtype=jnp.float32,
        cell=rnn_cell(activation),
    )
    return h, hs
