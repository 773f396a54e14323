"""Scanned layers (`models/stack.py`): the DiT and the Step-LLM under one `lax.scan` equal a Python
loop over the same layers (outputs and gradients), on one device and on 8 devices (fsdp x sequence);
the program holds ONE loop whatever the depth. Model sizes come from the fixture configs; inputs are
built from them."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepvideo_jax.convert import dit as dit_convert
from stepvideo_jax.convert import step_llm as llm_convert
from stepvideo_jax.models import stack
from stepvideo_jax.models.dit import StepVideoDiT
from stepvideo_jax.models.rope import grid_positions
from stepvideo_jax.models.step_llm import StepLLM
from stepvideo_jax.parallel.rules import constrain, state_shardings
from stepvideo_jax.parallel.mesh import make_mesh
from stepvideo_jax.training.loop import batch_shardings
from tests.fixtures import fixture_dir, load_json

MESH = {"fsdp": 4, "sequence": 2}
TOL = 1e-5


@functools.lru_cache(maxsize=None)
def dit():
    cfg = dit_convert.config_from_dict(load_json("dit")["constructor_args"])
    return StepVideoDiT(cfg, rngs=nnx.Rngs(0))


@functools.lru_cache(maxsize=None)
def llm():
    return StepLLM(llm_convert.read_config(fixture_dir("step_llm")), rngs=nnx.Rngs(0))


def dit_inputs(cfg, b=4, f=2, lt=6, lc=3):
    rng = np.random.default_rng(0)
    hw = 4 * cfg.patch_size
    valid = rng.integers(1, lt + 1, size=b)
    return {"x": jnp.asarray(rng.normal(size=(b, f, cfg.in_channels, hw, hw)), jnp.float32),
            "t": jnp.asarray(rng.uniform(size=b), jnp.float32),
            "y": jnp.asarray(rng.normal(size=(b, lt, cfg.caption_channels[0])), jnp.float32),
            "y_mask": jnp.asarray(np.concatenate([np.ones((b, lc)), np.arange(lt)[None] < valid[:, None]], 1),
                                  jnp.int32),
            "clip": jnp.asarray(rng.normal(size=(b, lc, cfg.caption_channels[1])), jnp.float32)}


def dit_unrolled(model, x, t, y, y_mask, clip):
    """The pre-scan forward: a Python loop over the layers sliced out of the stacked blocks."""
    b, f, c, h, w = x.shape
    p = model.cfg.patch_size
    modulation, emb = model.embed_timestep(t)
    tokens, key_mask = model.embed_text(y, clip, y_mask)
    hidden = constrain(model.patch_embed(model.patchify(x)), ("batch", "length", "act_embed"))
    positions = grid_positions(f, h // p, w // p)
    for i in range(stack.num_layers(model.blocks)):
        hidden = stack.layer(model.blocks, i)(hidden, modulation, tokens, key_mask, positions, backend="xla")
    return model.unpatchify(model.final_layer(hidden, emb), f, h, w)


def llm_unrolled(model, ids):
    x = jnp.take(model.embed[...], ids, axis=0)
    for i in range(stack.num_layers(model.layers)):
        x = stack.layer(model.layers, i)(x, backend="xla")
    return x


def _value_and_grad(model, forward, inputs, weight, mesh=None):
    graphdef, params = nnx.split(model)

    def loss(p, inputs):
        out = forward(nnx.merge(graphdef, p), **inputs)
        return jnp.sum(out * weight), out

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    if mesh is None:
        (_, out), grads = fn(params, inputs)
        return np.asarray(out), grads, fn.lower(params, inputs).as_text()
    with jax.set_mesh(mesh):
        params = jax.device_put(params, state_shardings(params, mesh))
        inputs = jax.device_put(inputs, batch_shardings(inputs, mesh))
        (_, out), grads = fn(params, inputs)
        return np.asarray(out), grads, fn.lower(params, inputs).as_text()


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(np.asarray(b))), 1e-30))


def _compare(scanned, unrolled):
    assert _rel(scanned[0], unrolled[0]) <= TOL
    flat_s, flat_u = dict(nnx.to_flat_state(scanned[1])), dict(nnx.to_flat_state(unrolled[1]))
    assert flat_s.keys() == flat_u.keys()
    stacked = [k for k in flat_s if k[0] in ("blocks", "layers")]
    assert stacked, "no stacked-layer gradients"
    for k in flat_s:
        g = np.asarray(flat_u[k][...])
        assert np.max(np.abs(g)) > 0, k
        assert _rel(flat_s[k][...], g) <= TOL, k


def _while_loops(hlo: str) -> int:
    return hlo.count("stablehlo.while")


def _dit_case(mesh=None):
    model = dit()
    inputs = dit_inputs(model.cfg)
    weight = jax.random.normal(jax.random.key(1), inputs["x"].shape[:2] + (model.cfg.out_channels,)
                               + inputs["x"].shape[3:])
    scanned = _value_and_grad(model, lambda m, **a: m(**a, backend="xla"), inputs, weight, mesh)
    unrolled = _value_and_grad(model, dit_unrolled, inputs, weight, mesh)
    return scanned, unrolled


def _llm_case(mesh=None):
    model = llm()
    ids = jax.random.randint(jax.random.key(2), (4, 12), 0, model.cfg.vocab_size)
    weight = jax.random.normal(jax.random.key(3), (4, 12, model.cfg.hidden_size))
    scanned = _value_and_grad(model, lambda m, ids: m(ids, backend="xla"), {"ids": ids}, weight, mesh)
    unrolled = _value_and_grad(model, llm_unrolled, {"ids": ids}, weight, mesh)
    return scanned, unrolled


@pytest.mark.parametrize("case", [pytest.param(_dit_case, marks=pytest.mark.slow), _llm_case],
                         ids=["dit", "step_llm"])
@pytest.mark.parametrize("sharded", [False, True], ids=["one_device", "fsdp4_x_sequence2"])
def test_scanned_equals_unrolled(case, sharded):
    scanned, unrolled = case(make_mesh(MESH, subset=True) if sharded else None)
    _compare(scanned, unrolled)
    # forward and backward: one loop each, whatever the depth; the Python loop has none
    assert _while_loops(scanned[2]) == 2, _while_loops(scanned[2])
    assert _while_loops(unrolled[2]) == 0


def test_program_size_does_not_grow_with_depth():
    """The scanned forward's program text is the same at N and 2N layers (one block, looped); the
    unrolled (`unroll_layers`) one grows with N (N more calls of the block)."""
    import dataclasses

    cfg = dit().cfg
    sizes = {}
    for n in (cfg.num_layers, 2 * cfg.num_layers):
        for unroll in (False, True):
            model = nnx.eval_shape(lambda: StepVideoDiT(dataclasses.replace(cfg, num_layers=n), rngs=nnx.Rngs(0)))
            model.unroll_layers = unroll
            graphdef, state = nnx.split(model)
            inputs = dit_inputs(cfg)
            hlo = jax.jit(lambda s, a: nnx.merge(graphdef, s)(**a, backend="xla")).lower(state, inputs).as_text()
            sizes[n, unroll] = (len(hlo), _while_loops(hlo))
    n = cfg.num_layers
    assert sizes[n, False][1] == sizes[2 * n, False][1] == 1
    assert sizes[n, True][1] == sizes[2 * n, True][1] == 0
    assert abs(sizes[2 * n, False][0] - sizes[n, False][0]) < 0.01 * sizes[n, False][0]
    assert sizes[2 * n, True][0] > 1.05 * sizes[n, True][0]


def test_stacked_params_carry_the_layer_axis():
    for model, name in ((dit(), "blocks"), (llm(), "layers")):
        n = getattr(model, "cfg").num_layers
        for path, v in nnx.to_flat_state(nnx.state(getattr(model, name))):
            axes = v.get_metadata()["axes"]
            assert axes[0] == "layers" and v[...].shape[0] == n and len(axes) == v[...].ndim, (path, axes)


@pytest.mark.parametrize("family", ["dit", "step_llm"])
def test_stacked_init_is_one_vmapped_block_init(family):
    """`stack.build` traces one block's init whatever the depth (construction cost does not grow
    with the layer count), and its weights are those of the blocks built one after the other from
    the same `rngs` (seeded results from before the stacked init, e.g. the demo's recorded training
    curve, stay reproducible); `rngs` continues after the stack as it did after the blocks."""
    from stepvideo_jax.models import dit as dit_module
    from stepvideo_jax.models import step_llm as llm_module

    model = dit() if family == "dit" else llm()
    block_cls = (dit_module if family == "dit" else llm_module).Block
    calls = []

    def make(rngs):
        calls.append(1)
        return block_cls(model.cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)

    counts = set()
    for n in (1, 3):
        calls.clear()
        nnx.eval_shape(lambda: stack.build(make, n, nnx.Rngs(0)))
        counts.add(len(calls))
    assert len(counts) == 1, counts   # the same number of block traces at every depth
    n = 3
    rngs = nnx.Rngs(0)
    stacked = stack.build(make, n, rngs)
    sequential_rngs = nnx.Rngs(0)
    blocks = [make(sequential_rngs) for _ in range(n)]
    assert int(rngs.params.count[...]) == int(sequential_rngs.params.count[...])
    flat = dict(nnx.to_flat_state(nnx.state(stacked)))
    for i, block in enumerate(blocks):
        for path, v in nnx.to_flat_state(nnx.state(block)):
            np.testing.assert_array_equal(np.asarray(flat[path][...][i]), np.asarray(v[...]), err_msg=str(path))
    drawn = [np.asarray(v[...]) for _, v in flat.items() if np.asarray(v[...])[0].std() > 0]
    assert drawn and all(not np.array_equal(a[0], a[1]) for a in drawn)   # every layer draws its own
