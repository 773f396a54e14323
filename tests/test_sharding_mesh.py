"""Meshes from configs, parameter placement by the rules table, multi-process detection."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from stepvideo_jax.models.layers import Linear
from stepvideo_jax.parallel.mesh import (MESH_AXES, MeshConfig, initialize_distributed, make_mesh,
                                         multi_process_env, shard_model)
from tests.fixtures import PROJECT_ROOT

pytestmark = pytest.mark.sharding


def test_sizes_fill_the_rest():
    assert MeshConfig(sequence=2, tensor=2).resolve(8) == {"data": 1, "fsdp": 2, "sequence": 2, "tensor": 2}
    assert MeshConfig.from_string("sequence=8").resolve(8)["fsdp"] == 1
    assert MeshConfig.from_string("data=2,sequence=-1").resolve(8) == {
        "data": 2, "fsdp": 1, "sequence": 4, "tensor": 1}
    assert MeshConfig.from_mapping({"tensor": 4}).resolve(8)["fsdp"] == 2


@pytest.mark.parametrize("config, match", [
    (MeshConfig(fsdp=3), "use 3 devices"),
    (MeshConfig(data=-1, fsdp=-1), "at most one"),
    (MeshConfig(tensor=3), "do not divide"),
    (MeshConfig(tensor=0), "positive"),
])
def test_bad_sizes(config, match):
    with pytest.raises(ValueError, match=match):
        config.resolve(8)


def test_bad_strings():
    with pytest.raises(ValueError, match="axis in"):
        MeshConfig.from_string("pipeline=2")
    with pytest.raises(ValueError, match="integer"):
        MeshConfig.from_string("fsdp=two")
    with pytest.raises(ValueError, match="unknown mesh axes"):
        MeshConfig.from_mapping({"model": 2})


def test_mesh_axes_and_devices():
    mesh = make_mesh(MeshConfig.from_string("fsdp=2,sequence=2,tensor=2"))
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "sequence": 2, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_shard_model_follows_rules():
    layer = Linear(16, 32, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    before = np.asarray(layer.kernel[...])
    mesh = make_mesh(MeshConfig.from_string("fsdp=4,tensor=2"))
    shard_model(layer, mesh)
    assert layer.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert layer.kernel[...].addressable_shards[0].data.shape == (4, 16)
    assert layer.bias[...].sharding.spec == P("tensor")
    np.testing.assert_array_equal(np.asarray(layer.kernel[...]), before)
    with jax.set_mesh(mesh):
        y = jax.jit(lambda m, x: m(x))(layer, jnp.ones((8, 16)))
    np.testing.assert_allclose(y, jnp.ones((8, 16)) @ before + np.asarray(layer.bias[...]), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_NTASKS": "1"}, None),
    ({"SLURM_NTASKS": "16"}, "SLURM_NTASKS"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, "TPU_WORKER_HOSTNAMES"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, "JAX_COORDINATOR_ADDRESS"),
    ({"STEPVIDEO_DISTRIBUTED": "0"}, None),
    ({"STEPVIDEO_DISTRIBUTED": "1"}, "STEPVIDEO_DISTRIBUTED"),
])
def test_multi_process_detection(env, expected):
    assert multi_process_env(env) == expected


def test_single_process_does_not_initialize():
    assert initialize_distributed(environ={}) is False


def test_launch_entry_runs_module_single_process(tmp_path):
    (tmp_path / "probe.py").write_text(
        "import sys, jax\nprint(sys.argv[1:], jax.distributed.is_initialized())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                                                            "JAX_COORDINATOR_ADDRESS", "STEPVIDEO_DISTRIBUTED")}
    env["PYTHONPATH"] = str(tmp_path)
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "launch" / "entry.py"), "-m", "probe", "--x", "1"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['--x', '1'] False"


def test_one_builder_for_configs_mappings_and_strings():
    """`make_mesh` takes a training config's mapping or a spec string; with `subset=True` fixed sizes
    below the device count use the first devices (a one-device run on a host with more)."""
    n = jax.device_count()
    assert dict(make_mesh({"data": 1, "fsdp": -1, "sequence": 1, "tensor": 1}).shape)["fsdp"] == n
    assert make_mesh(f"fsdp={n}").devices.size == n
    small = make_mesh({"data": 1, "fsdp": 1, "sequence": 1, "tensor": 1}, subset=True)
    assert small.devices.size == 1 and small.axis_names == MESH_AXES
    if n > 1:
        with pytest.raises(ValueError, match="set one axis to -1"):
            make_mesh({"data": 1, "fsdp": 1, "sequence": 1, "tensor": 1})
