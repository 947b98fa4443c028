"""The simple RNN's Pallas kernels (the LSTM's kernels/lstm_sequence.py and kernels/lstm_grid.py
with ``common.rnn_cell``): interpreted on CPU against their exact jnp references, forward and
gradients, for every named activation; ``rnn_scan(impl="pallas")`` against the scan; its dispatch
and refusals, lowered for GPU and TPU; the grid plan's limits for one gate block. The compiles for
H100 and A100 at those limits are tests/test_compile.py's."""

import jax
import jax.numpy as jnp
import pytest
from _lowering import GPUS, KERNEL_CALL, TPU, lowered_module
from jax.sharding import AbstractMesh

import jaxmodels
from jaxmodels.kernels import grid, lstm_sequence
from jaxmodels.kernels.common import ACTIVATIONS, rnn_cell
from jaxmodels.kernels.lstm_grid import rnn_grid, rnn_grid_reference
from jaxmodels.kernels.lstm_sequence import rnn_sequence, rnn_sequence_reference

# Largest |kernel - reference| relative to the reference's largest magnitude: the gradients differ
# by roundings to the operands' dtype (the references' autodiff sums the steps' w_h gradients in
# that dtype, the kernels in float32), and identity and relu leave them unbounded in size.
GRADIENT_TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# Small blocks: several programs, time blocks, padding (persistent); one program a batch group
# (the interpreter cannot complete a barrier among several), several chunks and groups (grid).
SEQUENCE_BLOCKS = lstm_sequence.BlockSizes(block_batch=8, block_time=4, hidden_multiple=8)
ONE_SLICE = grid.BlockSizes(block_batch=8, block_hidden=32, max_chunk=8)


def max_error(a, b):
    return max(
        float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def relative_error(a, b):
    scale = max(float(jnp.max(jnp.abs(y.astype(jnp.float32)))) for y in jax.tree.leaves(b))
    return max_error(a, b) / scale


def sin_loss(fn):
    return lambda *args: sum(
        jnp.sum(jnp.sin(z.astype(jnp.float32))) for z in jax.tree.leaves(fn(*args))
    )


def operands(time, batch, hidden, dtype, seed=0, scale=0.4):
    ks = jax.random.split(jax.random.key(seed), 3)
    x_proj = jax.random.normal(ks[0], (time, batch, hidden)).astype(dtype)
    w_h = (scale * jax.random.normal(ks[1], (hidden, hidden))).astype(dtype)
    return x_proj, w_h, jax.random.normal(ks[2], (batch, hidden)).astype(dtype)


CASES = [  # dtype, time, batch, hidden, lengths, reverse
    (jnp.float32, 7, 11, 20, [7, 3, 0, 5, 1, 7, 2, 6, 4, 7, 1], False),
    (jnp.bfloat16, 6, 3, 17, [2, 6, 0], True),
    (jnp.float32, 1, 9, 12, None, True),
]
# Every activation in the first case, the default (tanh) in the others: the activation enters
# the kernels only through the pointwise step, the shapes through everything else.
CASE_ACTIVATIONS = [(*CASES[0], a) for a in ACTIVATIONS] + [(*c, "tanh") for c in CASES[1:]]


@pytest.mark.parametrize("dtype,time,batch,hidden,lengths,reverse,activation", CASE_ACTIVATIONS)
@pytest.mark.parametrize("kernel", ["sequence", "grid"])
def test_kernels_are_their_references(
    kernel, dtype, time, batch, hidden, lengths, reverse, activation
):
    """Forward: the kernel computes exactly its reference's sums (the persistent one: h carried in
    float32; the grid one: the plan's chunks in order, h in x_proj's dtype); gradients (x_proj,
    w_h, h_0): the backward kernels against autodiff of the reference."""
    x_proj, w_h, h0 = operands(time, batch, hidden, dtype)
    lengths = None if lengths is None else jnp.array(lengths, jnp.int32)
    options = dict(activation=activation, reverse=reverse)
    if kernel == "sequence":
        run, reference, blocks = rnn_sequence, rnn_sequence_reference, SEQUENCE_BLOCKS
        sums = {}
    else:  # one program a batch group; the reference takes the same chunks
        run, reference, blocks = rnn_grid, rnn_grid_reference, ONE_SLICE
        sums = {"block_sizes": blocks}
    fn = jax.jit(lambda x, w, h: run(x, w, h, lengths, block_sizes=blocks, **options))
    spec = lambda x, w, h: reference(x, w, h, lengths, **sums, **options)
    h, hs = fn(x_proj, w_h, h0)
    assert hs.shape == (time, batch, hidden) and h.shape == (batch, hidden)
    assert h.dtype == hs.dtype == dtype
    assert max_error((h, hs), spec(x_proj, w_h, h0)) == 0
    grads = jax.jit(jax.grad(sin_loss(fn), (0, 1, 2)))(x_proj, w_h, h0)
    expected = jax.grad(sin_loss(spec), (0, 1, 2))(x_proj, w_h, h0)
    assert relative_error(grads, expected) <= GRADIENT_TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_grid_reference_of_many_slices_is_the_rnn(dtype):
    """The grid's sums with the default blocks over hidden 200 (13 slices, chunks 128 + 64 + 16)
    agree with the persistent kernel's specification (w_h scaled by 1/sqrt(hidden), so that the
    orders of the sums stay roundings apart over the steps instead of diverging)."""
    x_proj, w_h, h0 = operands(9, 5, 200, dtype, seed=1, scale=200**-0.5)
    lengths = jnp.array([9, 4, 0, 7, 1])
    emulated = rnn_grid_reference(x_proj, w_h, h0, lengths, reverse=True)
    specified = rnn_sequence_reference(x_proj, w_h, h0, lengths, reverse=True)
    assert max_error(emulated, specified) <= (1e-5 if dtype == jnp.float32 else 2e-2)


@pytest.mark.parametrize(
    "dtype,reverse,activation",
    [(jnp.float32, False, "tanh"), (jnp.float32, True, "relu"), (jnp.bfloat16, True, "sigmoid")],
    ids=lambda v: jnp.dtype(v).name if isinstance(v, type) else str(v),
)
def test_rnn_scan_pallas_equals_scan(dtype, reverse, activation):
    """rnn_scan(impl="pallas") (interpreted: the persistent kernel) against the scan under jit,
    with seq_lengths (NaN in the padding), an initial carry and reverse: outputs, and gradients
    w.r.t. params, xs and h_0. The scan computes in x's dtype, the kernel in float32: bfloat16
    differs by that."""
    params = jax.tree.map(lambda a: a.astype(dtype), jaxmodels.init_rnn(jax.random.key(0), 5, 12))
    xs = jax.random.normal(jax.random.key(1), (4, 7, 5)).astype(dtype)
    h0 = jax.random.normal(jax.random.key(2), (4, 12)).astype(dtype)
    lengths = jnp.array([7, 3, 0, 5])
    padded = jnp.arange(7)[None, :, None] >= lengths[:, None, None]
    xs = jnp.where(padded, jnp.nan, xs)  # padding reaches neither outputs nor gradients

    def scan(impl):
        return lambda p, x, h: jaxmodels.rnn_scan(
            p, x, h, seq_lengths=lengths, reverse=reverse, impl=impl, activation=activation
        )

    forward_tolerance = 1e-6 if dtype == jnp.float32 else 2e-2
    assert max_error(jax.jit(scan("pallas"))(params, xs, h0), scan("scan")(params, xs, h0)) <= (
        forward_tolerance
    )
    grads = jax.jit(jax.grad(sin_loss(scan("pallas")), (0, 1, 2)))(params, xs, h0)
    expected = jax.grad(sin_loss(scan("scan")), (0, 1, 2))(params, xs, h0)
    assert relative_error(grads, expected) <= GRADIENT_TOLERANCE[dtype]


def test_rnn_scan_pallas_takes_named_activations_only():
    """A callable that is not one of ACTIVATIONS' functions: the scan under impl="auto", a
    ValueError naming what impl="pallas" takes; jnp.tanh (the default) is 'tanh'."""
    params = jaxmodels.init_rnn(jax.random.key(0), 3, 4)
    xs = jnp.ones((2, 3, 3))
    softsign = lambda x: x / (1 + jnp.abs(x))
    h, _ = jaxmodels.rnn_scan(params, xs, activation=softsign, impl="auto")
    assert h.shape == (2, 4)
    with pytest.raises(ValueError, match=r"activation to be one of \('identity'.*impl='pallas'"):
        jaxmodels.rnn_scan(params, xs, activation=softsign, impl="pallas")
    by_function = jaxmodels.rnn_scan(params, xs, activation=jnp.tanh, impl="pallas")
    assert max_error(by_function, jaxmodels.rnn_scan(params, xs, impl="scan")) <= 1e-6
    with pytest.raises(TypeError, match=r"xs and params of one dtype.*impl='pallas'"):
        jaxmodels.rnn_scan(params, xs.astype(jnp.bfloat16), impl="pallas")


# ---------------------------------------------------------------------------------------------
# Dispatch for accelerators (lowered here: lowering needs no device) and the grid plan's limits


def rnn_case(hidden, dtype, batch=20):
    params = jax.tree.map(
        lambda a: a.astype(dtype), jaxmodels.init_rnn(jax.random.key(0), 8, hidden)
    )
    return params, jnp.ones((batch, 5, 8), dtype)


@pytest.mark.parametrize(
    "platform,hidden,kernel",
    [("cuda", 256, "sequence"), ("cuda", 512, "grid"), ("tpu", 512, "sequence")],
)
def test_rnn_scan_pallas_picks_the_kernel_that_fits(platform, hidden, kernel):
    """bfloat16 on an H100: the persistent kernel to hidden 256 (w_h in one program's shared
    memory), the grid kernel beyond (one forward and one backward launch per group of 16
    sequences: 20 take two); on a TPU v5e the persistent kernel (VMEM). impl="auto": the scan."""
    params, xs = rnn_case(hidden, jnp.bfloat16)
    device = GPUS["h100"] if platform == "cuda" else TPU
    for impl, calls in (("pallas", 4 if kernel == "grid" else 2), ("auto", 0)):
        loss = sin_loss(lambda p, x: jaxmodels.rnn_scan(p, x, impl=impl))
        text = lowered_module(jax.grad(loss), platform, params, xs, device=device)
        assert text.count(KERNEL_CALL[platform]) == calls
        assert (f"rnn_{kernel}_forward" in text) == (calls > 0)


def test_rnn_scan_pallas_refuses_what_no_kernel_takes():
    """bfloat16 hidden 4096 on an H100: past the persistent kernel's shared memory and the grid
    kernel's programs (256 slices > 128): a ValueError naming both limits."""
    params, xs = rnn_case(4096, jnp.bfloat16, batch=2)
    with (
        jax.sharding.use_abstract_mesh(
            AbstractMesh((1,), ("device",), abstract_device=GPUS["h100"])
        ),
        pytest.raises(ValueError, match=r"limits on NVIDIA H100.*got hidden=4096 in bfloat16"),
    ):
        jax.eval_shape(lambda p, x: jaxmodels.rnn_scan(p, x, impl="pallas"), params, xs)


# The plans' largest hidden per GPU and dtype for the simple RNN, proven on both sides by compiling
# in tests/test_compile.py: (persistent kernel, a power of two; grid kernel, a multiple of 16).
PLAN_LIMITS = {
    ("h100", "float32"): (128, 1840),
    ("h100", "bfloat16"): (256, 2048),
    ("a100", "float32"): (128, 1664),
    ("a100", "bfloat16"): (128, 1664),
}


@pytest.mark.parametrize("target,dtype", sorted(PLAN_LIMITS))
def test_plan_limits(target, dtype):
    persistent, sliced = PLAN_LIMITS[target, dtype]
    cell = rnn_cell("tanh")
    mesh = AbstractMesh((1,), ("device",), abstract_device=GPUS[target])
    with jax.sharding.use_abstract_mesh(mesh):
        sizes = [2**k for k in range(4, 13)]
        fits = [h for h in sizes if lstm_sequence.plan(h, dtype, "triton", cell=cell)]
        assert fits == [h for h in sizes if h <= persistent]
        fits = [h for h in range(16, 4097, 16) if grid.plan(h, dtype, "triton", gates=1)]
        assert fits == list(range(16, sliced + 1, 16))
