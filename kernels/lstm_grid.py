"""The LSTM recurrence in one launch across many SMs: each program keeps a slice of w_h on chip.

A grid-persistent kernel (``kernels.grid``) for recurrent layers too large for one program's
shared memory (``lstm_sequence``): program p of a batch group owns hidden units [p·n, (p+1)·n)
(n = ``block_hidden``), loads its columns of w_h for the four gates, [hidden_p, 4n], once, and
keeps them in shared memory for the whole sequence. Each step it reads all of h_{t-1} from the
carried-h buffer (row s-1 of ``h_carry``: a fresh row per step, so nothing read is overwritten),
computes its gates and C in float32, writes its slice of h_t to row s and waits at the grid
barrier. The backward kernel is the same with w_hᵀ: program p keeps the rows of w_h for its
units, each step reads all of the previous step's δgates (again a fresh row per step) for its
slice of δh, writes its slice of δgates and waits. δw_h = Σ_t h_{t-1}ᵀ δgates_t is one matmul
outside, as in ``lstm_sequence``.

Numerics: the gates are x_t + Σ_j h_{t-1}[:, chunk j] w_h[chunk j, :], the chunks the power-of-two
pieces of hidden_p (``grid.chunks``), added in order in float32; h is carried in x_proj's dtype
(it enters the matmul in that dtype either way) and C in float32. ``lstm_grid_reference`` computes
exactly these partial sums in jnp. Interpreted, programs run one at a time, so a barrier among
several never completes: there the kernel takes one slice only (``block_hidden`` >= hidden).

Not yet run on a device: ``lstm_scan`` takes it only under impl="pallas".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxmodels.kernels import grid
from jaxmodels.kernels.common import (
    check_sequence_operands,
    dot_f32,
    lstm_gate_gradients,
    on_platforms,
    pad_gates,
    pad_to,
    round_up,
    sigmoid,
    target_device_kind,
    target_platform,
    un_pad_gates,
)
from jaxmodels.kernels.grid import BlockSizes, Plan, chunks, limit_text, plan

Array = jax.Array


def _forward_kernel(
    xp_ref, w_ref, h0_ref, c0_ref, len_ref, _counter_in, _flag_in,
    hcarry_ref, c_ref, acts_ref, cprev_ref, counter_ref, flag_ref,
    *, pieces, n, reverse, save_residuals, backend,
):  # fmt: skip
    """xp [time, rows, 4H] (time order), w [H, 4H], h0 [rows, H] (x dtype), c0 [rows, H], lengths
    [rows, 1] -> h_carry [time, rows, H] (x dtype; row s: the carry after the s-th step taken),
    c [rows, H] (float32, final), and with save_residuals acts [time, rows, 4H] and cprev [time,
    rows, H] (float32, time order); counter [groups] and flag [1] int32 (aliased)."""
    time, _, hidden_p = hcarry_ref.shape
    group = pl.program_id(0)
    cols, own = grid.columns(hidden_p, n)
    weights = [[w_ref[pl.ds(start, size), cols[k]] for k in range(4)] for start, size in pieces]
    lengths = len_ref[...]
    triton, upcast = backend == "triton", backend == "interpret"
    programs = pl.num_programs(1)

    def step(s, carry):
        c, failed = carry
        t = time - 1 - s if reverse else s
        prev = jnp.maximum(s - 1, 0)
        h_in = lambda width: jnp.where(s == 0, h0_ref[:, width], hcarry_ref[prev, :, width])
        pre = [xp_ref[t, :, cols[k]].astype(jnp.float32) for k in range(4)]
        pre = grid.contract(
            lambda k, start, size: h_in(pl.ds(start, size)),
            weights, pieces, w_ref.dtype, upcast, pre,
        )  # fmt: skip
        i, f, g, o = sigmoid(pre[0]), sigmoid(pre[1]), jnp.tanh(pre[2]), sigmoid(pre[3])
        new_c = f * c + i * g
        new_h = o * jnp.tanh(new_c)
        keep = t < lengths
        hcarry_ref[s, :, own] = jnp.where(keep, new_h.astype(hcarry_ref.dtype), h_in(own))
        if save_residuals:
            for k, a in enumerate((i, f, g, o)):
                acts_ref[t, :, cols[k]] = a
            cprev_ref[t, :, own] = c
        failed = grid.barrier(counter_ref, flag_ref, group, (s + 1) * programs, failed, triton)
        return jnp.where(keep, new_c, c), failed

    c, _ = lax.fori_loop(0, time, step, (c0_ref[:, own].astype(jnp.float32), False))
    c_ref[:, own] = c


def _backward_kernel(
    dhs_ref, dh_ref, dc_ref, acts_ref, cprev_ref, wt_ref, len_ref, _counter_in, _flag_in,
    dgates_ref, dh0_ref, dc0_ref, counter_ref, flag_ref,
    *, pieces, n, reverse, backend,
):  # fmt: skip
    """The reverse-time recurrence: dhs [time, rows, H] (f32), dh/dc [rows, H] (final carry's
    gradients), acts [time, rows, 4H], cprev [time, rows, H], wt [H, 4H] (gate block k: w_h's
    block kᵀ), lengths -> dgates [time, rows, 4H] (f32, a fresh row per step, read by every
    program after the barrier), dc0 [rows, H] and dh0 [rows, H] before its last term (the last
    step's δgates w_hᵀ, one matmul outside). ``reverse``: the forward's direction."""
    time, _, gates = dgates_ref.shape
    hidden_p = gates // 4
    group = pl.program_id(0)
    cols, own = grid.columns(hidden_p, n)
    weights = [[wt_ref[pl.ds(start, size), cols[k]] for k in range(4)] for start, size in pieces]
    lengths = len_ref[...]
    triton, upcast = backend == "triton", backend == "interpret"
    programs = pl.num_programs(1)

    def from_later(row):
        """δh_{t} of this program's units from all of row's δgates: Σ_k δgates_k w_h,kᵀ."""
        zero = jnp.zeros((dh_ref.shape[0], n), jnp.float32)
        acc = grid.contract(
            lambda k, start, size: dgates_ref[row, :, pl.ds(k * hidden_p + start, size)],
            weights, pieces, wt_ref.dtype, upcast, [zero] * 4,
        )  # fmt: skip
        return sum(acc[1:], acc[0])

    def step(s, carry):
        dh_next, dc_next, failed = carry
        t = s if reverse else time - 1 - s
        later = t - 1 if reverse else t + 1  # the step taken just before this one
        row = jnp.clip(later, 0, time - 1)
        dh_next = jnp.where((s > 0) & (later < lengths), from_later(row), dh_next)
        dh = dhs_ref[t, :, own].astype(jnp.float32) + dh_next
        acts = [acts_ref[t, :, cols[k]] for k in range(4)]
        dgates, dc_prev = lstm_gate_gradients(dh, dc_next, acts, cprev_ref[t, :, own])
        keep = t < lengths
        for k, d in enumerate(dgates):
            dgates_ref[t, :, cols[k]] = jnp.where(keep, d, 0)
        failed = grid.barrier(counter_ref, flag_ref, group, (s + 1) * programs, failed, triton)
        return dh_next, jnp.where(keep, dc_prev, dc_next), failed

    carry = (dh_ref[:, own].astype(jnp.float32), dc_ref[:, own].astype(jnp.float32), False)
    dh_next, dc_next, _ = lax.fori_loop(0, time, step, carry)
    dh0_ref[:, own] = dh_next  # the wrapper adds the first step's δgates w_hᵀ where it was taken
    dc0_ref[:, own] = dc_next


def _forward(x_proj, w_h, h0, c0, lengths, reverse, plan: Plan, save_residuals):
    """Padded operands through the forward kernel, launch by launch. Returns ((h_T, c_T), hs
    [time, batch, hidden]) and the residuals (acts, cprev [time_p, batch_p, ..] float32, hprev
    [time_p, batch_p, hidden_p] in time order, the padded lengths)."""
    time, batch, gates = x_proj.shape
    hidden, hidden_p, rows = gates // 4, plan.hidden_p, plan.block_batch
    time_p, batch_p = max(time, 2), round_up(batch, rows)  # a one-step loop is unrolled: 2 steps
    xp = pad_to(pad_gates(x_proj, hidden_p), (time_p, batch_p, 4 * hidden_p))
    w = pad_gates(pad_to(w_h, (hidden_p, gates)), hidden_p)
    h0p, c0p = pad_to(h0, (batch_p, hidden_p)), pad_to(c0, (batch_p, hidden_p))
    lens = pad_to(lengths, (batch_p,)).reshape(batch_p, 1)  # padded rows and steps are masked
    seq, state = grid.specs(time_p, rows)
    f32, dtype = jnp.float32, x_proj.dtype
    kernel = functools.partial(
        _forward_kernel, pieces=plan.chunks, n=plan.block_hidden, reverse=reverse,
        save_residuals=save_residuals, backend=plan.backend,
    )  # fmt: skip
    out_specs = [seq(hidden_p), state(hidden_p)]
    if save_residuals:
        out_specs += [seq(4 * hidden_p), seq(hidden_p)]
    else:  # the residual refs are then absent
        kernel = functools.partial(_without_residuals, kernel)
    outs, flags = [], []
    for first, groups in grid.launches(batch_p, plan):
        part = lambda a: a[..., first : first + groups * rows, :]
        out_shape = [
            jax.ShapeDtypeStruct((time_p, groups * rows, hidden_p), dtype),
            jax.ShapeDtypeStruct((groups * rows, hidden_p), f32),
        ]
        if save_residuals:
            out_shape += [
                jax.ShapeDtypeStruct((time_p, groups * rows, 4 * hidden_p), f32),
                jax.ShapeDtypeStruct((time_p, groups * rows, hidden_p), f32),
            ]
        weights = pl.BlockSpec((hidden_p, 4 * hidden_p), lambda g, p: (0, 0))
        in_specs = [seq(4 * hidden_p), weights, state(hidden_p), state(hidden_p), state(1)]
        *result, _, flag = grid.call(
            kernel, plan, groups, in_specs, out_specs, out_shape,
            (part(xp), w, part(h0p), part(c0p), part(lens)),
        )  # fmt: skip
        outs.append(result)
        flags.append(flag)
    joined = [jnp.concatenate(parts, axis=-2) for parts in zip(*outs)]
    h_carry, c_final = joined[:2]  # h_carry in the order the steps were taken
    ordered = jnp.flip(h_carry, 0) if reverse else h_carry
    hs = jnp.where(jnp.arange(time_p)[:, None, None] < lens[None], ordered, 0)[:time, :batch]
    carry = (h_carry[-1][:batch, :hidden], c_final[:batch, :hidden].astype(dtype))
    (carry, hs) = grid.poisoned(flags, (carry, hs[..., :hidden]))
    residuals = None
    if save_residuals:
        taken = jnp.concatenate([h0p[None], h_carry[:-1]])  # h entering each step taken
        hprev = jnp.flip(taken, 0) if reverse else taken
        residuals = (joined[2], joined[3], hprev, lens)
    return carry, hs, residuals


def _without_residuals(kernel, *refs):
    """The forward kernel with its residual refs (acts, cprev) absent."""
    *inputs, h_carry, c, counter, flag = refs
    kernel(*inputs, h_carry, c, None, None, counter, flag)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _lstm_grid(x_proj, w_h, h0, c0, lengths, reverse, plan):
    carry, hs, _ = _forward(x_proj, w_h, h0, c0, lengths, reverse, plan, save_residuals=False)
    return carry, hs


def _lstm_grid_fwd(x_proj, w_h, h0, c0, lengths, reverse, plan):
    carry, hs, residuals = _forward(x_proj, w_h, h0, c0, lengths, reverse, plan, True)
    return (carry, hs), (w_h, residuals)


def _lstm_grid_bwd(reverse, plan, saved, cotangents):
    w_h, (acts, cprev, hprev, lens) = saved
    (dh_T, dc_T), dhs = cotangents
    time, batch, hidden = dhs.shape
    time_p, batch_p, hidden_p = hprev.shape
    rows = plan.block_batch
    w_p = pad_gates(pad_to(w_h, (hidden_p, w_h.shape[1])), hidden_p)  # [hidden_p, 4*hidden_p]
    wt = w_p.reshape(hidden_p, 4, hidden_p).transpose(2, 1, 0).reshape(hidden_p, 4 * hidden_p)
    f32 = jnp.float32
    dhs_p = pad_to(dhs.astype(f32), (time_p, batch_p, hidden_p))
    dh_p, dc_p = (pad_to(a.astype(f32), (batch_p, hidden_p)) for a in (dh_T, dc_T))
    seq, state = grid.specs(time_p, rows)
    kernel = functools.partial(
        _backward_kernel, pieces=plan.chunks, n=plan.block_hidden, reverse=reverse,
        backend=plan.backend,
    )  # fmt: skip
    in_specs = [seq(hidden_p), state(hidden_p), state(hidden_p), seq(4 * hidden_p), seq(hidden_p)]
    in_specs += [pl.BlockSpec((hidden_p, 4 * hidden_p), lambda g, p: (0, 0)), state(1)]
    outs, flags = [], []
    for first, groups in grid.launches(batch_p, plan):
        part = lambda a: a[..., first : first + groups * rows, :]
        out_shape = [
            jax.ShapeDtypeStruct((time_p, groups * rows, 4 * hidden_p), f32),
            jax.ShapeDtypeStruct((groups * rows, hidden_p), f32),
            jax.ShapeDtypeStruct((groups * rows, hidden_p), f32),
        ]
        *result, _, flag = grid.call(
            kernel, plan, groups, in_specs,
            [seq(4 * hidden_p), state(hidden_p), state(hidden_p)], out_shape,
            (part(dhs_p), part(dh_p), part(dc_p), part(acts), part(cprev), wt, part(lens)),
        )  # fmt: skip
        outs.append(result)
        flags.append(flag)
    dgates_p, dh0, dc0 = (jnp.concatenate(parts, axis=-2) for parts in zip(*outs))
    first = time_p - 1 if reverse else 0  # the step taken last
    upcast = plan.backend == "interpret"
    last = dot_f32(dgates_p[first].astype(w_h.dtype), w_p.T, upcast)  # Σ_k δgates_k w_h,kᵀ
    dh0 = jnp.where(first < lens, last, dh0)
    dtype = w_h.dtype
    dw_h = jnp.einsum("tbh,tbg->hg", hprev.astype(f32), dgates_p)
    dw_h = un_pad_gates(dw_h[:hidden], hidden).astype(dtype)
    dgates = un_pad_gates(dgates_p[:time, :batch], hidden).astype(dtype)
    unpad = lambda a: a[:batch, :hidden].astype(dtype)
    grads = (dgates, dw_h, unpad(dh0), unpad(dc0))
    return (*grid.poisoned(flags, grads), None)


_lstm_grid.defvjp(_lstm_grid_fwd, _lstm_grid_bwd)


def grid_kernel(
    backend: str, hidden: int, dtype, reverse: bool, block_sizes: BlockSizes | None = None
):
    """The grid kernels on ``backend`` as one differentiable function (x_proj, w_h, h0, c0,
    lengths) -> ((h_T, c_T), hs), or None where they do not run (``plan``; interpreted, also
    where hidden takes more than one slice, whose barrier the interpreter cannot complete)."""
    kernel_plan = plan(hidden, dtype, backend, block_sizes)
    if kernel_plan is None or (backend == "interpret" and kernel_plan.slices > 1):
        return None
    return planned_kernel(kernel_plan, reverse)


def planned_kernel(kernel_plan: Plan, reverse: bool):
    """The grid kernels following ``kernel_plan`` as it is, unchecked (for compile tests past
    the plan's limits, and interpreted over several slices, where every barrier gives up):
    (x_proj, w_h, h0, c0, lengths) -> ((h_T, c_T), hs), differentiable."""
    return functools.partial(_lstm_grid, reverse=reverse, plan=kernel_plan)


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
    time, batch, hidden = check_sequence_operands(x_proj, w_h, initial_carry, seq_lengths)
    platform = "interpret" if interpret else target_platform()
    if grid_kernel(platform, hidden, x_proj.dtype, reverse, block_sizes) is None:
        raise ValueError(_refusal(platform, hidden, x_proj.dtype, block_sizes))
    if seq_lengths is None:
        seq_lengths = jnp.full((batch,), time, jnp.int32)
    h0, c0 = (a.astype(x_proj.dtype) for a in initial_carry)
    args = (x_proj, w_h, h0, c0, jnp.asarray(seq_lengths, jnp.int32))

    def branch(backend):
        kernel = grid_kernel(backend, hidden, x_proj.dtype, reverse, block_sizes)
        if kernel is None:  # another platform than the target's, lowered beside it
            return lambda *a: lstm_grid_reference(*a[:2], a[2:4], a[4], reverse=reverse)
        return kernel

    return on_platforms(branch, interpret, *args)


def _refusal(platform: str, hidden: int, dtype, block_sizes) -> str:
    if platform == "interpret":
        n = (block_sizes or BlockSizes.get_default()).block_hidden
        return (
            f"expected hidden <= block_hidden={n} when interpreted (one program: the interpreter "
            f"runs programs one at a time, so a barrier among several never completes), got "
            f"hidden={hidden}; lstm_grid_reference computes the same sums"
        )
    if platform == "mosaic":
        return "expected a GPU: on TPU lstm_sequence keeps all of w_h in VMEM"
    return (
        f"expected the grid kernel to fit {target_device_kind()} ({limit_text(dtype)}), got "
        f"hidden={hidden} in {jnp.dtype(dtype).name}; use lstm_stepwise"
    )


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
    time, batch, hidden = check_sequence_operands(x_proj, w_h, initial_carry, seq_lengths)
    block_sizes = block_sizes or BlockSizes.get_default()
    hidden_p = round_up(hidden, block_sizes.block_hidden)
    pieces = chunks(hidden_p, block_sizes.max_chunk)
    w = pad_gates(pad_to(w_h, (hidden_p, 4 * hidden)), hidden_p)
    lengths = jnp.full((batch,), time) if seq_lengths is None else jnp.asarray(seq_lengths)
    dtype = x_proj.dtype

    def step(carry, inputs):
        h, c = carry
        x_t, t = inputs
        pre = pad_gates(x_t, hidden_p).astype(jnp.float32)
        for start, size in pieces:
            pre = pre + dot_f32(h[:, start : start + size], w[start : start + size], upcast=True)
        i, f, g, o = (pre[:, k * hidden_p : k * hidden_p + hidden] for k in range(4))
        new_c = sigmoid(f) * c + sigmoid(i) * jnp.tanh(g)
        new_h = (sigmoid(o) * jnp.tanh(new_c)).astype(dtype)
        keep = (t < lengths)[:, None]
        out = jnp.where(keep, new_h, 0)
        h_next = pad_to(jnp.where(keep, new_h, h[:, :hidden]), (batch, hidden_p))
        return (h_next, jnp.where(keep, new_c, c)), out

    h0 = pad_to(initial_carry[0].astype(dtype), (batch, hidden_p))
    carry = (h0, initial_carry[1].astype(jnp.float32))
    (h, c), hs = lax.scan(step, carry, (x_proj, jnp.arange(time)), reverse=reverse)
    return (h[:, :hidden], c.astype(dtype)), hs
