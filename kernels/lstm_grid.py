"""The LSTM and simple-RNN recurrences in one launch across many SMs: each program keeps a slice
of w_h on chip.

A grid-persistent kernel (``kernels.grid``) for recurrent layers too large for one program's
shared memory (``lstm_sequence``): program p of a batch group owns hidden units [p·n, (p+1)·n)
(n = ``block_hidden``), loads its columns of w_h for each of the G gate blocks, [hidden_p, G·n],
once, and keeps them in shared memory for the whole sequence. Each step it reads all of h_{t-1}
from the carried-h buffer (row s-1 of ``h_carry``: a fresh row per step, so nothing read is
overwritten), computes its gates and the cell's step in float32, writes its slice of h_t to row s
and waits at the grid barrier. The backward kernel is the same with w_hᵀ: program p keeps the
rows of w_h for its units, each step reads all of the previous step's δgates (again a fresh row
per step) for its slice of δh, writes its slice of δgates and waits. δw_h = Σ_t h_{t-1}ᵀ δgates_t
is one matmul outside, as in ``lstm_sequence``.

One kernel body serves both cells (``common.Cell``): the LSTM (``lstm_grid``; G = 4 gates i, f,
g, o, and C carried in float32 beside h: C_t = σ(f)⊙C_{t-1} + σ(i)⊙tanh(g), h_t = σ(o)⊙tanh(C_t))
and the simple RNN (``rnn_grid``; G = 1, h_t = f(pre) for f a name in ``common.ACTIVATIONS``,
no C: its refs are absent, ``common.with_absent``).

Numerics: the pre-activations are x_t + Σ_j h_{t-1}[:, chunk j] w_h[chunk j, :], the chunks the
power-of-two pieces of hidden_p (``grid.chunks``), added in order in float32; h is carried in
x_proj's dtype (it enters the matmul in that dtype either way) and C in float32.
``lstm_grid_reference`` and ``rnn_grid_reference`` compute exactly these partial sums in jnp.
Interpreted, programs run one at a time, so a barrier among several never completes: there the
kernel takes one slice only (``block_hidden`` >= hidden).

Not yet run on a device: ``lstm_scan`` and ``rnn_scan`` take it only under impl="pallas".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxmodels.kernels import grid
from jaxmodels.kernels.common import (
    LSTM,
    Cell,
    check_sequence_operands,
    dot_f32,
    kept,
    on_platforms,
    pad_gates,
    pad_to,
    rnn_cell,
    round_up,
    target_device_kind,
    target_platform,
    un_pad_gates,
    with_absent,
)
from jaxmodels.kernels.grid import BlockSizes, Plan, chunks, limit_text, plan

Array = jax.Array


def _forward_kernel(
    xp_ref, w_ref, h0_ref, c0_ref, len_ref, _counter_in, _flag_in,
    hcarry_ref, c_ref, acts_ref, cprev_ref, counter_ref, flag_ref,
    *, cell, pieces, n, reverse, save_residuals, backend,
):  # fmt: skip
    """xp [time, rows, GH] (time order; G = cell.gates), w [H, GH], h0 [rows, H] (x dtype), c0
    [rows, H], lengths [rows, 1] -> h_carry [time, rows, H] (x dtype; row s: the carry after the
    s-th step taken), c [rows, H] (float32, final), and with save_residuals the cell's activated
    gates acts [time, rows, GH] and cprev [time, rows, H] (float32, time order); counter [groups]
    and flag [1] int32 (aliased). The C refs are None for a cell without C (the RNN)."""
    time, _, hidden_p = hcarry_ref.shape
    g = cell.gates
    group = pl.program_id(0)
    cols, own = grid.columns(hidden_p, n, g)
    weights = [[w_ref[pl.ds(start, size), cols[k]] for k in range(g)] for start, size in pieces]
    lengths = len_ref[...]
    triton, upcast = backend == "triton", backend == "interpret"
    programs = pl.num_programs(1)

    def step(s, carry):
        c, failed = carry
        t = time - 1 - s if reverse else s
        prev = jnp.maximum(s - 1, 0)
        h_in = lambda width: jnp.where(s == 0, h0_ref[:, width], hcarry_ref[prev, :, width])
        pre = [xp_ref[t, :, cols[k]].astype(jnp.float32) for k in range(g)]
        pre = grid.contract(
            lambda k, start, size: h_in(pl.ds(start, size)),
            weights, pieces, w_ref.dtype, upcast, pre,
        )  # fmt: skip
        new_h, new_c, acts = cell.forward(pre, c)
        keep = t < lengths
        hcarry_ref[s, :, own] = jnp.where(keep, new_h.astype(hcarry_ref.dtype), h_in(own))
        if save_residuals:
            for k, a in enumerate(acts):
                acts_ref[t, :, cols[k]] = a
            if cell.has_c:
                cprev_ref[t, :, own] = c
        failed = grid.barrier(counter_ref, flag_ref, group, (s + 1) * programs, failed, triton)
        return kept(keep, new_c, c), failed

    c0 = c0_ref[:, own].astype(jnp.float32) if cell.has_c else None
    c, _ = lax.fori_loop(0, time, step, (c0, False))
    if cell.has_c:
        c_ref[:, own] = c


def _backward_kernel(
    dhs_ref, dh_ref, dc_ref, acts_ref, cprev_ref, wt_ref, len_ref, _counter_in, _flag_in,
    dgates_ref, dh0_ref, dc0_ref, counter_ref, flag_ref,
    *, cell, pieces, n, reverse, backend,
):  # fmt: skip
    """The reverse-time recurrence: dhs [time, rows, H] (f32), dh/dc [rows, H] (final carry's
    gradients), acts [time, rows, GH], cprev [time, rows, H], wt [H, GH] (gate block k: w_h's
    block kᵀ), lengths -> dgates [time, rows, GH] (f32, a fresh row per step, read by every
    program after the barrier), dc0 [rows, H] and dh0 [rows, H] before its last term (the last
    step's δgates w_hᵀ, one matmul outside); the C refs None for a cell without C.
    ``reverse``: the forward's direction."""
    time, _, width = dgates_ref.shape
    g = cell.gates
    hidden_p = width // g
    group = pl.program_id(0)
    cols, own = grid.columns(hidden_p, n, g)
    weights = [[wt_ref[pl.ds(start, size), cols[k]] for k in range(g)] for start, size in pieces]
    lengths = len_ref[...]
    triton, upcast = backend == "triton", backend == "interpret"
    programs = pl.num_programs(1)

    def from_later(row):
        """δh_{t} of this program's units from all of row's δgates: Σ_k δgates_k w_h,kᵀ."""
        zero = jnp.zeros((dh_ref.shape[0], n), jnp.float32)
        acc = grid.contract(
            lambda k, start, size: dgates_ref[row, :, pl.ds(k * hidden_p + start, size)],
            weights, pieces, wt_ref.dtype, upcast, [zero] * g,
        )  # fmt: skip
        return sum(acc[1:], acc[0])

    def step(s, carry):
        dh_next, dc_next, failed = carry
        t = s if reverse else time - 1 - s
        later = t - 1 if reverse else t + 1  # the step taken just before this one
        row = jnp.clip(later, 0, time - 1)
        dh_next = jnp.where((s > 0) & (later < lengths), from_later(row), dh_next)
        dh = dhs_ref[t, :, own].astype(jnp.float32) + dh_next
        acts = [acts_ref[t, :, cols[k]] for k in range(g)]
        c_in = cprev_ref[t, :, own] if cell.has_c else None
        dgates, dc_prev = cell.backward(dh, dc_next, acts, c_in)
        keep = t < lengths
        for k, d in enumerate(dgates):
            dgates_ref[t, :, cols[k]] = jnp.where(keep, d, 0)
        failed = grid.barrier(counter_ref, flag_ref, group, (s + 1) * programs, failed, triton)
        return dh_next, kept(keep, dc_prev, dc_next), failed

    dc_in = dc_ref[:, own].astype(jnp.float32) if cell.has_c else None
    dh_next, dc_next, _ = lax.fori_loop(
        0, time, step, (dh_ref[:, own].astype(jnp.float32), dc_in, False)
    )
    dh0_ref[:, own] = dh_next  # the wrapper adds the first step's δgates w_hᵀ where it was taken
    if cell.has_c:
        dc0_ref[:, own] = dc_next


def _forward(x_proj, w_h, carry, lengths, reverse, plan: Plan, cell: Cell, save_residuals):
    """Padded operands through the forward kernel, launch by launch. Returns (final carry, hs
    [time, batch, hidden]) and the residuals (acts [time_p, batch_p, G*hidden_p] float32, hprev
    [time_p, batch_p, hidden_p] in time order, the padded lengths, and with C cprev [time_p,
    batch_p, hidden_p] float32)."""
    time, batch, width = x_proj.shape
    g, has_c = cell.gates, cell.has_c
    hidden, hidden_p, rows = width // g, plan.hidden_p, plan.block_batch
    time_p, batch_p = max(time, 2), round_up(batch, rows)  # a one-step loop is unrolled: 2 steps
    xp = pad_to(pad_gates(x_proj, hidden_p, g), (time_p, batch_p, g * hidden_p))
    w = pad_gates(pad_to(w_h, (hidden_p, width)), hidden_p, g)
    carry_p = [pad_to(a, (batch_p, hidden_p)) for a in carry]
    lens = pad_to(lengths, (batch_p,)).reshape(batch_p, 1)  # padded rows and steps are masked
    seq, state = grid.specs(time_p, rows)
    f32, dtype = jnp.float32, x_proj.dtype
    kernel = functools.partial(
        _forward_kernel, cell=cell, pieces=plan.chunks, n=plan.block_hidden, reverse=reverse,
        save_residuals=save_residuals, backend=plan.backend,
    )  # fmt: skip
    saved = (save_residuals, save_residuals and has_c)
    present = (True, True, True, has_c, True, True, True, True, has_c, *saved, True, True)
    kernel = functools.partial(with_absent, kernel, present)
    out_specs = [seq(hidden_p)] + [state(hidden_p)] * has_c
    if save_residuals:
        out_specs += [seq(g * hidden_p)] + [seq(hidden_p)] * has_c
    weights = pl.BlockSpec((hidden_p, g * hidden_p), lambda g_, p: (0, 0))
    in_specs = [seq(g * hidden_p), weights, *[state(hidden_p)] * len(carry), state(1)]
    outs, flags = [], []
    for first, groups in grid.launches(batch_p, plan):
        part = lambda a: a[..., first : first + groups * rows, :]
        out_shape = [jax.ShapeDtypeStruct((time_p, groups * rows, hidden_p), dtype)]
        out_shape += [jax.ShapeDtypeStruct((groups * rows, hidden_p), f32)] * has_c
        if save_residuals:
            out_shape += [jax.ShapeDtypeStruct((time_p, groups * rows, g * hidden_p), f32)]
            out_shape += [jax.ShapeDtypeStruct((time_p, groups * rows, hidden_p), f32)] * has_c
        *result, _, flag = grid.call(
            kernel, plan, groups, in_specs, out_specs, out_shape,
            (part(xp), w, *map(part, carry_p), part(lens)), f"{cell.name}_grid_forward",
        )  # fmt: skip
        outs.append(result)
        flags.append(flag)
    joined = [jnp.concatenate(parts, axis=-2) for parts in zip(*outs)]
    h_carry = joined[0]  # in the order the steps were taken
    ordered = jnp.flip(h_carry, 0) if reverse else h_carry
    hs = jnp.where(jnp.arange(time_p)[:, None, None] < lens[None], ordered, 0)[:time, :batch]
    final = (h_carry[-1][:batch, :hidden],)
    if has_c:
        final += (joined[1][:batch, :hidden].astype(dtype),)
    (final, hs) = grid.poisoned(flags, (final, hs[..., :hidden]))
    residuals = None
    if save_residuals:
        taken = jnp.concatenate([carry_p[0][None], h_carry[:-1]])  # h entering each step taken
        hprev = jnp.flip(taken, 0) if reverse else taken
        residuals = (joined[1 + has_c], hprev, lens, *joined[2 + has_c :])
    return final, hs, residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _grid(x_proj, w_h, carry, lengths, reverse, plan, cell):
    carry, hs, _ = _forward(x_proj, w_h, carry, lengths, reverse, plan, cell, False)
    return carry, hs


def _grid_fwd(x_proj, w_h, carry, lengths, reverse, plan, cell):
    carry, hs, residuals = _forward(x_proj, w_h, carry, lengths, reverse, plan, cell, True)
    return (carry, hs), (w_h, residuals)


def _grid_bwd(reverse, plan, cell, saved, cotangents):
    w_h, (acts, hprev, lens, *cprev) = saved
    dcarry, dhs = cotangents
    time, batch, hidden = dhs.shape
    time_p, batch_p, hidden_p = hprev.shape
    g, has_c, rows = cell.gates, cell.has_c, plan.block_batch
    w_p = pad_gates(pad_to(w_h, (hidden_p, w_h.shape[1])), hidden_p, g)  # [hidden_p, G*hidden_p]
    wt = w_p.reshape(hidden_p, g, hidden_p).transpose(2, 1, 0).reshape(hidden_p, g * hidden_p)
    f32 = jnp.float32
    dhs_p = pad_to(dhs.astype(f32), (time_p, batch_p, hidden_p))
    dcarry_p = [pad_to(d.astype(f32), (batch_p, hidden_p)) for d in dcarry]
    seq, state = grid.specs(time_p, rows)
    kernel = functools.partial(
        _backward_kernel, cell=cell, pieces=plan.chunks, n=plan.block_hidden, reverse=reverse,
        backend=plan.backend,
    )  # fmt: skip
    present = (True, True, has_c, True, has_c, True, True, True, True, True, True, has_c)
    kernel = functools.partial(with_absent, kernel, (*present, True, True))
    in_specs = [seq(hidden_p), *[state(hidden_p)] * len(dcarry), seq(g * hidden_p)]
    in_specs += [seq(hidden_p)] * has_c
    in_specs += [pl.BlockSpec((hidden_p, g * hidden_p), lambda g_, p: (0, 0)), state(1)]
    out_specs = [seq(g * hidden_p)] + [state(hidden_p)] * len(dcarry)
    outs, flags = [], []
    for first, groups in grid.launches(batch_p, plan):
        part = lambda a: a[..., first : first + groups * rows, :]
        out_shape = [jax.ShapeDtypeStruct((time_p, groups * rows, g * hidden_p), f32)]
        out_shape += [jax.ShapeDtypeStruct((groups * rows, hidden_p), f32)] * len(dcarry)
        args = (part(dhs_p), *map(part, dcarry_p), part(acts), *map(part, cprev), wt, part(lens))
        *result, _, flag = grid.call(
            kernel, plan, groups, in_specs, out_specs, out_shape, args, f"{cell.name}_grid_backward"
        )
        outs.append(result)
        flags.append(flag)
    dgates_p, dh0, *dc0 = (jnp.concatenate(parts, axis=-2) for parts in zip(*outs))
    first = time_p - 1 if reverse else 0  # the step taken last
    upcast = plan.backend == "interpret"
    last = dot_f32(dgates_p[first].astype(w_h.dtype), w_p.T, upcast)  # Σ_k δgates_k w_h,kᵀ
    dh0 = jnp.where(first < lens, last, dh0)
    dtype = w_h.dtype
    dw_h = jnp.einsum("tbh,tbg->hg", hprev.astype(f32), dgates_p)
    dw_h = un_pad_gates(dw_h[:hidden], hidden, g).astype(dtype)
    dgates = un_pad_gates(dgates_p[:time, :batch], hidden, g).astype(dtype)
    unpad = lambda a: a[:batch, :hidden].astype(dtype)
    grads = (dgates, dw_h, tuple(map(unpad, (dh0, *dc0))))
    return (*grid.poisoned(flags, grads), None)


_grid.defvjp(_grid_fwd, _grid_bwd)


def grid_kernel(
    backend: str,
    hidden: int,
    dtype,
    reverse: bool,
    block_sizes: BlockSizes | None = None,
    cell: Cell = LSTM,
):
    """The grid kernels of ``cell``'s recurrence on ``backend`` as one differentiable function
    ``(x_proj, w_h, *carry, lengths) -> (carry, hs)``, the carry (h, c) for the LSTM and (h,)
    for the RNN, or None where they do not run (``plan``; interpreted, also where hidden takes
    more than one slice, whose barrier the interpreter cannot complete)."""
    kernel_plan = plan(hidden, dtype, backend, block_sizes, gates=cell.gates)
    if kernel_plan is None or (backend == "interpret" and kernel_plan.slices > 1):
        return None
    return planned_kernel(kernel_plan, reverse, cell)


def planned_kernel(kernel_plan: Plan, reverse: bool, cell: Cell = LSTM):
    """The grid kernels following ``kernel_plan`` as it is, unchecked (for compile tests past
    the plan's limits, and interpreted over several slices, where every barrier gives up):
    ``(x_proj, w_h, *carry, lengths) -> (carry, hs)``, differentiable."""
    run = functools.partial(_grid, reverse=reverse, plan=kernel_plan, cell=cell)
    return lambda x_proj, w_h, *rest: run(x_proj, w_h, tuple(rest[:-1]), rest[-1])


def lstm_grid(
    x_proj: Array,
    w_h: Array,
    initial_carry: tuple[Array, Array],
    seq_lengths: Array | None = None,
    *,
    reverse: bool = False,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> tuple[tuple[Array, Array], Array]:
    """Run the LSTM recurrence with w_h split over a grid of programs that meet at a barrier
    every step (see the module's docstring).

    Args:
      x_proj: [time, batch, 4*hidden], x_t W_x + b (gates i, f, g, o), float32 or bfloat16.
      w_h: [hidden, 4*hidden], same dtype.
      initial_carry: (h_0, c_0), each [batch, hidden].
      seq_lengths: [batch] integers in [0, time], or None for full length.
      reverse: walk time from the last step to the first.
      block_sizes: ``BlockSizes``; default ``BlockSizes.get_default()``.
      interpret: True to interpret everywhere; None interprets on CPU only.
    Returns:
      ((h_T, c_T), hs) with h_T, c_T [batch, hidden] and hs [time, batch, hidden], in x_proj's
      dtype: C_t = σ(f)⊙C_{t-1} + σ(i)⊙tanh(g), h_t = σ(o)⊙tanh(C_t) over the gates
      x_t + h_{t-1} w_h (``lstm_grid_reference``); all NaN where a barrier gave up.
    Raises:
      ValueError where the plan refuses (on GPU: a slice of w_h over shared memory, or more
      programs than SMs; on TPU always) or, interpreted, where hidden takes more than one slice
      (the interpreter runs programs one at a time, so a barrier among several never completes).
    """
    check_sequence_operands(x_proj, w_h, initial_carry, seq_lengths)
    return _run(LSTM, x_proj, w_h, initial_carry, seq_lengths, reverse, block_sizes, interpret)


def rnn_grid(
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
    """Run the simple RNN's recurrence h_t = f(x_t + h_{t-1} w_h) with w_h's columns split over
    a grid of programs that meet at a barrier every step (the LSTM's kernels with
    ``common.rnn_cell(activation)``: one gate block, no C).

    Args:
      x_proj: [time, batch, hidden], x_t W_x + b, float32 or bfloat16.
      w_h: [hidden, hidden], same dtype.
      h0: [batch, hidden].
      seq_lengths: [batch] integers in [0, time], or None for full length.
      activation: f, a name in ``common.ACTIVATIONS`` ('identity', 'relu', 'tanh', 'sigmoid').
      reverse, block_sizes, interpret: as for ``lstm_grid``.
    Returns:
      (h_T, hs) with h_T [batch, hidden] and hs [time, batch, hidden] in x_proj's dtype: f of
      x_t + Σ_j h_{t-1}[:, chunk j] w_h[chunk j, :] in float32, h carried in x_proj's dtype
      (``rnn_grid_reference``); all NaN where a barrier gave up.
    Raises:
      ValueError for an unknown activation and where the plan refuses, as ``lstm_grid``.
    """
    cell = rnn_cell(activation)
    check_sequence_operands(x_proj, w_h, (h0,), seq_lengths, gates=1)
    (h,), hs = _run(cell, x_proj, w_h, (h0,), seq_lengths, reverse, block_sizes, interpret)
    return h, hs


def _run(cell, x_proj, w_h, initial_carry, seq_lengths, reverse, block_sizes, interpret):
    """The grid kernels of ``cell`` on the platform lowered for (validated operands); raise
    where the plan of the target platform refuses; another platform's branch where it refuses
    runs the reference."""
    time, batch, width = x_proj.shape
    hidden, dtype = width // cell.gates, x_proj.dtype
    platform = "interpret" if interpret else target_platform()
    if grid_kernel(platform, hidden, dtype, reverse, block_sizes, cell) is None:
        raise ValueError(_refusal(platform, hidden, dtype, block_sizes, cell))
    if seq_lengths is None:
        seq_lengths = jnp.full((batch,), time, jnp.int32)
    carry = [a.astype(dtype) for a in initial_carry]
    args = (x_proj, w_h, *carry, jnp.asarray(seq_lengths, jnp.int32))

    def branch(backend):
        kernel = grid_kernel(backend, hidden, dtype, reverse, block_sizes, cell)
        if kernel is None:  # another platform than the target's, lowered beside it
            return functools.partial(
                _reference_kernel, cell=cell, reverse=reverse, block_sizes=block_sizes
            )
        return kernel

    return on_platforms(branch, interpret, *args)


def _reference_kernel(x_proj, w_h, *carry_and_lengths, cell, reverse, block_sizes):
    """``_grid_reference`` as a kernel function (x_proj, w_h, *carry, lengths)."""
    *carry, lengths = carry_and_lengths
    return _grid_reference(cell, x_proj, w_h, carry, lengths, reverse, block_sizes)


def _refusal(platform: str, hidden: int, dtype, block_sizes, cell: Cell) -> str:
    name = "lstm" if cell.has_c else "rnn"
    if platform == "interpret":
        n = (block_sizes or BlockSizes.get_default()).block_hidden
        return (
            f"expected hidden <= block_hidden={n} when interpreted (one program: the interpreter "
            f"runs programs one at a time, so a barrier among several never completes), got "
            f"hidden={hidden}; {name}_grid_reference computes the same sums"
        )
    other = "lstm_sequence" if cell.has_c else "lstm_sequence.rnn_sequence"
    if platform == "mosaic":
        return f"expected a GPU: on TPU {other} keeps all of w_h in VMEM"
    instead = "use lstm_stepwise" if cell.has_c else "use rnn_scan(impl='scan')"
    return (
        f"expected the grid kernel to fit {target_device_kind()} "
        f"({limit_text(dtype, cell.gates)}), got hidden={hidden} in {jnp.dtype(dtype).name}; "
        f"{instead}"
    )


def _grid_reference(cell, x_proj, w_h, initial_carry, seq_lengths, reverse, block_sizes):
    """``lstm_grid_reference`` and ``rnn_grid_reference`` for ``cell``: (x_proj, w_h, carry
    (h_0, c_0) or (h_0,), lengths or None) -> (carry at T, hs)."""
    time, batch, width = x_proj.shape
    g = cell.gates
    hidden = width // g
    block_sizes = block_sizes or BlockSizes.get_default()
    hidden_p = round_up(hidden, block_sizes.block_hidden)
    pieces = chunks(hidden_p, block_sizes.max_chunk)
    w = pad_gates(pad_to(w_h, (hidden_p, width)), hidden_p, g)
    lengths = jnp.full((batch,), time) if seq_lengths is None else jnp.asarray(seq_lengths)
    dtype = x_proj.dtype

    def step(carry, inputs):
        h, c = carry
        x_t, t = inputs
        pre = pad_gates(x_t, hidden_p, g).astype(jnp.float32)
        for start, size in pieces:
            pre = pre + dot_f32(h[:, start : start + size], w[start : start + size], upcast=True)
        blocks = [pre[:, k * hidden_p : k * hidden_p + hidden] for k in range(g)]
        new_h, new_c, _ = cell.forward(blocks, c)
        new_h = new_h.astype(dtype)
        keep = (t < lengths)[:, None]
        out = jnp.where(keep, new_h, 0)
        h_next = pad_to(jnp.where(keep, new_h, h[:, :hidden]), (batch, hidden_p))
        return (h_next, kept(keep, new_c, c)), out

    h0 = pad_to(initial_carry[0].astype(dtype), (batch, hidden_p))
    c0 = initial_carry[1].astype(jnp.float32) if cell.has_c else None
    (h, c), hs = lax.scan(step, (h0, c0), (x_proj, jnp.arange(time)), reverse=reverse)
    return ((h[:, :hidden], c.astype(dtype)) if cell.has_c else (h[:, :hidden],)), hs


def lstm_grid_reference(
    x_proj: Array,
    w_h: Array,
    initial_carry: tuple[Array, Array],
    seq_lengths: Array | None = None,
    *,
    reverse: bool = False,
    block_sizes: BlockSizes | None = None,
) -> tuple[tuple[Array, Array], Array]:
    """The grid kernel's sums in plain jnp (same arguments and results as ``lstm_grid``): each
    step's gates x_t + Σ_j h_{t-1}[:, chunk j] w_h[chunk j, :] with the plan's chunks of hidden_p
    (``chunks``) added in order in float32 (every program's columns at once: a column's sum does
    not depend on the others), h carried in x_proj's dtype and C in float32."""
    check_sequence_operands(x_proj, w_h, initial_carry, seq_lengths)
    return _grid_reference(LSTM, x_proj, w_h, initial_carry, seq_lengths, reverse, block_sizes)


def rnn_grid_reference(
    x_proj: Array,
    w_h: Array,
    h0: Array,
    seq_lengths: Array | None = None,
    *,
    activation: str = "tanh",
    reverse: bool = False,
    block_sizes: BlockSizes | None = None,
) -> tuple[Array, Array]:
    """The RNN grid kernel's sums in plain jnp (same arguments and results as ``rnn_grid``):
    h_t = f(x_t + Σ_j h_{t-1}[:, chunk j] w_h[chunk j, :]), the chunks of hidden_p added in
    order in float32, h carried in x_proj's dtype."""
    check_sequence_operands(x_proj, w_h, (h0,), seq_lengths, gates=1)
    cell = rnn_cell(activation)
    (h,), hs = _grid_reference(cell, x_proj, w_h, (h0,), seq_lengths, reverse, block_sizes)
    return h, hs
