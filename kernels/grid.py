"""Grid-persistent recurrences: the machinery shared by the kernels whose programs each keep a
slice of the recurrent weights on chip and meet at a grid barrier every step (``lstm_grid``, for
the LSTM's 4 gate blocks and the simple RNN's 1).

Grid axis 1 splits the hidden units into ``slices`` of ``block_hidden`` units, one program each;
grid axis 0 runs independent groups of ``block_batch`` sequences, each with its own barrier
counter. ``plan`` decides where this runs: a program's slice of the weights, [hidden_p,
gates·block_hidden], must fit the GPU's shared memory, and a group's programs must fit the SMs.

The barrier (``barrier``): ``debug_barrier`` (the program's threads have issued this step's
stores), an acq_rel ``atomic_add`` of 1 on the group's int32 counter (zero-initialised, aliased in
and out, so it only grows: after step s it reaches (s+1)·slices), a poll of the counter through
``atomic_add`` of 0 (a volatile load whose value is unused is removed by the compiler), and
``debug_barrier`` again. The kernels compile with ``num_stages=1``, so that no load is pipelined
across the barrier. The poll is bounded (``MAX_SPIN`` polls, about a second on an H100): a program
that gives up sets the error flag and stops waiting, and ``poisoned`` turns every output NaN, so a
grid that was not all resident ends in NaN instead of a hang. XLA launches the kernel without a
cooperative launch, so residency is not guaranteed: the plan keeps a launch's programs within the
SM count of the device compiled for (``common.gpu_core_count``) less ``GPU_SM_MARGIN``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxmodels.kernels.common import (
    check_block_sizes,
    compiler_params,
    dot_f32,
    gpu_core_count,
    gpu_shared_memory,
    round_up,
)

Array = jax.Array

# Programs of one launch: at most the device's SMs less this margin, for SMs that another stream,
# MPS client or the driver holds (one program uses most of an SM's shared memory, so SMs and
# programs are one to one).
GPU_SM_MARGIN = 4
# Shared memory the LSTM kernels ask for beside the weights' slice, by itemsize (bytes, measured
# by compiling for H100 and A100 with chunks of 128, the same on both: float32 forward 9 KiB,
# backward 8 KiB; bfloat16 forward 4 KiB, backward 8 KiB).
GPU_EXTRA_SHARED_MEMORY = {4: 9 * 2**10, 2: 8 * 2**10}
# float32: Triton keeps the TF32 dot's operands of the slice in registers, not shared memory, so
# registers bound hidden, by gate blocks (measured for H100 and A100 alike, the spills in the
# backward kernel: the LSTM's hidden 448 compiles, 464 spills; the simple RNN's 1840 compiles,
# 1856 spills on H100, where A100 meets its programs first, at 1664).
GPU_MAX_HIDDEN_FLOAT32 = {4: 448, 1: 1840}
GPU_NUM_WARPS = 4
# Polls of the barrier counter before a program gives up and sets the error flag.
MAX_SPIN = 2**20


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Blocks of the grid-persistent kernels, each a positive power of two.

    Attributes:
      block_batch: sequences per batch group (rows of every tile; at least 16 for Triton's dots).
      block_hidden: hidden units per program (its w_h slice is [hidden_p, 4·block_hidden]; at
        least 16 for Triton's dots).
      max_chunk: the longest piece of the contraction over hidden_p (register pressure of the
        h_{t-1} tile [block_batch, max_chunk]).
    """

    block_batch: int
    block_hidden: int
    max_chunk: int

    def __post_init__(self):
        check_block_sizes(self)

    @classmethod
    def get_default(cls) -> BlockSizes:
        """16 sequences and 16 hidden units a program, contraction pieces of at most 128."""
        return cls(block_batch=16, block_hidden=16, max_chunk=128)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the grid kernels run one shape: hidden padded to ``hidden_p`` (a multiple of
    ``block_hidden``), ``slices`` = hidden_p / block_hidden programs per batch group, at most
    ``groups_per_launch`` groups in one launch (more groups take more launches, one after
    another), and the contraction's ``chunks`` as (start, size) pairs."""

    backend: str
    block_batch: int
    block_hidden: int
    hidden_p: int
    slices: int
    groups_per_launch: int
    chunks: tuple[tuple[int, int], ...]


def chunks(hidden_p: int, max_chunk: int) -> tuple[tuple[int, int], ...]:
    """The contraction over hidden_p in power-of-two pieces of at most ``max_chunk``, largest
    first, as (start, size): 1536 -> 12 x 128; 1008 -> 7 x 128, 64, 32, 16."""
    pieces, start = [], 0
    while start < hidden_p:
        size = min(max_chunk, 1 << ((hidden_p - start).bit_length() - 1))
        pieces.append((start, size))
        start += size
    return tuple(pieces)


def shared_memory_bytes(
    hidden_p: int, dtype, block_sizes: BlockSizes | None = None, gates: int = 4
) -> int:
    """Shared memory one program asks for: its slice of the recurrent weights,
    gates·block_hidden·hidden_p·itemsize bytes (gates: 4 for the LSTM, 1 for the simple RNN),
    plus ``GPU_EXTRA_SHARED_MEMORY`` of the dtype."""
    block_sizes = block_sizes or BlockSizes.get_default()
    itemsize = jnp.dtype(dtype).itemsize
    return (
        gates * block_sizes.block_hidden * hidden_p * itemsize + GPU_EXTRA_SHARED_MEMORY[itemsize]
    )


def max_programs() -> int:
    """Programs one launch may have on the GPU compiled for: its SMs less ``GPU_SM_MARGIN``."""
    return gpu_core_count() - GPU_SM_MARGIN


def plan(
    hidden: int, dtype, backend: str, block_sizes: BlockSizes | None = None, gates: int = 4
) -> Plan | None:
    """The grid kernels' plan for ``hidden`` and ``dtype`` on ``backend`` ("interpret",
    "triton", "mosaic") for the device being compiled for, for a recurrence of ``gates`` gate
    blocks (4: LSTM; 1: simple RNN); None where they do not run.

    Triton: hidden padded to a multiple of block_hidden; it runs where one program's slice fits
    the GPU's shared memory (``shared_memory_bytes`` <= ``common.gpu_shared_memory``), in
    float32 hidden_p <= ``GPU_MAX_HIDDEN_FLOAT32[gates]`` (registers), and one batch group's
    programs fit ``max_programs``. Interpreted: always (one slice, see ``lstm_grid``). Mosaic
    (TPU): never; ``lstm_sequence`` keeps all of w_h in VMEM there.
    """
    block_sizes = block_sizes or BlockSizes.get_default()
    n = block_sizes.block_hidden
    hidden_p = round_up(hidden, n)
    slices = hidden_p // n
    pieces = chunks(hidden_p, block_sizes.max_chunk)
    if backend == "interpret":
        return Plan(backend, block_sizes.block_batch, n, hidden_p, slices, 1, pieces)
    if backend != "triton":
        return None
    programs = max_programs()
    too_big = shared_memory_bytes(hidden_p, dtype, block_sizes, gates) > gpu_shared_memory()
    if jnp.dtype(dtype) == jnp.float32:
        too_big = too_big or hidden_p > GPU_MAX_HIDDEN_FLOAT32[gates]
    if too_big or slices > programs:
        return None
    # One batch group a launch: with four groups in one launch the gradient program spilled
    # registers on H100 (hidden 512, bfloat16, batch 64), not yet understood; groups then run
    # one launch after another.
    return Plan(backend, block_sizes.block_batch, n, hidden_p, slices, 1, pieces)


def limit_text(dtype, gates: int = 4) -> str:
    """The plan's Triton limits in words, for errors."""
    itemsize = jnp.dtype(dtype).itemsize
    n = BlockSizes.get_default().block_hidden
    registers = ""
    if itemsize == 4:
        registers = f", hidden_p <= {GPU_MAX_HIDDEN_FLOAT32[gates]} (registers)"
    return (
        f"{gates}*{n}*hidden_p*{itemsize} bytes + {GPU_EXTRA_SHARED_MEMORY[itemsize]} <= "
        f"{gpu_shared_memory()} bytes of shared memory per program{registers}, and "
        f"hidden_p/{n} <= {max_programs()} programs ({gpu_core_count()} SMs less {GPU_SM_MARGIN})"
    )


def barrier(counter_ref, flag_ref, group, target, failed, triton: bool):
    """Add this program's 1 to counter_ref[group] (int32) and wait until it reaches ``target``,
    polling at most ``MAX_SPIN`` times, not at all once ``failed`` (a bool, carried by the
    caller's time loop). Returns ``failed`` or whether this wait gave up; then flag_ref[0] is set
    to 1. ``triton``: fence the program's own threads with ``debug_barrier`` (the interpreter has
    no threads and no such primitive)."""
    one, zero = jnp.ones((), jnp.int32), jnp.zeros((), jnp.int32)
    if triton:
        plgpu.debug_barrier()
    plgpu.atomic_add(counter_ref, (group,), one)

    def waiting(state):
        seen, spins = state
        return (seen < target) & (spins < MAX_SPIN) & jnp.logical_not(failed)

    def poll(state):
        return plgpu.atomic_add(counter_ref, (group,), zero), state[1] + 1

    seen, _ = lax.while_loop(waiting, poll, (plgpu.atomic_add(counter_ref, (group,), zero), 0))
    gave_up = seen < target
    plgpu.atomic_max(flag_ref, (zero,), gave_up.astype(jnp.int32))
    if triton:
        plgpu.debug_barrier()
    return failed | gave_up


def columns(hidden_p: int, n: int, gates: int = 4):
    """This program's columns (``pl.ds``) of each gate block of a [.., gates·hidden_p] array, and
    of a [.., hidden_p] one: n units from p·n, p the program's index along grid axis 1."""
    p = pl.program_id(1)
    return [pl.ds(k * hidden_p + p * n, n) for k in range(gates)], pl.ds(p * n, n)


def contract(read, weights, pieces, dtype, upcast, acc):
    """acc[k] + Σ_j read(k, start_j, size_j) w_j[k] for each gate k, the chunks' (start_j,
    size_j) in order: read gives [rows, size_j] (cast to ``dtype``), weights[j][k] is [size_j, n],
    each product accumulated in float32 (``common.dot_f32``)."""
    for (start, size), w_j in zip(pieces, weights):
        for k in range(len(w_j)):
            acc[k] = acc[k] + dot_f32(read(k, start, size).astype(dtype), w_j[k], upcast)
    return acc


def call(kernel, plan: Plan, groups: int, in_specs, out_specs, out_shape, args, name: str):
    """One launch of ``kernel`` (named ``name``) over ``groups`` batch groups, grid (groups,
    plan.slices), with ``num_stages=1``: ``pl.pallas_call`` of the given specs and shapes, with
    the barrier counter [groups] and the error flag [1] (int32) appended to the inputs and the
    outputs, zero-initialised and aliased. Returns the outputs, the counter and the flag last."""
    n_in = len(args)
    state = [jnp.zeros((groups,), jnp.int32), jnp.zeros((1,), jnp.int32)]
    whole = lambda shape: pl.BlockSpec(shape, lambda g, p: (0,) * len(shape))
    interpret = plan.backend == "interpret"
    return pl.pallas_call(
        kernel,
        grid=(groups, plan.slices),
        in_specs=[*in_specs, whole((groups,)), whole((1,))],
        out_specs=[*out_specs, whole((groups,)), whole((1,))],
        out_shape=[
            *out_shape,
            jax.ShapeDtypeStruct((groups,), jnp.int32),
            jax.ShapeDtypeStruct((1,), jnp.int32),
        ],
        input_output_aliases={n_in: len(out_shape), n_in + 1: len(out_shape) + 1},
        interpret=interpret,
        name=name,
        compiler_params=compiler_params(plan.backend, num_warps=GPU_NUM_WARPS, num_stages=1),
    )(*args, *state)


def specs(time: int, rows: int):
    """BlockSpec makers for group g's rows of [time, batch, width] arrays and of [batch, width]
    ones (all of time and width in the block)."""
    seq = lambda width: pl.BlockSpec((time, rows, width), lambda g, p: (0, g, 0))
    state = lambda width: pl.BlockSpec((rows, width), lambda g, p: (g, 0))
    return seq, state


def launches(batch_p: int, plan: Plan):
    """(first row, groups) of each launch over batch_p rows, in order: at most
    ``plan.groups_per_launch`` groups of ``plan.block_batch`` rows each."""
    groups = batch_p // plan.block_batch
    step = plan.groups_per_launch
    return [(g * plan.block_batch, min(step, groups - g)) for g in range(0, groups, step)]


def poisoned(flags, tree):
    """``tree`` (float arrays) with every element NaN where any of the launches' error ``flags``
    ([1] int32 each) is set."""
    bad = sum(jnp.sum(f) for f in flags) > 0
    return jax.tree.map(lambda a: jnp.where(bad, jnp.nan, a).astype(a.dtype), tree)
