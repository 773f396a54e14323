"""Sharded checkpoint restore and sharded sampling equal one device.

A fixture DiT converted to the project's Orbax format restores straight into the rule shardings of
meshes of two sizes (8 and 4 devices) and reproduces the fixture output; three flow-matching steps
with CFG, the [cond, uncond] branches split over `data` and ring attention over `sequence`, equal
the unsharded steps (max|a - b| / max|b| <= 1e-5).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from stepvideo_jax.convert import dit as dit_convert
from stepvideo_jax.convert import orbax_io
from stepvideo_jax.convert.keymap import convert_tensors, flat_shapes
from stepvideo_jax.convert.safetensors_io import TensorSource
from stepvideo_jax.parallel.mesh import MeshConfig, make_mesh, shard_model
from stepvideo_jax.sampling.flow_matching import FlowMatchSampler, SamplerSettings, denoise_step
from stepvideo_jax.sampling.pipeline import dit_velocity_fn
from tests.fixtures import assert_close, fixture_dir, load_json, load_npz

pytestmark = pytest.mark.sharding

REL = 1e-5


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def fixture_config():
    return dit_convert.config_from_dict(load_json("dit")["constructor_args"])


def abstract_dit():
    return nnx.eval_shape(lambda: dit_convert.build(fixture_config(), rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=None)
def fixture_case():
    return load_npz("dit", f"{load_json('dit')['cases'][0]}.npz")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture weights written by the converter's Orbax writer (small groups: several files)."""
    folder = tmp_path_factory.mktemp("dit_orbax")
    cfg = fixture_config()
    tensors = convert_tensors(TensorSource.single(fixture_dir("dit") / "weights.safetensors"),
                              dit_convert.rules(cfg), flat_shapes(nnx.state(abstract_dit())),
                              ignore=dit_convert.IGNORE, label="fixture dit")
    groups = orbax_io.write_params(folder, tensors, group_bytes=2**20)
    orbax_io.write_manifest(folder, component="transformer", dtype="float32", groups=groups, config={},
                            files=[], source="fixture dit",
                            layers=orbax_io.stacked_layers(nnx.state(abstract_dit())))
    return folder


@pytest.mark.parametrize("mesh_spec, num_devices", [("fsdp=2,sequence=2,tensor=2", 8),
                                                    ("fsdp=2,tensor=2", 4)])
def test_restore_into_mesh(converted, mesh_spec, num_devices):
    mesh = make_mesh(MeshConfig.from_string(mesh_spec), jax.devices()[:num_devices])
    model = orbax_io.restore(converted, abstract_dit(), mesh=mesh)
    kernel = model.blocks.ff.fc1.kernel[...]  # stacked (layers, d, 4d), assembled layer by layer
    assert kernel.sharding.mesh.devices.size == num_devices
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0], kernel.shape[1] // 2, kernel.shape[2] // 2)
    case = fixture_case()
    args = [case[k] for k in ("hidden_states", "timestep", "encoder_hidden_states",
                              "encoder_attention_mask", "encoder_hidden_states_2")]
    backend = "ring" if mesh.shape["sequence"] > 1 else None
    with jax.set_mesh(mesh):
        out = jax.jit(lambda m, *a: m(*a, backend=backend))(model, *args)
    assert_close(out, case["output"], atol=1e-4, rtol=1e-4, name=f"restored on [{mesh_spec}]")


def test_sampler_steps_sharded(converted):
    case = fixture_case()
    rows = [0, min(1, len(case["hidden_states"]) - 1)]  # [cond, uncond]; a one-row case is repeated
    cond = {"y": case["encoder_hidden_states"][rows], "y_mask": case["encoder_attention_mask"][rows],
            "clip": case["encoder_hidden_states_2"][rows]}
    noise = case["hidden_states"][:1]
    settings = SamplerSettings(num_steps=3, guidance_scale=7.0, shift=13.0)

    model = orbax_io.restore(converted, abstract_dit())
    graphdef, state = nnx.split(model)
    reference = FlowMatchSampler(dit_velocity_fn(graphdef)).sample(state, noise, cond, settings)

    mesh = make_mesh(MeshConfig.from_string("data=2,sequence=4"))
    sharded = nnx.state(shard_model(nnx.clone(model), mesh))
    velocity = dit_velocity_fn(graphdef, backend="ring")
    with jax.set_mesh(mesh):
        latents = FlowMatchSampler(velocity).sample(sharded, noise, cond, settings)
        step = jax.jit(functools.partial(denoise_step, velocity, cfg=True, model_dtype=jnp.float32))
        hlo = step.lower(sharded, jnp.asarray(noise), cond, 0.5, 1.0, 0.9, 7.0).compile().as_text()
    err = rel_err(latents, reference)
    print(f"\n3 CFG steps [data=2,sequence=4, ring]: latents rel err {err:.2e}")
    assert err <= REL
    b, f, c, h, w = noise.shape
    p = fixture_config().patch_size
    # The CFG batch (2 rows) is split over data: one row and a quarter of the tokens per device
    # (a token count 4 does not divide is padded up).
    local = f"f32[1,{-(-f * (h // p) * (w // p) // 4)},{fixture_config().dim}]"
    assert local in hlo and "collective-permute" in hlo, local
