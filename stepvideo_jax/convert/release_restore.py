"""A release component straight into a device mesh, without a converted copy.

Each official tensor is read from the release's shards, mapped by the component's key map and cast
on the host (`keymap.convert_tensors`: the converter's strict key, shape and dtype accounting, all
key errors before any tensor is read), then placed into its target sharding with
`jax.make_array_from_callback`, so every device receives only its own slice; the host array is
dropped before the next tensor is read. Host memory therefore stays near one large tensor (plus
its cast), as in `python -m stepvideo_jax.convert`, and the device memory is the sharded model's.
The shardings are the logical-axis rules' (`parallel.rules.state_shardings`) for `mesh`, the same
targets `orbax_io.restore` gives a converted checkpoint, so both sources restore to the same
arrays in the same shardings. Stacked layer variables (`models/stack.py`) are written layer by
layer into their stacked arrays in place (`stack.Assembler`). With `weights="int8"|"fp8"` each block
kernel is quantised where it lands (`models.quant.sharded_quantizer`), so device memory holds the
quantised model, never the float one.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from stepvideo_jax.convert.keymap import convert_tensors, flat_shapes, unflatten
from stepvideo_jax.convert.registry import abstract_model, converter
from stepvideo_jax.models import quant, stack
from stepvideo_jax.parallel.rules import state_shardings


def load_release_component(folder: str | os.PathLike, component: str, *, param_dtype, dtype=None, mesh=None,
                           shardings=None, weights: str = "bf16", **build_kwargs) -> nnx.Module:
    """The model of the release component folder `folder` (e.g. `<release>/transformer`), its
    parameters in `param_dtype` (computation in `dtype`, default `param_dtype`) placed in
    `shardings` (a tree like `nnx.state(model)`), or `mesh`'s rule shardings, or on the default
    device when neither is given; the block linears quantised by `weights` (`models.quant`, the
    component's scheme: see `registry.component_weights`). `build_kwargs` go to the component's `build`."""
    module = converter(component)
    cfg = module.read_config(folder)
    source = module.tensor_source(folder)
    model = abstract_model(module, cfg, param_dtype, dtype, **build_kwargs)
    float_shapes = flat_shapes(nnx.state(model))
    graphdef, state = nnx.split(quant.quantize(model, weights))
    if shardings is None and mesh is not None:
        shardings = state_shardings(state, mesh)
    variables = _flat(state)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        placement = dict.fromkeys(variables, device)
    else:
        placement = _flat(shardings)
    assembler = stack.Assembler(variables, placement)
    for key, host in convert_tensors(source, module.rules(cfg), float_shapes, dtype=np.dtype(param_dtype),
                                     ignore=module.IGNORE, label=str(folder)):
        sharding = assembler.targets[key].sharding
        array = jax.make_array_from_callback(host.shape, sharding, lambda index, h=host: h[index])
        del host
        scale_key = quant.scale_path(key) if key.endswith("/kernel") else None
        if scale_key in assembler.targets:
            array, scale = quant.sharded_quantizer(weights, sharding, assembler.targets[scale_key].sharding)(array)
            assembler.put(scale_key, scale)
        assembler.put(key, array)
    nnx.replace_by_pure_dict(state, unflatten(assembler.arrays))
    return nnx.merge(graphdef, state)


def _flat(tree) -> dict:
    """'/'-joined path -> leaf of an NNX state or a nested dict/list of shardings."""
    if isinstance(tree, nnx.State):
        return {"/".join(str(p) for p in path): v for path, v in nnx.to_flat_state(tree)}
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
