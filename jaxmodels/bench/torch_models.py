"""PyTorch's side of the suites: the LSTM layer and the seed CNN written for PyTorch, each set up as
a contender's step (``jaxmodels.bench.lstm`` and ``cnn`` say what is measured).

Nothing here imports jax or any other part of jaxmodels: a PyTorch worker process loads this file
by path, so that it runs as a PyTorch user's process does, with no JAX runtime in it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _precision(device: str, dtype: str, autocast: str | None):
    """(the dtype of the module and the inputs, a context for the forward pass): ``dtype`` cast,
    or float32 under ``torch.autocast`` to ``autocast``."""
    import contextlib

    import torch

    if autocast is None:
        return getattr(torch, dtype), contextlib.nullcontext
    if dtype != "float32":
        raise ValueError(f"expected dtype float32 with autocast, got {dtype!r}")
    return torch.float32, lambda: torch.autocast(device, dtype=getattr(torch, autocast))


def lstm(
    *,
    hidden: int,
    batch: int,
    time: int,
    features: int,
    train: bool,
    dtype: str = "float32",
    autocast: str | None = None,
) -> Callable[[], Any]:
    """``torch.nn.LSTM(features, hidden, batch_first=True)`` on xs [batch, time, features]; module
    and inputs of ``dtype`` ("float32", "bfloat16"), or float32 run under
    ``torch.autocast(dtype=autocast)``. Forward: the outputs under ``torch.no_grad``. Training
    step: the gradients of sum(hs) (summed in float32) with respect to the parameters and the
    inputs (``torch.autograd.grad``: returned, not accumulated into ``.grad``)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    dtype, precision = _precision(device, dtype, autocast)
    layer = torch.nn.LSTM(features, hidden, batch_first=True).to(device, dtype)
    xs = torch.randn(batch, time, features, device=device).to(dtype)
    if not train:

        def forward():
            with torch.no_grad(), precision():
                return layer(xs)[0]

        return forward
    xs.requires_grad_(True)
    wrt = [*layer.parameters(), xs]

    def step():
        with precision():
            hs = layer(xs)[0]
        return torch.autograd.grad(hs.float().sum(), wrt)

    return step


def seed_cnn():
    """The seed CNN as ``torch.nn.Sequential`` in NCHW: [batch, 1, 28, 28] -> logits [batch, 10]
    (93,322 parameters, as jaxmodels' ``CNN()``)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 64, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def cnn(
    *, batch: int, train: bool, dtype: str = "float32", autocast: str | None = None
) -> Callable[[], Any]:
    """The seed CNN in NCHW on x [batch, 1, 28, 28]; model and inputs of ``dtype`` ("float32",
    "bfloat16"), or float32 run under ``torch.autocast(dtype=autocast)``. Training step:
    cross-entropy (in float32) on integer labels, backward, ``torch.optim.Adam`` (lr 1e-3) step.
    Inference: the logits under ``torch.inference_mode``, in eval mode."""
    import torch

    nn = torch.nn
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    dtype, precision = _precision(device, dtype, autocast)
    model = seed_cnn().to(device, dtype)
    x = torch.randn(batch, 1, 28, 28, device=device).to(dtype)
    y = torch.randint(0, 10, (batch,), device=device)
    if not train:
        model.eval()

        def infer():
            with torch.inference_mode(), precision():
                return model(x)

        return infer
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with precision():
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        optimizer.step()
        return loss

    return step


def train_seed_cnn(
    data: str, *, epochs: int, batch_size: int, optimizer: str, lr: float, seed: int
) -> dict:
    """Train ``seed_cnn()`` as a PyTorch user would: shuffled mini-batches of the arrays in the
    .npz file ``data`` (x_train [n, 1, 28, 28] float32, y_train [n] int, x_test, y_test), cross-
    entropy, ``optimizer`` "rmsprop" (Keras' rho 0.9 and epsilon 1e-7 as ``alpha`` and ``eps``;
    PyTorch adds epsilon after the square root, Keras under it) or "adam"; the last partial batch
    dropped. Returns the training seconds of each epoch (the test evaluation after it not
    counted), the test accuracy after each epoch and the thread count."""
    import time

    import numpy as np
    import torch

    torch.manual_seed(seed)
    arrays = np.load(data)
    x, y = torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"]).long()
    x_test, y_test = torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"]).long()
    model = seed_cnn()
    make = {
        "rmsprop": lambda p: torch.optim.RMSprop(p, lr=lr, alpha=0.9, eps=1e-7),
        "adam": lambda p: torch.optim.Adam(p, lr=lr),
    }
    opt = make[optimizer](model.parameters())
    epoch_s, accuracy = [], []
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(x))
        for i in range(len(x) // batch_size):
            idx = order[i * batch_size : (i + 1) * batch_size]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        epoch_s.append(time.perf_counter() - start)
        model.eval()
        with torch.inference_mode():
            correct = sum(
                int((model(x_test[i : i + 1000]).argmax(1) == y_test[i : i + 1000]).sum())
                for i in range(0, len(x_test), 1000)
            )
        accuracy.append(correct / len(x_test))
    return {"epoch_s": epoch_s, "test_accuracy": accuracy, "threads": torch.get_num_threads()}
