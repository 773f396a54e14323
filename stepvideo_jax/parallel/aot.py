"""Ahead-of-time compilation for a TPU slice from a machine without TPUs (MaxText `train_compile` style).

libtpu can describe a TPU topology and compile for it without any chip attached: the devices are
compile-only, so `jit(...).lower(abstract args).compile()` runs the real TPU compiler (fusion, layout,
Pallas/Mosaic kernels, memory assignment) and `memory_analysis()` reports the per-chip HBM the program
would need. Nothing is executed. This is the accelerator memory plan; a CPU `memory_analysis` is not.

Requires libtpu (not a project dependency): `pip install libtpu==0.0.42.1` (the version `jax[tpu]==0.10.2`
pins) or `TPU_LIBRARY_PATH=/path/to/libtpu.so`.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from stepvideo_jax.parallel.rules import LOGICAL_RULES, Rules, logical_to_spec

# TPU slice name -> (topology_name, chip_config_name, chips_per_host_bounds), as libtpu names them.
SLICES: dict[str, tuple[str, str, tuple[int, int, int]]] = {
    "v5p-8": ("v5p:2x2x1", "megacore", (2, 2, 1)),
    "v5p-16": ("v5p:2x2x2", "megacore", (2, 2, 1)),
    "v5p-32": ("v5p:2x2x4", "megacore", (2, 2, 1)),
    "v5p-64": ("v5p:2x4x4", "megacore", (2, 2, 1)),
    "v5p-128": ("v5p:4x4x4", "megacore", (2, 2, 1)),
    "v5p-256": ("v5p:4x4x8", "megacore", (2, 2, 1)),
    "v4-8": ("v4:2x2x1", "megacore", (2, 2, 1)),
    "v5e-8": ("v5e:2x4", "default", (2, 2, 1)),
    "v6e-8": ("v6e:2x4", "default", (2, 2, 1)),
    "v6e-16": ("v6e:4x4", "default", (2, 2, 1)),
}


def tpu_devices(slice_name: str = "v5p-8", *, num_slices: int = 1) -> list:
    """Compile-only TPU devices of `slice_name` (one per chip; v4/v5p chips are megacore)."""
    if slice_name not in SLICES:
        raise ValueError(f"unknown TPU slice {slice_name!r}; choose one of {sorted(SLICES)}")
    # compile-only TPU topologies: only an ahead-of-time compile (`launch/`, `bench/`) loads them
    from jax._src import cloud_tpu_init
    from jax.experimental import topologies

    if cloud_tpu_init.get_tpu_library_path() is None:
        raise RuntimeError("libtpu is not installed: `pip install libtpu==0.0.42.1` (pinned by "
                           "jax[tpu]==0.10.2) or set TPU_LIBRARY_PATH to a libtpu.so")
    # Compile-only use: several processes may load libtpu at once (no chip is claimed).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    name, chip_config, host_bounds = SLICES[slice_name]
    return list(topologies.get_topology_desc(
        platform="tpu", topology_name=name, chip_config_name=chip_config,
        chips_per_host_bounds=host_bounds, num_slices=num_slices).devices)


def mesh_over(devices: Sequence, axes: Mapping[str, int]) -> Mesh:
    """Mesh with named axes (e.g. `{"fsdp": 1, "tensor": 4}`) over exactly `devices`."""
    if math.prod(axes.values()) != len(devices):
        raise ValueError(f"mesh axes {dict(axes)} multiply to {math.prod(axes.values())}, "
                         f"but the topology has {len(devices)} devices")

    grid = mesh_utils.create_device_mesh(tuple(axes.values()), list(devices))
    return Mesh(grid, tuple(axes))


def parse_axes(text: str) -> dict[str, int]:
    """"tensor=4" or "sequence=2,tensor=2" -> {"sequence": 2, "tensor": 2} (mesh axes of `rules.py`)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, size = item.partition("=")
        if not size.isdigit():
            raise ValueError(f"mesh axis {item!r} should look like name=size, e.g. tensor=4")
        out[name.strip()] = int(size)
    known = {a for _, t in LOGICAL_RULES for a in ((t,) if isinstance(t, str) else (t or ()))}
    if set(out) - known:
        raise ValueError(f"unknown mesh axes {sorted(set(out) - known)}; the rules use {sorted(known)}")
    return out


def abstract(shape: Sequence[int], dtype, mesh: Mesh, axes: Sequence[str | None] | None,
             rules: Rules = LOGICAL_RULES) -> jax.ShapeDtypeStruct:
    """A sharded stand-in for an activation with logical `axes` (nothing is allocated)."""
    spec = logical_to_spec(axes, mesh, rules) if axes is not None else PartitionSpec()
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, spec))


class CpuPhases:
    """Process CPU seconds (every thread: XLA compiles on several) per named phase, e.g. model init,
    trace + lower, XLA compile. Wall time on a shared host measures the neighbours; this does not."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.process_time()

    def mark(self, name: str) -> None:
        """Charges the CPU time since the previous mark (or creation) to `name`."""
        now = time.process_time()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now

    def format(self) -> str:
        return ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()) + " (process CPU s)"


def compile_aot(fn: Callable, args: Sequence[Any], *, in_shardings, out_shardings=None,
                mesh: Mesh, static_argnums: Sequence[int] = (), phases: CpuPhases | None = None):
    """`jit(fn).lower(*args).compile()` for the mesh's devices; `args` are abstract (ShapeDtypeStruct).
    `phases` gets the CPU time of "lower" (trace + lowering) and "compile" (XLA) charged."""
    phases = phases or CpuPhases()
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     static_argnums=tuple(static_argnums))
    with jax.set_mesh(mesh):
        lowered = jitted.lower(*args)
    phases.mark("lower")
    compiled = lowered.compile()
    phases.mark("compile")
    return compiled


MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "temp_size_in_bytes", "generated_code_size_in_bytes")


def memory(compiled) -> dict[str, int]:
    """Per-device bytes from `compiled.memory_analysis()`, plus `peak` = arguments + outputs - aliased
    + temporaries + code (what must fit in one chip's HBM)."""
    m = compiled.memory_analysis()
    out = {f: int(getattr(m, f)) for f in MEMORY_FIELDS}
    out["peak"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
                   + out["temp_size_in_bytes"] + out["generated_code_size_in_bytes"])
    return out


def format_memory(mem: Mapping[str, int]) -> str:
    short = {"argument_size_in_bytes": "arguments", "output_size_in_bytes": "outputs",
             "alias_size_in_bytes": "aliased", "temp_size_in_bytes": "temporaries",
             "generated_code_size_in_bytes": "code", "peak": "peak"}
    return ", ".join(f"{short[k]} {_human(v)}" for k, v in mem.items())


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)
