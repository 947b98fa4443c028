"""Pallas kernels for jaxmodels, installed as ``jaxmodels.kernels``, and the CPU LSTM kernel
(``lstm_cpu``: C++ through the XLA FFI, built on first use).

Each kernel file follows the anatomy of ``jax/experimental/pallas/ops``: its own frozen
``BlockSizes`` with ``get_default()``, the kernel body over refs, a public wrapper that checks
shapes and picks block sizes, a ``custom_vjp`` forward/backward pair, and a plain ``jnp``
``*_reference`` that is both the specification and the fallback. ``lstm_stepwise`` runs the
``lstm_cell`` kernel once a step and takes ``lstm_cell.BlockSizes``.
"""
