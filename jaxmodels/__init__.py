"""jaxmodels: pure-function CNN, simple RNN and LSTM models in JAX, with a fused scan LSTM.

Public names only; the docs (docs/, built with Sphinx) have the guides and the architecture.
"""

from jaxmodels.nn.cells import dense, init_dense, init_lstm, init_rnn, lstm_cell, rnn_cell
from jaxmodels.nn.checks import checked
from jaxmodels.nn.layers import CNN, LSTM, SimpleRNN
from jaxmodels.nn.models import Model, get_model, list_models
from jaxmodels.nn.recurrent import lstm_scan, rnn_scan

__version__ = "0.1.0"

__all__ = [
    "CNN",
    "LSTM",
    "Model",
    "SimpleRNN",
    "checked",
    "dense",
    "get_model",
    "init_dense",
    "init_lstm",
    "init_rnn",
    "list_models",
    "lstm_cell",
    "lstm_scan",
    "rnn_cell",
    "rnn_scan",
]
