"""Data parallelism: the ``pmap`` and ``sharded`` strategies, meshes and shardings, multi-host start-up.

    initialize_distributed()                       # no-op unless flags or env vars ask for it
    strategy = get_strategy()                      # "sharded" with > 1 device, else "single"
    fit(model, ds, config, workdir, strategy=strategy)

Three strategies by name, one trajectory for the same global batch (within float tolerance):

  "single":  ``jax.jit`` on one device (``SingleDevice``).
  "pmap":    ``jax.pmap`` over this process's devices with the named axis ``"batch"``; the state
             is replicated with a leading device axis, a global batch [batch, ...] is reshaped to
             [devices, batch / devices, ...], and the step ``pmean``s gradients and metrics over
             the axis (the step is built with ``axis_name``).
  "sharded": ``jax.jit`` over a one-axis ``Mesh`` named ``"data"`` of all devices (of all
             processes); the batch is sharded along ``data``, the state replicated with
             ``NamedSharding``; the step has no axis name: XLA's SPMD partitioner inserts the
             all-reduce that makes the global mask-weighted mean. The default with > 1 device and
             the one that spans hosts.

Every global batch must divide by the strategy's ``num_devices``; ``fetch`` returns host numpy of
the logical values (one copy of replicated state, the global value of sharded arrays).

Multi-host: ``initialize_distributed`` calls ``jax.distributed.initialize`` before anything else
touches JAX. Every process builds the same global batch (same data, seed and order) and feeds only
its own rows to its own devices with ``jax.make_array_from_process_local_data``; all processes
run the same steps in lockstep, and only process 0 writes logs (``train.fit``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

STRATEGIES = ("single", "pmap", "sharded")
DATA_AXIS = "data"  # the mesh axis of the sharded strategy
PMAP_AXIS = "batch"  # the named axis of the pmap strategy

# Environment variables read when the corresponding argument (command-line flag) is not given.
# JAX itself reads JAX_COORDINATOR_ADDRESS (and JAX_LOCAL_DEVICE_IDS, JAX_COORDINATOR_BIND_ADDRESS)
# but not the other two, which jaxmodels reads.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


# ----------------------------------------------------------------------------------- multi-host


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Start multi-host JAX (``jax.distributed.initialize``) when asked to; returns whether it did.

    Each argument, when None, is read from its environment variable: ``JAX_COORDINATOR_ADDRESS``
    ("host:port" of process 0), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``. Nothing given anywhere:
    a single-process run, nothing happens. Anything given: the missing values are left to JAX's
    cluster auto-detection (SLURM, Open MPI, Kubernetes, Cloud TPU), which fails with JAX's own
    message outside such a cluster. Must run before any other JAX computation (e.g. loading a data
    set that resizes images with JAX). CPU collectives use gloo (set before initialising).
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if coordinator_address is None and num_processes is None and process_id is None:
        return False
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"expected 0 <= process id < number of processes, got {process_id} and {num_processes}"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer in ${name}, got {text!r}") from None


# ------------------------------------------------------------------------------ meshes, batches


def make_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A one-axis mesh named ``"data"`` over ``devices`` (default: all devices of all processes),
    ordered by (process, id) so that each process owns a contiguous block of rows of a batch."""
    devices = sorted(
        devices if devices is not None else jax.devices(), key=lambda d: (d.process_index, d.id)
    )
    return Mesh(np.array(devices), (DATA_AXIS,))


def check_divisible(batch_size: int, num_devices: int) -> None:
    """A clear error unless the global batch splits evenly over the devices."""
    if batch_size % num_devices:
        raise ValueError(
            f"global batch size {batch_size} does not divide by the {num_devices} devices; "
            f"use a multiple of {num_devices} (e.g. {max(num_devices, batch_size // num_devices * num_devices)})"
        )


def _batch_size(batch: dict[str, np.ndarray]) -> int:
    sizes = {len(v) for v in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(
            f"expected every array of a batch to have the same leading [batch] size, got {sorted(sizes)}"
        )
    return sizes.pop()


def process_rows(sharding: NamedSharding, global_batch: int) -> slice:
    """The rows [start, stop) of a global batch [global_batch, ...] that this process's devices hold
    under ``sharding`` (batch sharded along its first axis)."""
    index_map = sharding.addressable_devices_indices_map((global_batch,))
    starts = [idx[0].indices(global_batch)[0] for idx in index_map.values()]
    stops = [idx[0].indices(global_batch)[1] for idx in index_map.values()]
    start, stop = min(starts), max(stops)
    rows = sum(b - a for a, b in set(zip(starts, stops)))
    if rows != stop - start:
        raise ValueError(
            f"this process's rows of the batch are not contiguous: {sorted(set(zip(starts, stops)))}"
        )
    return slice(start, stop)


def _to_host(x: Any) -> Any:
    """Host numpy of one (possibly multi-host) array: fully addressable -> device_get; replicated
    -> one local copy; sharded across processes -> all-gathered from every process."""
    if not isinstance(x, jax.Array):
        return x
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ----------------------------------------------------------------------------------- strategies


class Strategy(Protocol):
    """How steps run on devices. ``axis_name``: the device axis steps reduce over (None: none).
    ``compile`` turns a pure step into a runnable one; ``put_state`` / ``put_batch`` place host
    values (a global batch [batch, ...]) where compiled steps expect them; ``fetch`` brings
    results (metrics, state) back to the host as numpy, one copy."""

    name: str
    axis_name: str | None
    num_devices: int  # a global batch must divide by it

    def compile(self, fn: Callable, *, donate_state: bool = False) -> Callable:
        """``fn`` (state, batch) -> ... as a compiled step on this strategy's devices; with
        ``donate_state`` the state argument's buffers are reused for the result."""

    def put_state(self, state: Any) -> Any:
        """A host pytree placed as compiled steps expect the state (replicated)."""

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A global batch {name: [batch, ...]} placed as compiled steps expect it (split over the
        devices); the batch size must divide by ``num_devices``."""

    def fetch(self, tree: Any) -> Any:
        """Host numpy of the logical values of ``tree`` (one copy of replicated values)."""


@dataclasses.dataclass(frozen=True)
class SingleDevice:
    """``jax.jit`` on one device (the default device unless ``device`` is given)."""

    device: Any = None
    name: str = "single"
    axis_name: str | None = None
    num_devices: int = 1

    def _device(self):
        return self.device if self.device is not None else jax.devices()[0]

    def compile(self, fn: Callable, *, donate_state: bool = False) -> Callable:
        """``jax.jit(fn)``, donating the state (argument 0) with ``donate_state``."""
        return jax.jit(fn, donate_argnums=(0,) if donate_state else ())

    def put_state(self, state: Any) -> Any:
        """``state`` on the device."""
        return jax.device_put(state, self._device())

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """``batch`` on the device, whole."""
        return jax.device_put(batch, self._device())

    def fetch(self, tree: Any) -> Any:
        """``jax.device_get(tree)``: host numpy."""
        return jax.device_get(tree)


@dataclasses.dataclass(frozen=True)
class PmapStrategy:
    """``jax.pmap`` over ``devices`` (default: this process's local devices) with the axis "batch".

    State: every leaf [devices, ...] (one replica per device). Batch: [batch, ...] ->
    [devices, batch / devices, ...]. One process only: across hosts use "sharded".
    """

    devices: tuple = ()
    name: str = "pmap"
    axis_name: str | None = PMAP_AXIS

    def __post_init__(self):
        if jax.process_count() > 1:
            raise ValueError(
                f"the pmap strategy runs in one process, this run has {jax.process_count()}; use 'sharded'"
            )
        object.__setattr__(self, "devices", tuple(self.devices or jax.local_devices()))

    @property
    def num_devices(self) -> int:
        """How many devices the batch is split over: ``len(devices)``."""
        return len(self.devices)

    @property
    def _sharding(self) -> NamedSharding:
        return NamedSharding(Mesh(np.array(self.devices), (PMAP_AXIS,)), PartitionSpec(PMAP_AXIS))

    def compile(self, fn: Callable, *, donate_state: bool = False) -> Callable:
        """``jax.pmap(fn)`` over the devices with the axis "batch" (donating the state with
        ``donate_state``)."""
        return jax.pmap(
            fn,
            axis_name=PMAP_AXIS,
            devices=self.devices,
            donate_argnums=(0,) if donate_state else (),
        )

    def put_state(self, state: Any) -> Any:
        """One replica of ``state`` per device: every leaf [devices, ...]."""
        n = self.num_devices
        stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), state)
        return jax.device_put(stacked, self._sharding)

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A global batch [batch, ...] as [devices, batch / devices, ...], a slice per device."""
        size, n = _batch_size(batch), self.num_devices
        check_divisible(size, n)
        split = jax.tree.map(lambda x: np.reshape(x, (n, size // n, *np.shape(x)[1:])), batch)
        return jax.device_put(split, self._sharding)

    def fetch(self, tree: Any) -> Any:
        """Host numpy of the first replica (the values are the same on every device)."""
        return jax.tree.map(
            lambda x: np.asarray(x.addressable_data(0))[0] if isinstance(x, jax.Array) else x, tree
        )


@dataclasses.dataclass(frozen=True)
class ShardedStrategy:
    """``jax.jit`` over ``mesh`` (default: ``make_mesh()``, every device of every process): the
    batch sharded along "data", state and outputs replicated. No axis name: the partitioner makes
    the cross-device reductions. In a multi-host run each process places only its own rows."""

    mesh: Mesh | None = None
    name: str = "sharded"
    axis_name: str | None = None

    def __post_init__(self):
        if self.mesh is None:
            object.__setattr__(self, "mesh", make_mesh())
        if DATA_AXIS not in self.mesh.axis_names:
            raise ValueError(
                f"expected a mesh with a {DATA_AXIS!r} axis, got axes {self.mesh.axis_names}"
            )

    @property
    def num_devices(self) -> int:
        """The size of the mesh's "data" axis, every device of every process by default."""
        return int(self.mesh.shape[DATA_AXIS])

    @property
    def replicated(self) -> NamedSharding:
        """The sharding of the state and the outputs: a whole copy on every device."""
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch_sharding(self) -> NamedSharding:
        """The sharding of a batch: its leading axis split along "data"."""
        return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

    def compile(self, fn: Callable, *, donate_state: bool = False) -> Callable:
        """``jax.jit(fn)`` with replicated outputs (donating the state with ``donate_state``)."""
        # Replicated outputs keep the state's sharding fixed from step to step (no recompilation).
        return jax.jit(
            fn, out_shardings=self.replicated, donate_argnums=(0,) if donate_state else ()
        )

    def put_state(self, state: Any) -> Any:
        """``state`` replicated on every device of the mesh, from each process's host copy."""
        sharding = self.replicated

        def put(x):
            host = np.asarray(jax.device_get(x))
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

        return jax.tree.map(put, state)

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A global batch [batch, ...] (the same on every process) -> arrays sharded along "data";
        each process hands over only its own rows."""
        size = _batch_size(batch)
        check_divisible(size, self.num_devices)
        sharding = self.batch_sharding
        if jax.process_count() == 1:
            return jax.device_put(batch, sharding)
        rows = process_rows(sharding, size)
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(
                sharding, np.asarray(x[rows]), np.shape(x)
            ),
            batch,
        )

    def fetch(self, tree: Any) -> Any:
        """Host numpy of each leaf's global value, on every process."""
        return jax.tree.map(_to_host, tree)


def default_strategy_name() -> str:
    """ "sharded" when there is more than one device (of all processes), else "single"."""
    return "sharded" if jax.device_count() > 1 else "single"


def get_strategy(name: str | None = None) -> Strategy:
    """The strategy ``name`` (one of ``STRATEGIES``) over all available devices; None: the default
    (``default_strategy_name``)."""
    name = name or default_strategy_name()
    if name == "single":
        if jax.process_count() > 1:
            raise ValueError(
                f"the single strategy runs in one process, this run has {jax.process_count()}; use 'sharded'"
            )
        return SingleDevice()
    if name == "pmap":
        return PmapStrategy()
    if name == "sharded":
        return ShardedStrategy()
    raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGIES}")
