"""Stacked layers: N identical blocks held as ONE module whose variables have a leading layer axis.

Why: a Python loop over N blocks compiles N copies of the block, so compile time and program size
grow with depth (48 DiT blocks, 48 Step-LLM layers). A stacked module runs under one
`jax.lax.scan`: one compiled block, a `while` loop in the HLO, whatever N is.

Layout: every variable of the stacked module is `(num_layers, *per_layer_shape)`; its logical `axes`
metadata gains the leading axis `LAYER_AXIS` ("layers" in `parallel/rules.py`), so the one rules
table shards the stacked state. The stacked module is a model's top-level attribute (the DiT's
`blocks`, the Step-LLM's `layers`): its state paths are `blocks/attn1/q/kernel` where the unrolled
model had `blocks/<i>/attn1/q/kernel`. Checkpoints keep the per-layer paths on disk
(`per_layer_shapes`, `layer_key`), so a converter writes one layer at a time and restores assemble
the stacked arrays (`convert/orbax_io.py`).

`scan` applies the remat policy once, to the scan body, which is a pure function of
(carry, one layer's variables): it differentiates through every variable of the layer, trained or
frozen (a LoRA adapter and its frozen base alike). With `capture`, the intermediates each layer
sows are returned as scan outputs and sown on the stacked module with the layer axis in front.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepvideo_jax.parallel.rules import constrain, logical_to_spec

LAYER_AXIS = "layers"


def build(make_block: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs) -> nnx.Module:
    """`num` blocks `make_block(rngs)` as one stacked module, initialised by ONE vmapped init.

    Why: building the blocks one by one and stacking them costs tracing time per block (under
    `nnx.eval_shape` 48 full-size DiT blocks took 6.5 s of CPU against 0.07 s for 2), which every
    AOT plan, bench and restore pays before it compiles anything. Here one block's init is traced
    once and `jax.vmap`ped over the layer index, and the cost does not grow with `num`.

    The weights are those of the blocks built one after the other from `rngs` (the pre-scan
    models, and every checkpoint or recorded curve made from a seed before this change): a block
    draws `k` keys `fold_in(key, count)` from the `params` stream, so layer i continues that stream
    at count `start + i k`, and `rngs` leaves at `start + num k` for what is built after the stack.
    """
    if num < 1:
        raise ValueError(f"a stacked module needs at least one layer, got {num}")
    stream = rngs.params
    key, start = stream.key[...], stream.count[...]
    k = _draws_per_block(make_block)

    def layer_state(i):
        layer_rngs = nnx.Rngs(params=key)
        layer_rngs.params.count[...] = start + i * k
        return nnx.state(make_block(layer_rngs))

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_block(nnx.Rngs(0))))
    state = jax.vmap(layer_state)(jnp.arange(num, dtype=start.dtype))
    stream.count[...] = start + num * k
    return _with_layer_axis(nnx.merge(graphdef, state))


def _draws_per_block(make_block: Callable[[nnx.Rngs], nnx.Module]) -> int:
    """How many keys one `make_block` draws from its `params` stream, without computing weights:
    the key is abstract (the init's arrays stay staged) while the count is evaluated eagerly."""
    counts = []

    def probe(key):
        with jax.ensure_compile_time_eval():
            probe_rngs = nnx.Rngs(params=key)
            make_block(probe_rngs)
            counts.append(int(probe_rngs.params.count[...]))

    jax.eval_shape(probe, jax.random.key(0))
    return counts[0]


def stack(blocks: Sequence[nnx.Module]) -> nnx.Module:
    """One module with the variables of `blocks` (same structure, built separately) stacked on a
    leading axis; for assembling existing blocks (models build theirs with `build`)."""
    if not blocks:
        raise ValueError("stack needs at least one block")
    graphdef = nnx.graphdef(blocks[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks])
    return _with_layer_axis(nnx.merge(graphdef, stacked))


def _with_layer_axis(module: nnx.Module) -> nnx.Module:
    """Prefixes every variable's logical `axes` with `LAYER_AXIS` (the stacked leading axis)."""
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Variable):
            axes = node.get_metadata().get("axes")
            if axes is not None:
                node.set_metadata(axes=(LAYER_AXIS,) + tuple(axes))
    return module


def num_layers(module: nnx.Module) -> int:
    leaves = jax.tree.leaves(nnx.state(module))
    return int(leaves[0].shape[0])


def layer(module: nnx.Module, i: int) -> nnx.Module:
    """Layer `i` of a stacked module as a plain block (sliced copies; for inspection and tests)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def scan(module: nnx.Module, fn: Callable, carry, *, carry_axes: Optional[Sequence] = None, remat_policy=None,
         remat: bool = False, capture: bool = False, unroll: int | bool = 1, offload: bool = False):
    """`carry = fn(block_i, carry)` for i = 0..N-1 over the stacked `module`, as one `lax.scan`.

    `carry_axes`: the carry's logical axes, constrained at the top of every iteration. Without it
    XLA's partitioner can lose the carry's layout in the loop: on a (data 2, fsdp 2, tensor 2) CPU
    mesh the DiT gave wrong values (max error 1.4), not only a slower program.

    `remat` (or a non-None `remat_policy`, a `jax.checkpoint_policies` entry) rematerialises the
    body. `unroll=True` unrolls the loop into N copies (the pre-scan program, for comparisons).

    `offload`: the stacked variables live in host memory (`pinned_host`, `models/offload.py`); each
    layer's are copied to the device one iteration ahead (see `_scan_offloaded`).
    """
    graphdef, state = nnx.split(module)

    def body(c, layer_state):
        block = nnx.merge(graphdef, layer_state)
        if carry_axes is not None:
            c = constrain(c, carry_axes)
        if capture:
            return nnx.capture(fn, nnx.Intermediate)(block, c)
        return fn(block, c), None

    if remat or remat_policy is not None:
        body = jax.checkpoint(body, policy=remat_policy, prevent_cse=False)
    if offload:
        carry, inter = _scan_offloaded(body, carry, state, unroll)
    else:
        carry, inter = jax.lax.scan(body, carry, state, unroll=unroll)
    if capture:
        for path, var in nnx.to_flat_state(inter):
            owner = module
            for p in path[:-1]:
                owner = getattr(owner, p) if not isinstance(p, int) else owner[p]
            for value in var.get_value():
                owner.sow(nnx.Intermediate, path[-1], value)
    return carry


def fetch_layer(state, i):
    """Layer `i` of a stacked state, copied to device memory (a no-op for variables already there)
    and constrained, under a mesh, to its rule sharding (the stacked variable's `axes` without the
    layer axis), so the partitioner keeps the layout the device-resident scan has."""
    mesh = jax.sharding.get_abstract_mesh()

    def one(v):
        if not isinstance(v, nnx.Variable):
            return v
        x = jax.device_put(jax.lax.dynamic_index_in_dim(v.get_value(), i, 0, keepdims=False),
                           jax.memory.Space.Device)
        axes = v.get_metadata().get("axes")
        if axes is not None and not mesh.empty:
            x = jax.lax.with_sharding_constraint(x, logical_to_spec(tuple(axes)[1:], mesh, shape=x.shape))
        return v.replace(x)

    return jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def _scan_offloaded(body, carry, state, unroll):
    """`lax.scan(body, carry, state)` over a host-resident stacked `state`, prefetching.

    The loop carries the device copy of the current layer's variables; iteration i starts the
    host-to-device copy of layer i + 1 (layer N - 1 again in the last iteration: one extra layer
    per call) and runs `body` on layer i, so the copy overlaps the layer's compute.

    The loop is unrolled by 2 (unless `unroll` asks for more): a while loop's carried buffer is
    reused in place, so in a one-layer body the copy into it must wait until the layer has read
    it, and XLA serialises them. With two layers per iteration the first copy lands in a second
    buffer while layer i computes and the second refills the carried buffer while layer i + 1
    computes: a double buffer, two layers' variables on the device at most (TPU HLO in
    docs/offload.md: `dynamic-slice-start` / `dynamic-slice-done` around each layer's matmuls).
    """
    n = jax.tree.leaves(state)[0].shape[0]

    def fetch(i):
        return fetch_layer(state, i)

    def prefetching(c_layer, i):
        c, layer_state = c_layer
        following = fetch(jnp.minimum(i + 1, n - 1))
        c, inter = body(c, layer_state)
        return (c, following), inter

    if unroll is not True:
        unroll = max(int(unroll), 2)
    (carry, _), inter = jax.lax.scan(prefetching, (carry, fetch(0)), jnp.arange(n), unroll=unroll)
    return carry, inter


def is_stacked(axes: Optional[Sequence]) -> bool:
    return bool(axes) and axes[0] == LAYER_AXIS


def layer_key(path: str, i: int) -> str:
    """Per-layer checkpoint key of layer `i` of the stacked state path `path` (`blocks/x` -> `blocks/i/x`)."""
    head, _, rest = path.partition("/")
    return f"{head}/{i}/{rest}"


def per_layer_shapes(shapes: Mapping[str, tuple], axes: Mapping[str, Optional[Sequence]]
                     ) -> dict[str, tuple]:
    """Stacked paths -> their per-layer keys and shapes (others unchanged), in the checkpoint order
    of the unrolled model: top-level entries, then layer 0, layer 1, ..."""
    out, layered = {}, {}
    for path, shape in shapes.items():
        if is_stacked(axes.get(path)):
            for i in range(shape[0]):
                layered.setdefault(i, {})[layer_key(path, i)] = tuple(shape[1:])
        else:
            out[path] = tuple(shape)
    for i in sorted(layered):
        out.update(layered[i])
    return out


STACKED_MODULES = ("blocks", "layers")  # the DiT's and the Step-LLM's stacked modules


def _per_layer_children(node) -> Optional[list]:
    """The children of a nested dict keyed '0'..'N-1' (an unrolled layer list), else None."""
    if isinstance(node, Mapping) and node and all(str(k).isdigit() for k in node):
        keys = sorted(node, key=lambda k: int(k))
        if [int(k) for k in keys] == list(range(len(keys))):
            return [node[k] for k in keys]
    return None


def find_unrolled(tree, prefix: str = "") -> Optional[str]:
    """Path of the first unrolled layer list (`blocks/0/...`, written before the layers were
    stacked) in a nested dict of a saved checkpoint, or None."""
    if not isinstance(tree, Mapping):
        return None
    for k, v in tree.items():
        if str(k) in STACKED_MODULES and _per_layer_children(v) is not None:
            return f"{prefix}{k}/0"
        found = find_unrolled(v, f"{prefix}{k}/")
        if found:
            return found
    return None


def stack_unrolled(tree):
    """A nested dict with every unrolled layer list (`blocks/<i>/...`) stacked into the stacked
    layout (`blocks/...` with a leading layer axis); host arrays (old training checkpoints)."""
    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for k, v in tree.items():
        layers = _per_layer_children(v) if str(k) in STACKED_MODULES else None
        if layers is not None:
            out[k] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
        else:
            out[k] = stack_unrolled(v)
    return out


@functools.lru_cache(maxsize=None)
def _layer_writer(sharding):
    """In-place `buffer[i] = layer` (the buffer is donated), keeping `sharding`."""
    return jax.jit(lambda buf, x, i: jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), i, 0),
                   donate_argnums=0, out_shardings=sharding)


def _layer_sharding(sharding):
    """The sharding of one layer of a stacked array sharded by `sharding` (the layer axis dropped;
    same memory kind: an offloaded layer is read straight into host memory)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]),
                                          memory_kind=sharding.memory_kind)
    return sharding


class Assembler:
    """Device arrays of a state from its checkpoint-layout tensors (one per layer of a stacked
    variable), each stacked array allocated once in its target sharding and written layer by layer
    in place, so device memory peaks at the state plus one layer.

    `variables`: state path -> variable (abstract); `placement`: state path -> target sharding.
    `targets` gives, per checkpoint key, the `jax.ShapeDtypeStruct` (with the per-layer sharding) to
    read it into; `put(key, array)` stores it; `arrays` the state-path -> array result.
    """

    def __init__(self, variables: Mapping[str, nnx.Variable], placement: Mapping[str, object]):
        self.targets, self._owner, self.arrays = {}, {}, {}
        self._placement = placement
        for path, v in variables.items():
            value = v.get_value()
            if is_stacked(v.get_metadata().get("axes")):
                layer_sh = _layer_sharding(placement[path])
                for i in range(value.shape[0]):
                    key = layer_key(path, i)
                    self.targets[key] = jax.ShapeDtypeStruct(value.shape[1:], value.dtype, sharding=layer_sh)
                    self._owner[key] = (path, i)
                self.arrays[path] = jax.jit(functools.partial(jnp.zeros, value.shape, value.dtype),
                                            out_shardings=placement[path])()
            else:
                self.targets[path] = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=placement[path])

    def put(self, key: str, array: jax.Array) -> None:
        if key in self._owner:
            path, i = self._owner[key]
            self.arrays[path] = _layer_writer(self._placement[path])(self.arrays[path], array, i)
        else:
            self.arrays[key] = array
