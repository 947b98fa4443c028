"""The tests' one independent numpy implementation of the seed's equations (docs/guides/math.md).

Pure numpy, no jaxmodels: the oracle the cells, layers and models are checked against.

- dense:  y = f(x W + b)
- rnn:    h_t = f(x_t W_x + h_{t-1} W_h + b)
- lstm:   pre = x_t W_x + h_{t-1} W_h + b in the pinned layout {"w_x": [in, 4H], "w_h": [H, 4H],
  "b": [4H]}, split in 4 blocks of H, gates i, f, g, o in that order; each gate's weights are
  sliced out (W_xi, W_hi, b_i, ...) and written out separately:
  C_t = f ⊙ C_{t-1} + i ⊙ g, h_t = o ⊙ tanh(C_t), with σ(x) = 1 / (1 + exp(-x)).

The sequence functions compute in float64 and follow packed-sequence semantics: example n runs
over its first ``lengths[n]`` steps only (steps at t >= length leave the carry unchanged and
output zeros); ``reverse`` reads each sequence backwards from its own last step, length - 1, down
to 0, writing each output at the step it read. The carry starts at zeros.
"""

from __future__ import annotations

import numpy as np

CELLS = ("lstm", "rnn")


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_dense(w, b, x, activation=lambda v: v):
    return activation(x @ w + b)


def np_rnn_step(w_x, w_h, b, h, x, activation=np.tanh):
    return activation(x @ w_x + h @ w_h + b)


def np_lstm_step(w_x, w_h, b, h, c, x):
    """The seed's LSTM step with every gate's weights sliced out of the pinned layout: (h_t, C_t)."""
    H = w_h.shape[0]
    W_xi, W_xf, W_xc, W_xo = (w_x[:, k * H : (k + 1) * H] for k in range(4))
    W_hi, W_hf, W_hc, W_ho = (w_h[:, k * H : (k + 1) * H] for k in range(4))
    b_i, b_f, b_c, b_o = (b[k * H : (k + 1) * H] for k in range(4))
    i_t = np_sigmoid(x @ W_xi + h @ W_hi + b_i)
    f_t = np_sigmoid(x @ W_xf + h @ W_hf + b_f)
    o_t = np_sigmoid(x @ W_xo + h @ W_ho + b_o)
    g_t = np.tanh(x @ W_xc + h @ W_hc + b_c)
    c_t = f_t * c + i_t * g_t
    h_t = o_t * np.tanh(c_t)
    return h_t, c_t


def np_recurrence(cell, params, xs, lengths=None, reverse=False):
    """One layer and direction of ``cell`` ("lstm" or "rnn", tanh) over xs [batch, time, features]
    in float64, from a zero carry: (final carry, outputs [batch, time, hidden]).

    The final carry is (h_n, c_n) for the LSTM and h_n for the RNN, each [batch, hidden]: the carry
    after each example's last real step (the zero carry for length 0)."""
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    w_x, w_h, b = (np.asarray(params[k], np.float64) for k in ("w_x", "w_h", "b"))
    xs = np.asarray(xs, np.float64)
    batch, time, _ = xs.shape
    hidden = w_h.shape[0]
    lengths = np.full(batch, time) if lengths is None else np.asarray(lengths)
    hs = np.zeros((batch, time, hidden))
    h_n, c_n = np.zeros((batch, hidden)), np.zeros((batch, hidden))
    for n in range(batch):
        h, c = np.zeros(hidden), np.zeros(hidden)
        steps = range(lengths[n] - 1, -1, -1) if reverse else range(lengths[n])
        for t in steps:
            if cell == "lstm":
                h, c = np_lstm_step(w_x, w_h, b, h, c, xs[n, t])
            else:
                h = np_rnn_step(w_x, w_h, b, h, xs[n, t])
            hs[n, t] = h
        h_n[n], c_n[n] = h, c
    return ((h_n, c_n) if cell == "lstm" else h_n), hs


def np_chain(cell, params, xs, num_layers, bidirectional, lengths=None):
    """Stacked (bi)directional recurrences, with ``params[f"layer_{l}"]`` and, when bidirectional,
    ``params[f"layer_{l}_reverse"]``: (outputs of the last layer, final carry).

    A bidirectional layer's output is its forward and reverse outputs concatenated on the feature
    axis (forward first), and is the next layer's input. The final carry is stacked like PyTorch's
    h_n: [num_layers * directions, batch, hidden], index layer * directions + direction (direction
    1 the reverse one); a tuple (h_n, c_n) of such for the LSTM."""
    finals, xs = [], np.asarray(xs, np.float64)
    for layer in range(num_layers):
        fwd_carry, fwd = np_recurrence(cell, params[f"layer_{layer}"], xs, lengths)
        finals.append(fwd_carry)
        if bidirectional:
            bwd_carry, bwd = np_recurrence(
                cell, params[f"layer_{layer}_reverse"], xs, lengths, reverse=True
            )
            finals.append(bwd_carry)
            xs = np.concatenate([fwd, bwd], -1)
        else:
            xs = fwd
    if cell == "lstm":
        return xs, tuple(np.stack(part) for part in zip(*finals))
    return xs, np.stack(finals)
