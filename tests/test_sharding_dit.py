"""Sharded DiT == one device: outputs and gradients of a scalar loss wrt params and inputs.

Fixture weights (loaded through the project's converter) on (fsdp=2, sequence=2, tensor=2) with
ring attention, on fsdp=8, and ring over sequence=8; random-weight configs with >= 8 heads for
Ulysses and Ulysses-inside-ring on a 3 x 5 x 7 = 105-token grid (not divisible by the degree).
Every comparison is max|a - b| / max|b| <= 1e-5 against the unsharded run on one device. The tests
also check that sharding happens: parameter and activation shardings, and the collectives in the
compiled HLO.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from stepvideo_jax.convert import dit as dit_convert
from stepvideo_jax.convert.safetensors_io import TensorSource
from stepvideo_jax.models.dit import DiTConfig, StepVideoDiT
from stepvideo_jax.parallel.mesh import MeshConfig, make_mesh, shard_model
from stepvideo_jax.models.sequence_parallel import SequenceParallel
from tests.fixtures import assert_close, fixture_dir, load_json, load_npz

pytestmark = pytest.mark.sharding

REL = 1e-5
INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask",
          "encoder_hidden_states_2")


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@functools.lru_cache(maxsize=None)
def fixture_model():
    cfg = dit_convert.config_from_dict(load_json("dit")["constructor_args"])
    source = TensorSource.single(fixture_dir("dit") / "weights.safetensors")
    return dit_convert.convert(cfg, source, label="fixture dit")


@functools.lru_cache(maxsize=None)
def fixture_case():
    return load_npz("dit", f"{load_json('dit')['cases'][-1]}.npz")


def random_case(cfg: DiTConfig, grid=(3, 5, 7), batch=2, l_clip=3, l_text=6, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    f, h, w = grid
    valid = np.array([l_clip + l_text, l_clip + 2])[:batch]
    return {
        "hidden_states": np.asarray(jax.random.normal(ks[0], (batch, f, cfg.in_channels, h, w))),
        "timestep": np.linspace(0.2, 0.8, batch).astype(np.float32),
        "encoder_hidden_states": np.asarray(jax.random.normal(ks[1], (batch, l_text, cfg.caption_channels[0]))),
        "encoder_attention_mask": (np.arange(l_clip + l_text)[None] < valid[:, None]).astype(np.float32),
        "encoder_hidden_states_2": np.asarray(jax.random.normal(ks[2], (batch, l_clip, cfg.caption_channels[1]))),
    }


def loss_and_grads(model, case, *, backend=None, mesh=None):
    """(output, blocks_in activation, param grads, input grads (x, y, clip), compiled HLO text)."""
    graphdef, params = nnx.split(model, nnx.Param)
    x, t, y, y_mask, clip = (jnp.asarray(case[k]) for k in INPUTS)
    weight = jax.random.normal(jax.random.key(7), x.shape[:2] + (model.cfg.out_channels,) + x.shape[3:])

    def loss(params, x, y, clip):
        m = nnx.merge(graphdef, params)
        out, inter = nnx.capture(m, nnx.Intermediate)(x, t, y, y_mask, clip, backend=backend, capture=True)
        blocks_in = inter["blocks_in"].get_value()[0]
        return jnp.sum(out * weight), (out, blocks_in)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    if mesh is None:
        (_, (out, act)), grads = fn(params, x, y, clip)
        return out, act, grads[0], grads[1:], ""
    with jax.set_mesh(mesh):
        compiled = fn.lower(params, x, y, clip).compile()
        (_, (out, act)), grads = compiled(params, x, y, clip)
    return out, act, grads[0], grads[1:], compiled.as_text()


def compare(reference, sharded, label):
    out_r, _, gp_r, gi_r, _ = reference
    out_s, _, gp_s, gi_s, _ = sharded
    errs = {"output": rel_err(out_s, out_r)}
    for name, a, b in zip(("d_x", "d_y", "d_clip"), gi_s, gi_r):
        errs[name] = rel_err(a, b)
    flat_r, flat_s = nnx.to_flat_state(gp_r), dict(nnx.to_flat_state(gp_s))
    param_errs = {path: rel_err(flat_s[path][...], v[...]) for path, v in flat_r}
    worst = max(param_errs, key=param_errs.get)
    errs["d_params(max)"] = param_errs[worst]
    print(f"\n{label}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()) + f" (worst {worst})")
    bad = {k: v for k, v in {**errs, **{str(p): e for p, e in param_errs.items()}}.items() if v > REL}
    assert not bad, f"{label}: sharded differs from one device: {bad}"


def assert_sharded(model, sharded, mesh, *, collectives=()):
    """Params sharded by the rules, the block activation sharded over the token axis when the
    mesh has one, and the expected collectives in the compiled HLO."""
    kernel = model.blocks.attn1.q.kernel[...]  # stacked: (layers, d, d), the layer axis unsharded
    expected = P(None, *(a if mesh.shape[a] > 1 else None for a in ("fsdp", "tensor")))
    assert kernel.sharding.spec == expected, kernel.sharding
    assert len(kernel.addressable_shards) == mesh.size
    assert kernel.addressable_shards[0].data.size == kernel.size // (
        mesh.shape["fsdp"] * mesh.shape["tensor"])
    b, s, d = sharded[1].shape
    if mesh.shape["sequence"] > 1:
        # Tokens (b, s, d) live as (b / batch shards, ceil(s / n), d) per device; with an uneven
        # split the jit output itself is replicated, so the compiled shapes are what shows it.
        b_local = b // math.gcd(b, mesh.shape["data"] * mesh.shape["fsdp"])
        local = f"f32[{b_local},{-(-s // mesh.shape['sequence'])},{d}]"
        assert local in sharded[4], f"no per-device token activation {local} in the compiled HLO"
    for op in collectives:
        assert op in sharded[4], f"no {op} in the compiled HLO"


@pytest.fixture(scope="module")
def fixture_reference():
    model = fixture_model()
    ref = loss_and_grads(model, fixture_case())
    assert_close(ref[0], fixture_case()["output"], atol=1e-4, rtol=1e-4, name="unsharded output")
    return ref


@pytest.mark.parametrize("mesh_spec, backend, collectives", [
    ("fsdp=2,sequence=2,tensor=2", "ring", ("collective-permute",)),
    ("fsdp=8", None, ()),
    ("sequence=8", "ring", ("collective-permute",)),
])
def test_fixture_dit_sharded(fixture_reference, mesh_spec, backend, collectives):
    mesh = make_mesh(MeshConfig.from_string(mesh_spec))
    model = shard_model(nnx.clone(fixture_model()), mesh)
    sharded = loss_and_grads(model, fixture_case(), backend=backend, mesh=mesh)
    assert_sharded(model, sharded, mesh, collectives=collectives)
    compare(fixture_reference, sharded, f"fixture dit [{mesh_spec}, {backend}]")


@functools.lru_cache(maxsize=None)
def random_model_and_reference(heads: int):
    """One-layer random-weight DiT with `heads` heads of 16 channels, its 105-token case and the
    unsharded result (plain XLA attention, cheap to compile)."""
    cfg = DiTConfig(num_layers=1, num_heads=heads, head_dim=16, in_channels=8, out_channels=8,
                    caption_channels=(24, 16), rope_splits=(8, 4, 4))
    model = StepVideoDiT(cfg, rngs=nnx.Rngs(3))
    case = random_case(cfg)
    return model, case, loss_and_grads(model, case, backend="xla")


@pytest.mark.parametrize("mesh_spec, heads, backend, collectives", [
    ("sequence=8", 8, SequenceParallel("ulysses", local_backend="xla"), ("all-to-all",)),
    ("sequence=8", 12, "ulysses_ring", ("all-to-all", "collective-permute")),
    ("data=2,sequence=4", 8, SequenceParallel("ulysses_ring", ulysses_degree=2, local_backend="xla"),
     ("all-to-all", "collective-permute")),
])
def test_random_dit_sharded(mesh_spec, heads, backend, collectives):
    model, case, reference = random_model_and_reference(heads)
    mesh = make_mesh(MeshConfig.from_string(mesh_spec))
    sharded_model = shard_model(nnx.clone(model), mesh)
    sharded = loss_and_grads(sharded_model, case, backend=backend, mesh=mesh)
    assert_sharded(sharded_model, sharded, mesh, collectives=collectives)
    compare(reference, sharded, f"random dit {heads} heads [{mesh_spec}, {backend}]")
