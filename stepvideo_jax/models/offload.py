"""Host offload of the stacked transformer layers: `--config.offload=blocks`.

The DiT's `blocks` and the Step-LLM's `layers` (`models/stack.py`: one module, leading layer axis)
are ~99% of either model's parameters, nearly all of it the linear layers' kernels. Offloaded, those
kernels live in host memory (the `pinned_host` memory
kind, which TPU, GPU and CPU devices all have) in the same shardings as on the device, and the
scan copies each layer's variables to the device one iteration ahead of its use
(`stack._scan_offloaded`): at most two layers' weights are on the device at once, and the copy of
layer i + 1 overlaps the compute of layer i. Everything else of the model (embeddings, norms, the
top-level linears) stays on the device. Whatever dtype the variables have is offloaded as is
(int8 / fp8 values and their scales from `models/quant.py` alike).

Choices (`CHOICES`, the config's `offload`): "none" (everything on the device) and "blocks".

The model's `offload_layers` flag (static: part of its graph definition) selects the prefetching
scan; the placement is the variables' shardings' memory kind. `offload` sets both on a built
model; `host_shardings` gives the placement to restore a checkpoint into directly (so the
offloaded layers never pass through device memory) or to compile a plan ahead of time.
"""
from __future__ import annotations

from typing import Optional

import jax
from flax import nnx

from stepvideo_jax.models import stack
from stepvideo_jax.parallel.rules import state_shardings

CHOICES = ("none", "blocks")
HOST = "pinned_host"


def check_offload(value) -> bool:
    """True for "blocks", False for "none"; a ValueError naming the choices for anything else."""
    if not isinstance(value, str) or value not in CHOICES:
        raise ValueError(f"offload={value!r}: choose one of {list(CHOICES)} (\"blocks\": the DiT's and the "
                         "Step-LLM's per-layer weights live in host memory and reach the device one layer ahead; "
                         "see docs/offload.md)")
    return value == "blocks"


def check_mesh(mesh: Optional[jax.sharding.Mesh]) -> None:
    """A ValueError, before anything loads, for a layout offload cannot serve: devices without a
    `pinned_host` memory, or a mesh spanning several processes (each process's host memory holds
    only its own devices' shards; the copies are per device, but a multi-process host placement
    is not tested here, so it is refused rather than guessed)."""
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()
    lacking = sorted({d.platform for d in devices
                      if HOST not in {m.kind for m in d.addressable_memories()}})
    if lacking:
        kinds = sorted({m.kind for d in devices for m in d.addressable_memories()})
        raise ValueError(f"offload=blocks needs the {HOST!r} memory kind; {', '.join(lacking)} devices offer "
                         f"{kinds}: use offload=none")
    if len({d.process_index for d in devices}) > 1:
        raise ValueError(f"offload=blocks serves a mesh within one process (its devices' shards in that host's "
                         f"memory); the mesh {dict(mesh.shape) if mesh is not None else '(all devices)'} spans "
                         f"{len({d.process_index for d in devices})} processes: use offload=none, or one "
                         "process per mesh")


def stacked_name(model: nnx.Module) -> str:
    """The attribute holding `model`'s stacked layers (`stack.STACKED_MODULES`)."""
    names = [n for n in stack.STACKED_MODULES if isinstance(getattr(model, n, None), nnx.Module)]
    if len(names) != 1 or not hasattr(model, "offload_layers"):
        raise ValueError(f"{type(model).__name__} has no stacked layers to offload (expected one of "
                         f"{list(stack.STACKED_MODULES)} and an offload_layers flag)")
    return names[0]


def host_sharding(sharding):
    """`sharding` in host memory (same devices and layout)."""
    return sharding.with_memory_kind(HOST)


def host_shardings(model: nnx.Module, shardings):
    """`shardings` (a tree like `nnx.state(model)`) with the stacked layers' linear kernels moved to
    host memory; the rest unchanged."""
    name = stacked_name(model)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: host_sharding(s) if is_offloaded_path(path, name) else s, shardings)


def is_offloaded_path(path, stacked: str) -> bool:
    """Whether the state entry at key `path` is offloaded: a linear layer's `kernel` (its (in, out)
    weights, float or quantised values) inside the stacked module `stacked`.

    Only the kernels: they are the bulk (99.9% of a DiT block's bytes), and the TPU compiler
    rejects host-memory slices of the small per-layer tensors (libtpu 0.0.42.1: a RET_CHECK on the
    tiling of the (1, 6, d) modulation table), so biases, norms, scales and tables stay on the device."""
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    keys = [k for k in keys if k != "value"]
    return len(keys) > 1 and keys[0] == stacked and keys[-1] == "kernel"


def placement(model: nnx.Module, mesh: Optional[jax.sharding.Mesh] = None):
    """Where an offloaded `model`'s variables go (a tree like `nnx.state(model)`): the rule shardings
    on `mesh` (None: the default device), the stacked layers' in host memory. The target of a
    restore (`checkpoints`), so the offloaded layers never pass through device memory whole."""
    state = nnx.state(model)
    if mesh is not None:
        shardings = state_shardings(state, mesh)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return host_shardings(model, shardings)


def mark(model: nnx.Module) -> nnx.Module:
    """Set `model`'s prefetching scan on (its stacked variables must be, or be compiled, in host
    memory: `host_shardings`); returns `model`."""
    stacked_name(model)
    model.offload_layers = True
    return model


def offload(model: nnx.Module) -> nnx.Module:
    """Move a built model's stacked layers to host memory, keeping their shardings, and set the
    prefetching scan on (in place; returns `model`)."""
    state = nnx.state(model)
    targets = host_shardings(model, jax.tree.map(lambda a: a.sharding, state))
    nnx.update(model, jax.device_put(state, targets))
    return mark(model)


def is_offloaded(model: nnx.Module) -> bool:
    """Whether `model` runs the prefetching scan with its stacked variables in host memory."""
    if not getattr(model, "offload_layers", False):
        return False
    name = stacked_name(model)
    kinds = [getattr(a.sharding, "memory_kind", None) == HOST
             for path, a in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0] if is_offloaded_path(path, name)]
    return bool(kinds) and all(kinds)
