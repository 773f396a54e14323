"""The pure train step: accumulation, remat, EMA, bf16 compute with f32 master weights, sharding."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from stepvideo_jax.models.dit import DiTConfig, StepVideoDiT
from stepvideo_jax.parallel.rules import STATE_RULES, state_shardings
from stepvideo_jax.training import optimizer as optim
from stepvideo_jax.training import train_state
from stepvideo_jax.parallel.mesh import make_mesh
from stepvideo_jax.training.loop import batch_shardings
from stepvideo_jax.training.train_step import StepSettings, loss_and_grads, make_train_step

CFG = DiTConfig(num_layers=1, num_heads=2, head_dim=16, in_channels=4, out_channels=4,
                caption_channels=(12, 8), rope_splits=(8, 4, 4))


def _batch(b=4, f=2, h=4, w=4, lt=6, lc=3, seed=0):
    rng = np.random.default_rng(seed)
    valid = rng.integers(1, lt + 1, size=b)
    return {"mean": jnp.asarray(rng.normal(size=(b, f, 4, h, w)), jnp.float32),
            "logvar": jnp.full((b, f, 4, h, w), -4.0, jnp.float32),
            "y": jnp.asarray(rng.normal(size=(b, lt, 12)), jnp.float32),
            "y_mask": jnp.asarray(np.concatenate([np.ones((b, lc)), np.arange(lt)[None] < valid[:, None]], 1),
                                  jnp.int32),
            "clip": jnp.asarray(rng.normal(size=(b, lc, 8)), jnp.float32)}


def _negative(batch):
    return {k: jnp.zeros_like(batch[k][:1]) for k in ("y", "y_mask", "clip")}


def _model(dtype=jnp.float32):
    return nnx.split(StepVideoDiT(CFG, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))


def _max_rel(a, b):
    num = jax.tree.reduce(max, jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b))
    den = jax.tree.reduce(max, jax.tree.map(lambda y: float(jnp.max(jnp.abs(y))), b))
    return num / den


def _leafwise_rel(a, b):
    return max(jax.tree.leaves(jax.tree.map(
        lambda x, y: float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30)), a, b)))


SETTINGS = StepSettings(cond_dropout=0.5, attention_backend="xla")
KEY = 5


@pytest.fixture(scope="module")
def reference():
    """Single-device loss and gradients of one batch (shared by the tests below)."""
    graphdef, params = _model()
    batch = _batch(b=4, f=2, h=4, w=8)
    fn = lambda p, bt, ng: loss_and_grads(graphdef, p, bt, jax.random.key(KEY), SETTINGS, ng)
    loss, grads = jax.jit(fn)(params, batch, _negative(batch))
    return graphdef, params, batch, loss, grads


def test_accumulation_and_remat_give_the_full_batch_gradient(reference):
    graphdef, params, batch, loss1, g1 = reference
    s = dataclasses.replace(SETTINGS, remat="full", accum_steps=2)
    loss2, g2 = jax.jit(lambda p: loss_and_grads(graphdef, p, batch, jax.random.key(KEY), s, _negative(batch)))(params)
    np.testing.assert_allclose(float(loss2), float(loss1), rtol=1e-5)
    assert _leafwise_rel(g2, g1) < 1e-4


def test_step_updates_params_in_float32_with_bf16_compute_and_ema():
    graphdef, params = _model(jnp.bfloat16)
    schedule = optim.learning_rate_schedule(1e-3, warmup_steps=2, total_steps=10)
    opt = optim.adamw(schedule, clip_norm=1.0)
    state = train_state.create(params, opt, seed=0, use_ema=True)
    step = jax.jit(make_train_step(graphdef, opt, schedule, StepSettings(ema_decay=0.9, attention_backend="xla")), donate_argnums=0)
    batch = _batch()
    old = jax.tree.map(np.asarray, state.params)
    state, m = step(state, batch, _negative(batch))
    state, m = step(state, batch, _negative(batch))
    assert int(state.step) == 2 and bool(m["finite"])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    np.testing.assert_allclose(float(m["learning_rate"]), float(schedule(1)))
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state.params, old)
    assert max(jax.tree.leaves(moved)) > 0
    # EMA after two updates: 0.9^2 * p0 + 0.1 * 0.9 * p1 + 0.1 * p2; lies strictly between p0 and p2
    ema_gap = _max_rel(jax.tree.map(lambda e, o: e - o, state.ema, old), jax.tree.map(lambda p, o: p - o, state.params, old))
    assert 0 < ema_gap < 1


def test_learning_rate_schedules():
    cos = optim.learning_rate_schedule(1.0, warmup_steps=10, total_steps=110, end_fraction=0.1)
    assert float(cos(0)) == 0.0 and abs(float(cos(10)) - 1.0) < 1e-6 and abs(float(cos(110)) - 0.1) < 1e-6
    const = optim.learning_rate_schedule(2.0, warmup_steps=4, total_steps=100, kind="constant")
    assert abs(float(const(2)) - 1.0) < 1e-6 and float(const(50)) == 2.0
    try:
        optim.learning_rate_schedule(1.0, warmup_steps=1, total_steps=5, kind="linear")
    except ValueError as e:
        assert "cosine" in str(e)
    else:
        raise AssertionError("unknown schedule accepted")


@pytest.mark.sharding
def test_sharded_gradients_equal_single_device(reference):
    """8 host devices as (fsdp=4, sequence=2): gradients before the optimizer match one device."""
    graphdef, params, batch, loss_ref, g_ref = reference
    neg = _negative(batch)
    fn = lambda p, bt, ng: loss_and_grads(graphdef, p, bt, jax.random.key(KEY), SETTINGS, ng)
    mesh = make_mesh({"fsdp": 4, "sequence": 2}, subset=True)
    p_sh = state_shardings(params, mesh)
    b_sh = batch_shardings(batch, mesh)
    with jax.set_mesh(mesh):
        sharded = jax.jit(fn, in_shardings=(p_sh, b_sh, None), out_shardings=(None, p_sh))
        loss, g = sharded(jax.device_put(params, p_sh), jax.device_put(batch, b_sh), neg)
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(g))
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-5)
    err = _max_rel(g, g_ref)
    assert err <= 1e-5, f"max|a - b| / max|b| = {err:.2e}"


@pytest.mark.slow
def test_state_over_fsdp_x_sequence_is_gathered_for_compute():
    """ZeRO-style training state (`STATE_RULES`) on 8 host devices as (fsdp=4, sequence=2): every
    `embed` axis of params, Adam moments and EMA is split 8 ways (1/2 of the LOGICAL_RULES shard), the
    step gathers it for the forward (all-gathers in the HLO) and the update equals one device's."""
    graphdef, params = _model()
    batch = _batch(b=4, f=2, h=4, w=8)
    neg = _negative(batch)
    opt = optim.adamw(optim.learning_rate_schedule(1e-3, warmup_steps=0, total_steps=10))
    schedule = optim.learning_rate_schedule(1e-3, warmup_steps=0, total_steps=10)
    settings = dataclasses.replace(SETTINGS, ema_decay=0.9)
    step = make_train_step(graphdef, opt, schedule, settings)
    fresh = lambda: train_state.create(jax.tree.map(jnp.copy, params), opt, seed=0, use_ema=True)  # noqa: E731
    one, m_one = jax.jit(step)(fresh(), batch, neg)
    mesh = make_mesh({"fsdp": 4, "sequence": 2})
    s_sh = state_shardings(fresh(), mesh, STATE_RULES)
    compute_sh = state_shardings(fresh(), mesh)
    b_sh = batch_shardings(batch, mesh)
    kernel = lambda st: st["blocks"]["ff"]["fc1"]["kernel"]  # noqa: E731  (layers, embed, mlp)
    assert kernel(s_sh.params).spec == P(None, ("fsdp", "sequence"), None)
    assert kernel(compute_sh.params).spec == P(None, "fsdp", None)
    with jax.set_mesh(mesh):
        fn = jax.jit(step, in_shardings=(s_sh, b_sh, None), out_shardings=(s_sh, None), donate_argnums=0)
        hlo = fn.lower(jax.eval_shape(fresh), batch, neg).compile().as_text()
        state = jax.device_put(fresh(), s_sh)
        state, m = fn(state, jax.device_put(batch, b_sh), neg)
    assert "all-gather" in hlo and ("reduce-scatter" in hlo or "all-reduce" in hlo)
    for tree in (state.params, state.ema, state.opt_state):
        sharded = [x for x in jax.tree.leaves(tree) if ("fsdp", "sequence") in tuple(x.sharding.spec)]
        assert sharded, "no leaf of the state over fsdp x sequence"
    k = kernel(state.params)[...]
    assert k.addressable_shards[0].data.size == k.size // 8
    np.testing.assert_allclose(float(m["loss"]), float(m_one["loss"]), rtol=1e-5)
    assert _max_rel(state.params, one.params) <= 1e-5 and _max_rel(state.ema, one.ema) <= 1e-5
