"""The grid-persistent LSTM kernel (kernels/lstm_grid.py) without a GPU: the kernel body
interpreted where it needs no barrier (one program per batch group) against its exact emulation,
the emulation of the sliced algorithm against the scan and PyTorch, the bounded barrier, the plan's
limits per GPU, and the dispatch of lstm_scan. The compiles for H100 and A100 at the limits are
tests/test_compile.py's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh

import jaxmodels
from jaxmodels.kernels import grid
from jaxmodels.kernels import lstm_grid as grid_lstm
from jaxmodels.kernels.lstm_grid import lstm_grid, lstm_grid_reference
from jaxmodels.kernels.lstm_stepwise import lstm_stepwise_reference

TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 1e-1}  # gradients, as tests/test_kernels.py
# One program per group (block_hidden >= hidden), several contraction chunks and batch groups.
ONE_SLICE = grid.BlockSizes(block_batch=8, block_hidden=32, max_chunk=8)

GPUS = {
    "h100": AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"),
    "a100": AbstractDevice(device_kind="NVIDIA A100-SXM4-80GB", num_cores=108, platform="gpu"),
}


def on_gpu(name):
    return jax.sharding.use_abstract_mesh(
        AbstractMesh((1,), ("device",), abstract_device=GPUS[name])
    )


def max_error(a, b):
    return max(
        float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def sin_loss(fn):
    return lambda *args: sum(
        jnp.sum(jnp.sin(z.astype(jnp.float32))) for z in jax.tree.leaves(fn(*args))
    )


def operands(time, batch, hidden, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    x_proj = jax.random.normal(ks[0], (time, batch, 4 * hidden)).astype(dtype)
    w_h = (0.4 * jax.random.normal(ks[1], (hidden, 4 * hidden))).astype(dtype)
    carry = tuple(jax.random.normal(k, (batch, hidden)).astype(dtype) for k in ks[2:])
    return x_proj, w_h, carry


@pytest.mark.parametrize(
    "dtype,time,batch,hidden,lengths,reverse",
    [
        (jnp.float32, 7, 11, 20, [7, 3, 0, 5, 1, 7, 2, 6, 4, 7, 1], False),
        (jnp.bfloat16, 1, 9, 17, [1, 0, 1, 1, 0, 1, 1, 1, 1], True),
    ],
)
def test_interpreted_kernel_is_its_emulation(dtype, time, batch, hidden, lengths, reverse):
    """Forward: the kernel body (one program a group, chunks of 8, padding) computes exactly the
    emulation's sums; gradients: its backward kernel against autodiff of the emulation."""
    x_proj, w_h, carry = operands(time, batch, hidden, dtype)
    lengths = None if lengths is None else jnp.array(lengths, jnp.int32)
    kernel = jax.jit(
        lambda x, w, c: lstm_grid(x, w, c, lengths, reverse=reverse, block_sizes=ONE_SLICE)
    )
    emulation = functools.partial(
        lambda x, w, c: lstm_grid_reference(
            x, w, c, lengths, reverse=reverse, block_sizes=ONE_SLICE
        )
    )
    (h, c), hs = kernel(x_proj, w_h, carry)
    assert hs.shape == (time, batch, hidden) and h.dtype == c.dtype == hs.dtype == dtype
    assert max_error(((h, c), hs), emulation(x_proj, w_h, carry)) == 0
    grads = jax.jit(jax.grad(sin_loss(kernel), (0, 1, 2)))(x_proj, w_h, carry)
    expected = jax.grad(sin_loss(emulation), (0, 1, 2))(x_proj, w_h, carry)
    assert max_error(grads, expected) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_emulation_of_many_slices_is_the_lstm(dtype):
    """The default blocks (16 units a program, chunks of 128) over hidden 200 (13 slices, chunks
    128 + 64 + 16, padding) agree with the recurrence's specification."""
    x_proj, w_h, carry = operands(9, 5, 200, dtype, seed=1)
    lengths = jnp.array([9, 4, 0, 7, 1])
    assert grid.chunks(208, 128) == ((0, 128), (128, 64), (192, 16))
    emulated = lstm_grid_reference(x_proj, w_h, carry, lengths, reverse=True)
    specified = lstm_stepwise_reference(x_proj, w_h, carry, lengths, reverse=True)
    assert max_error(emulated, specified) <= (1e-5 if dtype == jnp.float32 else 2e-2)


def test_emulation_matches_the_scan_and_pytorch():
    """Many slices and chunks of 16 (hidden 40 -> 48: 3 slices), against lstm_scan's scan and
    torch.nn.LSTM with the same weights."""
    torch = pytest.importorskip("torch")
    batch, time, features, hidden = 3, 8, 5, 40
    params = jaxmodels.init_lstm(jax.random.key(2), features, hidden)
    xs = jax.random.normal(jax.random.key(3), (batch, time, features))
    lstm = torch.nn.LSTM(features, hidden, batch_first=True)
    with torch.no_grad():  # torch's gates are i, f, g, o too; weights [4*hidden, in]
        lstm.weight_ih_l0.copy_(torch.tensor(np.asarray(params["w_x"]).T))
        lstm.weight_hh_l0.copy_(torch.tensor(np.asarray(params["w_h"]).T))
        lstm.bias_ih_l0.copy_(torch.tensor(np.asarray(params["b"])))
        lstm.bias_hh_l0.zero_()
        out, (h, c) = lstm(torch.tensor(np.asarray(xs)))
    x_proj = jnp.einsum("btf,fg->tbg", xs, params["w_x"]) + params["b"][None, None]
    zeros = jnp.zeros((batch, hidden))
    blocks = grid.BlockSizes(block_batch=16, block_hidden=16, max_chunk=16)
    (h_e, c_e), hs = lstm_grid_reference(x_proj, params["w_h"], (zeros, zeros), block_sizes=blocks)
    (h_s, c_s), hs_s = jaxmodels.lstm_scan(params, xs, impl="scan")
    assert max_error(((h_e, c_e), jnp.swapaxes(hs, 0, 1)), ((h_s, c_s), hs_s)) <= 1e-5
    np.testing.assert_allclose(np.swapaxes(np.asarray(hs), 0, 1), out.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(h_e), h[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(c_e), c[0].numpy(), atol=1e-5)


def test_a_barrier_that_cannot_complete_gives_nan_not_a_hang(monkeypatch):
    """Interpreted over two slices, program 0 runs alone and its barrier never completes: each
    program polls MAX_SPIN times once, sets the error flag, and every output is NaN."""
    monkeypatch.setattr(grid, "MAX_SPIN", 50)
    x_proj, w_h, carry = operands(3, 4, 32, jnp.float32)
    two = grid.plan(32, jnp.float32, "interpret", grid.BlockSizes(8, 16, 16))
    assert two.slices == 2
    kernel = grid_lstm.planned_kernel(two, reverse=False)
    (h, c), hs = jax.jit(kernel)(x_proj, w_h, *carry, jnp.full((4,), 3, jnp.int32))
    assert all(bool(jnp.isnan(a).all()) for a in (h, c, hs))


def test_refusals():
    x_proj, w_h, carry = operands(3, 2, 40, jnp.float32)
    with pytest.raises(ValueError, match=r"hidden <= block_hidden=16 when interpreted"):
        lstm_grid(x_proj, w_h, carry)
    x_proj, w_h, carry = operands(3, 2, 2048, jnp.bfloat16)
    with on_gpu("h100"), pytest.raises(ValueError, match=r"fit NVIDIA H100.*got hidden=2048"):
        lstm_grid(x_proj, w_h, carry)


# The plan's largest hidden per GPU and dtype (multiples of 16), proven on both sides by compiling
# in tests/test_compile.py.
GRID_LIMITS = {
    ("h100", "float32"): 448,
    ("h100", "bfloat16"): 1744,
    ("a100", "float32"): 448,
    ("a100", "bfloat16"): 1232,
}


@pytest.mark.parametrize("target,dtype", sorted(GRID_LIMITS))
def test_plan_limits(target, dtype):
    with on_gpu(target):
        fits = [h for h in range(16, 4097, 16) if grid.plan(h, dtype, "triton") is not None]
        assert max(fits) == GRID_LIMITS[target, dtype] and fits == list(
            range(16, max(fits) + 1, 16)
        )
        assert grid.plan(64, dtype, "mosaic") is None
        programs = grid.max_programs()
        assert programs == GPUS[target].num_cores - grid.GPU_SM_MARGIN
        big = grid.plan(max(fits), dtype, "triton")
        assert big.slices <= programs and big.groups_per_launch == 1


def lowered(fn, *args):
    mesh = AbstractMesh((1,), ("device",), abstract_device=GPUS["h100"])
    with jax.sharding.use_abstract_mesh(mesh):
        exported = export.export(
            jax.jit(fn),
            platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*args)
    return exported.mlir_module()


def test_lstm_scan_pallas_takes_the_grid_kernel_where_one_program_is_too_small():
    """On an H100 hidden 256 in bfloat16 is past the single-program kernel (128) and within the
    grid kernel: impl="pallas" lowers its forward and backward kernels, one launch of each per
    group of 16 sequences (20: two groups); impl="auto" the scan."""
    params = jax.tree.map(
        lambda a: a.astype(jnp.bfloat16), jaxmodels.init_lstm(jax.random.key(0), 8, 256)
    )
    xs = jnp.ones((20, 5, 8), jnp.bfloat16)
    for impl, expected in (("pallas", 4), ("auto", 0)):
        loss = sin_loss(lambda p, x: jaxmodels.lstm_scan(p, x, impl=impl))
        text = lowered(jax.grad(loss), params, xs)
        assert text.count("__gpu$xla.gpu.triton") == expected
        assert ("lstm_grid_forward" in text) == (expected > 0)
