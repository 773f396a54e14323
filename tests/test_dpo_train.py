"""Video-DPO through the training loop on the tiny synthetic preference set (configs/dpo/tiny_cpu.py).

Full fine-tuning with the bf16 reference: on fixed (noise, t) draws over every pair of the set, the
implicit reward accuracy and the margin rise and the policy's velocity error on preferred videos
falls relative to rejected ones. LoRA: a short run stopped, resumed (the reference rebuilt from its
source), and its checkpoints hold only the adapters.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepvideo_jax import checkpoints
from stepvideo_jax.data.preferences import PairDataset
from stepvideo_jax.models import lora
from stepvideo_jax.models.dit import StepVideoDiT
from stepvideo_jax.training.dpo import dpo_settings, load_weights, resolve, train_dpo
from stepvideo_jax.training.dpo_step import draw_pair_inputs, pair_metrics
from stepvideo_jax.training.settings import dit_config, step_settings
from stepvideo_jax.training.metrics import read_jsonl
from tests.fixtures import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def dpo_config(**overrides):
    return load_config("configs/dpo/tiny_cpu.py", **overrides)


def _fixed_eval(config, dataset, params_list, draws=2):
    """DPO metrics of each params on `draws` fixed (noise, t) draws over every pair; bf16 reference
    = the initial policy, as in the run."""
    cfg = dit_config(config.model)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: StepVideoDiT(cfg, rngs=nnx.Rngs(0))))
    init = load_weights("", cfg, dtype=jnp.float32, param_dtype=jnp.float32, seed=config.seed)
    frozen = {"reference": jax.tree.map(lambda a: a.astype(jnp.bfloat16), init), "base": None}
    pairs = [dataset.load(i) for i in range(len(dataset))]
    batch = {k: jnp.asarray(np.stack([p[k] for p in pairs])) for k in pairs[0]}
    settings, dpo = step_settings(config.step), dpo_settings(config.dpo)

    @jax.jit
    def evaluate(params):
        per_draw = [pair_metrics(graphdef, graphdef, params, frozen,
                                 draw_pair_inputs(jax.random.key(100 + d), batch, settings), dpo, backend="xla")
                    for d in range(draws)]
        return jax.tree.map(lambda *x: jnp.mean(jnp.stack(x)), *per_draw)

    return [{k: float(v) for k, v in evaluate(p).items()} for p in [init] + list(params_list)]


@pytest.mark.slow
def test_dpo_learns_the_synthetic_preferences(tmp_path, compile_cache):
    config = dpo_config()
    result = train_dpo(config, tmp_path, printer=None)
    steps = config.total_steps
    assert [h["step"] for h in result.history] == list(range(1, steps + 1))
    dataset = PairDataset(tmp_path / "synthetic_preferences")
    before, after = _fixed_eval(config, dataset, [result.state.params])
    window = 10
    curve = [(s + window, np.mean([h["reward_accuracy"] for h in result.history[s: s + window]]),
              np.mean([h["margin"] for h in result.history[s: s + window]])) for s in range(0, steps, window)]
    print("\nreward accuracy / margin per 10 training steps: "
          + ", ".join(f"{s}: {a:.2f} / {m:+.4f}" for s, a, m in curve))
    print(f"fixed draws over all {len(dataset)} pairs, before -> after: reward accuracy "
          f"{before['reward_accuracy']:.3f} -> {after['reward_accuracy']:.3f}, margin {before['margin']:+.5f} -> "
          f"{after['margin']:+.5f}, err_w - err_l {before['err_w'] - before['err_l']:+.5f} -> "
          f"{after['err_w'] - after['err_l']:+.5f}, loss {before['loss']:.4f} -> {after['loss']:.4f}")
    assert after["reward_accuracy"] > before["reward_accuracy"]
    assert after["margin"] > before["margin"]
    assert after["err_w"] - after["err_l"] < before["err_w"] - before["err_l"]
    assert after["loss"] < before["loss"]
    assert curve[-1][1] > curve[0][1]
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "reward_accuracy" in r]
    assert [r["step"] for r in rows] == list(range(config.log_every, steps + 1, config.log_every))
    assert all(np.isfinite(r["margin"]) and np.isfinite(r["mfu"] if "mfu" in r else 0.0) for r in rows)


@pytest.mark.slow
def test_lora_run_resumes_and_checkpoints_only_adapters(tmp_path, compile_cache):
    overrides = {"dpo.lora_rank": 4, "total_steps": 6, "checkpoint.every": 3, "log_every": 3}
    first = train_dpo(dpo_config(stop_at_step=3, **overrides), tmp_path, printer=None)
    names = {str(p[-1]) for p, _ in nnx.to_flat_state(first.state.params)}
    assert names == {"lora_a", "lora_b"}
    assert abs(first.history[0]["margin"]) < 1e-3          # LoRA starts at the reference (bf16 deviation)
    second = train_dpo(dpo_config(**overrides), tmp_path, printer=None)
    assert [h["step"] for h in second.history] == [4, 5, 6]
    straight = train_dpo(dpo_config(**overrides), tmp_path / "straight", printer=None)
    np.testing.assert_allclose([h["loss"] for h in first.history + second.history],
                               [h["loss"] for h in straight.history], rtol=1e-6)


@pytest.mark.slow
def test_a_lora_run_loads_as_its_base_with_the_adapters_folded_in(tmp_path, compile_cache):
    """`checkpoints.load_dit` of a LoRA run (its checkpoints hold only the adapters) rebuilds the
    base from the run's record (here the seed's init) and folds the trained adapters in."""
    config = dpo_config(**{"dpo.lora_rank": 4, "total_steps": 2, "optim.warmup_steps": 1, "checkpoint.every": 2,
                           "log_every": 1})
    result = train_dpo(config, tmp_path, printer=None)
    d, cfg = config.dpo, dit_config(config.model)
    model = lora.apply_lora(StepVideoDiT(cfg, rngs=nnx.Rngs(config.seed)), rank=d.lora_rank, alpha=d.lora_alpha,
                            targets=tuple(d.lora_targets))
    nnx.update(model, result.state.params)
    want = nnx.to_flat_state(lora.merged_state(model))
    got = dict(nnx.to_flat_state(nnx.state(checkpoints.load_dit(tmp_path))))
    assert sorted(got) == sorted(p for p, _ in want)
    for path, v in want:
        np.testing.assert_array_equal(np.asarray(got[path].get_value()), np.asarray(v.get_value()), err_msg=str(path))
    base = dict(nnx.to_flat_state(nnx.state(StepVideoDiT(cfg, rngs=nnx.Rngs(config.seed)))))
    changed = [p for p, _ in want if not np.array_equal(np.asarray(got[p].get_value()), np.asarray(base[p].get_value()))]
    assert changed and all(p[-1] == "kernel" and p[-2] in "qkvo" for p in changed), changed


def test_a_wrong_weight_source_is_named_before_the_run_starts(tmp_path):
    for field in ("dpo.policy_from", "dpo.reference_from"):
        with pytest.raises(ValueError, match=r"weight source .*nowhere' is none of"):
            resolve(dpo_config(**{field: str(tmp_path / "nowhere")}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="eval_every"):
        resolve(dpo_config(eval_every=10))
    with pytest.raises(ValueError, match="cond_dropout"):
        resolve(dpo_config(**{"step.cond_dropout": 0.1}))
    with pytest.raises(ValueError, match="policy_from"):
        resolve(dpo_config(**{"model.init_from": "/some/release/transformer"}))
    with pytest.raises(ValueError, match="samples.every = 5: sample videos are written by flow-matching runs only"):
        resolve(dpo_config(**{"samples.every": 5}))
    with pytest.raises(ValueError, match="training workdir"):
        load_weights("/nonexistent", dit_config(dpo_config().model), dtype=jnp.float32,
                     param_dtype=jnp.float32, seed=0)


def test_policy_from_a_release_transformer_into_a_mesh():
    """A release `transformer/` loads (it used to fail the fit check for any real source: the shape
    tuples were flattened into their ints) straight into the mesh's rule shardings, with the
    release's values; a DiT config it does not fit is named."""
    import dataclasses

    from stepvideo_jax.convert import dit as dit_convert
    from stepvideo_jax.parallel.mesh import MeshConfig, make_mesh
    from tests.fixtures import fixture_dir

    folder = fixture_dir("release_layout") / "stepvideo-t2v" / "transformer"
    cfg = dit_convert.read_config(folder)
    mesh = make_mesh(MeshConfig.from_string("fsdp=-1"))
    got = load_weights(str(folder), cfg, dtype=jnp.float32, param_dtype=jnp.float32, seed=0, mesh=mesh)
    want = nnx.state(dit_convert.load(folder))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert len(a.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="do not fit the configured DiT"):
        load_weights(str(folder), dataclasses.replace(cfg, num_layers=cfg.num_layers + 1), dtype=jnp.float32,
                     param_dtype=jnp.float32, seed=0)
