"""The attention selection rule (`models/attention_backend.py`), on CPU: a table of cases over head
dims, GPU generations, dtypes, masks and meshes; every full-size model's attention calls traced
through it as on a Hopper GPU; the mask conversion cuDNN takes checked against the reference."""
import dataclasses
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from stepvideo_jax.models import attention as attn
from stepvideo_jax.models import attention_backend as ab
from stepvideo_jax.models import attention_kernels as kernels
from stepvideo_jax.models.dit import DiTConfig, StepVideoDiT
from stepvideo_jax.models.hunyuan_clip import HunyuanClip, HunyuanClipConfig
from stepvideo_jax.models.step_llm import StepLLM, StepLLMConfig
from stepvideo_jax.models.vae import VAEConfig, VideoVAE

AMPERE, HOPPER, BLACKWELL = (8, 0), (9, 0), (10, 0)
NEW_CUDNN = 91300


def gpu_case(head_dim, cc, dtype="bfloat16", cudnn=NEW_CUDNN, **kw):
    kw = {"q_len": 4096, "kv_len": 4096, **kw}
    return ab.AttentionCase(platform="gpu", dtype=dtype, head_dim=head_dim, device_kind="test GPU",
                            compute_capability=cc, cudnn_version=cudnn, **kw)


# (head dim) -> expected backend on (Ampere, Hopper, Blackwell) in bf16, cuDNN 9.13, no mask.
HEAD_DIM_TABLE = {
    64: ("cudnn", "cudnn", "cudnn"),
    128: ("cudnn", "cudnn", "cudnn"),
    256: ("blockwise", "cudnn", "blockwise"),
    512: ("blockwise", "blockwise", "blockwise"),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", sorted(HEAD_DIM_TABLE))
def test_head_dim_by_generation_bf16(head_dim, causal):
    for cc, expected in zip((AMPERE, HOPPER, BLACKWELL), HEAD_DIM_TABLE[head_dim]):
        choice = ab.select_backend(gpu_case(head_dim, cc, causal=causal))
        assert choice.backend == expected, (head_dim, cc, choice)
        assert choice.fallback == (expected != "cudnn")
        if expected != "cudnn":
            assert f"head dim {head_dim}" in choice.reason


@pytest.mark.parametrize("head_dim", sorted(HEAD_DIM_TABLE))
@pytest.mark.parametrize("cc", [AMPERE, HOPPER, BLACKWELL])
def test_float32_never_cudnn(head_dim, cc):
    choice = ab.select_backend(gpu_case(head_dim, cc, dtype="float32"))
    assert choice.backend == "blockwise" and choice.fallback and "float32" in choice.reason


@pytest.mark.parametrize("cc", [AMPERE, HOPPER, BLACKWELL])
def test_float16_as_bfloat16(cc):
    assert ab.select_backend(gpu_case(128, cc, dtype="float16")).backend == "cudnn"


MASK_TABLE = [  # (causal, key_mask, bias) -> backend on Hopper, head dim 128, bf16
    (False, "none", False, "cudnn"),
    (True, "none", False, "cudnn"),
    (False, "prefix", False, "cudnn"),
    (True, "prefix", False, "cudnn"),
    (False, "any", False, "blockwise"),
    (True, "any", False, "blockwise"),
    (True, "none", True, "blockwise"),   # ALiBi
    (False, "prefix", True, "blockwise"),
]


@pytest.mark.parametrize("causal,key_mask,bias,expected", MASK_TABLE)
def test_masks(causal, key_mask, bias, expected):
    choice = ab.select_backend(gpu_case(128, HOPPER, causal=causal, key_mask=key_mask, bias=bias))
    assert choice.backend == expected, choice


@pytest.mark.parametrize("mesh,expected", [("none", "cudnn"), ("batch_heads", "cudnn"), ("manual", "cudnn"),
                                           ("length", "blockwise")])
def test_mesh_modes(mesh, expected):
    assert ab.select_backend(gpu_case(128, HOPPER, mesh=mesh)).backend == expected


def test_versions_and_old_chips():
    assert ab.select_backend(gpu_case(256, HOPPER, cudnn=90100)).backend == "blockwise"   # old cuDNN
    assert ab.select_backend(gpu_case(256, HOPPER, cudnn=None)).backend == "blockwise"    # unknown
    assert ab.select_backend(gpu_case(128, HOPPER, cudnn=None)).backend == "cudnn"
    assert ab.select_backend(gpu_case(128, (7, 5))).backend == "blockwise"               # Turing
    assert ab.select_backend(gpu_case(128, (10, 3), cudnn=91000)).backend == "blockwise"
    assert ab.select_backend(gpu_case(128, (10, 3), cudnn=91100)).backend == "cudnn"
    assert ab.select_backend(gpu_case(128, None)).backend == "blockwise"                 # no CUDA cc
    assert ab.select_backend(gpu_case(100, HOPPER)).backend == "blockwise"               # not 8k


def test_other_platforms():
    tpu = dict(platform="tpu", dtype="bfloat16", head_dim=128, q_len=512, kv_len=512)
    assert ab.select_backend(ab.AttentionCase(**tpu)).backend == "splash"
    bias = ab.select_backend(ab.AttentionCase(**tpu, bias=True))
    assert bias.backend == "blockwise" and bias.fallback
    cpu = ab.select_backend(ab.AttentionCase(**{**tpu, "platform": "cpu"}))
    assert cpu.backend == "blockwise" and not cpu.fallback
    with pytest.raises(ValueError, match="key_mask"):
        ab.AttentionCase(**tpu, key_mask="maybe")
    with pytest.raises(ValueError, match="mesh"):
        ab.AttentionCase(**tpu, mesh="sideways")


def test_fallback_logged_once(caplog):
    case = gpu_case(512, HOPPER, q_len=123)
    with caplog.at_level(logging.WARNING, logger=ab.log.name):
        for _ in range(3):
            ab.log_choice(ab.select_backend(case))
        ab.log_choice(ab.select_backend(gpu_case(128, HOPPER)))   # not a fallback: silent
    records = [r for r in caplog.records if r.name == ab.log.name]
    assert len(records) == 1 and "head dim 512" in records[0].getMessage()


def test_mesh_mode_of_the_ambient_mesh():
    assert ab.mesh_mode() == "none"
    devices = np.array(jax.devices()[:4])
    auto = (jax.sharding.AxisType.Auto,) * 2
    with jax.set_mesh(jax.sharding.Mesh(devices.reshape(2, 2), ("data", "tensor"), axis_types=auto)):
        assert ab.mesh_mode() == "batch_heads"
    mesh = jax.sharding.Mesh(devices.reshape(2, 2), ("data", "sequence"), axis_types=auto)
    with jax.set_mesh(mesh):
        assert ab.mesh_mode() == "length"
        seen = []

        def local(x):
            seen.append(ab.mesh_mode())
            return x

        jax.shard_map(local, in_specs=P("data", "sequence"), out_specs=P("data", "sequence"))(jnp.zeros((4, 4)))
        assert seen == ["manual"]


# -- every model's attention, at full size, traced as on a Hopper GPU --------------------------------

H200 = ab.DeviceFacts(platform="gpu", device_kind="NVIDIA H200", compute_capability=HOPPER,
                      cudnn_version=NEW_CUDNN)


@pytest.fixture
def on_hopper(monkeypatch):
    """Traces as if on an H200: records each (case, choice); the cuDNN kernel itself (which cannot
    run on CPU) is replaced by the reference so that tracing completes."""
    seen = []
    select = ab.select_backend

    def spy(case):
        choice = select(case)
        seen.append((case, choice))
        return choice

    monkeypatch.setattr(ab, "device_facts", lambda device=None: H200)
    monkeypatch.setattr(ab, "select_backend", spy)
    monkeypatch.setattr(kernels, "cudnn", lambda q, k, v, key_mask, causal, bias_fn, scale, *a:
                        kernels.xla(q, k, v, key_mask, causal, bias_fn, scale))
    return seen


def _abstract(build):
    graphdef, state = nnx.split(nnx.eval_shape(build))
    return graphdef, state


def test_full_size_models_on_hopper(on_hopper):
    bf16 = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    sds = jax.ShapeDtypeStruct

    dit_cfg = dataclasses.replace(DiTConfig.full(), num_layers=1)
    g, s = _abstract(lambda: StepVideoDiT(dit_cfg, rngs=nnx.Rngs(0), **bf16))
    l_clip, l_text = 77, 320
    jax.eval_shape(lambda s, *a: nnx.merge(g, s)(*a), s, sds((1, 2, dit_cfg.in_channels, 4, 4), jnp.float32),
                   sds((1,), jnp.float32), sds((1, l_text, dit_cfg.caption_channels[0]), jnp.float32),
                   sds((1, l_clip + l_text), jnp.int32), sds((1, l_clip, dit_cfg.caption_channels[1]), jnp.float32))
    (self_case, self_choice), (cross_case, cross_choice) = on_hopper[-2:]
    assert (self_case.head_dim, self_case.key_mask, self_choice.backend) == (dit_cfg.head_dim, "none", "cudnn")
    assert (cross_case.kv_len, cross_case.key_mask, cross_choice.backend) == (l_clip + l_text, "prefix", "cudnn")

    vae_cfg = VAEConfig.full()
    g, s = _abstract(lambda: VideoVAE(vae_cfg, rngs=nnx.Rngs(0), **bf16))
    jax.eval_shape(lambda s, z: nnx.merge(g, s).decode(z), s,
                   sds((1, vae_cfg.latent_len, vae_cfg.z_channels, 2, 2), jnp.float32))
    case, choice = on_hopper[-1]
    assert case.head_dim == vae_cfg.decoder_widths[-1] and case.causal
    assert choice.backend == "blockwise" and choice.fallback

    llm_cfg = dataclasses.replace(StepLLMConfig.full(), num_layers=1)
    g, s = _abstract(lambda: StepLLM(llm_cfg, rngs=nnx.Rngs(0), **bf16))
    jax.eval_shape(lambda s, ids: nnx.merge(g, s)(ids), s, sds((1, 320), jnp.int32))
    case, choice = on_hopper[-1]
    assert case.bias and case.head_dim == llm_cfg.head_dim and choice.backend == "blockwise"

    clip_cfg = dataclasses.replace(HunyuanClipConfig.full(), num_layers=1)
    for dtype, expected in ((jnp.float32, "blockwise"), (jnp.bfloat16, "blockwise")):
        g, s = _abstract(lambda: HunyuanClip(clip_cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
        jax.eval_shape(lambda s, ids, m: nnx.merge(g, s)(ids, m), s, sds((1, 77), jnp.int32), sds((1, 77), jnp.int32))
        case, choice = on_hopper[-1]
        assert case.head_dim == clip_cfg.head_dim and case.key_mask == "any" and choice.backend == expected


@pytest.mark.parametrize("mode,cross", [("ulysses", True), ("ulysses", False)])
def test_sequence_parallel_local_attention_on_hopper(on_hopper, mode, cross):
    """Under a sequence-parallel mode the per-device attention (inside shard_map) still goes through
    the rule, sees the "manual" mesh, and keeps the text keys' prefix mask: cuDNN."""
    from stepvideo_jax.parallel.mesh import MeshConfig, make_mesh

    b, s, h, d = 2, 24, 4, 16
    sk = 10 if cross else s
    q, k, v = _qkv(jax.random.key(8), b, s, sk, h, h, d, jnp.bfloat16)
    mask = jnp.arange(sk)[None, :] < jnp.array([sk, sk // 2])[:, None]
    ref = attn.attention(q, k, v, key_mask=mask, backend="xla")
    with jax.set_mesh(make_mesh(MeshConfig.from_string("sequence=2"))):
        out = jax.jit(lambda q, k, v, m: attn.attention(q, k, v, key_mask=m, key_mask_is_prefix=True,
                                                         backend=mode, cross=cross))(q, k, v, mask)
    case, choice = on_hopper[-1]
    assert (case.mesh, case.key_mask, choice.backend) == ("manual", "prefix", "cudnn")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)


# -- the conversion to cuDNN's arguments, checked through jax's XLA implementation --------------------


def _qkv(key, b, sq, sk, h, hkv, d, dtype):
    ks = jax.random.split(key, 3)
    return (jax.random.normal(ks[0], (b, sq, h, d), dtype), jax.random.normal(ks[1], (b, sk, hkv, d), dtype),
            jax.random.normal(ks[2], (b, sk, hkv, d), dtype))


@pytest.mark.parametrize("causal,masked,hkv,sq,sk", [(False, True, 4, 40, 29), (True, True, 2, 41, 41),
                                                     (True, False, 4, 40, 40), (False, False, 1, 33, 397)])
def test_cudnn_arguments_match_reference(causal, masked, hkv, sq, sk):
    """`cudnn_attention` (odd lengths padded by one masked key / one dropped query, the mask as
    lengths) through jax's XLA implementation equals the reference, output and gradients."""
    b, h, d = 2, 4, 16
    q, k, v = _qkv(jax.random.key(3), b, sq, sk, h, hkv, d, jnp.float32)
    mask = jnp.arange(sk)[None, :] < jnp.array([sk, sk // 3])[:, None] if masked else None
    scale = 0.7 / np.sqrt(d)
    w = jax.random.normal(jax.random.key(4), q.shape)

    def loss(fn, q, k, v):
        o = fn(q, k, v)
        return jnp.sum(o * w), o

    ref = lambda q, k, v: attn.attention(q, k, v, key_mask=mask, causal=causal, scale=scale, backend="xla")
    got = lambda q, k, v: ab.cudnn_attention(q, k, v, key_mask=mask, causal=causal, scale=scale,
                                             implementation="xla")
    (g_ref, o_ref), (g_got, o_got) = (jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
                                      for fn in (ref, got))
    assert o_got.shape == q.shape
    np.testing.assert_allclose(np.asarray(o_got), np.asarray(o_ref), atol=2e-5, rtol=2e-5)
    for a, r in zip(g_got, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=5e-5, rtol=5e-5)


def test_dit_text_mask_is_a_prefix():
    """The promise `key_mask_is_prefix=True` of the DiT's cross-attention: `embed_text`'s key mask."""
    cfg = DiTConfig(num_layers=1, num_heads=2, head_dim=16, rope_splits=(8, 4, 4), caption_channels=(8, 8))
    model = StepVideoDiT(cfg, rngs=nnx.Rngs(0))
    y_mask = np.zeros((3, 11), np.int32)
    for row, n in enumerate((11, 5, 1)):
        y_mask[row, :n] = 1
    _, key_mask = model.embed_text(jnp.ones((3, 7, 8)), jnp.ones((3, 4, 8)), jnp.asarray(y_mask))
    key_mask = np.asarray(key_mask)
    lengths = key_mask.sum(-1)
    np.testing.assert_array_equal(key_mask, np.arange(11)[None] < lengths[:, None])


def test_explicit_cudnn_off_gpu_falls_back():
    q, k, v = _qkv(jax.random.key(5), 1, 24, 24, 2, 2, 16, jnp.bfloat16)
    out = attn.attention(q, k, v, causal=True, backend="cudnn")
    ref = attn.attention(q, k, v, causal=True, backend="xla")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)


# -- the model, sampling and converter code imports without TensorFlow, grain or ml-collections -----

BLOCKED_IMPORTS = """
import importlib, importlib.abc, sys
BLOCKED = ("tensorflow", "tensorflow_text", "grain", "ml_collections")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked (the GPU machine has none)")
sys.meta_path.insert(0, Block())
for module in sys.argv[1:]:
    importlib.import_module(module)
assert not any(m.split(".")[0] in BLOCKED for m in sys.modules), sorted(sys.modules)
print("imported", len(sys.argv) - 1)
"""

GPU_MODULES = ("stepvideo_jax.models.attention", "stepvideo_jax.models.attention_kernels",
               "stepvideo_jax.models.attention_backend",
               "stepvideo_jax.models.dit", "stepvideo_jax.models.vae", "stepvideo_jax.models.step_llm",
               "stepvideo_jax.models.hunyuan_clip", "stepvideo_jax.sampling.pipeline",
               "stepvideo_jax.sampling.flow_matching", "stepvideo_jax.sampling.components",
               "stepvideo_jax.demo.export", "stepvideo_jax.convert.dit", "stepvideo_jax.convert.vae",
               "stepvideo_jax.convert.step_llm", "stepvideo_jax.convert.hunyuan_clip",
               "stepvideo_jax.convert.cli", "stepvideo_jax.convert.registry", "stepvideo_jax.checkpoints",
               "stepvideo_jax.text.conditioning",
               "stepvideo_jax.text.sentencepiece_tokenizer", "stepvideo_jax.text.wordpiece_tokenizer",
               "bench.dit_flops", "bench.gpu_check")


def test_gpu_modules_import_without_tensorflow_grain_ml_collections():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", BLOCKED_IMPORTS, *GPU_MODULES], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"imported {len(GPU_MODULES)}" in run.stdout
