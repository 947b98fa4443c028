"""Batches of host arrays, seeded and resumable.

    it = BatchIterator((ds.x_train, ds.y_train), batch_size=64, seed=0)
    for batch in it.epoch():                       # {"x": [64, ...], "y": [64], "mask": [64]}
            ...
    saved = it.position                            # Position(epoch, step); it.restore(saved) resumes

Arrays stay numpy on the host; placing them on devices is the trainer's (a strategy's) job.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

REMAINDERS = ("drop", "pad", "keep")


class Position(NamedTuple):
    """Where an iterator stands: the next batch is number ``step`` of epoch ``epoch``."""

    epoch: int
    step: int


class BatchIterator:
    """Batches of ``(x, y)`` with a seeded shuffle per epoch and a resumable position.

    The order of epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(examples)``, a
    function of (seed, epoch) only, so ``restore(Position(epoch, step))`` continues exactly where a
    saved iterator stood. Every batch is a dict ``{"x": [batch, ...], "y": [batch, ...],
    "mask": [batch] float32}``; ``mask`` is 1 for real examples and 0 for padding.

    Remainder policy for the last ``examples % batch_size`` examples of an epoch:
      "drop": left out (a different subset each epoch when shuffling); every batch is full.
      "pad":  one last full-size batch, the missing rows filled with copies of real examples and
              masked out; every example counts exactly once and shapes never change (no retrace).
      "keep": one last smaller batch (a second shape, hence a second compilation under jit).

    Examples:
      >>> import numpy as np
      >>> x, y = np.arange(10.0).reshape(10, 1), np.arange(10)
      >>> batches = BatchIterator((x, y), 4, seed=0, remainder="pad")
      >>> batches.steps_per_epoch
      3
      >>> [batch["mask"].tolist() for batch in batches.epoch()][-1]  # two real rows, two padding
      [1.0, 1.0, 0.0, 0.0]
    """

    def __init__(
        self,
        arrays: Sequence[np.ndarray],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        remainder: str = "drop",
    ):
        x, y = arrays
        if len(x) != len(y):
            raise ValueError(
                f"expected x and y with the same number of examples, got {len(x)} and {len(y)}"
            )
        if remainder not in REMAINDERS:
            raise ValueError(
                f"unknown remainder policy {remainder!r}; expected one of {REMAINDERS}"
            )
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, (int, np.integer))
            or batch_size <= 0
        ):
            raise ValueError(f"expected a positive integer batch size, got {batch_size!r}")
        if len(x) == 0:
            raise ValueError("expected at least one example, got an empty split")
        if remainder == "drop" and batch_size > len(x):
            raise ValueError(
                f"batch size {batch_size} is larger than the {len(x)} examples: with remainder='drop' "
                f"there would be no batch; use a batch size <= {len(x)} or remainder='pad'/'keep'"
            )
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.remainder = shuffle, seed, remainder
        self._position = Position(0, 0)

    @property
    def num_examples(self) -> int:
        """The examples of one epoch (all the arrays' leading size)."""
        return len(self.x)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch: examples // batch_size, plus one for a remainder unless "drop"."""
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest and self.remainder != "drop" else 0)

    @property
    def position(self) -> Position:
        """Where the next batch comes from: Position(epoch, step), what ``restore`` takes."""
        return self._position

    def restore(self, position: Position | Sequence[int] | dict) -> None:
        """Continue from a saved ``position`` (a Position, an (epoch, step) pair or a dict)."""
        epoch, step = (
            (position["epoch"], position["step"]) if isinstance(position, dict) else position
        )
        if epoch < 0 or not 0 <= step <= self.steps_per_epoch:
            raise ValueError(
                f"expected epoch >= 0 and 0 <= step <= {self.steps_per_epoch}, got ({epoch}, {step})"
            )
        self._position = Position(int(epoch), int(step))
        if step == self.steps_per_epoch:
            self._position = Position(int(epoch) + 1, 0)

    def order(self, epoch: int) -> np.ndarray:
        """Indices [examples] of epoch ``epoch``, in the order batches take them."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def _batch(self, order: np.ndarray, step: int) -> dict[str, np.ndarray]:
        idx = order[step * self.batch_size : (step + 1) * self.batch_size]
        mask = np.ones(len(idx), np.float32)
        if self.remainder == "pad" and len(idx) < self.batch_size:
            fill = np.resize(order, self.batch_size - len(idx))  # repeats real examples, cyclically
            idx = np.concatenate([idx, fill])
            mask = np.concatenate([mask, np.zeros(len(fill), np.float32)])
        return {"x": self.x[idx], "y": self.y[idx], "mask": mask}

    def epoch(self) -> Iterator[dict[str, np.ndarray]]:
        """The remaining batches of the current epoch; the position advances with each batch and
        moves to (epoch + 1, 0) after the last one."""
        epoch, start = self._position
        order = self.order(epoch)
        steps = self.steps_per_epoch
        for step in range(start, steps):
            batch = self._batch(order, step)
            self._position = (
                Position(epoch, step + 1) if step + 1 < steps else Position(epoch + 1, 0)
            )
            yield batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Batches without end, epoch after epoch."""
        while True:
            yield from self.epoch()
