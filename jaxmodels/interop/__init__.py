"""Weights in and out of other frameworks and formats, one module each:

- ``pytorch``: ``from_torch`` / ``to_torch`` for ``nn.LSTM``, ``nn.RNN``, ``nn.Linear`` and the seed
  CNN as an ``nn.Sequential`` (its flatten order converted from NCHW);
- ``keras``: ``from_keras`` / ``to_keras`` for Keras 3's ``LSTM``, ``SimpleRNN``, ``Conv2D``,
  ``Dense`` and the seed's ``Sequential`` network;
- ``cudnn``: ``to_cudnn`` / ``from_cudnn``, the flat weight vector of ``jax.experimental.rnn.lstm``;
- ``safetensors``: ``save_variables`` / ``load_variables``, variables with the model's name and
  config in the file's metadata (``jaxmodels export --out F.safetensors``, ``eval --weights F``).

Each maps the other side's parameters to the Flax variables of the equivalent jaxmodels model and
back, exactly (transposes, gate order, bias sums, flatten order), checks shapes before writing,
and names what it cannot convert. ``jaxmodels.nnx`` holds the Flax NNX modules over the same
layout; ``jaxmodels.export`` writes ``jax.export`` artifacts.
"""
