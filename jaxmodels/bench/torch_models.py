"""PyTorch's side of the suites: the LSTM layer and the seed CNN written for PyTorch, each set up as
a contender's step (``jaxmodels.bench.lstm`` and ``cnn`` say what is measured).

Nothing here imports jax or any other part of jaxmodels: a PyTorch worker process loads this file
by path, so that it runs as a PyTorch user's process does, with no JAX runtime in it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def lstm(*, hidden: int, batch: int, time: int, features: int, train: bool) -> Callable[[], Any]:
    """``torch.nn.LSTM(features, hidden, batch_first=True)`` on xs [batch, time, features] float32.
    Forward: the outputs under ``torch.no_grad``. Training step: the gradients of sum(hs) with
    respect to the parameters and the inputs (``torch.autograd.grad``: returned, not accumulated
    into ``.grad``)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    layer = torch.nn.LSTM(features, hidden, batch_first=True).to(device)
    xs = torch.randn(batch, time, features, device=device)
    if not train:

        def forward():
            with torch.no_grad():
                return layer(xs)[0]

        return forward
    xs.requires_grad_(True)
    wrt = [*layer.parameters(), xs]

    def step():
        return torch.autograd.grad(layer(xs)[0].sum(), wrt)

    return step


def cnn(*, batch: int, train: bool) -> Callable[[], Any]:
    """The seed CNN in NCHW on x [batch, 1, 28, 28] float32. Training step: cross-entropy on
    integer labels, backward, ``torch.optim.Adam`` (lr 1e-3) step. Inference: the logits under
    ``torch.inference_mode``, in eval mode."""
    import torch

    nn = torch.nn
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = nn.Sequential(
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
    ).to(device)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if not train:
        model.eval()

        def infer():
            with torch.inference_mode():
                return model(x)

        return infer
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    return step
