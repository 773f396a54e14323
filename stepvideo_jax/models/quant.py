"""Weight-only quantisation of the transformer blocks' linear layers (int8, fp8 e4m3), with qwix.

Schemes (`SCHEMES`, the config's `weights`): "bf16" (none: the weights keep their float dtype),
"int8" (symmetric, one scale per output channel), "fp8" (float8_e4m3fn values, one scale per output
channel: a storage format, dequantised before the matmul, so every platform runs it).

What is quantised: every `layers.Linear` inside a stacked module (`models/stack.py`: the DiT's
`blocks`, the Step-LLM's `layers`): the attention projections and the MLPs, over 98% of either
model's parameters. The top-level linears (patch embedding, timestep / caption / adaLN embeddings,
`proj_out`), embeddings, norms, attention and the VAE stay in their float dtype; so do activations.

Layout: a quantised `Linear` holds `kernel` = the quantised values (in, out) in int8 or
float8_e4m3fn (same logical axes, same state path as the float kernel, so the rules table shards it
alike) and `kernel_scale` (1, out) float32 with axes `(None, out_axis)`: the scale is sharded like
the kernel's output axis. Stacked, both gain the leading layer axis: (L, in, out) and (L, 1, out).
`kernel ~= kernel_q * kernel_scale`; `Linear` computes `qwix.dot_general(x, QArray(kernel_q, scale))`.

Why not `qwix.quantize_model`: it clones the model and runs an eager forward (impossible at full
size and not streamed), records scale shardings only in flax's own metadata (not this project's
`axes`), and would also catch LoRA's matmuls. Instead one function, `quantize_kernel` (qwix's array
quantisation, channel-wise on the output axis), serves the converter (tensor by tensor), the
quantise-on-load of a float checkpoint (tensor by tensor, in the target sharding) and `quantize`
(an in-memory model).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from stepvideo_jax.models import stack
from stepvideo_jax.models.layers import Linear

SCHEMES = {"bf16": None, "int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
SCALE_DTYPE = jnp.float32
SCALE_NAME = "kernel_scale"


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    """A quantised checkpoint's scheme, as its manifest records it (`convert.config_records`)."""

    scheme: Literal["int8", "fp8"]


def check_scheme(name) -> Optional[str]:
    """`name` if it is a quantising scheme, None for "bf16"; a ValueError naming the choices otherwise."""
    if not isinstance(name, str) or name not in SCHEMES:
        raise ValueError(f"weights={name!r}: choose one of {list(SCHEMES)} (weight-only quantisation of the "
                         "transformer blocks' linear layers; see docs/quantization.md)")
    return None if SCHEMES[name] is None else name


def qtype(scheme: str):
    if check_scheme(scheme) is None:
        raise ValueError(f"weights={scheme!r} does not quantise; choose one of {[s for s in SCHEMES if SCHEMES[s]]}")
    return SCHEMES[scheme]


def quantize_kernel(kernel: jax.Array, scheme: str) -> tuple[jax.Array, jax.Array]:
    """(..., in, out) float kernel -> (values (..., in, out) int8|float8_e4m3fn, scale (..., 1, out) float32).

    qwix's absmax calibration, channel-wise on every axis but the input axis (-2), computed in float32
    so the rounding is exact: int8 `|kernel - q * scale| <= scale / 2`; fp8 the e4m3 rounding of
    `kernel / scale`, `scale = absmax / 448`.
    """
    ndim = kernel.ndim
    qa = qwix.quantize(jnp.asarray(kernel, jnp.float32), qtype(scheme),
                       channelwise_axes=[a for a in range(ndim) if a != ndim - 2], scale_dtype=SCALE_DTYPE)
    return qa.qvalue, qa.scale


@functools.lru_cache(maxsize=None)
def sharded_quantizer(scheme: str, kernel_sharding, scale_sharding):
    """Jitted `quantize_kernel` with its outputs in the kernel's and the scale's target shardings:
    quantise-on-load of one tensor where it lies (`convert.orbax_io.restore`,
    `convert.release_restore`)."""
    return jax.jit(functools.partial(quantize_kernel, scheme=scheme), out_shardings=(kernel_sharding, scale_sharding))


def scale_axes(kernel_axes):
    """The scale's logical axes: the kernel's with the input axis replaced by None."""
    axes = tuple(kernel_axes)
    return axes[:-2] + (None, axes[-1])


def quantized_linears(model: nnx.Module):
    """`(path, Linear)` of every linear this scheme quantises: those inside a stacked module."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear) and path and str(path[0]) in stack.STACKED_MODULES:
            yield tuple(str(p) for p in path), node


def quantize(model: nnx.Module, scheme: str) -> nnx.Module:
    """`model` with its block linears quantised by `scheme` ("bf16": unchanged), in place; returns it.

    Works on a concrete model (the values are quantised where they lie, keeping their shardings) and
    on an abstract one from `nnx.eval_shape` (shapes only: the target of a quantised restore).
    """
    if check_scheme(scheme) is None:
        return model
    for _, linear in quantized_linears(model):
        if linear.kernel_scale is not None:
            raise ValueError(f"the model's linears are already quantised ({linear.kernel.get_value().dtype})")
        kernel = linear.kernel.get_value()
        axes = linear.kernel.get_metadata()["axes"]
        fn = lambda k: quantize_kernel(k, scheme)  # noqa: E731
        if isinstance(kernel, jax.ShapeDtypeStruct):
            q, s = jax.eval_shape(fn, kernel)
        else:
            q, s = jax.jit(fn, out_shardings=_out_shardings(kernel))(kernel)
        linear.kernel = nnx.Param(q, axes=tuple(axes))
        linear.kernel_scale = nnx.Param(s, axes=scale_axes(axes))
    return model


def _out_shardings(kernel: jax.Array):
    """(kernel's sharding, the scale's: the kernel's with the input axis unsharded), or None."""
    sharding = getattr(kernel, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    spec = tuple(sharding.spec) + (None,) * (kernel.ndim - len(sharding.spec))
    scale_spec = jax.sharding.PartitionSpec(*spec[:-2], None, spec[-1])
    return sharding, jax.sharding.NamedSharding(sharding.mesh, scale_spec)


def model_scheme(model: nnx.Module) -> str:
    """The scheme a model's block linears carry ("bf16" when none is quantised)."""
    for _, linear in quantized_linears(model):
        if linear.kernel_scale is not None:
            dtype = jnp.dtype(linear.kernel.get_value().dtype)
            return next(k for k, v in SCHEMES.items() if v is not None and jnp.dtype(v) == dtype)
    return "bf16"


def kernel_paths(model: nnx.Module) -> set[str]:
    """'/'-joined state paths of the kernels `quantize` quantises (stacked paths: `blocks/attn1/q/kernel`)."""
    return {"/".join(path + ("kernel",)) for path, _ in quantized_linears(model)}


def scale_path(kernel_path: str) -> str:
    return kernel_path.rsplit("/", 1)[0] + "/" + SCALE_NAME
