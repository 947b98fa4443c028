"""Every public path compiled, not just lowered, for real accelerators: NVIDIA H100 (sm_90) and
A100 (sm_80) through the CUDA plugin's deviceless compilation (ptxas runs; a register spill fails),
TPU v5e and v6e through libtpu's topologies (Mosaic and XLA:TPU run; VMEM is checked).

Needs the compilers (``pip install "jax[tpu]==<jax>" "jax-cuda12-plugin==<jax>"
nvidia-cuda-nvcc-cu12``, as .ci/run does); a target whose compiler is missing is skipped with the
reason. Each compile is timed and bounded (COMPILE_SECONDS).
"""

import time

import jax
import jax.numpy as jnp
import pytest
from jaxmodels.kernels import lstm_sequence as persistent
from jaxmodels.kernels.common import gpu_shared_memory, tpu_vmem
from jaxmodels.kernels.dense import dense
from jaxmodels.kernels.lstm_cell import lstm_cell
from jaxmodels.kernels.lstm_sequence import lstm_sequence
from jaxmodels.kernels.lstm_stepwise import lstm_stepwise

import jaxmodels
from jaxmodels import targets

pytestmark = pytest.mark.timeout(300)

TARGETS = ("h100", "a100", "v5e", "v6e")
COMPILE_SECONDS = 60  # the slowest compile measured here took a few seconds
KERNEL_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}

DTYPES = (jnp.float32, jnp.bfloat16)


def require(target):
    try:
        return targets.device(target)
    except RuntimeError as e:
        pytest.skip(str(e))


_compiled = {}  # (target, program text) -> compiled: impl "auto" and "pallas" often give one program


def compile_for(target, fn, *args):
    """targets.compile with timing: (compiled, seconds). A program already compiled for the
    target (the same lowered text) is not compiled again."""
    with targets.on_device(target):
        key = (target, jax.jit(fn).lower(*args).as_text())
    if key in _compiled:
        return _compiled[key], 0.0
    start = time.perf_counter()
    compiled = targets.compile(fn, *args, target=target)
    seconds = time.perf_counter() - start
    assert seconds < COMPILE_SECONDS, f"compiling took {seconds:.0f} s"
    _compiled[key] = compiled
    return compiled, seconds


def kernel_calls(target, compiled) -> int:
    return compiled.as_text().count(KERNEL_CALL[targets.TARGETS[target].platform])


def loss_of(fn):
    return lambda *args: sum(jnp.sum(z.astype(jnp.float32)) for z in jax.tree.leaves(fn(*args)))


def lstm_operands(target, hidden, batch, time, dtype, features=None):
    params = jax.eval_shape(
        lambda: jaxmodels.init_lstm(jax.random.key(0), features or hidden, hidden)
    )
    params = jax.tree.map(lambda a: targets.abstract(a.shape, dtype, target), params)
    return params, targets.abstract((batch, time, features or hidden), dtype, target)


def persistent_fits(target, hidden, dtype) -> bool:
    """The plan of the persistent kernel for target's device (what impl='auto' follows)."""
    backend = "triton" if targets.TARGETS[target].platform == "cuda" else "mosaic"
    with targets.on_device(target):
        return persistent.plan(hidden, dtype, backend) is not None


# ---------------------------------------------------------------------------------------------
# lstm_scan over the grid


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("impl", ["auto", "pallas"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("hidden,batch,time", targets.COMPILE_GRID)
def test_lstm_scan_compiles(target, impl, dtype, hidden, batch, time):
    require(target)
    params, xs = lstm_operands(target, hidden, batch, time, dtype)
    forward = lambda p, x: jaxmodels.lstm_scan(p, x, impl=impl)
    gradient = jax.grad(loss_of(forward), argnums=(0, 1))
    fits = persistent_fits(target, hidden, dtype)
    for fn in (forward, gradient):
        compiled, _ = compile_for(target, fn, params, xs)
        calls = kernel_calls(target, compiled)
        if impl == "pallas":
            assert calls >= 1, "impl='pallas' must run a kernel"
        else:  # auto: the persistent kernel exactly where it fits, else the scan (no kernel)
            assert (calls >= 1) == fits


@pytest.mark.parametrize("target", TARGETS)
def test_lstm_scan_with_lengths_reverse_and_carry_compiles(target):
    require(target)
    params, xs = lstm_operands(target, 256, 32, 50, jnp.bfloat16, features=40)
    lengths = targets.abstract((32,), jnp.int32, target)
    carry = (targets.abstract((32, 256), jnp.bfloat16, target),) * 2
    for impl in ("auto", "pallas"):
        fn = lambda p, x, n, c: jaxmodels.lstm_scan(p, x, c, seq_lengths=n, reverse=True, impl=impl)
        compile_for(target, jax.grad(loss_of(fn), argnums=(0, 1, 3)), params, xs, lengths, carry)


# ---------------------------------------------------------------------------------------------
# rnn_scan (no kernel: the scan on every platform), the modules and every registry model


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("impl", ["auto", "scan"])
@pytest.mark.parametrize("hidden,batch,time", [(64, 1, 1024), (1024, 256, 100), (2048, 16, 25)])
def test_rnn_scan_compiles(target, impl, hidden, batch, time):
    require(target)
    params = jax.eval_shape(lambda: jaxmodels.init_rnn(jax.random.key(0), hidden, hidden))
    params = jax.tree.map(lambda a: targets.abstract(a.shape, jnp.float32, target), params)
    xs = targets.abstract((batch, time, hidden), jnp.float32, target)
    forward = lambda p, x: jaxmodels.rnn_scan(p, x, impl=impl)
    for fn in (forward, jax.grad(loss_of(forward), argnums=(0, 1))):
        compile_for(target, fn, params, xs)


def module_cases():
    # name: (module, input shape); bfloat16 cases compute in bfloat16 with float32 parameters
    return {
        "LSTM-2x-bidirectional": (
            jaxmodels.LSTM(256, num_layers=2, bidirectional=True),
            (16, 100, 64),
        ),
        "LSTM-bf16-pallas": (
            jaxmodels.LSTM(512, impl="pallas", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
            (64, 150, 512),
        ),
        "SimpleRNN": (jaxmodels.SimpleRNN(128, num_layers=2), (16, 100, 32)),
        "CNN": (jaxmodels.CNN(), (128, 28, 28, 1)),
        "CNN-xla": (jaxmodels.CNN(conv_impl="xla"), (128, 28, 28, 1)),
    }


def registry_cases():
    sequence = (32, 28, 28)
    return {
        "cnn": ({}, (64, 28, 28, 1), jnp.float32),
        "lstm-classifier": ({"hidden_size": 128, "num_classes": 10}, sequence, jnp.float32),
        "rnn-classifier": ({"hidden_size": 128, "num_classes": 10}, sequence, jnp.float32),
        "lstm-regressor": ({"hidden_size": 128}, (32, 100, 2), jnp.float32),
        "rnn-regressor": ({"hidden_size": 128}, (32, 100, 2), jnp.float32),
        "char-lstm": ({"vocab_size": 65}, (16, 100), jnp.int32),
        "char-rnn": ({"vocab_size": 65}, (16, 100), jnp.int32),
    }


def compile_training_step(target, init, apply, shape, dtype):
    """Forward and parameter gradient of ``apply`` at an input of ``shape``."""
    x = jnp.zeros(shape, dtype)
    variables = jax.eval_shape(init, jax.random.key(0), x)
    variables = jax.tree.map(lambda a: targets.abstract(a.shape, a.dtype, target), variables)
    spec = targets.abstract(shape, dtype, target)
    compile_for(target, apply, variables, spec)
    compile_for(target, jax.grad(loss_of(apply)), variables, spec)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(module_cases()))
def test_modules_compile(target, name):
    require(target)
    module, shape = module_cases()[name]
    compile_training_step(
        target,
        module.init,
        module.apply,
        shape,
        jnp.float32 if "bf16" not in name else jnp.bfloat16,
    )


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(registry_cases()))
def test_registry_models_compile(target, name):
    require(target)
    config, shape, dtype = registry_cases()[name]
    model = jaxmodels.get_model(name, **config)
    compile_training_step(target, model.init, model.apply, shape, dtype)


def test_every_registry_model_is_compiled():
    assert set(registry_cases()) == set(jaxmodels.list_models())


# ---------------------------------------------------------------------------------------------
# Each kernel on its own


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("rows,features,out", [(1, 64, 64), (256, 2048, 8192), (100, 300, 700)])
def test_dense_compiles(target, dtype, rows, features, out):
    require(target)
    x, w, b = (
        targets.abstract(s, dtype, target) for s in ((rows, features), (features, out), (out,))
    )
    fn = lambda x, w, b: dense(x, w, b, "tanh")
    for f in (fn, jax.grad(loss_of(fn), argnums=(0, 1, 2))):
        assert kernel_calls(target, compile_for(target, f, x, w, b)[0]) >= 1


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("hidden,batch", [(64, 1), (768, 16), (2048, 256)])
def test_lstm_cell_compiles(target, dtype, hidden, batch):
    require(target)
    x_proj = targets.abstract((batch, 4 * hidden), dtype, target)
    w_h = targets.abstract((hidden, 4 * hidden), dtype, target)
    carry = (targets.abstract((batch, hidden), dtype, target),) * 2
    for f in (lstm_cell, jax.grad(loss_of(lstm_cell), argnums=(0, 1, 2))):
        assert kernel_calls(target, compile_for(target, f, x_proj, w_h, carry)[0]) >= 1


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("hidden,batch,time", [(64, 256, 1024), (1024, 16, 150), (2048, 1, 100)])
def test_lstm_stepwise_compiles(target, dtype, hidden, batch, time):
    require(target)
    x_proj = targets.abstract((time, batch, 4 * hidden), dtype, target)
    w_h = targets.abstract((hidden, 4 * hidden), dtype, target)
    carry = (targets.abstract((batch, hidden), dtype, target),) * 2
    fn = lambda x, w, c: lstm_stepwise(x, w, c, reverse=True)
    for f in (fn, jax.grad(loss_of(fn), argnums=(0, 1, 2))):
        assert kernel_calls(target, compile_for(target, f, x_proj, w_h, carry)[0]) >= 1


# ---------------------------------------------------------------------------------------------
# The persistent kernel's limit: the plan agrees with the compiler on both sides


def largest_fitting_hidden(target, dtype) -> int:
    """The largest hidden (a multiple of 64, at most 4096) that the plan takes on target."""
    return max(h for h in range(64, 4097, 64) if persistent_fits(target, h, dtype))


def sequence_operands(target, hidden, dtype, batch=16, time=20):
    x_proj = targets.abstract((time, batch, 4 * hidden), dtype, target)
    w_h = targets.abstract((hidden, 4 * hidden), dtype, target)
    return x_proj, w_h, (targets.abstract((batch, hidden), dtype, target),) * 2


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_persistent_kernel_limit_agrees_with_the_compiler(target, dtype):
    """Just inside the plan's limit the persistent kernel compiles (and impl="auto" takes it);
    just outside, the kernel refuses with an error naming the limit (and impl="auto" takes the
    scan); on GPU the compiler refuses the kernel forced past the limit too."""
    require(target)
    inside = largest_fitting_hidden(target, dtype)
    fn = lambda x, w, c: lstm_sequence(x, w, c)
    for f in (fn, jax.grad(loss_of(fn), argnums=(0, 1, 2))):
        assert (
            kernel_calls(
                target, compile_for(target, f, *sequence_operands(target, inside, dtype))[0]
            )
            >= 1
        )
    outside = inside + 1
    with pytest.raises(ValueError, match=rf"fit on chip .* got hidden={outside}"):
        compile_for(target, fn, *sequence_operands(target, outside, dtype))
    # lstm_scan(impl="auto") takes the kernel just inside and the scan just outside.
    for hidden, kernel_expected in ((inside, True), (outside, False)):
        params, xs = lstm_operands(target, hidden, 16, 20, dtype)
        auto = jax.grad(
            loss_of(lambda p, x: jaxmodels.lstm_scan(p, x, impl="auto")), argnums=(0, 1)
        )
        assert (
            kernel_calls(target, compile_for(target, auto, params, xs)[0]) >= 1
        ) == kernel_expected
    if targets.TARGETS[target].platform == "cuda":
        # The compiler refuses it too: the kernels (forward and backward) forced past the plan
        # overflow shared memory.
        hidden_p = 1 << (outside - 1).bit_length()
        forced = persistent.Plan("triton", 16, hidden_p, 0)
        kernel = lambda x, w, c: persistent._lstm_sequence(
            x, w, *c, jnp.full((16,), 20, jnp.int32), False, forced
        )
        with pytest.raises(Exception, match=r"Shared memory size limit exceeded|register spilling"):
            gradient = jax.grad(loss_of(kernel), argnums=(0, 1, 2))
            compile_for(target, gradient, *sequence_operands(target, outside, dtype))


@pytest.mark.parametrize("target", TARGETS)
def test_budgets_are_the_targets(target):
    """The on-chip budgets read off the device compiled for are that device's."""
    require(target)
    with targets.on_device(target):
        expected = {"h100": 232448, "a100": 166912}.get(target)
        if expected:
            assert gpu_shared_memory() == expected
        else:
            assert tpu_vmem() == 128 * 2**20
