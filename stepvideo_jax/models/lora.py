"""Low-rank adapters (LoRA) on the DiT's attention projections, an alternative to full fine-tuning.

An adapted projection computes `y = x @ kernel + (alpha / rank) * (x @ lora_a) @ lora_b`; `kernel`
(in, out) stays where `layers.Linear` keeps it (same state path), `lora_a` (in, rank) is drawn
N(0, 1/in) and `lora_b` (rank, out) starts at zero, so a fresh adapter leaves the model unchanged.
The adapter factors are `LoRAParam`s (a `Param` subclass): `nnx.state(model, LoRAParam)` is what
the optimizer sees, `nnx.state(model, FROZEN)` the base weights, whose paths and shapes are those of
the plain `StepVideoDiT` (so a plain DiT graphdef runs on them: the DPO reference, or the export).
On the stacked blocks (`models/stack.py`) the adapters are stacked too: `lora_a` (layers, in, rank),
`lora_b` (layers, rank, out), logical axes `("layers", ...)`; inside the layer scan a `LoRALinear`
sees one layer's slices, so remat of the scan body covers base and adapters alike.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stepvideo_jax.models import layers

PROJECTIONS = tuple(f"{attn}.{p}" for attn in ("attn1", "attn2") for p in ("q", "k", "v", "o"))


class LoRAParam(nnx.Param):
    """A trained low-rank adapter factor."""


FROZEN = nnx.All(nnx.Param, nnx.Not(LoRAParam))


class LoRALinear(nnx.Module):
    """A `layers.Linear` with a low-rank update; takes over the base layer's kernel and bias."""

    def __init__(self, base: layers.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs):
        *lead, din, dout = base.kernel[...].shape
        *lead_axes, axis_in, axis_out = base.kernel.get_metadata()["axes"]
        dtype = base.kernel[...].dtype
        self.kernel, self.bias, self.dtype = base.kernel, base.bias, base.dtype
        a = jax.random.normal(rngs.params(), (*lead, din, rank), jnp.float32) / jnp.sqrt(din)
        self.lora_a = LoRAParam(a.astype(dtype), axes=(*lead_axes, axis_in, None))
        self.lora_b = LoRAParam(jnp.zeros((*lead, rank, dout), dtype), axes=(*lead_axes, None, axis_out))
        self.scale = alpha / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.dot(x, self.kernel[...].astype(self.dtype))
        low = jnp.dot(jnp.dot(x, self.lora_a[...].astype(self.dtype)), self.lora_b[...].astype(self.dtype))
        y = y + jnp.asarray(self.scale, self.dtype) * low
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def apply_lora(model: nnx.Module, *, rank: int, alpha: float, targets=PROJECTIONS, seed: int = 0) -> nnx.Module:
    """Replaces the `targets` projections (names of `PROJECTIONS`) of the stacked blocks of a
    `StepVideoDiT` by `LoRALinear`s with stacked adapters, in place; returns the model."""
    unknown = sorted(set(targets) - set(PROJECTIONS))
    if unknown or not targets:
        raise ValueError(f"LoRA targets {list(targets)}: unknown {unknown}; choose from {list(PROJECTIONS)}")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    rngs = nnx.Rngs(seed)
    for name in targets:
        attn_name, proj = name.split(".")
        attn = getattr(model.blocks, attn_name)
        base = getattr(attn, proj)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{name} already carries a LoRA adapter")
        if base.kernel_scale is not None:
            raise ValueError(f"{name} is quantised ({base.kernel[...].dtype}); LoRA adapts float weights only "
                             "(train on a bf16/float32 model: weights=bf16)")
        setattr(attn, proj, LoRALinear(base, rank=rank, alpha=alpha, rngs=rngs))
    return model


def merged_state(model: nnx.Module) -> nnx.State:
    """The plain DiT's state with every adapter folded in: `kernel + scale * lora_a @ lora_b` (float32
    math, stored in the kernel's dtype). Restores into `StepVideoDiT` (e.g. for `generate`)."""
    flat = dict(nnx.to_flat_state(nnx.state(model, FROZEN)))
    for path, module in nnx.iter_graph(model):
        if isinstance(module, LoRALinear):
            key = tuple(path) + ("kernel",)
            kernel = module.kernel[...]
            delta = module.scale * jnp.matmul(module.lora_a[...].astype(jnp.float32),
                                              module.lora_b[...].astype(jnp.float32))
            flat[key] = flat[key].replace((kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
    return nnx.from_flat_state(list(flat.items()))
