"""The Video-DPO step: log 2 at initialisation, frozen reference, LoRA, accumulation, sharding."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from stepvideo_jax.models import lora
from stepvideo_jax.models.dit import DiTConfig, StepVideoDiT
from stepvideo_jax.parallel.rules import state_shardings
from stepvideo_jax.training import train_state
from stepvideo_jax.training.dpo_step import (DPOSettings, dpo_loss_and_grads, draw_pair_inputs, make_dpo_step,
                                             pair_metrics)
from stepvideo_jax.parallel.mesh import make_mesh
from stepvideo_jax.training.loop import batch_shardings
from stepvideo_jax.training.train_step import StepSettings

CFG = DiTConfig(num_layers=1, num_heads=2, head_dim=16, in_channels=4, out_channels=4,
                caption_channels=(12, 8), rope_splits=(8, 4, 4))
SETTINGS = StepSettings(attention_backend="xla")
DPO = DPOSettings(beta=500.0)
# The equivalence check (sharding + accumulation) uses a small beta: the loss multiplies the margin, a
# difference of four O(1) velocity errors, by beta / 2, so at beta 500 the ~1e-7 relative
# reduction-order differences of float32 errors become ~1e-4 in the loss. What is compared (the
# program and its reductions) does not depend on beta.
EQUIV = DPOSettings(beta=5.0)


def _pairs(b=4, f=2, h=4, w=4, lt=6, lc=3, seed=0):
    rng = np.random.default_rng(seed)
    valid = rng.integers(1, lt + 1, size=b)
    moments = lambda: jnp.asarray(rng.normal(size=(b, f, 4, h, w)), jnp.float32)  # noqa: E731
    return {"mean_w": moments(), "logvar_w": jnp.full((b, f, 4, h, w), -4.0, jnp.float32),
            "mean_l": moments(), "logvar_l": jnp.full((b, f, 4, h, w), -4.0, jnp.float32),
            "y": jnp.asarray(rng.normal(size=(b, lt, 12)), jnp.float32),
            "y_mask": jnp.asarray(np.concatenate([np.ones((b, lc)), np.arange(lt)[None] < valid[:, None]], 1),
                                  jnp.int32),
            "clip": jnp.asarray(rng.normal(size=(b, lc, 8)), jnp.float32)}


def _model():
    return nnx.split(StepVideoDiT(CFG, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))


def _cast(params, dtype):
    return jax.tree.map(lambda a: a.astype(dtype), params)


def test_initial_loss_is_log2_and_bf16_reference_deviation():
    graphdef, params = _model()
    batch = _pairs()
    t_squared = dataclasses.replace(DPO, beta_schedule="t_squared")

    def run(p, ref32, ref16):
        inputs = draw_pair_inputs(jax.random.key(1), batch, SETTINGS)
        pm = lambda ref, dpo: pair_metrics(graphdef, graphdef, p, {"reference": ref, "base": None}, inputs,  # noqa: E731
                                           dpo, backend="xla")
        return pm(ref32, DPO), pm(ref32, t_squared), pm(ref16, DPO)

    out = jax.jit(run)(params, params, _cast(params, jnp.bfloat16))
    const, tsq, bf16 = ({k: float(v) for k, v in m.items()} for m in out)
    for m in (const, tsq):
        assert abs(m["loss"] - np.log(2.0)) <= 1e-6, m
        assert abs(m["margin"]) <= 1e-6, m
        assert m["reward_accuracy"] == 0.0   # a zero margin is not a correct ranking
    rel = max(abs(bf16["ref_err_w"] / bf16["err_w"] - 1), abs(bf16["ref_err_l"] / bf16["err_l"] - 1))
    print(f"\nbf16 reference at init (beta {DPO.beta}): loss - log 2 = {bf16['loss'] - np.log(2.0):+.3e}, "
          f"margin {bf16['margin']:+.3e}, reward accuracy {bf16['reward_accuracy']:.2f}, "
          f"max relative velocity-error deviation {rel:.2e}")
    assert np.isfinite(bf16["loss"]) and 0.0 <= bf16["reward_accuracy"] <= 1.0


def test_lora_starts_at_log2_trains_only_adapters_and_shares_the_frozen_base():
    model = StepVideoDiT(CFG, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    plain_graphdef = nnx.graphdef(model)
    lora.apply_lora(model, rank=4, alpha=8.0, seed=1)
    graphdef = nnx.graphdef(model)
    adapters, base = nnx.state(model, lora.LoRAParam), nnx.state(model, lora.FROZEN)
    frozen = {"reference": base, "base": base}     # one copy: the reference is the frozen base
    batch = _pairs()
    inputs = lambda: draw_pair_inputs(jax.random.key(1), batch, SETTINGS)  # noqa: E731
    m = jax.jit(lambda a, fr: pair_metrics(graphdef, plain_graphdef, a, fr, inputs(), DPO, backend="xla"))(
        adapters, frozen)
    assert abs(float(m["loss"]) - np.log(2.0)) <= 1e-6 and abs(float(m["margin"])) <= 1e-6
    schedule = optax.constant_schedule(1e-2)
    opt = optax.adam(schedule)
    state = train_state.create(adapters, opt, seed=0, use_ema=False)
    before = jax.tree.map(np.array, base)
    step = jax.jit(make_dpo_step(graphdef, opt, schedule, SETTINGS, ref_graphdef=plain_graphdef, dpo=DPO),
                   donate_argnums=0)
    for _ in range(2):
        state, _ = step(state, batch, frozen)
    assert len(jax.tree.leaves(state.params)) == 4 * 2 * 2   # 8 projections x (a, b), stacked over layers
    lora_b = state.params["blocks"]["attn1"]["q"]["lora_b"][...]
    assert lora_b.shape == (CFG.num_layers, 4, CFG.dim) and float(jnp.max(jnp.abs(lora_b))) > 0
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    # folding the adapters into the kernels gives the adapted model's velocity
    nnx.update(model, state.params)
    x = jax.random.normal(jax.random.key(2), (2, 2, 4, 4, 4))
    args = (x, jnp.array([0.3, 0.8]), batch["y"][:2], batch["y_mask"][:2], batch["clip"][:2])
    both = jax.jit(lambda adapted, folded: (nnx.merge(graphdef, adapted)(*args, backend="xla"),
                                            nnx.merge(plain_graphdef, folded)(*args, backend="xla")))
    a, b = both(nnx.state(model), lora.merged_state(model))
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def _same_metrics(m, m_ref):
    """Errors and losses to 1e-5 relative; the margin, a difference of the four errors, to 1e-5 of
    their sum (its absolute error is bounded by theirs)."""
    errors = ("err_w", "err_l", "ref_err_w", "ref_err_l")
    for k in m_ref:
        atol = 1e-5 * sum(abs(float(m_ref[e])) for e in errors) if k == "margin" else 1e-7
        np.testing.assert_allclose(float(m[k]), float(m_ref[k]), rtol=1e-5, atol=atol, err_msg=k)


def _max_rel(a, b):
    num = max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))
    return num / max(jax.tree.leaves(jax.tree.map(lambda y: float(jnp.max(jnp.abs(y))), b)))


@pytest.mark.sharding
@pytest.mark.slow
def test_sharded_accumulated_dpo_step_equals_single_device_and_keeps_the_reference_bit_identical():
    """8 host devices as (fsdp=4, sequence=2) with 2 accumulated micro-batches and full remat against
    one device and the whole batch at once; policy, bf16 reference and batch sharded by the rules, the
    state donated as in the loop. Plain SGD, so the parameter change of a step is -lr * gradient and
    compares like the gradient. Three steps each: the references are untouched and alive."""
    graphdef, params = _model()
    frozen = {"reference": _cast(params, jnp.bfloat16), "base": None}
    before = jax.tree.map(np.array, frozen["reference"])
    batch = _pairs(b=4, f=2, h=4, w=8)
    lr = 1e-2
    schedule = optax.constant_schedule(lr)
    opt = optax.sgd(schedule)
    fresh = lambda: train_state.create(jax.tree.map(jnp.copy, params), opt, seed=0, use_ema=False)  # noqa: E731
    step = make_dpo_step(graphdef, opt, schedule, SETTINGS, ref_graphdef=graphdef, dpo=EQUIV)
    accumulated = make_dpo_step(graphdef, opt, schedule, dataclasses.replace(SETTINGS, accum_steps=2, remat="full"),
                                ref_graphdef=graphdef, dpo=EQUIV)
    single = jax.jit(step, donate_argnums=0)
    one = [single(fresh(), batch, frozen)]
    mesh = make_mesh({"fsdp": 4, "sequence": 2}, subset=True)
    s_sh = state_shardings(fresh(), mesh)
    f_sh = {"reference": state_shardings(frozen["reference"], mesh), "base": None}
    b_sh = batch_shardings(batch, mesh)
    with jax.set_mesh(mesh):
        frozen_d, batch_d = jax.device_put(frozen, f_sh), jax.device_put(batch, b_sh)
        sharded = jax.jit(accumulated, in_shardings=(s_sh, b_sh, f_sh), out_shardings=(s_sh, None),
                          donate_argnums=0)
        many = [sharded(jax.device_put(fresh(), s_sh), batch_d, frozen_d)]
        assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
                   for x in jax.tree.leaves(frozen_d["reference"]))
        assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(many[0][0].params))
        _same_metrics(many[0][1], one[0][1])
        # The DPO gradient is a weighted difference of the preferred and rejected samples' gradients,
        # which largely cancel (on this batch max|g_w| = 8.9, max|g_l| = 8.9, max|g_w - g_l| = 1.3):
        # the 1e-5 relative agreement of flow-matching gradients (test_train_step) becomes up to
        # ~7e-5 here.
        delta = lambda st: jax.tree.map(lambda a, b: (a - b) / lr, st.params, params)  # noqa: E731
        err = _max_rel(delta(many[0][0]), delta(one[0][0]))
        assert err <= 1e-4, f"max|a - b| / max|b| of the update = {err:.2e}"
        for _ in range(2):
            one.append(single(one[-1][0], batch, frozen))
            many.append(sharded(many[-1][0], batch_d, frozen_d))
    assert int(one[-1][0].step) == int(many[-1][0].step) == 3
    assert all(bool(m["finite"]) for _, m in one + many)
    for ref in (frozen["reference"], frozen_d["reference"]):
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(before)):
            assert not a.is_deleted() and a.dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(a), b)


def test_bad_inputs_are_named():
    graphdef, params = _model()
    batch = _pairs()
    with pytest.raises(ValueError, match="missing"):
        draw_pair_inputs(jax.random.key(0), {k: v for k, v in batch.items() if k != "mean_l"}, SETTINGS)
    with pytest.raises(ValueError, match="cond_dropout"):
        draw_pair_inputs(jax.random.key(0), batch, dataclasses.replace(SETTINGS, cond_dropout=0.1))
    with pytest.raises(ValueError, match="beta_schedule"):
        DPOSettings(beta_schedule="linear")
    with pytest.raises(ValueError, match="choose from"):
        lora.apply_lora(StepVideoDiT(CFG, rngs=nnx.Rngs(0)), rank=2, alpha=2.0, targets=("attn1.qkv",))


def test_lora_with_full_remat_equals_lora_without_remat():
    """LoRA on the scanned blocks with remat 'full' (the scan body rematerialised: base slices and
    adapters alike): the same loss and adapter gradients as without remat."""
    cfg = dataclasses.replace(CFG, num_layers=2)
    model = StepVideoDiT(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    plain_graphdef, base = nnx.split(model)
    lora.apply_lora(model, rank=2, alpha=2.0, seed=3)
    graphdef, adapters, _ = nnx.split(model, lora.LoRAParam, ...)
    # non-zero lora_b, so the adapters' path through the blocks matters to the gradients
    adapters = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(a.size), a.shape), adapters)
    frozen = {"reference": base, "base": base}
    batch = _pairs()
    run = lambda remat: jax.jit(lambda p: dpo_loss_and_grads(  # noqa: E731
        graphdef, plain_graphdef, p, frozen, batch, jax.random.key(0),
        dataclasses.replace(SETTINGS, remat=remat), DPO))(adapters)
    loss_full, metrics_full, grads_full = run("full")
    loss_none, _, grads_none = run("none")
    np.testing.assert_allclose(float(loss_full), float(loss_none), rtol=1e-6)
    assert float(metrics_full["margin"]) != 0.0
    assert jax.tree.structure(grads_full) == jax.tree.structure(adapters)
    for a, b in zip(jax.tree.leaves(grads_full), jax.tree.leaves(grads_none)):
        assert float(jnp.max(jnp.abs(b))) > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))
