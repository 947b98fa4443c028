"""Generators of the synthetic long-range tasks, as numpy arrays from a numpy Generator: the adding
problem and the copy problem. ``jaxmodels.data.datasets`` makes data sets of them ("adding", "copy"), one
seeded stream per split.
"""

from __future__ import annotations

import numpy as np


def adding_problem(
    num: int, seq_len: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``num`` examples of the adding problem (Hochreiter & Schmidhuber 1997, in the form of Le et al.
    2015 and Arjovsky et al. 2016).

    x [num, seq_len, 2] float32: feature 0 values uniform in [0, 1); feature 1 a marker, 1 at exactly
    two steps, one uniformly in the first half ``[0, seq_len // 2)`` and one in the second half
    ``[seq_len // 2, seq_len)``, else 0. y [num, 1] float32: the sum of the two marked values,
    ``sum_t x[:, t, 0] * x[:, t, 1]``. Predicting the mean, 1, scores MSE 1/6 (the variance of the sum).
    """
    values_rng, first_rng, second_rng = rng.spawn(
        3
    )  # one stream each: more examples extend, not reshuffle
    values = values_rng.random((num, seq_len), dtype=np.float32)
    half = seq_len // 2
    first, second = first_rng.integers(0, half, num), second_rng.integers(half, seq_len, num)
    rows = np.arange(num)
    markers = np.zeros((num, seq_len), np.float32)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    targets = (values[rows, first] + values[rows, second])[:, None]
    return np.stack([values, markers], axis=-1), targets


COPY_BLANK = 0  # token ids of the copy task: 0 blank, 1..alphabet symbols, alphabet + 1 delimiter


def copy_problem(
    num: int, seq_len: int, rng: np.random.Generator, *, alphabet: int = 8, memory: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """``num`` examples of the copy problem (Arjovsky, Shah & Bengio 2016, after Hochreiter &
    Schmidhuber 1997) with delay ``seq_len`` (their T); time = seq_len + 2 * memory steps.

    Tokens: 0 blank, 1..alphabet the symbols, alphabet + 1 the delimiter. Input x [num, time] int32:
    ``memory`` symbols drawn uniformly with replacement, then seq_len - 1 blanks, the delimiter, and
    ``memory`` blanks. Target y [num, time] int32: blanks, except the last ``memory`` steps, which
    repeat the symbols. The delimiter is the cue to start writing, at step ``memory + seq_len``.
    """
    symbols = rng.integers(1, alphabet + 1, (num, memory), dtype=np.int32)
    time = seq_len + 2 * memory
    x = np.full((num, time), COPY_BLANK, np.int32)
    x[:, :memory] = symbols
    x[:, memory + seq_len - 1] = alphabet + 1
    y = np.full((num, time), COPY_BLANK, np.int32)
    y[:, -memory:] = symbols
    return x, y
