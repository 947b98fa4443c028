"""Tests of the compiled CPU LSTM kernel (jaxmodels.kernels.lstm_cpu) and of lstm_scan's choice of
it: impl='cpu' against the XLA scan (impl='scan') and ``lstm_cell`` stepped by ``lax.scan`` and
differentiated by plain autodiff, forwards and reversed, across the shapes that take the kernel's other code
paths (hidden not a multiple of 8: the scalar tail; batch not a multiple of the micro-kernel's rows,
6 with AVX2, 8 with AVX-512; an odd number of 16-column panels; several threads; time longer than
one chunk of the input projection); the AVX2 build against the AVX-512 one where the CPU has both;
bfloat16 on AMX tiles against an LSTM whose matmuls round their operands as the tiles do; then
the fallbacks: where it cannot be built, where it is switched off, and what impl='cpu' refuses."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmodels
from jaxmodels.kernels import lstm_cpu

pytestmark = pytest.mark.skipif(
    lstm_cpu.unavailable() is not None, reason=f"CPU kernel unavailable: {lstm_cpu.unavailable()}"
)

TOL = dict(rtol=2e-5, atol=2e-6)
GRAD_TOL = dict(rtol=5e-5, atol=5e-5)


def _problem(hidden, batch, time, features, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    params = {
        "w_x": jax.random.normal(k[0], (features, 4 * hidden)) / np.sqrt(features),
        "w_h": jax.random.normal(k[1], (hidden, 4 * hidden)) / np.sqrt(hidden),
        "b": 0.1 * jax.random.normal(k[2], (4 * hidden,)),
    }
    carry = (
        0.5 * jax.random.normal(k[3], (batch, hidden)),
        0.5 * jax.random.normal(k[4], (batch, hidden)),
    )
    return params, carry, jax.random.normal(k[5], (batch, time, features))


def _loop(params, xs, carry, reverse):
    """The reference: ``lstm_cell`` stepped by a plain ``lax.scan``, differentiated by autodiff."""
    step = lambda carry, x: jaxmodels.lstm_cell(params, carry, x)
    carry, hs = jax.lax.scan(step, carry, jnp.swapaxes(xs, 0, 1), reverse=reverse)
    return carry, jnp.swapaxes(hs, 0, 1)


def _loss(run):
    """A loss that reaches every output: the outputs, and both parts of the final carry."""

    def loss(params, carry, xs):
        (h, c), hs = run(params, xs, carry)
        return jnp.sum(hs**2) + jnp.sum(jnp.sin(h)) + jnp.sum(c * c)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


# (hidden, batch, time, features): the code paths named in the module docstring
SHAPES = [
    (16, 2, 5, 3),
    (13, 3, 7, 5),  # hidden < 8: the scalar tail only
    (37, 7, 9, 4),  # a vector block and a tail; batch 6 + 1 (AVX2), 7 (AVX-512)
    (36, 19, 4, 9),  # 9 panels of w_h's columns, 3 of its rows (pairs and one); batch 8 + 8 + 3
    (200, 5, 9, 7),  # several threads (where the machine has the CPUs)
    (24, 1, 150, 6),  # batch 1: projections in chunks of 128 steps and a partial chunk
]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_the_scan_and_the_cell_loop(shape, reverse):
    params, carry, xs = _problem(*shape)
    kernel = lambda p, x, c: jaxmodels.lstm_scan(p, x, c, reverse=reverse, impl="cpu")
    scan = lambda p, x, c: jaxmodels.lstm_scan(p, x, c, reverse=reverse, impl="scan")
    loop = lambda p, x, c: _loop(p, x, c, reverse)
    out = jax.jit(kernel)(params, xs, carry)
    for reference in (scan, loop):
        np.testing.assert_allclose(
            np.concatenate([np.ravel(a) for a in jax.tree.leaves(out)]),
            np.concatenate([np.ravel(a) for a in jax.tree.leaves(reference(params, xs, carry))]),
            **TOL,
        )
    value, grads = _loss(kernel)(params, carry, xs)
    for reference in (scan, loop):
        ref_value, ref_grads = _loss(reference)(params, carry, xs)
        np.testing.assert_allclose(value, ref_value, rtol=1e-5)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(g, r, **GRAD_TOL)


def test_parts_of_the_hidden_units_give_the_same_result(monkeypatch):
    """However many threads split the units (one, or as many as there are CPUs, up to one per 8
    units), the results are bitwise one thread's: each output's sums run in the same order
    whichever thread computes them, so a run is reproducible whatever threads it got."""
    params, carry, xs = _problem(64, 4, 6, 5)
    kernel = lambda p, x, c: jaxmodels.lstm_scan(p, x, c, impl="cpu")
    monkeypatch.setattr(lstm_cpu, "UNITS_PER_THREAD", 10**6)
    assert lstm_cpu.threads_for(64) == 1
    one = _loss(kernel)(params, carry, xs)  # traced anew: the threads are read while tracing
    monkeypatch.setattr(lstm_cpu, "UNITS_PER_THREAD", 8)
    monkeypatch.setattr(lstm_cpu, "TRAINING_STEP_FLOPS_PER_THREAD", 1)
    assert lstm_cpu.threads_for(64, 4, 5) == min(8, len(os.sched_getaffinity(0)))
    many = _loss(kernel)(params, carry, xs)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
        np.testing.assert_array_equal(a, b)


def test_a_training_step_with_little_work_a_step_takes_one_thread():
    """The forward pass alone splits the units (one thread per 64); a training step's kernels do
    so only with at least TRAINING_STEP_FLOPS_PER_THREAD of a step per thread."""
    cpus = len(os.sched_getaffinity(0))
    assert lstm_cpu.threads_for(128) == min(2, cpus)
    assert lstm_cpu.threads_for(128, 16, 128) == 1  # 4.2 MFLOP a step
    assert lstm_cpu.threads_for(256, 16, 256) == min(2, cpus)  # 16.8 MFLOP a step
    assert lstm_cpu.threads_for(1024, 64, 1024) == min(16, cpus)


def test_auto_takes_the_kernel_on_cpu_for_full_length_sequences():
    params, _, xs = _problem(16, 2, 5, 3)
    lowered = lambda p, x, **kw: jax.jit(lambda p, x: jaxmodels.lstm_scan(p, x, **kw)).lower(p, x)
    assert lstm_cpu.FORWARD_TARGET in lowered(params, xs).as_text()
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    assert lstm_cpu.FORWARD_TARGET in lowered(bf16, xs.astype(jnp.bfloat16)).as_text()
    text = lowered(params, xs, seq_lengths=jnp.array([5, 3])).as_text()
    assert lstm_cpu.FORWARD_TARGET not in text


def test_the_module_and_vmap_run_on_the_kernel():
    """The Linen module (impl "auto"; two layers, both directions) agrees with impl="scan"; vmap
    over a leading axis runs the kernel once per entry, forward and backward (whose gate gradients
    are written over the saved activations: each entry's own)."""
    model = jaxmodels.LSTM(hidden_size=24, num_layers=2, bidirectional=True)
    xs = jax.random.normal(jax.random.key(3), (2, 6, 5))
    variables = model.init(jax.random.key(4), xs)
    np.testing.assert_allclose(
        model.apply(variables, xs)[0],
        jaxmodels.LSTM(hidden_size=24, num_layers=2, bidirectional=True, impl="scan").apply(
            variables, xs
        )[0],
        **TOL,
    )
    params, _, _ = _problem(16, 2, 5, 3)
    stacked = jax.random.normal(jax.random.key(5), (3, 2, 5, 3))
    outs = jax.vmap(lambda x: jaxmodels.lstm_scan(params, x, impl="cpu")[1])(stacked)
    loss = lambda p, x, impl: jnp.sum(jaxmodels.lstm_scan(p, x, impl=impl)[1] ** 2)
    grads = jax.vmap(jax.grad(loss), (None, 0, None))(params, stacked, "cpu")
    for i in range(3):
        np.testing.assert_allclose(outs[i], jaxmodels.lstm_scan(params, stacked[i])[1], **TOL)
        expected = jax.grad(loss)(params, stacked[i], "scan")
        for name in expected:
            np.testing.assert_allclose(grads[name][i], expected[name], **GRAD_TOL)


@pytest.mark.parametrize(
    "kwargs, dtype, match",
    [
        ({"seq_lengths": jnp.array([5, 3])}, jnp.float32, r"full-length sequences"),
        ({}, jnp.float64, r"float32, bfloat16 or float16 xs and params"),
    ],
)
def test_impl_cpu_refuses_what_it_does_not_take(kwargs, dtype, match):
    params, _, xs = _problem(16, 2, 5, 3)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: a.astype(dtype), params)
        with pytest.raises(ValueError, match=match):
            jaxmodels.lstm_scan(params, xs.astype(dtype), impl="cpu", **kwargs)


HALF_IN_FLOAT32 = [jnp.float16] + ([] if lstm_cpu.tiles() else [jnp.bfloat16])


@pytest.mark.parametrize("dtype", HALF_IN_FLOAT32, ids=lambda d: jnp.dtype(d).name)
def test_half_precision_is_computed_in_float32(dtype):
    """float16, and bfloat16 without AMX tiles, run on the kernel in float32: the outputs, in the
    inputs' dtype, are the float32 kernel's rounded, and the gradients reach the half-precision
    parameters."""
    params, carry, xs = _problem(32, 3, 7, 5)
    half = lambda tree: jax.tree.map(lambda a: a.astype(dtype), tree)
    params, carry, xs = half(params), half(carry), half(xs)
    (h, c), hs = jaxmodels.lstm_scan(params, xs, carry, impl="cpu")
    (h32, c32), hs32 = jaxmodels.lstm_scan(_f32(params), _f32(xs), _f32(carry), impl="cpu")
    assert hs.dtype == h.dtype == c.dtype == dtype
    for got, want in ((hs, hs32), (h, h32), (c, c32)):
        np.testing.assert_array_equal(got, want.astype(dtype))
    loss = lambda p: jnp.sum(jaxmodels.lstm_scan(p, xs, carry, impl="cpu")[1].astype(jnp.float32))
    grads = jax.grad(loss)(params)
    loss32 = lambda p: jnp.sum(jaxmodels.lstm_scan(p, _f32(xs), _f32(carry), impl="cpu")[1])
    grads32 = jax.grad(loss32)(_f32(params))
    for name in grads:
        assert grads[name].dtype == dtype
        np.testing.assert_array_equal(grads[name], grads32[name].astype(dtype))


def _f32(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def _bf16_values(tree):
    """float32 arrays holding bfloat16 values (each rounded to nearest even)."""
    return jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), tree)


@jax.custom_vjp
def _rounded_dot(a, w):
    """a [n, k] · w [k, m] as the tiles take it: a rounded to bfloat16 (w holds bfloat16 values),
    the products summed in float32; backwards, the cotangent rounded as the kernel rounds δpre."""
    return jnp.dot(_bf16_values(a), w, precision="highest")


def _rounded_dot_fwd(a, w):
    return _rounded_dot(a, w), (a, w)


def _rounded_dot_bwd(residuals, g):
    a, w = residuals
    g = _bf16_values(g)
    return jnp.dot(g, w.T, precision="highest"), jnp.dot(_bf16_values(a).T, g, precision="highest")


_rounded_dot.defvjp(_rounded_dot_fwd, _rounded_dot_bwd)


def _rounded_loop(w_x, w_h, b, carry, xs, reverse):
    """The reference for bfloat16 on tiles: the LSTM with every matmul a ``_rounded_dot``, the gates
    and the cell in float32, differentiated by autodiff."""

    def step(carry, x):
        h, c = carry
        pre = _rounded_dot(x, w_x) + _rounded_dot(h, w_h) + b[None]
        i, f, g, o = jnp.split(pre, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    carry, hs = jax.lax.scan(step, carry, jnp.swapaxes(xs, 0, 1), reverse=reverse)
    return carry, jnp.swapaxes(hs, 0, 1)


def _relative_error(got, want, quantile=1.0):
    """The largest over the leaves of the ``quantile`` of |got - want| / max |want|."""
    return max(
        float(jnp.quantile(jnp.abs(g - w), quantile) / jnp.max(jnp.abs(w)))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    )


needs_tiles = pytest.mark.skipif(not lstm_cpu.tiles(), reason="no AMX bfloat16 tiles here")


@needs_tiles
@pytest.mark.parametrize("shape", [(37, 19, 4), (36, 20, 9), (200, 17, 7), (13, 16, 40)], ids=str)
def test_bfloat16_on_tiles_rounds_the_matmul_operands(shape):
    """With tiles, one step's outputs and gradients are those of the LSTM with each matmul's
    operands rounded to bfloat16 (``_rounded_loop``), up to float32 rounding; the same kernel in
    float32 is far from them. The weights and x hold bfloat16 values, the carry does not (the
    forward's rounding shows in h_0). One step and nine elements of ten: the backward rounds δpre,
    float32 values that differ in their last bits between the two, and where a tie goes the other
    way one batch row's gradients move by a bfloat16 step (with a longer sequence, all its later
    steps would)."""
    hidden, batch, features = shape
    params, carry, xs = _problem(hidden, batch, 1, features)
    params, xs = _bf16_values((params, xs))
    args = (params["w_x"], params["w_h"], params["b"], carry, xs)

    def loss(run, *flag):
        def f(*args):
            (h, c), hs = run(*args, False, *flag)
            return jnp.sum(hs**2) + jnp.sum(jnp.sin(h)) + jnp.sum(c * c)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4)))(*args)

    want = loss(_rounded_loop)
    tiles_error = _relative_error(loss(lstm_cpu._recurrence, True), want, quantile=0.9)
    float32_error = _relative_error(loss(lstm_cpu._recurrence, False), want, quantile=0.9)
    assert tiles_error < 1e-6 and float32_error > 100 * tiles_error, (tiles_error, float32_error)


@needs_tiles
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bfloat16_on_tiles_stays_within_bfloat16_of_float32(shape):
    """Over whole sequences (every shape's code paths: the tiles' row and panel tails, k padded to
    32), lstm_scan in bfloat16 and its gradients stay within bfloat16's precision of the float32
    kernel on the same values."""
    params, carry, xs = _problem(*shape)
    half = lambda tree: jax.tree.map(lambda a: a.astype(jnp.bfloat16), tree)
    kernel = lambda p, x, c: jaxmodels.lstm_scan(p, x, c, impl="cpu")
    got = _loss(kernel)(half(params), half(carry), half(xs))
    want = _loss(kernel)(*_f32((half(params), half(carry), half(xs))))
    assert _relative_error(_f32(got), want) < 2e-2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_a_nan_in_the_inputs_reaches_the_outputs(dtype):
    """A NaN in x_t makes that batch row's h_t and every later one NaN (as in the scan), and only
    that row: the vectorized σ and tanh do not clamp it away."""
    params, carry, xs = _problem(37, 3, 6, 4)  # 37 units: full vectors and a masked tail
    xs = xs.at[1, 2, 0].set(jnp.nan)
    cast = lambda tree: jax.tree.map(lambda a: a.astype(dtype), tree)
    (h, c), hs = jaxmodels.lstm_scan(cast(params), cast(xs), cast(carry), impl="cpu")
    hs = np.asarray(hs.astype(jnp.float32))
    assert np.isnan(hs[1, 2:]).all() and not np.isnan(hs[1, :2]).any()
    assert np.isfinite(hs[[0, 2]]).all()
    assert np.isnan(np.asarray(h.astype(jnp.float32))[1]).all()
    assert np.isnan(np.asarray(c.astype(jnp.float32))[1]).all()


def test_a_build_is_reused():
    """The cached library is found again, not rebuilt."""
    lstm_cpu.unavailable()
    built = sorted(lstm_cpu.cache_dir().glob("lstm_cpu-*.so"))
    assert built, f"no build in {lstm_cpu.cache_dir()}"
    before = {p: p.stat().st_mtime_ns for p in built}
    _run_fresh("from jaxmodels.kernels import lstm_cpu; assert lstm_cpu.unavailable() is None")
    assert {p: p.stat().st_mtime_ns for p in built} == before


AVX2_BUILD = """
    import sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from test_lstm_cpu import SHAPES, _loss, _problem
    import jaxmodels
    from jaxmodels.kernels import lstm_cpu
    assert lstm_cpu.isa() == "avx2" and lstm_cpu.unavailable() is None, lstm_cpu.unavailable()
    kernel = lambda p, x, c: jaxmodels.lstm_scan(p, x, c, impl="cpu")
    results = {{}}
    for shape in SHAPES:
        params, carry, xs = _problem(*shape)
        for i, leaf in enumerate(jax.tree.leaves(_loss(kernel)(params, carry, xs))):
            results[f"{{shape}}/{{i}}"] = np.asarray(leaf)
    np.savez({out!r}, **results)
"""


@pytest.mark.skipif(lstm_cpu.isa() == "avx2", reason="this CPU has no AVX-512F: AVX2 only")
def test_the_avx2_build_agrees_with_the_avx512_build(tmp_path):
    """The AVX2 build (``JAXMODELS_CPU_KERNEL=avx2``, in a process of its own) gives this process's
    AVX-512 results, loss and gradients, up to float32 rounding (the sums' grouping differs)."""
    out = tmp_path / "avx2.npz"
    tests = os.path.dirname(os.path.abspath(__file__))
    _run_fresh(AVX2_BUILD.format(tests=tests, out=str(out)), JAXMODELS_CPU_KERNEL="avx2")
    avx2 = np.load(out)
    kernel = lambda p, x, c: jaxmodels.lstm_scan(p, x, c, impl="cpu")
    for shape in SHAPES:
        params, carry, xs = _problem(*shape)
        for i, leaf in enumerate(jax.tree.leaves(_loss(kernel)(params, carry, xs))):
            np.testing.assert_allclose(leaf, avx2[f"{shape}/{i}"], **GRAD_TOL, err_msg=str(shape))


@pytest.mark.skipif(lstm_cpu.isa() != "amx", reason="this CPU has no AMX tiles")
def test_the_avx512_switch_computes_bfloat16_in_float32():
    """``JAXMODELS_CPU_KERNEL=avx512`` builds without the tiles: bfloat16 is the float32 kernel's
    results rounded, as on a CPU without AMX (checked in a process of its own)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    code = f"""
        import sys
        import jax.numpy as jnp
        sys.path.insert(0, {tests!r})
        from test_lstm_cpu import test_half_precision_is_computed_in_float32
        from jaxmodels.kernels import lstm_cpu
        assert lstm_cpu.isa() == "avx512" and not lstm_cpu.tiles(), (lstm_cpu.isa(), lstm_cpu.tiles())
        test_half_precision_is_computed_in_float32(jnp.bfloat16)
    """
    _run_fresh(code, JAXMODELS_CPU_KERNEL="avx512")


def test_an_unknown_switch_value_is_named_and_auto_runs_the_scan(tmp_path):
    result = _run_fresh(FALLBACK, JAXMODELS_CPU_KERNEL="avx9", **_cache(tmp_path))
    expected = "expected JAXMODELS_CPU_KERNEL to be 0, 1, avx2 or avx512, got 'avx9'"
    assert f"REASON {expected}" in result.stdout
    assert "WARNINGS 1 " in result.stdout


def _run_fresh(code: str, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (the library is built and registered once per process)."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


FALLBACK = """
    import warnings
    import jax, jax.numpy as jnp, jaxmodels
    from jaxmodels.kernels import lstm_cpu
    params = jaxmodels.init_lstm(jax.random.key(0), 3, 16)
    xs = jnp.ones((2, 5, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out = jaxmodels.lstm_scan(params, xs)[1]
    scan = jaxmodels.lstm_scan(params, xs, impl="scan")[1]
    assert bool(jnp.all(out == scan)), "auto did not run the scan"
    print("REASON", lstm_cpu.unavailable())
    print("WARNINGS", len(caught), *[str(w.message) for w in caught])
    try:
        jaxmodels.lstm_scan(params, xs, impl="cpu")
    except RuntimeError as error:
        print("REFUSED", error)
"""


def test_without_a_compiler_auto_warns_once_and_runs_the_scan(tmp_path):
    result = _run_fresh(FALLBACK, CXX="false-compiler", PATH="/nonexistent", **_cache(tmp_path))
    assert "REASON no C++ compiler found" in result.stdout
    assert "WARNINGS 1 jaxmodels: the compiled CPU LSTM kernel is unavailable" in result.stdout
    assert "REFUSED impl='cpu' cannot run here: no C++ compiler found" in result.stdout


def test_a_failing_build_names_the_compiler_error(tmp_path):
    compiler = tmp_path / "broken-c++"
    compiler.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && exit 0\necho "fatal: broken" >&2\nexit 1\n'
    )
    compiler.chmod(0o755)
    result = _run_fresh(FALLBACK, CXX=str(compiler), **_cache(tmp_path))
    assert "REASON broken-c++ failed to build lstm_cpu.cc: fatal: broken" in result.stdout
    assert "WARNINGS 1 " in result.stdout
    assert not list((tmp_path / "cache").glob("*.so")), "a failed build left a library behind"


def test_switched_off_it_is_never_built_and_auto_stays_quiet(tmp_path):
    result = _run_fresh(FALLBACK, JAXMODELS_CPU_KERNEL="0", **_cache(tmp_path))
    assert "REASON disabled by JAXMODELS_CPU_KERNEL=0" in result.stdout
    assert "WARNINGS 0" in result.stdout
    assert "REFUSED impl='cpu' cannot run here: disabled" in result.stdout
    assert not (tmp_path / "cache").exists()


def _cache(tmp_path) -> dict:
    return {"JAXMODELS_CACHE_DIR": str(tmp_path / "cache")}
