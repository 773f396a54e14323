"""The shipped training configs parse into a consistent run description (no compilation)."""
import importlib.util
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from stepvideo_jax.convert import conversion
from stepvideo_jax.models.dit import DiTConfig, StepVideoDiT
from stepvideo_jax.parallel.mesh import make_mesh
from stepvideo_jax.parallel.rules import state_shardings
from stepvideo_jax.training import optimizer, train_state
from stepvideo_jax.training.settings import resolve
from stepvideo_jax.training.train_step import remat_policy

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(name, *args):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs/train" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


@pytest.mark.parametrize("name,arg,chips", [("pod_544x992", "v5p-128", 64), ("pod_544x992", "v5p-256", 128),
                                            ("pod_192x320", "v5p-128", 64), ("pod_192x320", "v5p-256", 128)])
def test_pod_configs(name, arg, chips):
    c = _config(name, arg)
    run = resolve(c)
    assert run.model == DiTConfig.full()
    s = run.step
    remat_policy(s.remat)
    assert s.remat == "full" and c.compute_dtype == "bfloat16"
    mesh = {k: v for k, v in c.mesh.items()}
    fsdp = chips // (mesh["data"] * mesh["sequence"] * mesh["tensor"])
    micro = c.data.global_batch // s.accum_steps
    assert micro * s.accum_steps == c.data.global_batch
    assert micro % (mesh["data"] * fsdp) == 0  # micro-batch rows over (data, fsdp)
    optimizer.build(run.optim)


@pytest.mark.sharding
def test_full_size_state_shards_over_a_mesh():
    """The whole full-size train state (f32 params, Adam moments, EMA) has a sharding from the rules."""
    c = _config("pod_544x992", "v5p-128")
    run = resolve(c)
    cfg = run.model
    _, opt = optimizer.build(run.optim)
    abstract = jax.eval_shape(lambda: train_state.create(
        nnx.state(StepVideoDiT(cfg, rngs=nnx.Rngs(0))), opt, seed=0, use_ema=True))
    mesh = make_mesh({"fsdp": 2, "sequence": 4}, subset=True)
    shardings = state_shardings(abstract, mesh)
    n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
    assert n_params == 29_342_478_400
    leaves = jax.tree.leaves(abstract)
    total = sum(x.size * x.dtype.itemsize for x in leaves)
    assert total > 4 * 4 * n_params  # params + mu + nu + EMA, float32
    assert len(jax.tree.leaves(shardings)) == len(leaves)


def test_init_from_release_and_converted_checkpoint(tmp_path):
    """`model.init_from` accepts an official transformer/ directory and a converter output root."""
    from stepvideo_jax.convert import dit as dit_convert
    from stepvideo_jax.checkpoints import dit_config as source_dit_config
    from stepvideo_jax.training.loop import _with_initial_weights
    from tests.fixtures import fixture_dir

    release = fixture_dir("release_layout") / "stepvideo-t2v"
    conversion.convert_release(release, tmp_path / "ckpt", components=["transformer"])
    want = nnx.state(dit_convert.load(release / "transformer"))
    mesh = make_mesh({"fsdp": 2}, subset=True)
    for source in (release / "transformer", tmp_path / "ckpt"):
        cfg = source_dit_config(source)
        assert cfg == dit_convert.read_config(release / "transformer")
        _, opt = optimizer.build(resolve(_config("tiny_cpu")).optim)
        fresh = train_state.create(nnx.state(StepVideoDiT(cfg, rngs=nnx.Rngs(0))), opt, seed=0, use_ema=True)
        sh = state_shardings(jax.eval_shape(lambda: fresh), mesh)
        state = _with_initial_weights(fresh, source, jax.numpy.float32, sh, mesh)
        for a, e, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema), jax.tree.leaves(want)):
            assert a.dtype == jax.numpy.float32
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            np.testing.assert_array_equal(np.asarray(e), np.asarray(b))
