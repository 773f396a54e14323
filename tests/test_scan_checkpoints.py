"""Checkpoint formats around the stacked layers (`models/stack.py`): what was written before the
blocks were stacked either restores stacked at load (converted checkpoints, manifest version 1, the
shipped demo; a training workdir's weights through `load_dit`) or is refused with the way out
(resuming an old training workdir, full or LoRA)."""
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import stepvideo_jax
from stepvideo_jax import checkpoints
from stepvideo_jax.checkpoints import load_dit
from stepvideo_jax.convert import cli, orbax_io, registry
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.convert.keymap import checkpoint_arrays
from stepvideo_jax.models import lora
from stepvideo_jax.models.dit import StepVideoDiT
from stepvideo_jax.training import train_state
from stepvideo_jax.training.checkpoint import Checkpointer, UnrolledCheckpointError
from tests.fixtures import fixture_dir

DEMO = pathlib.Path(stepvideo_jax.__file__).parent / "assets" / "demo"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "out"
    assert cli.main(["--release", str(fixture_dir("release_layout") / "stepvideo-t2v"), "--out", str(out),
                     "--components", "transformer"]) == 0
    return out


def _state(model) -> dict:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _rewrite_manifest(root, **changes):
    path = root / "transformer" / orbax_io.MANIFEST
    manifest = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            manifest.pop(k, None)
        else:
            manifest[k] = v
    path.write_text(json.dumps(manifest))


def test_version_2_records_the_stacked_layers_and_restores_them(converted):
    manifest = orbax_io.read_manifest(converted / "transformer")
    model = checkpoints.load_converted(converted, "transformer")
    n = model.cfg.num_layers
    assert manifest["version"] == 2 and manifest["layers"] == {"blocks": n}
    on_disk = [k for g in manifest["groups"] for k in g["params"] if k.startswith("blocks/")]
    assert len(on_disk) == n * len({k.split("/", 2)[2] for k in on_disk})  # one tensor per layer on disk
    assert all(k.split("/")[1].isdigit() for k in on_disk)
    assert model.blocks.ff.fc1.kernel[...].shape[0] == n


def test_version_1_checkpoint_restores_stacked(converted, tmp_path):
    import shutil

    old = tmp_path / "v1"
    shutil.copytree(converted, old)
    _rewrite_manifest(old, version=1, layers=None)
    a, b = _state(checkpoints.load_converted(old, "transformer")), _state(checkpoints.load_converted(converted, "transformer"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_unknown_version_and_layer_mismatch_are_refused(converted, tmp_path):
    import shutil

    bad = tmp_path / "v9"
    shutil.copytree(converted, bad)
    _rewrite_manifest(bad, version=9)
    with pytest.raises(CheckpointError, match="re-convert"):
        checkpoints.load_converted(bad, "transformer")
    _rewrite_manifest(bad, version=2, layers={"blocks": 999})
    with pytest.raises(CheckpointError, match="stacked layers"):
        checkpoints.load_converted(bad, "transformer")


def test_shipped_demo_restores_stacked():
    for component, name in (("transformer", "blocks"), ("step_llm", "layers")):
        manifest = orbax_io.read_manifest(DEMO / component)
        model = checkpoints.load_converted(DEMO, component)
        n = manifest["config"]["values"]["num_layers"]
        for _, v in nnx.to_flat_state(nnx.state(getattr(model, name))):
            assert v.get_value().shape[0] == n and v.get_metadata()["axes"][0] == "layers"


def _unrolled(state: nnx.State) -> dict:
    """A pure dict of `state` in the layout before stacking: `blocks/<i>/...`."""
    pure = nnx.to_pure_dict(state)
    blocks = pure.pop("blocks")
    n = jax.tree.leaves(blocks)[0].shape[0]
    pure["blocks"] = {str(i): jax.tree.map(lambda a: np.asarray(a[i]), blocks) for i in range(n)}
    return pure


def _tiny_cfg():
    cfg = registry.converter("transformer").read_config(fixture_dir("release_layout") / "stepvideo-t2v" / "transformer")
    return dataclasses.replace(cfg, num_layers=2)


def test_old_training_workdir_is_refused_for_resume_and_its_weights_load_stacked(tmp_path):
    cfg = _tiny_cfg()
    params = nnx.state(StepVideoDiT(cfg, rngs=nnx.Rngs(0)))
    old = {"step": np.int32(3), "params": _unrolled(params), "ema": _unrolled(params)}
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every=1, async_save=False)
    ckpt.save(3, old, {}, force=True)
    ckpt.wait()
    ckpt.close()
    (tmp_path / "dit_config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every=1, async_save=False)  # a resumed run's
    with pytest.raises(UnrolledCheckpointError, match=r"(params|ema)/blocks/0.*stepvideo_jax.export --workdir"):
        ckpt.restore({"step": jax.ShapeDtypeStruct((), jnp.int32)})
    ckpt.close()
    model = load_dit(tmp_path, ema=True)
    got, want = dict(checkpoint_arrays(nnx.state(model))), dict(checkpoint_arrays(params))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


def test_old_lora_adapters_are_refused(tmp_path):
    model = StepVideoDiT(_tiny_cfg(), rngs=nnx.Rngs(0))
    lora.apply_lora(model, rank=2, alpha=2.0)
    adapters = nnx.state(model, lora.LoRAParam)
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every=1, async_save=False)
    ckpt.save(1, {"params": _unrolled(adapters)}, {}, force=True)
    ckpt.wait()
    ckpt.close()
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every=1, async_save=False)
    with pytest.raises(UnrolledCheckpointError, match="unrolled layers"):
        ckpt.restore({"params": jax.eval_shape(lambda: nnx.to_pure_dict(adapters))})
    ckpt.close()
    # the stacked adapters of today save and restore as they are
    fresh = Checkpointer(tmp_path / "new", save_every=1, async_save=False)
    state = train_state.create(adapters, optax.adam(1e-3), seed=0, use_ema=False)
    fresh.save(1, state, {}, force=True)
    fresh.wait()
    restored, _ = fresh.restore(jax.eval_shape(lambda: state))
    fresh.close()
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(adapters)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
