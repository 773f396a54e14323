"""The one table that maps logical axis names to mesh axes (MaxText style).

Model code annotates parameters (`nnx.Param(..., axes=("embed", "mlp"))`) and activations
(`constrain(x, ("batch", "length", "embed"))`) with logical names only. This module alone knows
which mesh axis shards which logical axis. A logical axis maps to a mesh axis, a tuple of mesh axes,
or None (replicated). Mesh axes absent from the current mesh (or of size 1) are dropped, so the same
rules serve a single device, an FSDP-only mesh and a full (data, fsdp, sequence, tensor) mesh.

Mesh axes: `data` (replicas, CFG branches), `fsdp` (parameters + batch), `sequence` (video
tokens), `tensor` (heads / MLP width).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, Any], ...]

LOGICAL_RULES: Rules = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),        # video tokens (f h w) of self-attention
    ("text_length", None),         # text-encoder tokens (Step-LLM, CLIP): short, replicated
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("frames", None),
    # parameters
    ("embed", "fsdp"),             # model width d
    ("heads", "tensor"),           # fused (heads * head_dim) projections
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),             # feed-forward width
    ("head_dim", None),
    ("vocab", "tensor"),
    ("caption", "fsdp"),           # text-encoder width feeding the caption projection
    ("modulation", "tensor"),      # 6*d AdaLN outputs
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("layers", None),              # stacked (scanned) blocks
    ("norm", None),
    ("conv_window", None),         # convolution taps (t, h, w)
    ("vae_channels", None),        # Video-VAE channels: replicated (0.5B params; one chip per chunk)
    ("vae_chunks", ("data", "fsdp", "sequence", "tensor")),  # independent VAE chunks: every device
)


def _state_rules(rules: Rules) -> Rules:
    """`rules` with every parameter axis sharded over `fsdp` also sharded over `sequence`."""
    return tuple((name, ("fsdp", "sequence") if target == "fsdp" else target) for name, target in rules)


# The training state (float32 master weights, Adam moments, EMA) ZeRO-style: every `fsdp` parameter
# axis also over `sequence`. The sequence devices run the same parameters on different tokens, so
# under LOGICAL_RULES each would hold a full fsdp shard of the state; here each holds 1/sequence of
# it. The step gathers the compute layout (LOGICAL_RULES) once before the forward and
# reduce-scatters the gradients back (`constrain_state`); off a `sequence` axis both tables agree.
STATE_RULES: Rules = _state_rules(LOGICAL_RULES)


def logical_to_spec(axes: Sequence[str | None] | None, mesh: Mesh | jax.sharding.AbstractMesh,
                    rules: Rules = LOGICAL_RULES, shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for logical `axes` on `mesh`; a mesh axis is used at most once. Given the array
    `shape`, a logical axis mapped to several mesh axes keeps only the leading ones whose product
    divides its size (e.g. a 12-wide `caption` axis on fsdp 4 x sequence 2 shards over fsdp alone)."""
    if axes is None:
        return PartitionSpec()
    table = dict(rules)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes)) if mesh.axis_names else {}
    used: set[str] = set()
    spec = []
    for name in axes:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        target = table[name]
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        kept = tuple(a for a in targets if sizes.get(a, 1) > 1 and a not in used)
        if shape is not None:
            dim = shape[len(spec)]
            while len(kept) > 1 and dim % math.prod(sizes[a] for a in kept):
                kept = kept[:-1]
        used.update(kept)
        spec.append(kept[0] if len(kept) == 1 else (kept or None))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Rules = LOGICAL_RULES) -> jax.Array:
    """Sharding constraint on an activation by logical axes, under the ambient mesh.

    A no-op outside a mesh context (`jax.set_mesh`), so model code runs unchanged on one device.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, mesh, rules))


def _is_variable(x) -> bool:

    return isinstance(x, nnx.Variable)


def constrain_state(state, rules: Rules = LOGICAL_RULES):
    """Sharding constraint on every variable of an NNX state (or gradient state) by its `axes`
    under the ambient mesh and `rules`; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return state

    def one(v):
        if not _is_variable(v):
            return v
        axes = v.get_metadata().get("axes")
        spec = logical_to_spec(axes, mesh, rules, v.get_value().shape if axes is not None else None)
        return v.replace(jax.lax.with_sharding_constraint(v.get_value(), spec))

    return jax.tree.map(one, state, is_leaf=_is_variable)


def state_specs(state, mesh, rules: Rules = LOGICAL_RULES):
    """PartitionSpec tree for an NNX state whose variables carry `axes` metadata."""

    def spec(v):
        axes = v.get_metadata().get("axes") if _is_variable(v) else None
        ndim = len(getattr(v, "shape", ()) if not _is_variable(v) else v.get_value().shape)
        if axes is not None and len(axes) != ndim:
            raise ValueError(f"axes {axes} do not match a variable of rank {ndim}")
        shape = getattr(v, "shape", ()) if not _is_variable(v) else v.get_value().shape
        return logical_to_spec(axes, mesh, rules, shape if axes is not None else None)

    return jax.tree.map(spec, state, is_leaf=_is_variable)


def state_shardings(state, mesh: Mesh, rules: Rules = LOGICAL_RULES):
    """NamedSharding tree for an NNX state (see `state_specs`)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(state, mesh, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))
