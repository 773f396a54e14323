"""The Video-VAE's training loss (`training/vae_train.py`): the foreground pixel weights and the loss
they give, on a VAE of the demo's architecture (the size is the demo config's)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.demo import train as demo_train_config
from stepvideo_jax.data import synthetic_motion as sm
from stepvideo_jax.demo import architecture
from stepvideo_jax.models.vae import VideoVAE
from stepvideo_jax.training import vae_train


@pytest.fixture(scope="module")
def config():
    return demo_train_config.get_config()


@pytest.fixture(scope="module")
def video(config):
    v = config.video
    scene = sm.TRAIN_SCENES[0]
    return jnp.asarray(sm.to_model_range(sm.render(scene, frames=v.frames, height=v.height, width=v.width, seed=3))[None])


def test_foreground_weights_mark_the_object_not_the_background(config, video):
    settings = vae_train.VAELossSettings(foreground_weight=4.0)
    w = np.asarray(vae_train.pixel_weights(video, settings))
    assert w.shape == (video.shape[0], video.shape[1], 1, *video.shape[3:])
    background = np.all(np.asarray(video) == np.asarray(video)[..., :1, :1], axis=2, keepdims=True)
    assert set(np.unique(w)) == {1.0, 5.0}
    np.testing.assert_array_equal(w[background], 1.0)
    # the object's interior (its own colour, far from the background in some channel) is weighted
    colour = np.asarray(sm.COLOURS[sm.TRAIN_SCENES[0].colour][0], np.float32) / 127.5 - 1
    inside = np.all(np.abs(np.asarray(video) - colour[None, None, :, None, None]) < 1e-2, axis=2, keepdims=True)
    assert inside.any()
    np.testing.assert_array_equal(w[inside], 5.0)
    assert 0 < (w > 1).mean() < 0.5     # a small object on a flat background


def test_loss_with_zero_foreground_weight_is_the_plain_mse(config, video):
    vae = VideoVAE(architecture.vae_config(config), rngs=nnx.Rngs(0))
    key = jax.random.key(0)
    plain, m_plain = vae_train.vae_loss(vae, video, key, vae_train.VAELossSettings(kl_weight=1e-4))
    assert float(plain) == pytest.approx(float(m_plain["recon_mse"]) + 1e-4 * float(m_plain["kl"]), rel=1e-6)
    weighted, m_w = vae_train.vae_loss(vae, video, key, vae_train.VAELossSettings(kl_weight=1e-4, foreground_weight=4.0))
    assert float(m_w["recon_mse"]) == pytest.approx(float(m_plain["recon_mse"]), rel=1e-6)   # same noise, same recon
    post = vae.posterior(vae.encode_moments(video, stream_frames=vae_train.ENCODE_STREAM_FRAMES))
    recon = vae.decode(post.sample(key), stream_frames=vae_train.DECODE_STREAM_FRAMES)
    w = vae_train.pixel_weights(video, vae_train.VAELossSettings(foreground_weight=4.0))
    want = float(jnp.mean(jnp.square(recon - video) * w)) + 1e-4 * float(m_w["kl"])
    assert float(weighted) == pytest.approx(want, rel=1e-5)
    assert float(weighted) > float(plain)
