"""A release directory restored straight into a mesh (`convert/release_restore.py`) equals its
converted checkpoint restored into the same mesh: same values, same shardings, on 8 devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepvideo_jax import checkpoints
from stepvideo_jax.convert import conversion, registry
from stepvideo_jax.parallel.mesh import MeshConfig, make_mesh
from tests.fixtures import fixture_dir

pytestmark = pytest.mark.sharding


def release():
    return fixture_dir("release_layout") / "stepvideo-t2v"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return conversion.convert_release(release(), tmp_path_factory.mktemp("ckpt") / "ckpt", dtype="float32")


def flat(model):
    return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("component", list(registry.COMPONENTS))
@pytest.mark.parametrize("mesh_spec, dtype", [("fsdp=2,sequence=2,tensor=2", jnp.float32),
                                              ("fsdp=-1", jnp.bfloat16)])
def test_release_into_a_mesh_equals_its_converted_checkpoint(converted, component, mesh_spec, dtype):
    assert jax.device_count() == 8, "tests/conftest.py provides 8 host devices"
    mesh = make_mesh(MeshConfig.from_string(mesh_spec))
    direct = flat(checkpoints.load_component(release(), component, dtype=dtype, mesh=mesh))
    restored = flat(checkpoints.load_converted(converted, component, param_dtype=dtype, mesh=mesh))
    assert direct.keys() == restored.keys()
    sharded = 0
    for k, want in restored.items():
        got = direct[k]
        assert got.dtype == want.dtype == dtype, k
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim), f"{k}: {got.sharding} != {want.sharding}"
        assert np.array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))), k
        sharded += not got.sharding.is_fully_replicated
    if component == "transformer":
        assert sharded > 0, "the rules shard the DiT's weights over this mesh"


def test_generation_loader_shards_a_release_like_its_converted_checkpoint(converted):
    """`generate`'s loader with `mesh` on the release directory: every model equals the converted
    checkpoint's in the same mesh, and the text encoders give the same conditioning."""
    mesh = make_mesh(MeshConfig.from_string("fsdp=2,tensor=4"))
    f32 = dict(dit_dtype=jnp.float32, vae_dtype=jnp.float32, llm_dtype=jnp.float32, clip_dtype=jnp.float32)
    direct = checkpoints.loader(release(), mesh=mesh, **f32)
    restored = checkpoints.loader(converted, mesh=mesh, **f32)
    assert not checkpoints.is_converted(direct.path) and direct.mesh is mesh
    for build in ("dit", "vae"):
        got, want = flat(getattr(direct, build)()), flat(getattr(restored, build)())
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].sharding.is_equivalent_to(want[k].sharding, got[k].ndim), k
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
    got, want = direct.text_encoder()(["a red circle grows"]), restored.text_encoder()(["a red circle grows"])
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
