"""The models' mathematics: pure functions and Flax Linen modules over documented parameter pytrees.

- ``cells``: one step of each layer, the seed's equations (``dense``, and ``rnn_cell`` and
  ``lstm_cell``, both ``(params, carry, x) -> (carry, y)`` as Flax's cells) and their initialisers;
- ``recurrent``: the cells over time (``rnn_scan``, ``lstm_scan``: the fused scan with its own
  backward pass, or a Pallas kernel from ``jaxmodels.kernels``);
- ``conv``: the seed CNN's convolution and pooling (XLA or the Pallas kernels);
- ``layers``: the Linen modules ``SimpleRNN``, ``LSTM`` and ``CNN`` over those functions;
- ``models``: the registry of named models (``get_model``) and character generation;
- ``checks``: argument validation shared by all of them (``checked``).

Imports only ``jaxmodels.kernels``; everything else in the package builds on it.
"""
