"""The CNN suite: the seed CNN's training step (Adam) and inference at several batch sizes, against
the same network written the plain Flax way (the baseline) and PyTorch; in float32, and in
bfloat16: the Flax contenders with parameters in float32 and compute in bfloat16 (``dtype``),
PyTorch with the model cast to bfloat16 and under ``torch.autocast``.

FLOPs are counted analytically from the model's attributes, multiply-add = 2: a convolution
2·batch·height_out·width_out·channels_out·(kh·kw·channels_in), a dense layer 2·batch·features·out;
pooling and activations are not counted; a training step (forward + backward) counts 3x its
forward pass.
"""

from __future__ import annotations

import functools
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

CNN_BATCHES = {  # (training batches, inference batches)
    "full": ((32, 128, 512), (1, 512)),
    "small": ((4,), (2,)),
}
CNN_TORCH = "PyTorch"  # as installed, CPU-count threads; torch_configs names the others
CNN_PLAIN = "Flax nn.Conv (plain)"


def _conv_out(size: int, kernel: int, padding: str) -> int:
    return size - kernel + 1 if padding.upper() == "VALID" else size


def cnn_flops(
    model: Any,
    batch: int,
    height: int = 28,
    width: int = 28,
    channels: int = 1,
    *,
    train: bool = False,
) -> float:
    """FLOPs of ``jaxmodels.CNN``-like ``model`` on [batch, height, width, channels], from its
    attributes (features, kernel_size, pool_after, pool_size, padding, dense_features, num_classes):
    convolutions 2·batch·h_out·w_out·c_out·(kh·kw·c_in) and dense layers 2·batch·in·out; pooling
    and activations are not counted. 3x the forward pass for a training step."""
    kh, kw = model.kernel_size
    total = 0.0
    for out, pool in zip(model.features, model.pool_after):
        height, width = _conv_out(height, kh, model.padding), _conv_out(width, kw, model.padding)
        total += 2.0 * batch * height * width * out * kh * kw * channels
        channels = out
        if pool:
            height, width = height // model.pool_size[0], width // model.pool_size[1]
    features = height * width * channels
    for out in (*model.dense_features, model.num_classes):
        total += 2.0 * batch * features * out
        features = out
    return 3 * total if train else total


def _plain_cnn(dtype=None):
    """The seed's Keras network written the plain Flax way (nn.Conv, nn.max_pool, nn.Dense),
    computing in ``dtype`` (None: its inputs' and parameters'), parameters float32."""
    import flax.linen as nn

    class PlainCNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            conv = lambda n: nn.Conv(n, (3, 3), padding="VALID", dtype=dtype)
            x = nn.max_pool(nn.relu(conv(32)(x)), (2, 2), strides=(2, 2))
            x = nn.max_pool(nn.relu(conv(64)(x)), (2, 2), strides=(2, 2))
            x = nn.relu(conv(64)(x))
            x = nn.relu(nn.Dense(64, dtype=dtype)(x.reshape(x.shape[0], -1)))
            return nn.Dense(10, dtype=dtype)(x)

    return PlainCNN()


def cnn_variants() -> list[tuple[str, dict]]:
    """(contender name, CNN kwargs): one ``jaxmodels.CNN`` contender per ``conv_impl``
    (``layers.CONV_IMPLS``)."""
    from jaxmodels.nn import layers

    return [(f"jaxmodels CNN(conv_impl={v!r})", {"conv_impl": v}) for v in layers.CONV_IMPLS]


def flax_setup(
    model: str, kwargs: dict, *, batch: int, train: bool, dtype: str = "float32"
) -> Callable[[], Any]:
    """Set up a Flax contender on x [batch, 28, 28, 1] of ``dtype`` (one of DTYPES), parameters
    float32: ``model`` "jaxmodels" is ``jaxmodels.CNN(**kwargs, dtype=dtype)``, "plain" the same
    network written the plain way.

    Training step: softmax cross-entropy (in float32) on integer labels, its gradient, an Adam
    update (optax), the new parameters and optimizer state kept for the next call. Inference: the
    jitted logits.
    """
    import jax
    import jax.numpy as jnp
    import optax

    import jaxmodels as jm

    check_dtypes((dtype,))
    compute = jnp.dtype(dtype)
    net = _plain_cnn(compute) if model == "plain" else jm.CNN(**kwargs, dtype=compute)
    x = jax.random.normal(jax.random.key(1), (batch, 28, 28, 1), jnp.float32).astype(compute)
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10, jnp.int32)
    params = net.init(jax.random.key(0), x[:1])["params"]
    if not train:
        apply = jax.jit(lambda p, x: net.apply({"params": p}, x))
        return lambda: apply(params, x)
    tx = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = net.apply({"params": p}, x).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = [params, tx.init(params)]

    def run():
        state[0], state[1], loss = step(state[0], state[1], x, y)
        return loss, state[0]

    return run


def cnn_contenders(
    batch: int,
    *,
    train: bool,
    dtype: str = "float32",
    torch_threads: int | None = None,
    allocators: Sequence[str] = (AS_INSTALLED,),
) -> list[Contender]:
    """The seed CNN on [batch, 28, 28, 1] of ``dtype`` (PyTorch: [batch, 1, 28, 28]): every
    ``jaxmodels.CNN`` variant, PyTorch in every configuration (``torch_configs``; in bfloat16 both
    cast and under autocast), plain Flax.

    Training step: softmax cross-entropy on integer labels, its gradient, an Adam update (optax;
    torch.optim.Adam), the new parameters and optimizer state kept for the next call.
    Inference: the logits (PyTorch under torch.inference_mode, in eval mode).
    """
    shape = dict(batch=batch, train=train)

    def flax_contender(name: str, model: str, kwargs: dict) -> Contender:
        return Contender(name, functools.partial(flax_setup, model, kwargs, dtype=dtype, **shape))

    contenders = [flax_contender(name, "jaxmodels", kwargs) for name, kwargs in cnn_variants()]
    contenders += torch_dtype_contenders(
        CNN_TORCH,
        functools.partial(torch_models.cnn, **shape),
        dtype,
        torch_threads=torch_threads,
        allocators=allocators,
    )
    contenders.append(flax_contender(CNN_PLAIN, "plain", {}))
    return contenders


def cnn_suite(
    shapes: str = "full",
    *,
    torch_threads: int | None = None,
    allocators: Sequence[str] = (AS_INSTALLED,),
    dtypes: Sequence[str] = DTYPES,
) -> Suite:
    """The seed CNN: training steps and inference at CNN_BATCHES[shapes] in each of ``dtypes``;
    baseline plain Flax, vs PyTorch too."""
    import jaxmodels as jm

    train_batches, infer_batches = CNN_BATCHES[shapes]
    workloads = []
    for dtype in check_dtypes(dtypes):
        for train, batches in ((True, train_batches), (False, infer_batches)):
            group = "training step (Adam)" if train else "inference"
            workloads += [
                Workload(
                    name=f"batch {batch}",
                    group=group if dtype == "float32" else f"{group}, {dtype}",
                    flops=cnn_flops(jm.CNN(), batch, train=train),
                    contenders=cnn_contenders(
                        batch,
                        train=train,
                        dtype=dtype,
                        torch_threads=torch_threads,
                        allocators=allocators,
                    ),
                    info={
                        "batch": batch,
                        "input": [batch, 28, 28, 1],
                        "train": train,
                        "dtype": dtype,
                    },
                )
                for batch in batches
            ]
    per_sample = cnn_flops(jm.CNN(), 1)
    notes = [
        f"The seed CNN (Conv32-pool-Conv64-pool-Conv64-Dense64-Dense10, VALID, 93,322 parameters) on 28x28x1, "
        "float32; the bfloat16 groups: parameters float32 and compute bfloat16 (Flax: dtype=bfloat16, the loss in "
        "float32), PyTorch with the model cast to bfloat16 (`bfloat16`) and float32 under "
        "torch.autocast(dtype=bfloat16) (`autocast bfloat16`); % peak against the float32 peak. "
        f"{per_sample / 1e6:.2f} MFLOP per image forward (convolutions and dense layers), 3x for a training "
        "step. Training step: softmax cross-entropy, gradients, Adam (lr 1e-3) update; the new state feeds the "
        "next call. PyTorch: the same network in NCHW with torch.optim.Adam; inference under torch.inference_mode.",
        f"`{CNN_PLAIN}`: the same architecture written in the benchmark the plain way "
        "(nn.Conv, nn.max_pool, nn.Dense).",
        torch_note(torch_threads, allocators, dtypes),
    ]
    return Suite("cnn", workloads, baseline=CNN_PLAIN, peak_n=PEAK_N[shapes], notes=notes)
