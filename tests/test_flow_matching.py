"""Flow-matching sampler against fixture `flow_matching`: schedules, `step()`, the sampling trace.

Every setting, index and shape is read from the fixture's config.json and arrays.
"""
import contextlib
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepvideo_jax.sampling import flow_matching as fm
from tests.fixtures import assert_close, load_json, load_npz

FIXTURE = "flow_matching"


@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compilations inside the block: `with count_compiles() as n: ...; n[0]`."""
    from jax._src import dispatch

    count = [0]

    def listener(event, duration, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _settings():
    return load_json(FIXTURE)["scheduler"]["settings"]


@pytest.mark.parametrize("name", sorted(load_json(FIXTURE)["scheduler"]["settings"]))
def test_schedule_bitwise(name):
    s = _settings()[name]
    ref = load_npz(FIXTURE, "schedules.npz")
    sched = fm.make_schedule(s["num_inference_steps"], s["time_shift"])
    assert sched.timesteps.dtype == np.float32 and sched.sigmas.dtype == np.float32
    np.testing.assert_array_equal(sched.timesteps, ref[f"{name}_timesteps"])
    np.testing.assert_array_equal(sched.sigmas, ref[f"{name}_sigmas"])
    assert sched.sigmas[0] == 0 and sched.sigmas[-1] == 1 and np.all(np.diff(sched.sigmas) > 0)
    # what the bf16 pipeline hands the model: bf16(t)
    t_bf16 = jnp.asarray(sched.timesteps).astype(jnp.bfloat16).astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(t_bf16), ref[f"{name}_timestep_bf16"])


def test_model_sees_t_in_its_dtype():
    """The sampler casts t (and x) to the model dtype, as the official loop casts to the DiT dtype."""
    s = next(iter(_settings().values()))
    ref = load_npz(FIXTURE, "schedules.npz")
    name = next(iter(_settings()))
    sched = fm.make_schedule(s["num_inference_steps"], s["time_shift"])
    seen = []

    def velocity(params, x, t, cond):
        seen.append((x.dtype, np.asarray(t.astype(jnp.float32))))
        return jnp.zeros_like(x)

    lat = jnp.zeros((1, 1, 2, 1, 1), jnp.float32)
    for i in range(sched.num_steps):
        fm.denoise_step(velocity, None, lat, None, sched.timesteps[i], sched.sigmas[i],
                        sched.sigmas[i + 1], 9.0, cfg=True, model_dtype=jnp.bfloat16)
    assert all(dt == jnp.bfloat16 for dt, _ in seen)
    got = np.stack([t for _, t in seen])
    assert got.shape == (sched.num_steps, 2)
    np.testing.assert_array_equal(got[:, 0], ref[f"{name}_timestep_bf16"])
    np.testing.assert_array_equal(got[:, 1], got[:, 0])


def _index_for_timestep(timesteps, t):
    """The official first-call lookup: match by value, the second match if there are several."""
    idx = np.nonzero(timesteps == t)[0]
    return int(idx[1] if len(idx) > 1 else idx[0])


def test_step_example():
    cfg = load_json(FIXTURE)["step_example"]
    ex = load_npz(FIXTURE, "step_example.npz")
    sched = fm.make_schedule(cfg["set_timesteps"]["num_inference_steps"],
                             cfg["set_timesteps"]["time_shift"])
    np.testing.assert_array_equal(sched.timesteps, ex["timesteps"])
    np.testing.assert_array_equal(sched.sigmas, ex["sigmas"])
    step_index = None
    for call in cfg["calls"]:
        k = int(re.fullmatch(r"timesteps\[(\d+)\]", call["timestep"]).group(1))
        if call.get("fresh_scheduler") or step_index is None:
            step_index = _index_for_timestep(sched.timesteps, sched.timesteps[k])
        out = fm.euler_step(jnp.asarray(ex[call["sample"]]), jnp.asarray(ex[call["model_output"]]),
                            sched.sigmas[step_index], sched.sigmas[step_index + 1])
        step_index += 1
        assert step_index == call["step_index_after"]
        assert out.dtype == jnp.float32
        err = assert_close(out, ex[call["result"]], atol=1e-6, rtol=1e-6, name=call["result"])
        assert err == 0.0, f"{call['result']}: not bitwise ({err:.3e})"


def _trace_arrays():
    tr = load_npz(FIXTURE, "trace.npz")
    n = len(tr["timesteps"])
    raw = np.stack([tr[f"step{i}_noise_pred_raw"] for i in range(n)])
    model_in = np.stack([tr[f"step{i}_model_in"] for i in range(n)])
    return tr, n, raw, model_in


def test_trace_guidance_and_euler_identities():
    """Per step: guide the recorded DiT output, Euler-step the recorded latents."""
    call = load_json(FIXTURE)["trace"]["call_args"]
    tr, n, raw, _ = _trace_arrays()
    sched = fm.make_schedule(call["num_inference_steps"], call["time_shift"])
    np.testing.assert_array_equal(sched.timesteps, tr["timesteps"])
    np.testing.assert_array_equal(sched.sigmas, tr["sigmas"])
    lat = tr["initial_latents"]
    for i in range(n):
        np.testing.assert_array_equal(tr[f"step{i}_model_in"], np.concatenate([lat, lat]))
        np.testing.assert_array_equal(tr[f"step{i}_timestep_in"], np.full(2, sched.timesteps[i]))
        guided = fm.classifier_free_guidance(jnp.asarray(raw[i]), call["guidance_scale"])
        assert_close(guided, tr[f"step{i}_noise_pred"], atol=1e-6, rtol=1e-6, name=f"step{i}_noise_pred")
        lat_next = fm.euler_step(jnp.asarray(lat), jnp.asarray(tr[f"step{i}_noise_pred"]),
                                 sched.sigmas[i], sched.sigmas[i + 1])
        assert_close(lat_next, tr[f"step{i}_latents"], atol=1e-6, rtol=1e-6, name=f"step{i}_latents")
        lat = tr[f"step{i}_latents"]


def test_trace_replay_through_the_sampler_loop():
    """The jitted host loop, fed the recorded DiT outputs, reproduces every step of the trace.

    The replayed velocity adds (x - recorded model_in), so a wrong model input, batch order or
    timestep would show up in the latents. Under jit XLA fuses the CFG and Euler multiply-adds into
    FMAs (one rounding where torch rounds twice), a few float32 ulps that the last, long step
    (dt 0.87 on a 9x guided velocity) scales up: hence 1e-5, not bitwise.
    """
    call = load_json(FIXTURE)["trace"]["call_args"]
    tr, n, raw, model_in = _trace_arrays()
    sched = fm.make_schedule(call["num_inference_steps"], call["time_shift"])

    def replay(params, x, t, cond):
        i = jnp.argmin(jnp.abs(params["timesteps"] - t[0]))
        assert x.shape[0] == cond["rows"].shape[0]
        return params["raw"][i] + (x - params["model_in"][i])

    params = dict(timesteps=jnp.asarray(sched.timesteps), raw=jnp.asarray(raw), model_in=jnp.asarray(model_in))
    cond = dict(rows=jnp.zeros((2, 1)))
    sampler = fm.FlowMatchSampler(replay)
    settings = fm.SamplerSettings(call["num_inference_steps"], call["guidance_scale"], call["time_shift"])
    steps = {}
    final = sampler.sample(params, jnp.asarray(tr["initial_latents"]), cond, settings,
                           on_step=lambda i, lat: steps.__setitem__(i, np.array(lat)))
    for i in range(n):
        assert_close(steps[i], tr[f"step{i}_latents"], atol=1e-5, rtol=1e-5, name=f"step{i}_latents")
    assert_close(final, tr["final_latents"], atol=1e-5, rtol=1e-5, name="final_latents")


def _toy_velocity(params, x, t, cond):
    """A cheap stand-in model: mixes channels and depends on t and on every cond row."""
    mixed = jnp.einsum("bfchw,cd->bfdhw", x, params["w"])
    return mixed * (1 + t[:, None, None, None, None]) + cond["emb"][:, None, :, None, None]


def _toy(b=1, f=2, c=4, h=3, w=5, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    params = dict(w=jax.random.normal(k[0], (c, c)) / c)
    noise = jax.random.normal(k[1], (b, f, c, h, w))
    emb = jax.random.normal(k[2], (2 * b, c))
    return params, noise, dict(emb=emb)


def test_no_recompilation_between_prompts_of_the_same_shape():
    params, noise, cond = _toy()
    sampler = fm.FlowMatchSampler(_toy_velocity)
    with count_compiles() as first:
        a = sampler.sample(params, noise, cond, fm.SamplerSettings(3, 9.0, 13.0))
    assert first[0] >= 1
    params2, noise2, cond2 = _toy(seed=1)
    with count_compiles() as again:
        b = sampler.sample(params2, noise2, cond2, fm.SamplerSettings(5, 5.0, 17.0), progress=True)
        b.block_until_ready()
    assert again[0] == 0, f"{again[0]} recompilation(s) for a new prompt of the same shape"
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_latents_are_donated_not_the_callers_noise():
    params, noise, cond = _toy()
    sampler = fm.FlowMatchSampler(_toy_velocity)
    before = np.asarray(noise).copy()
    sampler.sample(params, noise, cond, fm.SamplerSettings(2, 9.0, 13.0))
    np.testing.assert_array_equal(np.asarray(noise), before)


def test_sampler_matches_a_plain_python_loop():
    params, noise, cond = _toy(b=2)
    settings = fm.SamplerSettings(4, 7.5, 13.0)
    got = fm.FlowMatchSampler(_toy_velocity).sample(params, noise, cond, settings)
    sched = fm.make_schedule(4, 13.0)
    lat = np.asarray(noise, np.float64)
    for i in range(4):
        x = np.concatenate([lat, lat])
        v = np.asarray(_toy_velocity(params, jnp.asarray(x, jnp.float32),
                                     jnp.full((4,), sched.timesteps[i]), cond), np.float64)
        c, u = v[:2], v[2:]
        lat = lat + (u + 7.5 * (c - u)) * (float(sched.sigmas[i + 1]) - float(sched.sigmas[i]))
    assert_close(got, lat, atol=1e-5, rtol=1e-5, name="latents")


@pytest.mark.parametrize("guidance", [1.0, 0.5])
def test_guidance_at_most_one_skips_the_uncond_branch(guidance):
    params, noise, cond = _toy()
    cond_only = dict(emb=cond["emb"][:1])
    settings = fm.SamplerSettings(3, guidance, 13.0)
    assert not settings.cfg
    rows = []

    def velocity(p, x, t, c):
        rows.append(x.shape[0])
        return _toy_velocity(p, x, t, c)

    got = fm.FlowMatchSampler(velocity).sample(params, noise, cond_only, settings)
    assert set(rows) == {1}
    sched = fm.make_schedule(3, 13.0)
    lat = noise
    for i in range(3):
        v = _toy_velocity(params, lat, jnp.full((1,), sched.timesteps[i]), cond_only)
        lat = fm.euler_step(lat, v, sched.sigmas[i], sched.sigmas[i + 1])
    assert_close(got, lat, atol=1e-6, rtol=1e-6, name="cond-only latents")


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_steps=0, guidance_scale=9.0, shift=13.0), "num_steps must be a positive integer"),
    (dict(num_steps=2.5, guidance_scale=9.0, shift=13.0), "num_steps must be a positive integer"),
    (dict(num_steps=50, guidance_scale=9.0, shift=0.0), "time shift must be a positive"),
    (dict(num_steps=50, guidance_scale=-1.0, shift=13.0), "guidance_scale must be"),
    (dict(num_steps=50, guidance_scale=float("nan"), shift=13.0), "guidance_scale must be"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fm.SamplerSettings(**kwargs)


def test_trace_through_the_projects_dit():
    """The 3-step CFG trace with the project's DiT on the `dit` fixture weights, float32, 1e-4."""
    import hashlib

    from stepvideo_jax.convert import dit as dit_convert
    from stepvideo_jax.convert.safetensors_io import TensorSource
    from stepvideo_jax.sampling import pipeline
    from tests.fixtures import fixture_dir

    cfg = load_json(FIXTURE)["trace"]
    weights = fixture_dir("dit") / pathlib.Path(cfg["dit_weights"]["path"]).name
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == cfg["dit_weights"]["sha256"], (
        f"{weights} is not the DiT the trace was made with")
    model = dit_convert.convert(dit_convert.config_from_dict(cfg["transformer_config"]),
                                TensorSource.single(weights), label="fixture dit")
    call = cfg["call_args"]
    tr, n, _, _ = _trace_arrays()
    graphdef, state = nnx.split(model)
    text = dict(y=jnp.asarray(tr["prompt_embeds"]), y_mask=jnp.asarray(tr["prompt_attention_mask"]),
                clip=jnp.asarray(tr["prompt_embeds_2"]))
    sampler = fm.FlowMatchSampler(pipeline.dit_velocity_fn(graphdef))
    settings = fm.SamplerSettings(call["num_inference_steps"], call["guidance_scale"], call["time_shift"])
    steps = {}
    final = sampler.sample(state, jnp.asarray(tr["initial_latents"]), text, settings,
                           on_step=lambda i, lat: steps.__setitem__(i, np.array(lat)))
    for i in range(n):
        assert_close(steps[i], tr[f"step{i}_latents"], atol=1e-4, rtol=1e-4, name=f"step{i}_latents")
    assert_close(final, tr["final_latents"], atol=1e-4, rtol=1e-4, name="final_latents")
    # the DiT call of every step on the recorded inputs
    velocity = jax.jit(pipeline.dit_velocity_fn(graphdef))
    for i in range(n):
        raw = velocity(state, jnp.asarray(tr[f"step{i}_model_in"]), jnp.asarray(tr[f"step{i}_timestep_in"]), text)
        assert_close(raw, tr[f"step{i}_noise_pred_raw"], atol=1e-4, rtol=1e-4, name=f"step{i}_noise_pred_raw")


def test_cfg_with_cond_rows_only_is_named_before_the_dit_runs():
    """CFG needs [cond, uncond] rows; the cond rows alone fail with the expected row count named,
    not with a reshape error inside the DiT."""
    from stepvideo_jax.convert import dit as dit_convert
    from stepvideo_jax.sampling import pipeline

    trace = load_json(FIXTURE)["trace"]
    model = dit_convert.build(dit_convert.config_from_dict(trace["transformer_config"]), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tr, *_ = _trace_arrays()
    noise = jnp.asarray(tr["initial_latents"])
    b = noise.shape[0]
    cond_only = dict(y=jnp.asarray(tr["prompt_embeds"][:b]), y_mask=jnp.asarray(tr["prompt_attention_mask"][:b]),
                     clip=jnp.asarray(tr["prompt_embeds_2"][:b]))
    sampler = fm.FlowMatchSampler(pipeline.dit_velocity_fn(graphdef))
    with pytest.raises(ValueError, match=rf"\by \({b}, .*expected {2 * b} rows: {b} cond \+ {b} uncond"):
        sampler.sample(state, noise, cond_only, fm.SamplerSettings(2, 9.0, 13.0))


def test_cond_rows_must_match_the_latents():
    params, noise, cond = _toy(b=2)
    with pytest.raises(ValueError, match=r"leaves emb \(4, 4\).*2 latent row\(s\): expected 2 rows, one per latent"):
        fm.FlowMatchSampler(_toy_velocity).sample(params, noise, cond, fm.SamplerSettings(2, 1.0, 13.0))
    with pytest.raises(ValueError, match=r"leaves emb \(3, 4\).*expected 4 rows: 2 cond \+ 2 uncond"):
        fm.FlowMatchSampler(_toy_velocity).sample(params, noise, dict(emb=cond["emb"][:3]),
                                                  fm.SamplerSettings(2, 9.0, 13.0))
