"""Training a Step-Video-TI2V DiT: flow matching and DPO condition every row on its own first latent frame
(bf16, zeros after) and a motion score (per sample or from the settings); text dropout as for T2V."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepvideo_jax.models.dit import DiTConfig, StepVideoDiT
from stepvideo_jax.sampling.image_condition import condition_frames
from stepvideo_jax.training import flow_loss
from stepvideo_jax.training.dpo_step import DPOSettings, dpo_loss_and_grads, draw_pair_inputs, pair_errors
from stepvideo_jax.training.train_step import StepSettings, draw_inputs, heldout_loss, loss_and_grads
from tests.test_dpo_step import _pairs

CFG = DiTConfig(num_layers=1, num_heads=2, head_dim=16, in_channels=4, out_channels=4,
                caption_channels=(12, 8), rope_splits=(8, 4, 4), ti2v=True)
SETTINGS = StepSettings(attention_backend="xla", motion_score=5.0)


def _model():
    return nnx.split(StepVideoDiT(CFG, rngs=nnx.Rngs(0)))


def _batch(b=4, seed=0):
    pairs = _pairs(b=b, seed=seed)
    return {"mean": pairs["mean_w"], "logvar": pairs["logvar_w"], **{k: pairs[k] for k in ("y", "y_mask", "clip")}}


def _manual_loss(graphdef, params, inputs, ms):
    model = nnx.merge(graphdef, params)
    x = inputs["x"]
    cond = jnp.concatenate([x[:, :1], jnp.zeros_like(x[:, 1:])], axis=1).astype(jnp.bfloat16).astype(jnp.float32)
    velocity = lambda xt, t: model(xt, t, inputs["y"], inputs["y_mask"], inputs["clip"], backend="xla",  # noqa: E731
                                   condition=cond, motion_score=jnp.broadcast_to(jnp.float32(ms), t.shape))
    return flow_loss.flow_matching_loss(velocity, x, inputs["noise"], inputs["t"])


@pytest.mark.slow
def test_flow_matching_conditions_on_the_first_latent_frame():
    graphdef, params = _model()
    batch, key = _batch(), jax.random.key(3)
    loss, grads = jax.jit(lambda p: loss_and_grads(graphdef, p, batch, key, SETTINGS))(params)
    inputs = draw_inputs(key, batch, SETTINGS)
    want = _manual_loss(graphdef, params, inputs, SETTINGS.motion_score)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert float(jnp.abs(nnx.to_pure_dict(grads)["motion_linear_1"]["kernel"]).max()) > 0
    # a per-sample motion score in the batch overrides the settings' and changes the loss
    per_sample = dict(batch, motion_score=jnp.full((4,), 20.0, jnp.float32))
    other, _ = loss_and_grads(graphdef, params, per_sample, key, SETTINGS)
    np.testing.assert_allclose(float(other), float(_manual_loss(graphdef, params, inputs, 20.0)), rtol=1e-6)
    assert abs(float(other) - float(loss)) > 1e-6
    # accumulation draws the same inputs: the same loss
    acc, _ = loss_and_grads(graphdef, params, batch, key, dataclasses.replace(SETTINGS, accum_steps=2))
    np.testing.assert_allclose(float(acc), float(loss), rtol=1e-5)
    held = {**inputs, "x": inputs["x"]}
    np.testing.assert_allclose(float(heldout_loss(graphdef, params, held, backend="xla", motion_score=5.0)),
                               float(want), rtol=1e-6)


def test_condition_is_bf16_first_frame_and_text_dropout_keeps_it():
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2, 2))
    cond = np.asarray(condition_frames(x[:, :1], x.shape[1]))
    np.testing.assert_array_equal(cond[:, 0], np.asarray(x[:, 0].astype(jnp.bfloat16).astype(jnp.float32)))
    assert not cond[:, 1:].any()
    graphdef, params = _model()
    batch = _batch()
    negative = {k: batch[k][:1] * 0 for k in ("y", "y_mask", "clip")}
    drop_all = dataclasses.replace(SETTINGS, cond_dropout=1.0)
    loss, _ = loss_and_grads(graphdef, params, batch, jax.random.key(3), drop_all, negative)
    inputs = draw_inputs(jax.random.key(3), batch, drop_all, negative)
    np.testing.assert_array_equal(inputs["y"], jnp.broadcast_to(negative["y"], batch["y"].shape))
    np.testing.assert_allclose(float(loss), float(_manual_loss(graphdef, params, inputs, 5.0)), rtol=1e-6)


def test_motion_score_is_required():
    graphdef, params = _model()
    with pytest.raises(ValueError, match="motion_score"):
        loss_and_grads(graphdef, params, _batch(), jax.random.key(0), StepSettings(attention_backend="xla"))


@pytest.mark.slow
def test_dpo_conditions_each_video_on_its_own_first_frame():
    graphdef, params = _model()
    batch = _pairs()
    inputs = draw_pair_inputs(jax.random.key(1), batch, SETTINGS)
    model = nnx.merge(graphdef, params)
    err = pair_errors(model, inputs, backend="xla", motion_score=5.0)
    from stepvideo_jax.training.dpo_loss import pair_inputs, velocity_error

    x_t, v, t2 = pair_inputs(inputs["x_w"], inputs["x_l"], inputs["noise"], inputs["t"])
    x = jnp.concatenate([inputs["x_w"], inputs["x_l"]])
    two = lambda a: jnp.concatenate([a, a])  # noqa: E731
    pred = model(x_t, t2, two(inputs["y"]), two(inputs["y_mask"]), two(inputs["clip"]), backend="xla",
                 condition=condition_frames(x[:, :1], x.shape[1]), motion_score=jnp.full((x.shape[0],), 5.0))
    np.testing.assert_allclose(np.asarray(err), np.asarray(velocity_error(pred, v)), rtol=1e-6)
    loss, metrics, grads = dpo_loss_and_grads(graphdef, graphdef, params, {"reference": params, "base": None},
                                              batch, jax.random.key(1), SETTINGS, DPOSettings(beta=5.0))
    np.testing.assert_allclose(float(loss), np.log(2), rtol=1e-5)   # policy == reference
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
