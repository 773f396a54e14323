"""Device meshes from a config, parameter placement by the rules table, multi-host start-up.

The mesh always has the four axes `data`, `fsdp`, `sequence`, `tensor` (in that order, `tensor`
innermost so it lands on the fastest links); axes of size 1 are harmless because the rules in
`parallel/rules.py` drop them. One size may be -1: it takes whatever devices are left.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from stepvideo_jax.parallel.rules import LOGICAL_RULES, Rules, state_shardings

MESH_AXES = ("data", "fsdp", "sequence", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; exactly one may be -1 (the remaining devices)."""

    data: int = 1
    fsdp: int = -1
    sequence: int = 1
    tensor: int = 1

    @classmethod
    def from_string(cls, text: str) -> "MeshConfig":
        """Parses `"sequence=2,tensor=2"`; unnamed axes keep their defaults (fsdp takes the rest,
        unless another axis is given as -1, then fsdp is 1)."""
        sizes: dict[str, int] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep or name not in MESH_AXES:
                raise ValueError(f"mesh spec item {item!r} is not <axis>=<size> with axis in {MESH_AXES}")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ValueError(f"mesh spec item {item!r}: size must be an integer or -1") from None
        if -1 in sizes.values() and "fsdp" not in sizes:
            sizes["fsdp"] = 1
        return cls(**sizes)

    @classmethod
    def from_mapping(cls, sizes: Mapping[str, int]) -> "MeshConfig":
        unknown = set(sizes) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid axes: {MESH_AXES}")
        return cls(**{k: int(v) for k, v in sizes.items()})

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with the -1 filled in; their product must be `num_devices`."""
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        bad = {k: v for k, v in sizes.items() if v != -1 and v < 1}
        if bad:
            raise ValueError(f"mesh sizes must be positive or -1, got {bad}")
        free = [k for k, v in sizes.items() if v == -1]
        if len(free) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {free}")
        fixed = math.prod(v for v in sizes.values() if v != -1)
        if free:
            if num_devices % fixed:
                raise ValueError(f"mesh sizes {sizes}: the fixed axes ({fixed} devices) do not divide "
                                 f"the {num_devices} devices")
            sizes[free[0]] = num_devices // fixed
        if math.prod(sizes.values()) != num_devices:
            raise ValueError(f"mesh sizes {sizes} use {math.prod(sizes.values())} devices but "
                             f"{num_devices} are available; set one axis to -1 to take the rest")
        return sizes


def make_mesh(config: MeshConfig | Mapping[str, int] | str = MeshConfig(),
              devices: Optional[Sequence[jax.Device]] = None, *, subset: bool = False) -> Mesh:
    """The one mesh builder: a (data, fsdp, sequence, tensor) mesh over `devices` (default: all,
    every process). `config`: a `MeshConfig`, a mapping of axis sizes (`config.mesh` of a training
    config) or a spec string ("sequence=2,tensor=2"). `subset=True`: fixed sizes whose product is below
    the device count take the first devices (e.g. a one-device run on a host with 8); otherwise the
    sizes must use every device.

    Device order comes from `mesh_utils.create_device_mesh`, which follows the physical topology on
    TPU and GPU (innermost axis on the nearest chips).
    """
    if isinstance(config, str):
        config = MeshConfig.from_string(config)
    elif not isinstance(config, MeshConfig):
        config = MeshConfig.from_mapping(config)
    devices = list(jax.devices() if devices is None else devices)
    fixed = [getattr(config, name) for name in MESH_AXES]
    if subset and min(fixed) > 0 and len(devices) % math.prod(fixed) == 0:
        devices = devices[:math.prod(fixed)]
    sizes = config.resolve(len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> nnx.Module:
    """Moves every variable of `model` to its sharding by the rules (in place; returns `model`)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh, rules)))
    return model


# Environment variables that mean "this process is one of several" for the launchers we support.
_MULTI_PROCESS_ENV = {
    "STEPVIDEO_DISTRIBUTED": "flag",          # set by launch/ scripts (TPU VMs show no variable)
    "JAX_COORDINATOR_ADDRESS": None,          # explicit jax.distributed settings
    "SLURM_NTASKS": "count",                  # srun (SLURM GPU clusters)
    "OMPI_COMM_WORLD_SIZE": "count",          # mpirun
    "TPU_WORKER_HOSTNAMES": "hosts",          # TPU VM pod slices: comma-separated worker list
    "MEGASCALE_COORDINATOR_ADDRESS": None,    # multi-slice TPU
}


def multi_process_env(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The variable showing a multi-process launch, or None for a single process."""
    for name, kind in _MULTI_PROCESS_ENV.items():
        value = environ.get(name)
        if not value:
            continue
        if kind is None or (kind == "flag" and value.lower() in ("1", "true", "yes")):
            return name
        if kind == "count" and value.isdigit() and int(value) > 1:
            return name
        if kind == "hosts" and len([h for h in value.split(",") if h.strip()]) > 1:
            return name
    return None


def initialize_distributed(force: bool = False, environ: Mapping[str, str] = os.environ) -> bool:
    """The one multi-host start-up: calls `jax.distributed.initialize()` when a multi-process launch
    is detected (or `force`), once (a second call, e.g. by `launch/entry.py` and then the entry point
    it runs, does nothing). Every entry point calls it first.

    Must run before any other JAX call. Returns whether it initialised. `initialize()` itself reads
    the coordinator, process count and id from SLURM, Open MPI or the TPU metadata server.
    """
    if jax.distributed.is_initialized():
        return False
    if not force and multi_process_env(environ) is None:
        return False
    jax.distributed.initialize()
    return True
