"""Video-DPO loss against a hand-written numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepvideo_jax.training.dpo_loss import dpo_loss, pair_inputs, velocity_error


def _numpy_dpo(pw, pl, rw, rl, x_w, x_l, noise, beta, t=None):
    vw, vl = x_w - noise, x_l - noise
    mse = lambda a, b: ((a - b) ** 2).reshape(a.shape[0], -1).mean(1)
    ew, el, erw, erl = mse(pw, vw), mse(pl, vl), mse(rw, vw), mse(rl, vl)
    beta_t = beta if t is None else beta * t ** 2
    inside = -(beta_t / 2) * ((ew - el) - (erw - erl))
    loss = np.mean(np.log1p(np.exp(-inside)))
    return loss, np.mean(((erw - ew) - (erl - el)) > 0)


@pytest.mark.parametrize("schedule", ["constant", "t_squared"])
def test_loss_matches_numpy(schedule):
    rng = np.random.default_rng(0)
    shape = (3, 2, 4, 3, 5)
    x_w, x_l, noise, pw, pl, rw, rl = (rng.standard_normal(shape).astype(np.float32) for _ in range(7))
    t = rng.uniform(size=3).astype(np.float32)
    beta = 500.0
    x_t, v, t2 = pair_inputs(x_w, x_l, noise, t)
    np.testing.assert_allclose(np.asarray(x_t[:3]), (1 - t[:, None, None, None, None]) * noise
                               + t[:, None, None, None, None] * x_w, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(v[3:]), x_l - noise, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(t2), np.concatenate([t, t]))
    ew, el = velocity_error(pw, v[:3]), velocity_error(pl, v[3:])
    erw, erl = velocity_error(rw, v[:3]), velocity_error(rl, v[3:])
    loss, metrics = dpo_loss(ew, el, erw, erl, t, beta=beta, beta_schedule=schedule)
    ref_loss, ref_acc = _numpy_dpo(pw.astype(np.float64), pl.astype(np.float64), rw, rl, x_w, x_l, noise,
                                   beta, t if schedule == "t_squared" else None)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    assert float(metrics["reward_accuracy"]) == pytest.approx(ref_acc)


def test_equal_policy_and_reference_gives_log2():
    e = jnp.array([0.3, 1.2, 0.7])
    loss, metrics = dpo_loss(e, e[::-1], e, e[::-1], jnp.ones(3), beta=1000.0)
    assert abs(float(loss) - np.log(2.0)) < 1e-6
    assert float(metrics["margin"]) == 0.0
    assert float(metrics["reward_accuracy"]) == 0.0  # only a strictly positive margin counts


def test_no_gradient_flows_into_the_reference():
    e = jnp.array([0.3, 1.2])
    g = jax.grad(lambda r: dpo_loss(e, e + 1, r, r + 1, jnp.ones(2), beta=10.0)[0])(e)
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_sft_term_and_bad_schedule():
    e = jnp.array([0.5, 0.25])
    base, _ = dpo_loss(e, e, e, e, jnp.ones(2), beta=1.0)
    with_sft, _ = dpo_loss(e, e, e, e, jnp.ones(2), beta=1.0, sft_weight=2.0)
    assert float(with_sft - base) == pytest.approx(2.0 * 0.375)
    with pytest.raises(ValueError, match="beta_schedule"):
        dpo_loss(e, e, e, e, jnp.ones(2), beta=1.0, beta_schedule="linear")
