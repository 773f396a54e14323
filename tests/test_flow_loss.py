"""Flow-matching loss math against a hand-written numpy reference on a tiny batch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepvideo_jax.training import flow_loss


def _numpy_loss(x, noise, t, velocity_np):
    xt = (1.0 - t[:, None, None, None, None]) * noise + t[:, None, None, None, None] * x
    pred = velocity_np(xt, t)
    return np.mean((pred - (x - noise)) ** 2)


def test_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    shape = (3, 2, 4, 3, 5)
    x, noise = rng.normal(size=shape), rng.normal(size=shape)
    t = np.array([0.0, 0.37, 1.0])
    w = rng.normal(size=(4, 4))
    bias = rng.normal(size=(3,))

    def velocity_np(xt, tt):  # a channel mix plus a t-dependent offset
        return np.einsum("bfchw,cd->bfdhw", xt, w) + (tt * bias)[:, None, None, None, None]

    def velocity_jax(xt, tt):
        return jnp.einsum("bfchw,cd->bfdhw", xt, jnp.asarray(w, jnp.float32)) + \
            (tt * jnp.asarray(bias, jnp.float32))[:, None, None, None, None]

    want = _numpy_loss(x, noise, t, velocity_np)
    got = flow_loss.flow_matching_loss(velocity_jax, jnp.asarray(x, jnp.float32),
                                       jnp.asarray(noise, jnp.float32), jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # endpoints of the path: t = 0 is the noise, t = 1 the data
    xt = np.asarray(flow_loss.interpolate(jnp.asarray(x), jnp.asarray(noise), jnp.asarray(t)))
    np.testing.assert_allclose(xt[0], noise[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(xt[2], x[2], rtol=1e-6, atol=1e-6)
    # the exact velocity has zero loss
    exact = lambda xt_, tt: jnp.asarray(x - noise, jnp.float32)
    assert float(flow_loss.flow_matching_loss(exact, jnp.asarray(x), jnp.asarray(noise), jnp.asarray(t))) < 1e-12


def test_timestep_distributions():
    key = jax.random.key(0)
    n = 20000
    u = np.asarray(flow_loss.sample_timesteps(key, n, "uniform"))
    assert u.min() >= 0 and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01
    ln = np.asarray(flow_loss.sample_timesteps(key, n, "logit_normal", logit_mean=0.5, logit_std=0.8))
    logit = np.log(ln / (1 - ln))
    assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03
    shift = 13.0
    sh = np.asarray(flow_loss.sample_timesteps(key, n, "shifted", shift=shift))
    # same key -> same u as the uniform draw; t = 1 - shift*u / (1 + (shift-1) u) as in the sampler
    np.testing.assert_allclose(sh, 1 - shift * u / (1 + (shift - 1) * u), rtol=1e-5, atol=1e-6)
    assert np.median(sh) < 0.1  # mass moved to the noisy end
    with pytest.raises(ValueError, match="uniform"):
        flow_loss.sample_timesteps(key, 2, "beta")


def test_posterior_sample_and_conditioning_dropout():
    key = jax.random.key(1)
    mean = jnp.full((4096, 1, 1, 1, 1), 2.0)
    logvar = jnp.full_like(mean, np.log(0.25))
    s = np.asarray(flow_loss.sample_posterior(key, mean, logvar))
    assert abs(s.mean() - 2.0) < 0.03 and abs(s.std() - 0.5) < 0.03
    b = 1000
    cond = {"y": jnp.ones((b, 3, 2)), "y_mask": jnp.ones((b, 5)), "clip": jnp.ones((b, 2, 2))}
    neg = {"y": jnp.zeros((1, 3, 2)), "y_mask": jnp.zeros((1, 5)), "clip": jnp.zeros((1, 2, 2))}
    out = flow_loss.drop_conditioning(key, cond, neg, 0.3)
    dropped = np.asarray(out["y"][:, 0, 0] == 0)
    assert abs(dropped.mean() - 0.3) < 0.05
    for k in cond:  # a row is dropped as a whole
        np.testing.assert_array_equal(np.asarray(out[k]).reshape(b, -1).max(1) == 0, dropped)
