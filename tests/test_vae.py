"""Video-VAE v2 parity with the official `AutoencoderKL` (fixture `vae`), through the converter.

Tolerance (fixture README): per array atol = 2e-5 * max|ref|, rtol = 1e-4; the posterior case
(std up to e^10) rtol = 1e-6. Case names, shapes and chunk counts come from the fixture files.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepvideo_jax.convert import vae as vae_convert
from stepvideo_jax.models import vae as vae_model
from tests.fixtures import assert_close, fixture_dir, load_json, load_npz

RTOL = 1e-4
POSTERIOR_RTOL = 1e-6
CASES = load_npz("vae", "cases.npz")
INTER = load_npz("vae", "intermediates.npz")
ENCODE_CASES = sorted(k[:-2] for k in CASES if k.endswith(".x"))
DECODE_CASES = sorted(k[:-2] for k in CASES if k.endswith(".z"))
POSTERIOR_CASES = sorted(k[:-len(".moments")] for k in CASES
                         if k.endswith(".moments") and k[:-len(".moments")] + ".x" not in CASES)


def check(actual, ref, name):
    return assert_close(actual, ref, atol=2e-5 * float(np.max(np.abs(ref))), rtol=RTOL, name=name)


@functools.lru_cache(maxsize=None)
def fixture_model():
    return vae_convert.load(fixture_dir("vae") / "weights.safetensors")


def call(method: str, *args, **static):
    """`model.<method>(*args, **static)` under one jit (static keyword arguments)."""
    graphdef, state = nnx.split(fixture_model())
    fn = jax.jit(lambda s, *a: getattr(nnx.merge(graphdef, s), method)(*a, **static))
    return fn(state, *args)


def captured(part: str, x):
    """Run `encoder` / `decoder` on one chunk (b t h w c) and return its sown intermediates."""
    graphdef, state = nnx.split(fixture_model())

    @jax.jit
    def run(s, x):
        return nnx.capture(getattr(nnx.merge(graphdef, s), part), nnx.Intermediate)(x, capture=True)

    out, inter = run(state, x)
    return {k[len("tap_"):]: np.asarray(v[0]) for k, v in nnx.to_pure_dict(inter).items()}


def test_config_read_from_shapes_matches_fixture():
    cfg = vae_convert.read_config(fixture_dir("vae") / "weights.safetensors")
    meta = load_json("vae")
    assert cfg.z_channels == meta["constructor"]["z_channels"]
    assert list(cfg.encoder_widths) == meta["derived"]["encoder_level_widths"]
    assert list(cfg.decoder_widths) == meta["derived"]["decoder_level_widths"]
    assert cfg.patch_channels == meta["derived"]["patch_channels"]
    assert list(cfg.encoder_temporal_levels) == meta["encoder_constructor"]["down_sampling_layer"]
    assert list(cfg.decoder_temporal_levels) == meta["decoder_constructor"]["temporal_up_layers"]
    assert cfg.frame_len == meta["settings"]["frame_len"] and cfg.latent_len == meta["settings"]["latent_len"]
    n = sum(x.size for x in jax.tree.leaves(nnx.state(fixture_model(), nnx.Param)))
    assert n == meta["derived"]["n_params"]


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_intermediates(part):
    prefix = "int.enc." if part == "encoder" else "int.dec."
    x = INTER["int.x"] if part == "encoder" else INTER["int.z"]
    taps = captured(part, jnp.asarray(x).transpose(0, 1, 3, 4, 2))
    names = sorted(k for k in INTER if k.startswith(prefix))
    assert names
    for key in names:
        name = key[len(prefix):].replace(".", "_")
        assert name in taps, f"{key}: no intermediate {name!r}; have {sorted(taps)}"
        ours = taps[name]
        # fixture layout: b c t h w, except the encoder output (b t c h w)
        ours = ours.transpose(0, 1, 4, 2, 3) if name == "moments" else ours.transpose(0, 4, 1, 2, 3)
        check(ours, INTER[key], key)


@pytest.mark.parametrize("case", ENCODE_CASES)
def test_encode(case):
    x = CASES[f"{case}.x"]
    cfg = fixture_model().cfg
    assert CASES[f"{case}.moments"].shape[1] == vae_model.latent_frames(cfg, x.shape[1])
    moments = call("encode_moments", x)
    check(moments, CASES[f"{case}.moments"], f"{case}.moments")
    post = fixture_model().posterior(moments)
    for name in ("mean", "logvar", "std"):
        check(getattr(post, name), CASES[f"{case}.{name}"], f"{case}.{name}")
    check(post.sample_from_noise(CASES[f"{case}.noise"]), CASES[f"{case}.sample"], f"{case}.sample")


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode(case):
    z = CASES[f"{case}.z"]
    cfg = fixture_model().cfg
    assert CASES[f"{case}.out"].shape[1] == vae_model.video_frames(cfg, z.shape[1])
    unmixed = call("decode_chunks", z)
    check(unmixed, CASES[f"{case}.unmixed"], f"{case}.unmixed")
    check(vae_model.blend_boundaries(unmixed, cfg.frame_len, cfg.blend_remain), CASES[f"{case}.out"],
          f"{case}.out")


@pytest.mark.parametrize("case", POSTERIOR_CASES)
def test_posterior_clamp(case):
    """Pure relative tolerance: std reaches e^10, so an absolute slack would hide small values."""
    post = vae_model.posterior(jnp.asarray(CASES[f"{case}.moments"]), fixture_model().cfg.logvar_range)
    ours = dict(mean=post.mean, logvar=post.logvar, std=post.std,
                sample=post.sample_from_noise(CASES[f"{case}.noise"]))
    for name, value in ours.items():
        assert_close(value, CASES[f"{case}.{name}"], atol=0.0, rtol=POSTERIOR_RTOL, name=f"{case}.{name}")


def test_encode_samples_with_explicit_key_and_time_slabs():
    """`encode(video, key)` = posterior sample with N(0, 1) noise from `key`; here with 4-frame slabs
    (17 frames padded to 20 at the end), which must not change the moments."""
    x, moments = INTER["int.x"], INTER["int.enc.moments"]
    post = vae_model.posterior(jnp.asarray(moments))
    for seed in (7, 8):
        key = jax.random.key(seed)
        check(call("encode", x, key, stream_frames=4), post.sample(key), f"encode(key={seed})")
    assert not np.allclose(post.sample(jax.random.key(7)), post.sample(jax.random.key(8)))


def test_decode_with_other_slabs_and_vmapped_chunks():
    """3-frame slabs (end padding) and two chunks per map step give the official output."""
    case = max(DECODE_CASES, key=lambda c: CASES[f"{c}.z"].shape[1])
    check(call("decode", CASES[f"{case}.z"], stream_frames=3, chunks_per_step=2), CASES[f"{case}.out"],
          f"{case}.out")


def test_spatial_tiling_assembles_tiles():
    """Tiling is an approximation (off by default); with zero overlap it must equal decoding each
    tile on its own and placing it, which checks the tile bookkeeping exactly."""
    z = INTER["int.z"]
    if z.shape[-1] < 2:  # two tiles at least: widen a one-latent-wide case with its mirror
        z = np.concatenate([z, -z], axis=-1)
    w = z.shape[-1]
    tiled = call("decode", z, tile=(z.shape[-2], 1), tile_overlap=(0, 0))
    s = fixture_model().cfg.spatial_factor
    assert tiled.shape[-1] == w * s
    single = call("decode", z[..., :1])
    np.testing.assert_allclose(tiled[..., :s], single, rtol=1e-6, atol=1e-6)


def test_tile_weights_cross_fade():
    assert vae_model._tile_starts(62, 16, 4) == [0, 12, 24, 36, 46]
    assert vae_model._tile_starts(10, 16, 4) == [0]
    left = np.asarray(vae_model._ramp(0, 4, 8, 2 * 16, 16))
    right = np.asarray(vae_model._ramp(4, 4, 8, 2 * 16, 16))
    assert left[0] == 1 and right[-1] == 1 and left[-1] < 0.05 and right[0] < 0.05
    with pytest.raises(ValueError, match="0 <= overlap < tile"):
        fixture_model().decode(INTER["int.z"], tile=(1, 1), tile_overlap=(1, 0))


@pytest.mark.sharding
def test_decode_chunks_spread_over_a_mesh_equal_one_device():
    """Under a mesh, independent chunks are split over every device (padded with zero chunks)."""
    from jax.sharding import Mesh

    case = max(DECODE_CASES, key=lambda c: CASES[f"{c}.z"].shape[1])
    z = CASES[f"{case}.z"]
    devices = np.array(jax.devices()[:4]).reshape(2, 2)
    mesh = Mesh(devices, ("data", "fsdp"))
    graphdef, state = nnx.split(fixture_model())
    fn = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))
    with jax.set_mesh(mesh):
        lowered = fn.lower(state, z)
        out = lowered.compile()(state, z)
    check(out, CASES[f"{case}.out"], f"{case}.out on 4 devices")
    hlo = lowered.as_text()
    assert "shard_map" in hlo or "sdy.manual_computation" in hlo, "chunks were not split over the mesh"
