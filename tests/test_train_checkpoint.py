"""Checkpoints: a save killed mid-write leaves a restorable latest checkpoint; restore onto a mesh
of another size."""
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepvideo_jax.models.dit import DiTConfig, StepVideoDiT
from stepvideo_jax.parallel.rules import state_shardings
from stepvideo_jax.training import optimizer as optim
from stepvideo_jax.training import train_state
from stepvideo_jax.training.checkpoint import Checkpointer, abstract_with_shardings
from stepvideo_jax.parallel.mesh import make_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]

WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from stepvideo_jax.training.checkpoint import Checkpointer

    def state(step):  # 48 MiB per checkpoint, so a save takes a while
        return {"w": np.full((3, 1 << 22), step, np.float32), "step": np.int32(step)}

    ckpt = Checkpointer(sys.argv[1], save_every=1, keep=10)
    for step in range(1, 100):
        print("saving", step, flush=True)
        ckpt.save(step, state(step), {"next_index": step})
        if step == 1:
            ckpt.wait()
""")


def test_save_killed_mid_write_leaves_a_restorable_latest(tmp_path):
    ckdir = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(ckdir)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "saving 3":
                break
        os.kill(proc.pid, signal.SIGKILL)  # during the save of step 3 (or of step 2's background write)
    finally:
        proc.wait()
    # also leave a hand-made half-written step: a temporary directory with a truncated copy
    complete = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
    assert complete and complete[0] == 1, os.listdir(ckdir)
    partial = ckdir / "9.orbax-checkpoint-tmp-1234"
    shutil.copytree(ckdir / str(complete[-1]), partial)
    for f in partial.rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    ckpt = Checkpointer(ckdir, save_every=1)
    latest = ckpt.latest_step()
    assert latest in (1, 2, 3)
    abstract = {"w": jax.ShapeDtypeStruct((3, 1 << 22), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}
    state, data = ckpt.restore(abstract)
    ckpt.close()
    assert int(state["step"]) == latest and data == {"next_index": latest}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full((3, 1 << 22), latest, np.float32))


@pytest.mark.sharding
def test_restore_onto_a_mesh_of_another_size(tmp_path):
    cfg = DiTConfig(num_layers=1, num_heads=2, head_dim=16, in_channels=4, out_channels=4,
                    caption_channels=(16, 8), rope_splits=(8, 4, 4))
    opt = optim.adamw(optim.learning_rate_schedule(1e-3, warmup_steps=0, total_steps=10))

    def init():
        params = nnx.state(StepVideoDiT(cfg, rngs=nnx.Rngs(0)))
        return train_state.create(params, opt, seed=0, use_ema=True)

    abstract = jax.eval_shape(init)
    big = make_mesh({"fsdp": 8}, subset=True)
    sh8 = state_shardings(abstract, big)
    state = jax.jit(init, out_shardings=sh8)()
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(state))
    ckpt = Checkpointer(tmp_path, save_every=1)
    ckpt.save(0, state, {"next_index": 0})
    ckpt.wait()
    small = make_mesh({"fsdp": 2, "sequence": 2}, subset=True)  # the first 4 devices
    sh4 = state_shardings(abstract, small)
    restored, _ = ckpt.restore(abstract_with_shardings(abstract, sh4))
    ckpt.close()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert len(a.sharding.device_set) in (1, 4) and a.sharding.device_set <= set(small.devices.flat)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
