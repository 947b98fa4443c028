"""Compile targets without the hardware: devices of real GPUs and TPUs for ahead-of-time compiles.

``device("h100")`` returns a ``jax.Device`` of an NVIDIA H100 that exists only as a description;
``jax.jit(f).lower(spec).compile()`` with inputs placed on it (``abstract(shape, dtype, device)``)
runs the target's real compiler here: ptxas for GPUs (shared memory, registers), Mosaic and
XLA:TPU for TPUs (VMEM). That needs the compilers installed (``pip install "jax[tpu]==<jax>"
"jax-cuda12-plugin==<jax>" nvidia-cuda-nvcc-cu12``) and ``JAX_PLATFORMS=cpu``, so that the CUDA
plugin does not look for a GPU. GPU descriptions are XLA's ``GpuTargetConfigProto`` of each card,
kept in ``gpu_targets/``; TPUs come from libtpu's topologies.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target: ``platform`` "cuda" or "tpu"; ``spec`` the GPU target file in
    gpu_targets/ or the TPU topology name; peak dense FLOP/s per dtype and memory bandwidth (bytes/s)
    from the vendors' data sheets (dense, no sparsity), for roofline estimates."""

    name: str
    platform: str
    spec: str
    peak_flops: dict[str, float]
    bandwidth: float


TARGETS = {
    t.name: t
    for t in (
        Target("h100", "cuda", "h100_sxm.txtpb", {"float32": 67e12, "bfloat16": 989e12}, 3.35e12),
        Target(
            "a100", "cuda", "a100_sxm_80.txtpb", {"float32": 19.5e12, "bfloat16": 312e12}, 2.04e12
        ),
        Target("v5e", "tpu", "v5e:2x2", {"float32": 197e12, "bfloat16": 197e12}, 0.82e12),
        Target("v6e", "tpu", "v6e:2x2", {"float32": 918e12, "bfloat16": 918e12}, 1.64e12),
    )
}


# The shapes (hidden, batch, time) every LSTM path is compiled at for every target, in tests and in
# benchmarks/compile_matrix.py: hidden 64-2048, batch 1-256, time 1-1024, each extreme met with others.
COMPILE_GRID = (
    (64, 1, 1),
    (64, 256, 1024),
    (128, 16, 150),
    (256, 64, 150),
    (512, 1, 1024),
    (768, 16, 1024),
    (1024, 64, 25),
    (1024, 256, 1),
    (2048, 256, 100),
    (2048, 1, 1024),
)


def _gpu_config(spec: str) -> str:
    return (pathlib.Path(__file__).parent / "gpu_targets" / spec).read_text()


@functools.cache
def device(name: str) -> jax.Device:
    """A device of target ``name`` (one of ``TARGETS``) for ahead-of-time compilation.

    Raises RuntimeError naming the missing compiler when this jaxlib cannot target it."""
    if name not in TARGETS:
        raise ValueError(f"expected a target in {sorted(TARGETS)}, got {name!r}")
    target = TARGETS[name]
    try:
        if target.platform == "tpu":
            topology = topologies.get_topology_desc(target.spec, "tpu")
        else:
            topology = topologies.get_topology_desc(
                "", "cuda", target_config=_gpu_config(target.spec), topology="1x1x1"
            )
    except Exception as e:
        raise RuntimeError(
            f"cannot compile for {name} here ({type(e).__name__}: {str(e).splitlines()[0]}); install "
            f'"jax[tpu]=={jax.__version__}" "jax-cuda12-plugin=={jax.__version__}" nvidia-cuda-nvcc-cu12 '
            "and run with JAX_PLATFORMS=cpu. The CUDA plugin and libtpu are published after each jax "
            "release: where pip finds none for this jax, install the newest jax that has both in its "
            "place (`pip index versions jax-cuda12-plugin` lists them; .ci/run picks it this way)"
        ) from e
    return topology.devices[0]


def abstract(shape, dtype, target: str) -> jax.ShapeDtypeStruct:
    """An input of ``shape`` and ``dtype`` placed on a device of ``target``."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(device(target)))


def on_device(target: str):
    """A context in which traces are for ``target``'s device: an abstract mesh of it. It tells the
    Pallas GPU lowering which GPU it compiles for (jax >= 0.12 asks when no GPU is attached) and
    the kernels which on-chip budgets to plan with (``jaxmodels.kernels.common``)."""
    mesh = jax.sharding.Mesh(np.array([device(target)]), ("device",))
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


# XLA options of GPU compiles. A register spill fails the compile: a spilling kernel is a slow one.
# XLA's own Triton GEMM fusions are left out (cuBLAS instead): on a GPU, XLA autotunes them and
# drops configurations that spill, but a deviceless compile cannot autotune and takes a default
# one, which spilled in bfloat16 on A100 (the input-projection gradients of lstm_scan). Pallas
# kernels are compiled by Triton either way, and these options do not touch them.
GPU_COMPILER_OPTIONS = {
    "xla_gpu_fail_ptx_compilation_on_register_spilling": True,
    "xla_gpu_enable_triton_gemm": False,
}


def compile(fn, *args, target: str, **jit_kwargs):
    """``jax.jit(fn, **jit_kwargs).lower(*args).compile()`` for ``target``, with ``args`` made by
    ``abstract``, traced ``on_device(target)``, with ``GPU_COMPILER_OPTIONS`` on GPUs."""
    options = GPU_COMPILER_OPTIONS if TARGETS[target].platform == "cuda" else {}
    with on_device(target):
        return jax.jit(fn, **jit_kwargs).lower(*args).compile(compiler_options=options)
