"""Lowering for accelerators on this CPU machine (lowering needs no device): the abstract devices
the tests lower for, and the StableHLO text of a function lowered for one of them."""

import jax
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh

# The device a lowering is for: the Triton lowering asks which GPU (jax >= 0.12 refuses to guess
# without one attached), and the kernels' on-chip budgets depend on it.
GPUS = {
    "h100": AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"),
    "a100": AbstractDevice(device_kind="NVIDIA A100-SXM4-80GB", num_cores=108, platform="gpu"),
}
TPU = AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
TARGET_DEVICE = {"cuda": GPUS["h100"], "tpu": TPU}  # per export platform
KERNEL_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


def lowered_module(fn, platform, *args, device=None):
    """``jax.jit(fn)`` exported for ``platform`` ("cuda", "tpu") on ``device`` (default
    TARGET_DEVICE[platform]) with ``args``: its module's text, the kernels' custom calls in it."""
    mesh = AbstractMesh((1,), ("device",), abstract_device=device or TARGET_DEVICE[platform])
    with jax.sharding.use_abstract_mesh(mesh):
        exported = export.export(
            jax.jit(fn),
            platforms=[platform],
            disabled_checks=[export.DisabledSafetyCheck.custom_call(KERNEL_CALL["cuda"])],
        )(*args)
    return exported.mlir_module()
