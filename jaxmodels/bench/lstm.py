"""The LSTM suite: one layer's forward pass and training step, (hidden, batch, time) shapes with
input features = hidden, against Flax (the baseline), PyTorch and JAX peers; in float32, and in
bfloat16: the JAX contenders with parameters in float32 and compute in bfloat16 (cast inside the
jitted step, as mixed precision does it), PyTorch with the module cast to bfloat16 and under
``torch.autocast``.

Forward: the outputs hs [batch, time, hidden]. Training step: the gradients of sum(hs) with respect
to the parameters and the inputs.

FLOPs are counted analytically, multiply-add = 2: a layer's forward pass is
2·time·batch·(features+hidden)·4·hidden (the gate matmuls; the elementwise work is left out); a
training step (forward + backward) counts 3x its forward pass.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

from jaxmodels.bench import torch_models
from jaxmodels.bench.timing import (
    AS_INSTALLED,
    DTYPES,
    PEAK_N,
    Contender,
    Suite,
    Workload,
    check_dtypes,
)
from jaxmodels.bench.torch_configs import torch_dtype_contenders, torch_note
from jaxmodels.kernels import lstm_cpu

# (hidden, batch, time), input features = hidden: DeepBench's shapes scaled to a small CPU machine,
# and the latency shapes (batch 1; small hidden).
LSTM_SHAPES = {
    "full": [
        (256, 16, 150),
        (256, 64, 150),
        (512, 16, 25),
        (512, 64, 25),
        (1024, 64, 25),
        (256, 1, 150),
        (128, 16, 100),
    ],
    "small": [(16, 2, 5)],
}

LSTM_NAIVE = "naive lstm_cell scan"
LSTM_FLAX = "Flax nn.RNN(OptimizedLSTMCell)"
LSTM_TORCH = "PyTorch nn.LSTM"  # as installed, CPU-count threads; torch_configs names the others
LSTM_SCAN = "jaxmodels lstm_scan(scan)"
LSTM_PALLAS = "jaxmodels lstm_scan(pallas)"
LSTM_CPU = "jaxmodels lstm_scan(cpu)"
JAX_KINDS = ("naive", "flax", "experimental", "scan", "pallas", "cpu")


def lstm_flops(
    hidden: int, batch: int, time: int, features: int | None = None, *, train: bool = False
) -> float:
    """FLOPs of one LSTM layer over a sequence: 2·time·batch·(features+hidden)·4·hidden forward
    (the gate matmuls), 3x that for forward + backward. ``features`` defaults to ``hidden``."""
    features = hidden if features is None else features
    forward = 2.0 * time * batch * (features + hidden) * 4 * hidden
    return 3 * forward if train else forward


def _naive(key, hidden, batch, features, dtype):
    import jax
    import jax.numpy as jnp

    import jaxmodels as jm

    def f(params, xs):
        zeros = jnp.zeros((batch, hidden), dtype)
        params = jax.tree.map(lambda a: a.astype(dtype), params)
        _, hs = jax.lax.scan(
            lambda carry, x: jm.lstm_cell(params, carry, x),
            (zeros, zeros),
            jnp.swapaxes(xs, 0, 1),
        )
        return jnp.swapaxes(hs, 0, 1)

    return f, jm.init_lstm(key, features, hidden)


def _flax(key, hidden, batch, time, features, dtype):
    import flax.linen as nn
    import jax.numpy as jnp

    model = nn.RNN(nn.OptimizedLSTMCell(hidden, dtype=dtype))  # parameters float32
    return model.apply, model.init(key, jnp.zeros((batch, time, features), jnp.float32))


def _experimental(key, hidden, batch, time, features, backend):
    import jax.numpy as jnp
    from jax.experimental import rnn as jax_rnn

    weights = jax_rnn.init_lstm_weight(key, features, hidden, 1, False)
    zeros = jnp.zeros((1, batch, hidden), jnp.float32)
    lengths = jnp.full((batch,), time, jnp.int32)

    def f(weights, xs):
        if backend == "gpu":  # cuDNN
            return jax_rnn.lstm(
                xs, zeros, zeros, weights, lengths, features, hidden, 1, 0.0, False
            )[0]
        w_ih, w_hh, b_ih, b_hh = jax_rnn.unpack_lstm_weights(weights, features, hidden, 1, False)
        return jax_rnn.lstm_ref(
            xs, zeros, zeros, w_ih, w_hh, b_ih, b_hh, lengths, features, hidden, 1, 0.0, False
        )[0]

    return f, weights


def jax_setup(
    kind: str,
    *,
    hidden: int,
    batch: int,
    time: int,
    features: int,
    train: bool,
    backend: str,
    dtype: str = "float32",
) -> Callable[[], Any]:
    """Set up the JAX contender ``kind`` (one of JAX_KINDS) on xs [batch, time, features] of
    ``dtype`` (one of DTYPES), parameters float32 (cast to ``dtype`` inside the step): its step runs
    the jitted forward pass, or the jitted gradients of sum(hs) (summed in float32) with respect to
    the parameters and the inputs."""
    import jax
    import jax.numpy as jnp

    import jaxmodels as jm

    check_dtypes((dtype,))
    key, compute = jax.random.key(0), jnp.dtype(dtype)
    if kind == "naive":
        f, params = _naive(key, hidden, batch, features, compute)
    elif kind == "flax":
        f, params = _flax(key, hidden, batch, time, features, compute)
    elif kind == "experimental":
        if dtype != "float32":
            raise ValueError("jax.experimental.rnn takes float32 only")
        f, params = _experimental(key, hidden, batch, time, features, backend)
    elif kind in ("scan", "pallas", "cpu"):
        cast = lambda p: jax.tree.map(lambda a: a.astype(compute), p)
        f = lambda p, x: jm.lstm_scan(cast(p), x, impl=kind)[1]
        params = jm.init_lstm(key, features, hidden)
    else:
        raise ValueError(f"expected a kind in {JAX_KINDS}, got {kind!r}")
    xs = jax.random.normal(jax.random.key(1), (batch, time, features), jnp.float32).astype(compute)
    if train:
        loss = lambda p, x: jnp.sum(f(p, x).astype(jnp.float32))
        fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    else:
        fn = jax.jit(f)
    return lambda: fn(params, xs)


def lstm_contenders(
    hidden: int,
    batch: int,
    time: int,
    *,
    train: bool,
    dtype: str = "float32",
    backend: str | None = None,
    torch_threads: int | None = None,
    allocators: Sequence[str] = (AS_INSTALLED,),
) -> list[Contender]:
    """The LSTM contenders on xs [batch, time, hidden] (features = hidden) of ``dtype``; PyTorch in
    every configuration of ``torch_threads`` and ``allocators`` (``torch_configs``), in bfloat16
    both cast and under autocast. ``backend`` (default: this process's) decides whether the Pallas
    kernel and cuDNN run. In bfloat16 the naive scan and jax.experimental.rnn (float32 only) sit
    out."""
    if backend is None:
        import jax

        backend = jax.default_backend()
    shape = dict(hidden=hidden, batch=batch, time=time, features=hidden, train=train)

    def jax_contender(name: str, kind: str) -> Contender:
        setup = functools.partial(jax_setup, kind, backend=backend, dtype=dtype, **shape)
        return Contender(name, setup)

    if dtype == "float32":
        experimental = "jax.experimental.rnn " + ("(cuDNN)" if backend == "gpu" else "(lstm_ref)")
        contenders = [
            jax_contender(LSTM_NAIVE, "naive"),
            jax_contender(LSTM_FLAX, "flax"),
            jax_contender(experimental, "experimental"),
        ]
    else:  # the naive scan and jax.experimental.rnn (float32 only) sit out
        contenders = [jax_contender(LSTM_FLAX, "flax")]
    contenders += torch_dtype_contenders(
        LSTM_TORCH,
        functools.partial(torch_models.lstm, **shape),
        dtype,
        torch_threads=torch_threads,
        allocators=allocators,
    )
    contenders.append(jax_contender(LSTM_SCAN, "scan"))
    if backend == "cpu" and lstm_cpu.unavailable() is None:
        contenders.append(jax_contender(LSTM_CPU, "cpu"))  # the compiled CPU kernel
    if backend in ("gpu", "tpu"):  # never time the kernel in interpret mode
        contenders.append(jax_contender(LSTM_PALLAS, "pallas"))
    return contenders


def lstm_suite(
    shapes: str = "full",
    *,
    backend: str | None = None,
    torch_threads: int | None = None,
    allocators: Sequence[str] = (AS_INSTALLED,),
    dtypes: Sequence[str] = DTYPES,
) -> Suite:
    """Forward and training-step workloads over LSTM_SHAPES[shapes] in each of ``dtypes``;
    baseline Flax, vs PyTorch too."""
    if backend is None:
        import jax

        backend = jax.default_backend()
    workloads = []
    for dtype, train in itertools.product(check_dtypes(dtypes), (False, True)):
        group = "training step (forward + backward)" if train else "forward"
        for hidden, batch, steps in LSTM_SHAPES[shapes]:
            workloads.append(
                Workload(
                    name=f"({hidden}, {batch}, {steps})",
                    group=group if dtype == "float32" else f"{group}, {dtype}",
                    flops=lstm_flops(hidden, batch, steps, train=train),
                    contenders=lstm_contenders(
                        hidden,
                        batch,
                        steps,
                        train=train,
                        dtype=dtype,
                        backend=backend,
                        torch_threads=torch_threads,
                        allocators=allocators,
                    ),
                    info={
                        "hidden": hidden,
                        "batch": batch,
                        "time": steps,
                        "features": hidden,
                        "train": train,
                        "dtype": dtype,
                    },
                )
            )
    notes = [
        "Workloads are (hidden, batch, time) with input features = hidden, one layer, float32; the bfloat16 groups: "
        "parameters float32 and compute bfloat16 (JAX: the parameters cast in the jitted step, the gradients "
        "reaching the float32 parameters; Flax: OptimizedLSTMCell(dtype=bfloat16)), PyTorch with the module cast "
        "to bfloat16 (`bfloat16`) and float32 under torch.autocast(dtype=bfloat16) (`autocast bfloat16`); "
        "% peak against the float32 peak. Forward: hs "
        "[batch, time, hidden]. Training step: gradients of sum(hs) w.r.t. the parameters and the inputs "
        "(PyTorch: torch.autograd.grad; forward under torch.no_grad). FLOPs: 2·T·B·(F+H)·4H forward, 3x for training.",
        f"`{LSTM_NAIVE}`: lax.scan over jaxmodels.lstm_cell, input projection inside the step, autodiff backward. "
        f"`{LSTM_SCAN}`: the fused scan and its hand-written backward, time in chunks (CPU: input "
        "projection per step, weight and input gradients per chunk of up to 800 rows, steps x batch; "
        "GPU/TPU: each one matmul over the sequence). "
        f"`{LSTM_CPU}` (CPU): the C++ kernel of kernels/lstm_cpu.cc through the XLA FFI, "
        "forward and backward loops over time in persistent threads that each own a part of the "
        "hidden units (their columns of w_x and w_h packed in cache, one barrier a step), input "
        "projection inside it in chunks of about 128 rows; the weight and input gradients as XLA "
        "matmuls over all steps, batch-major as the kernel's buffers. Bfloat16 where the CPU has "
        "AMX (amx_bf16 among the flags above): every matmul with bfloat16 operands and float32 "
        "sums, the kernel's on AMX tiles, the gradients' as XLA bfloat16 dots; the gates and the "
        "cell in float32. Without AMX: computed in float32, inputs and outputs bfloat16.",
    ]
    if backend not in ("gpu", "tpu"):
        notes.append(
            "jax.experimental.rnn.lstm is cuDNN-only; on this backend its pure-JAX reference "
            "(jax.experimental.rnn.lstm_ref, on the same packed weights) runs. The Pallas kernel is "
            "timed on GPU and TPU only, never in interpret mode."
        )
    notes.append(torch_note(torch_threads, allocators, dtypes))
    return Suite(
        "lstm",
        workloads,
        baseline=LSTM_FLAX,
        peak_n=PEAK_N[shapes],
        notes=notes,
    )
