"""Host offload of the stacked layers (`models/offload.py`) and the sequential CFG rows
(`flow_matching.denoise_step(cfg_sequential=True)`), on the tiny release layout (fixture
`release_layout`; sizes, prompts and settings read from its `e2e_cases.npz`).

On one CPU device both are bitwise equal to the default program: the same arithmetic, only where
the weights live and how the CFG rows are batched differ.
"""
import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepvideo_jax import checkpoints
from stepvideo_jax.models import offload, stack
from stepvideo_jax.sampling import components, generation
from stepvideo_jax.sampling import pipeline as P
from stepvideo_jax.sampling.flow_matching import FlowMatchSampler, SamplerSettings, make_schedule
from tests.fixtures import fixture_dir, load_config, load_npz

FIXTURE = "release_layout"
F32 = dict(dit_dtype=jnp.float32, vae_dtype=jnp.float32, llm_dtype=jnp.float32, clip_dtype=jnp.float32)


@functools.lru_cache(maxsize=None)
def e2e():
    return load_npz(FIXTURE, "e2e_cases.npz")


def case():
    name = sorted({k.split(".")[0] for k in e2e() if "." in k})[0]
    d = {k.split(".", 1)[1]: v for k, v in e2e().items() if k.startswith(name + ".")}
    size = P.VideoSize(int(d["num_frames"]), int(d["height"]), int(d["width"]))
    settings = SamplerSettings(int(d["num_inference_steps"]), float(d["guidance_scale"]), float(d["time_shift"]))
    return d, size, settings


@functools.lru_cache(maxsize=None)
def models(offload_mode: str, weights: str = "bf16"):
    return checkpoints.loader(fixture_dir(FIXTURE) / "stepvideo-t2v", offload=offload_mode, weights=weights,
                              **F32).models()


def stacked_leaves(model):
    """The stacked layers' linear kernels (what offload moves), by state path."""
    name = offload.stacked_name(model)
    return [a for path, a in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
            if offload.is_offloaded_path(path, name)]


def memory_kinds(model) -> tuple[set, set]:
    """(memory kinds of the stacked layers' kernels, of every other array of `model`)."""
    name = offload.stacked_name(model)
    kinds = {True: set(), False: set()}
    for path, a in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]:
        kinds[offload.is_offloaded_path(path, name)].add(a.sharding.memory_kind)
    return kinds[True], kinds[False]


def cond_of(d):
    return {"y": jnp.asarray(d["y"]), "y_mask": jnp.asarray(d["y_mask"]), "clip": jnp.asarray(d["clip_embedding"])}


def one_step(dit, d, settings, *, cfg_sequential=False):
    graphdef, state = nnx.split(dit)
    sampler = FlowMatchSampler(P.dit_velocity_fn(graphdef), model_dtype=jnp.float32, cfg_sequential=cfg_sequential)
    sched = make_schedule(settings.num_steps, settings.shift)
    args = (state, jnp.array(d["initial_noise"]), cond_of(d), sched.timesteps[0], sched.sigmas[0], sched.sigmas[1],
            np.float32(settings.guidance_scale))
    jaxpr = str(jax.make_jaxpr(functools.partial(sampler._step_impl, cfg=settings.cfg))(*args))
    lowered = sampler._step.lower(*args, cfg=settings.cfg)
    return np.asarray(sampler._step(*args, cfg=settings.cfg)), types.SimpleNamespace(lowered=lowered, jaxpr=jaxpr)


def test_offloaded_layers_live_in_pinned_host_and_the_rest_on_the_device():
    m = models("blocks")
    stacked, rest = memory_kinds(m.dit)
    assert stacked == {"pinned_host"} and "pinned_host" not in rest, (stacked, rest)
    assert offload.is_offloaded(m.dit)
    llm = {"/".join(map(str, path)): v.get_value().sharding.memory_kind
           for path, v in nnx.to_flat_state(m.text.llm_state)}
    assert {k for k, v in llm.items() if v == "pinned_host"} == {
        k for k in llm if k.startswith("layers/") and k.endswith("/kernel")}, llm
    assert len([k for k, v in llm.items() if v == "pinned_host"]) > 0
    default = models("none")
    assert memory_kinds(default.dit)[0] == {"device"} and not offload.is_offloaded(default.dit)


def test_sampler_step_with_offload_is_bitwise_the_default_and_holds_the_weights_in_host_memory():
    d, _, settings = case()
    want, _ = one_step(models("none").dit, d, settings)
    got, program = one_step(models("blocks").dit, d, settings)
    np.testing.assert_array_equal(got, want)

    # the compiled program takes every stacked kernel in host memory, everything else on the device
    compiled = program.lowered.compile()
    dit = models("blocks").dit
    n_stacked, n_all = len(stacked_leaves(dit)), len(jax.tree.leaves(nnx.state(dit)))
    state_shardings = jax.tree.leaves(compiled.input_shardings[0][0])
    kinds = [s.memory_kind for s in state_shardings]
    assert len(kinds) == n_all and kinds.count("pinned_host") == n_stacked, kinds
    # HLO: those parameters are in the host memory space S(5); the lowered program marks them
    # pinned_host; the traced step copies each stacked kernel's layer to the device: the first
    # layer before the loop, the next one in the loop body (every layer variable goes through the
    # copy, a no-op for those on the device; the default step copies nothing)
    layout = re.search(r"entry_computation_layout=\{\((.*?)\)->", compiled.as_text()).group(1)
    assert layout.count("S(5)") == n_stacked, layout
    assert program.lowered.as_text().count('mhlo.memory_kind = "pinned_host"') == n_stacked
    n_layer_vars = len(jax.tree.leaves(nnx.state(getattr(dit, offload.stacked_name(dit)))))
    assert program.jaxpr.count("devices=(MemorySpace.Device,)") == 2 * n_layer_vars
    assert "MemorySpace.Device" not in one_step(models("none").dit, d, settings)[1].jaxpr


@pytest.mark.slow
def test_generate_with_offload_is_bitwise_the_default():
    """Both text encoders, CFG sampling of every step and the VAE decode: the Step-LLM's and the
    DiT's layers offloaded."""
    d, size, settings = case()
    out = {}
    for mode in ("none", "blocks"):
        m = models(mode)
        t2v = P.TextToVideo(encode_text=m.text, dit=m.dit, decode=components.vae_decoder(m.vae))
        out[mode] = t2v([str(d["prompt"])], size=size, settings=settings, seeds=[int(d["seed"])],
                        pos_magic=str(e2e()["pos_magic"]), neg_magic=str(e2e()["neg_magic"]),
                        noise=jnp.asarray(d["initial_noise"]))
    np.testing.assert_array_equal(out["blocks"].latents, out["none"].latents)
    np.testing.assert_array_equal(out["blocks"].video, out["none"].video)
    np.testing.assert_array_equal(out["blocks"].frames[0], out["none"].frames[0])


def test_cfg_sequential_equals_the_batched_step_to_float32_rounding():
    """Not bitwise on CPU: XLA's CPU matmuls round a batch of 1 row differently from a batch of 2
    (the model itself on 1 vs 2 rows differs by ~1e-6). Measured 6.0e-7 on latents of max 3.55,
    1.4 float32 ulps of the largest value; bound: 8 ulps of it."""
    d, _, settings = case()
    assert settings.cfg, "the fixture case runs classifier-free guidance"
    want, _ = one_step(models("none").dit, d, settings)
    bound = 8 * np.finfo(np.float32).eps * np.abs(want).max()
    got, program = one_step(models("none").dit, d, settings, cfg_sequential=True)
    assert np.abs(got - want).max() <= bound, (np.abs(got - want).max(), bound)
    assert "stablehlo.while" in program.lowered.as_text()   # the two rows as two iterations of one loop
    both, _ = one_step(models("blocks").dit, d, settings, cfg_sequential=True)
    np.testing.assert_array_equal(both, got)   # offload on top of it: bitwise


def test_int8_weights_offload_bitwise():
    d, _, settings = case()
    want, _ = one_step(models("none", "int8").dit, d, settings)
    dit = models("blocks", "int8").dit
    got, _ = one_step(dit, d, settings)
    np.testing.assert_array_equal(got, want)
    stacked = {(str(a.dtype), a.sharding.memory_kind) for a in stacked_leaves(dit)}
    assert stacked == {("int8", "pinned_host")}, stacked


def test_offload_on_a_mesh_keeps_the_layer_shardings():
    """On an 8-device (fsdp 2, tensor 2, sequence 2) mesh the offloaded layers keep their rule
    shardings in host memory, and the step equals the device-resident scan unrolled like the
    prefetching one (two layers per iteration; unrolled-vs-rolled alone moves the partitioned
    program's values by float32 rounding)."""
    from stepvideo_jax.parallel.mesh import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig.from_string("fsdp=2,tensor=2,sequence=2"))
    d, _, settings = case()
    kw = dict(F32, mesh=mesh)
    path = fixture_dir(FIXTURE) / "stepvideo-t2v"
    dev, host = checkpoints.loader(path, **kw).dit(), checkpoints.loader(path, offload="blocks", **kw).dit()
    for a, b in zip(stacked_leaves(dev), stacked_leaves(host)):
        assert b.sharding == a.sharding.with_memory_kind("pinned_host")
    dev.unroll_layers = 2
    with jax.set_mesh(mesh):
        np.testing.assert_array_equal(one_step(host, d, settings)[0], one_step(dev, d, settings)[0])


def test_unknown_offload_value_is_named_before_anything_loads(tmp_path):
    config = load_config("configs/generate/tiny.py", output=str(tmp_path / "v.mp4"), offload="disk")
    with pytest.raises(ValueError, match=r"offload='disk': choose one of \['none', 'blocks'\]"):
        generation.resolve(config)
    with pytest.raises(ValueError, match="choose one of"):
        checkpoints.loader(fixture_dir(FIXTURE) / "stepvideo-t2v", offload="cpu")


def _fake_mesh(devices):
    return types.SimpleNamespace(devices=np.array(devices), shape={"fsdp": len(devices)})


def _device(platform="tpu", process=0, kinds=("device", "pinned_host")):
    memories = [types.SimpleNamespace(kind=k) for k in kinds]
    return types.SimpleNamespace(platform=platform, process_index=process, addressable_memories=lambda: memories)


def test_layouts_offload_cannot_serve_are_refused_with_the_choices():
    offload.check_mesh(_fake_mesh([_device(), _device()]))
    with pytest.raises(ValueError, match=r"needs the 'pinned_host' memory kind.*\['device'\].*offload=none"):
        offload.check_mesh(_fake_mesh([_device(kinds=("device",))]))
    with pytest.raises(ValueError, match="spans 2 processes.*offload=none"):
        offload.check_mesh(_fake_mesh([_device(process=0), _device(process=1)]))
    loader = checkpoints.loader(fixture_dir(FIXTURE) / "stepvideo-t2v", **F32)
    with pytest.raises(ValueError, match="no stacked layers"):
        offload.offload(loader.vae())


def test_stack_scan_offloaded_equals_the_device_scan_for_any_unroll():
    """The prefetching scan over host-resident layers gives the plain scan's carry for every
    layer count (odd ones run a remainder iteration) and unroll setting."""
    for n in (1, 2, 3):
        blocks = stack.stack([nnx.Linear(8, 8, rngs=nnx.Rngs(i)) for i in range(n)])
        x = jax.random.normal(jax.random.key(0), (4, 8))
        fn = lambda block, h: jnp.tanh(block(h))  # noqa: E731
        want = stack.scan(blocks, fn, x)
        state = nnx.state(blocks)   # every variable in host memory: the scan serves any placement
        nnx.update(blocks, jax.tree.map(lambda a: jax.device_put(a, offload.host_sharding(a.sharding)), state))
        for unroll in (1, 2, True):
            got = jax.jit(lambda m, x: stack.scan(m, fn, x, offload=True, unroll=unroll))(blocks, x)
            np.testing.assert_array_equal(got, want)
