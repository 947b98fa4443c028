"""Pallas kernels vs their jnp references (interpret mode on CPU), forward and gradients, and proof
that each kernel lowers for GPU (Triton) and TPU (Mosaic)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lowering import KERNEL_CALL, lowered_module

import jaxmodels
from jaxmodels.kernels import dense as dense_kernel
from jaxmodels.kernels import lstm_cell as cell_kernel
from jaxmodels.kernels import lstm_sequence as sequence_kernel
from jaxmodels.kernels.dense import dense, dense_reference
from jaxmodels.kernels.lstm_cell import lstm_cell, lstm_cell_reference
from jaxmodels.kernels.lstm_sequence import lstm_sequence, lstm_sequence_reference
from jaxmodels.kernels.lstm_stepwise import lstm_stepwise, lstm_stepwise_reference

# Largest allowed |kernel - reference| per dtype (values are O(1)); the bfloat16 gradients differ by
# roundings of intermediate products to bfloat16 on either side.
TOLERANCE = {
    jnp.float32: {"forward": 1e-5, "gradient": 1e-4},
    jnp.bfloat16: {"forward": 2e-2, "gradient": 1e-1},
}
# Small blocks, so that small shapes still span several programs (contraction slices, time blocks)
# and need padding.
DENSE_BLOCKS = dense_kernel.BlockSizes(block_m=8, block_n=8, block_k=8)
CELL_BLOCKS = cell_kernel.BlockSizes(block_batch=8, block_hidden=8, block_contraction=8)
SEQUENCE_BLOCKS = sequence_kernel.BlockSizes(block_batch=8, block_time=4, hidden_multiple=8)


def max_error(a, b):
    return max(
        float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def random(key, shape, dtype, scale=1.0):
    return (scale * jax.random.normal(key, shape)).astype(dtype)


def sin_loss(fn):
    """A scalar loss over every output of fn, so that all cotangents are nonzero and distinct."""
    return lambda *args: sum(
        jnp.sum(jnp.sin(z.astype(jnp.float32))) for z in jax.tree.leaves(fn(*args))
    )


# ---------------------------------------------------------------------------------------------
# dense


@pytest.mark.parametrize(
    "rows,features,out,activation,dtype",
    [
        (8, 8, 8, "identity", jnp.bfloat16),
        (5, 13, 19, "relu", jnp.float32),
        (17, 9, 24, "tanh", jnp.bfloat16),
        (3, 30, 7, "sigmoid", jnp.float32),
    ],
)
def test_dense_matches_reference(rows, features, out, activation, dtype):
    ks = jax.random.split(jax.random.key(rows * features), 3)
    x, w, b = (
        random(ks[0], (rows, features), dtype),
        random(ks[1], (features, out), dtype, 0.3),
        random(ks[2], (out,), dtype),
    )
    kernel = jax.jit(functools.partial(dense, activation=activation, block_sizes=DENSE_BLOCKS))
    reference = functools.partial(dense_reference, activation=activation)
    tol = TOLERANCE[dtype]
    assert kernel(x, w, b).shape == (rows, out) and kernel(x, w, b).dtype == dtype
    assert max_error(kernel(x, w, b), reference(x, w, b)) <= tol["forward"]
    grads = jax.jit(jax.grad(sin_loss(kernel), (0, 1, 2)))(x, w, b)
    assert max_error(grads, jax.grad(sin_loss(reference), (0, 1, 2))(x, w, b)) <= tol["gradient"]


def test_dense_without_bias_and_default_blocks():
    x, w = jnp.ones((3, 5)), jnp.full((5, 4), 0.5)
    np.testing.assert_allclose(dense(x, w), np.full((3, 4), 2.5), rtol=1e-6)


def test_dense_rejects_bad_input():
    x, w = jnp.ones((3, 5)), jnp.ones((5, 4))
    with pytest.raises(ValueError, match=r"x \[rows, features\] and w \[features, out\]"):
        dense(x, jnp.ones((6, 4)))
    with pytest.raises(ValueError, match=r"b of shape \[out\]=\(4,\)"):
        dense(x, w, jnp.ones(3))
    with pytest.raises(ValueError, match="activation"):
        dense(x, w, activation="gelu")
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        dense(x.astype(jnp.int32), w.astype(jnp.int32))


def test_block_sizes_validate():
    with pytest.raises(ValueError, match="block_m to be a positive power of two, got 12"):
        dense_kernel.BlockSizes(block_m=12, block_n=8, block_k=8)
    with pytest.raises(ValueError, match="block_k to be a positive power of two, got None"):
        dense_kernel.BlockSizes(block_m=8, block_n=8, block_k=None)
    with pytest.raises(ValueError, match="block_contraction to be a positive power of two, got 0"):
        cell_kernel.BlockSizes(block_batch=8, block_hidden=8, block_contraction=0)
    with pytest.raises(ValueError, match="block_time to be a positive power of two, got None"):
        sequence_kernel.BlockSizes(block_batch=8, block_time=None, hidden_multiple=8)
    for backend in ("interpret", "triton", "mosaic"):
        dense_kernel.BlockSizes.get_default(backend)
        cell_kernel.BlockSizes.get_default(backend)
    assert cell_kernel.BlockSizes.get_default("mosaic").block_contraction is None


# ---------------------------------------------------------------------------------------------
# LSTM step


@pytest.mark.parametrize("blocks", [CELL_BLOCKS, None], ids=["small", "default"])
@pytest.mark.parametrize("batch,hidden,dtype", [(8, 8, jnp.bfloat16), (5, 12, jnp.float32)])
def test_lstm_cell_matches_reference(batch, hidden, dtype, blocks):
    """Small blocks (several programs and contraction slices) and the interpreter's default (the
    whole contraction in one slice)."""
    ks = jax.random.split(jax.random.key(batch + hidden), 4)
    x_proj = random(ks[0], (batch, 4 * hidden), dtype)
    w_h = random(ks[1], (hidden, 4 * hidden), dtype, 0.4)
    h, c = random(ks[2], (batch, hidden), dtype), random(ks[3], (batch, hidden), dtype)
    kernel = jax.jit(functools.partial(lstm_cell, block_sizes=blocks))
    tol = TOLERANCE[dtype]
    assert (
        max_error(kernel(x_proj, w_h, (h, c)), lstm_cell_reference(x_proj, w_h, (h, c)))
        <= tol["forward"]
    )
    grads = jax.jit(jax.grad(sin_loss(kernel), (0, 1, 2)))(x_proj, w_h, (h, c))
    expected = jax.grad(sin_loss(lstm_cell_reference), (0, 1, 2))(x_proj, w_h, (h, c))
    assert max_error(grads, expected) <= tol["gradient"]


def test_lstm_cell_reference_is_the_seed_step():
    """The kernel's reference equals jaxmodels.lstm_cell with the input projection split off."""
    ks = jax.random.split(jax.random.key(3), 4)
    params = jaxmodels.init_lstm(ks[0], 5, 6)
    x, h, c = (
        random(ks[1], (4, 5), jnp.float32),
        random(ks[2], (4, 6), jnp.float32),
        random(ks[3], (4, 6), jnp.float32),
    )
    (h_seed, c_seed), _ = jaxmodels.lstm_cell(params, (h, c), x)
    x_proj = x @ params["w_x"] + params["b"][None, :]
    assert max_error((h_seed, c_seed), lstm_cell_reference(x_proj, params["w_h"], (h, c))) <= 1e-6


def test_lstm_cell_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[batch, 4\*hidden\]"):
        lstm_cell(jnp.ones((2, 6)), jnp.ones((2, 6)), (jnp.ones((2, 2)), jnp.ones((2, 2))))
    with pytest.raises(ValueError, match=r"carry h \[batch, hidden\]=\(2, 2\)"):
        lstm_cell(jnp.ones((2, 8)), jnp.ones((2, 8)), (jnp.ones((3, 2)), jnp.ones((2, 2))))


# ---------------------------------------------------------------------------------------------
# whole-sequence LSTM


@pytest.mark.parametrize(
    "recurrence,blocks,specification",
    [
        (lstm_sequence, SEQUENCE_BLOCKS, lstm_sequence_reference),
        (lstm_stepwise, CELL_BLOCKS, lstm_stepwise_reference),
    ],
    ids=["lstm_sequence", "lstm_stepwise"],
)
@pytest.mark.parametrize(
    "dtype,time,batch,hidden,lengths,reverse",
    [
        (jnp.float32, 7, 5, 6, [7, 3, 0, 5, 1], False),
        (jnp.float32, 5, 9, 12, None, True),
        (jnp.bfloat16, 6, 3, 8, [2, 6, 4], True),
        (jnp.bfloat16, 9, 2, 20, [9, 4], False),
    ],
)
def test_lstm_sequence_matches_reference(
    recurrence, blocks, specification, dtype, time, batch, hidden, lengths, reverse
):
    """The persistent kernel and the stepwise one (small blocks: several programs, time blocks or
    contraction slices, and padding) against their references, forward and gradients."""
    ks = jax.random.split(jax.random.key(time * batch), 4)
    x_proj = random(ks[0], (time, batch, 4 * hidden), dtype)
    w_h = random(ks[1], (hidden, 4 * hidden), dtype, 0.4)
    carry = (random(ks[2], (batch, hidden), dtype), random(ks[3], (batch, hidden), dtype))
    lengths = None if lengths is None else jnp.array(lengths, jnp.int32)
    kernel = jax.jit(
        lambda x, w, carry: recurrence(x, w, carry, lengths, reverse=reverse, block_sizes=blocks)
    )
    reference = lambda x, w, carry: specification(x, w, carry, lengths, reverse=reverse)
    tol = TOLERANCE[dtype]
    (h, c), hs = kernel(x_proj, w_h, carry)
    assert hs.shape == (time, batch, hidden) and h.shape == c.shape == (batch, hidden)
    assert max_error(((h, c), hs), reference(x_proj, w_h, carry)) <= tol["forward"]
    grads = jax.jit(jax.grad(sin_loss(kernel), (0, 1, 2)))(x_proj, w_h, carry)
    assert (
        max_error(grads, jax.grad(sin_loss(reference), (0, 1, 2))(x_proj, w_h, carry))
        <= tol["gradient"]
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_the_two_recurrences_have_one_specification(dtype):
    """The stepwise reference (h carried in x_proj's dtype) equals the persistent one (h carried in
    float32): h enters the next step's matmul and the outputs rounded to x_proj's dtype either way,
    so lstm_scan(impl="pallas") computes one function whichever kernel the plan picks."""
    ks = jax.random.split(jax.random.key(0), 4)
    x_proj, w_h = random(ks[0], (9, 5, 48), dtype), random(ks[1], (12, 48), dtype, 0.4)
    carry = (random(ks[2], (5, 12), dtype), random(ks[3], (5, 12), dtype))
    lengths = jnp.array([9, 3, 0, 5, 1])

    def outputs_and_gradients(reference):
        fn = lambda x, w, c: reference(x, w, c, lengths, reverse=True)
        return fn(x_proj, w_h, carry), jax.grad(sin_loss(fn), (0, 1, 2))(x_proj, w_h, carry)

    stepwise = outputs_and_gradients(lstm_stepwise_reference)
    assert max_error(stepwise, outputs_and_gradients(lstm_sequence_reference)) == 0


@pytest.mark.parametrize("recurrence", [lstm_sequence, lstm_stepwise])
def test_lstm_sequence_rejects_bad_input(recurrence):
    x_proj, w_h, carry = jnp.ones((3, 2, 8)), jnp.ones((2, 8)), (jnp.ones((2, 2)), jnp.ones((2, 2)))
    with pytest.raises(ValueError, match=r"\[time, batch, 4\*hidden\]"):
        recurrence(jnp.ones((2, 8)), w_h, carry)
    with pytest.raises(ValueError, match=r"w_h \[hidden, 4\*hidden\]=\(2, 8\)"):
        recurrence(x_proj, jnp.ones((3, 8)), carry)
    with pytest.raises(ValueError, match=r"seq_lengths of shape \[batch\]=\(2,\)"):
        recurrence(x_proj, w_h, carry, jnp.array([1, 2, 3]))
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        recurrence(x_proj.astype(jnp.float16), w_h.astype(jnp.float16), carry)


# ---------------------------------------------------------------------------------------------
# integration: lstm_scan(impl="pallas") and the LSTM module


def test_lstm_module_pallas_equals_scan():
    xs = random(jax.random.key(0), (3, 6, 5), jnp.float32)
    lengths = jnp.array([6, 2, 4])
    scan = jaxmodels.LSTM(7, bidirectional=True, impl="scan")
    pallas = scan.clone(impl="pallas")
    variables = scan.init(jax.random.key(1), xs)
    assert (
        max_error(
            scan.apply(variables, xs, seq_lengths=lengths),
            jax.jit(pallas.apply)(variables, xs, seq_lengths=lengths),
        )
        <= 1e-5
    )
    loss = lambda module: sin_loss(lambda v, x: module.apply(v, x, seq_lengths=lengths))
    grads = jax.jit(jax.grad(loss(pallas), (0, 1)))(variables, xs)
    assert max_error(grads, jax.grad(loss(scan), (0, 1))(variables, xs)) <= 1e-4


def test_lstm_scan_pallas_wants_one_kernel_dtype():
    params = jaxmodels.init_lstm(jax.random.key(0), 3, 4)
    with pytest.raises(
        TypeError, match=r"xs and params of one dtype, float32 or bfloat16.*bfloat16"
    ):
        jaxmodels.lstm_scan(params, jnp.ones((1, 2, 3), jnp.bfloat16), impl="pallas")
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        jaxmodels.lstm_scan(
            jax.tree.map(lambda p: p.astype(jnp.float16), params),
            jnp.ones((1, 2, 3), jnp.float16),
            impl="pallas",
        )


# ---------------------------------------------------------------------------------------------
# lowering for accelerators (runs on this CPU machine: lowering needs no device)


def lowering_cases():
    x, w, b = jnp.ones((20, 70)), jnp.ones((70, 130)), jnp.ones(130)
    x_proj, w_h = jnp.ones((5, 20, 4 * 60)), jnp.ones((60, 4 * 60))
    carry = (jnp.ones((20, 60)), jnp.ones((20, 60)))
    lengths = jnp.full((20,), 5, jnp.int32)
    return {
        # name: (function whose forward and backward both run kernels, arguments, kernel calls expected)
        "dense": (
            jax.grad(sin_loss(lambda x, w, b: dense(x, w, b, "tanh")), (0, 1, 2)),
            (x, w, b),
            3,
        ),
        "lstm_cell": (jax.grad(sin_loss(lstm_cell), (0, 1, 2)), (x_proj[0], w_h, carry), 3),
        "lstm_sequence": (
            jax.grad(
                sin_loss(lambda x, w, c: lstm_sequence(x, w, c, lengths, reverse=True)), (0, 1, 2)
            ),
            (x_proj, w_h, carry),
            2,
        ),
        "lstm_stepwise": (
            jax.grad(sin_loss(lambda x, w, c: lstm_stepwise(x, w, c, lengths)), (0, 1, 2)),
            (x_proj, w_h, carry),
            1,
        ),
    }


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", ["dense", "lstm_cell", "lstm_sequence", "lstm_stepwise"])
def test_kernels_lower_for_accelerators(name, platform):
    fn, args, calls = lowering_cases()[name]
    assert lowered_module(fn, platform, *args).count(KERNEL_CALL[platform]) >= calls


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_auto_impl_picks_the_kernel_for_accelerators(platform):
    params = jaxmodels.init_lstm(jax.random.key(0), 4, 8)
    xs = jnp.ones((2, 3, 4))
    loss = sin_loss(lambda p, x: jaxmodels.lstm_scan(p, x, impl="auto"))
    assert lowered_module(jax.grad(loss), platform, params, xs).count(KERNEL_CALL[platform]) == 2
    cpu = jax.jit(jax.grad(loss)).lower(params, xs).as_text()
    assert "pallas" not in cpu and "triton" not in cpu
