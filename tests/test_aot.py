"""AOT helpers on the host's (fake CPU) devices; the TPU path itself needs libtpu and is a script
(`bench/dit_block_memory.py`, `launch/aot.py`), not a test."""
import jax
import jax.numpy as jnp
import pytest

from stepvideo_jax.parallel import aot


def test_parse_axes():
    assert aot.parse_axes("sequence=2, tensor=4") == {"sequence": 2, "tensor": 4}
    with pytest.raises(ValueError, match="name=size"):
        aot.parse_axes("tensor")
    with pytest.raises(ValueError, match="unknown mesh axes"):
        aot.parse_axes("model=4")


def test_mesh_must_cover_the_devices():
    with pytest.raises(ValueError, match="multiply to 4"):
        aot.mesh_over(jax.devices()[:8], {"tensor": 4})


def test_unknown_slice_is_rejected():
    with pytest.raises(ValueError, match="unknown TPU slice"):
        aot.tpu_devices("v9-8")


def test_compile_and_memory_on_host_devices():
    mesh = aot.mesh_over(jax.devices()[:8], {"fsdp": 2, "tensor": 4})
    x = aot.abstract((16, 64), jnp.float32, mesh, ("batch", "act_mlp"))
    assert x.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    compiled = aot.compile_aot(lambda x: jnp.tanh(x) * 2, (x,), in_shardings=(x.sharding,),
                               out_shardings=x.sharding, mesh=mesh)
    mem = aot.memory(compiled)
    assert mem["argument_size_in_bytes"] == 16 * 64 * 4 // 8  # one shard per device
    live = mem["argument_size_in_bytes"] + mem["output_size_in_bytes"] - mem["alias_size_in_bytes"]
    assert mem["peak"] >= live
    assert "peak" in aot.format_memory(mem)


def test_plan_splits_the_vae_chunks_over_every_chip():
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "launch"))
    import plan

    assert plan.vae_chunk_split(4) == "12 chunks, 3 per chip"
    assert plan.vae_chunk_split(8) == "12 chunks, 2 per chip (padded to 16)"
    assert plan.vae_chunk_split(16) == "12 chunks, 1 per chip (padded to 16)"
