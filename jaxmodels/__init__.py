"""jaxmodels: pure-function CNN, simple RNN and LSTM models in JAX, with a fused scan LSTM.

Public names only; see the README for the architecture.
"""

import os as _os

# Installed, kernels/ is the subpackage jaxmodels/kernels (pyproject's package-dir mapping). Imported
# from a source checkout instead (Python started in the repository root), kernels/ sits beside this
# folder: let the package's search path reach it there.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(
    _os.path.join(_root, "kernels", "__init__.py")
):
    __path__.append(_root)
del _os, _here, _root

from jaxmodels.cells import dense, init_dense, init_lstm, init_rnn, lstm_cell, rnn_cell
from jaxmodels.checks import checked
from jaxmodels.layers import CNN, LSTM, SimpleRNN
from jaxmodels.models import Model, get_model, list_models
from jaxmodels.recurrent import lstm_scan, rnn_scan

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
