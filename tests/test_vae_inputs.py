"""Video-VAE frame/size arithmetic (the official code's, probed in the fixture's report.json), input
validation and converter errors. No model run here: everything is rejected before any compute."""
import functools
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

from stepvideo_jax.convert import vae as vae_convert
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.convert.safetensors_io import TensorSource
from stepvideo_jax.models import vae as vae_model
from tests.fixtures import fixture_dir, fixtures_root, load_json

PROBES = load_json("vae", "report.json")["arithmetic_probes"]
WEIGHTS = fixture_dir("vae") / "weights.safetensors"


@functools.lru_cache(maxsize=None)
def cfg():
    return vae_convert.read_config(WEIGHTS)


@functools.lru_cache(maxsize=None)
def abstract_model():
    from flax import nnx

    return nnx.eval_shape(lambda: vae_convert.build(cfg(), rngs=nnx.Rngs(0)))


def test_chunk_arithmetic_matches_official_probes():
    for n, want in PROBES["encode_chunk_frames"].items():
        got = vae_model.chunk_latent_frames(cfg(), int(n))
        assert got == (None if want == "RuntimeError" else want), f"encoder chunk of {n} frames"
    for k, want in PROBES["decode_chunk_latents"].items():
        assert vae_model.chunk_video_frames(cfg(), int(k)) == want, f"decoder chunk of {k} latents"


def test_total_frame_arithmetic_matches_official_probes():
    for n, want in PROBES["encode_total_frames"].items():
        if want == "RuntimeError":
            with pytest.raises(ValueError, match=rf"cannot encode {n} frames"):
                vae_model.latent_frames(cfg(), int(n))
        else:
            assert vae_model.latent_frames(cfg(), int(n)) == want
    # whole decoder chunks plus a last partial one, each as the official code decodes it
    per_chunk = {int(k): v for k, v in PROBES["decode_chunk_latents"].items()}
    latent_len = max(per_chunk)
    for n in range(1, 4 * latent_len):
        full, rest = divmod(n, latent_len)
        want = full * per_chunk[latent_len] + (per_chunk[rest] if rest else 0)
        assert vae_model.video_frames(cfg(), n) == want, f"{n} latents"
        if n % latent_len == 0:  # whole chunks round-trip (the pipeline's 204 frames <-> 36 latents)
            assert vae_model.latent_frames(cfg(), want) == n


def test_spatial_sizes():
    f = cfg().spatial_factor
    for size, want in PROBES["spatial"].items():
        size = int(size)
        shape = (1, cfg().frame_len, cfg().in_channels, size, 2 * f)
        if size % f == 0:
            vae_model.check_video(cfg(), shape)
            assert want == size // f
        else:  # rejected, also where the official code silently does not round-trip (30, 33)
            with pytest.raises(ValueError, match=rf"height {size} is not a multiple of {f}; use e\.g\."):
                vae_model.check_video(cfg(), shape)


def _bad_videos():
    """(shape, message) pairs built from the VAE's own channel count and spatial factor."""
    c, s, f = cfg().in_channels, cfg().spatial_factor, cfg().frame_len
    h, w = 2 * s, 3 * s
    return [
        ((f, c, h, w), r"rank 5 \(b f c h w\)"),
        ((1, f, h, w, c), rf"has {h} channels on axis 2.*expects {c}.*channel-last"),
        ((1, f, c + 1, h, w), rf"has {c + 1} channels on axis 2; the VAE expects {c} in the layout b f c h w$"),
        ((1, f, c, h, w + s // 2), rf"width {w + s // 2} is not a multiple of {s}; use e\.g\. {w} or {w + s}"),
        ((1, f, c, s // 2, w), rf"height {s // 2} is not a multiple of {s}; use e\.g\. {s}$"),
    ] + [((1, n, c, h, w), message) for n, message in _bad_frame_counts()]


def _bad_frame_counts():
    """(frames, message) for every count the official code rejected in the probes, the accepted
    last-chunk sizes and nearest valid counts read from its per-chunk probes."""
    chunk = {int(n): v != "RuntimeError" for n, v in PROBES["encode_chunk_frames"].items()}
    frame_len = max(chunk)
    ok = [r for r in range(1, frame_len) if chunk[r]]
    runs = [[ok[0], ok[0]]]
    for r in ok[1:]:
        if r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    runs_text = ", ".join(["0"] + [str(a) if a == b else f"{a}-{b}" for a, b in runs])
    valid = lambda m: m % frame_len == 0 or chunk[m % frame_len]
    bad = sorted({int(n) for n, v in PROBES["encode_total_frames"].items() if v == "RuntimeError"}
                 | {n for n, ok_ in chunk.items() if not ok_})
    out = []
    for n in bad:
        lower = next((m for m in range(n - 1, 0, -1) if valid(m)), None)
        upper = next(m for m in range(n + 1, n + 2 * frame_len) if valid(m))
        near = f"{lower} or {upper}" if lower else f"{upper}"
        out.append((n, rf"cannot encode {n} frames.*must be one of {runs_text} .*nearest valid counts: {near}$"))
    assert out, "the probes name no rejected frame count"
    return out


@pytest.mark.parametrize("shape, message", _bad_videos())
def test_bad_video_is_rejected_up_front(shape, message):
    with pytest.raises(ValueError, match=message):
        abstract_model().encode_moments(np.zeros(shape, np.float32))


def _bad_latents():
    """(shape, message) pairs built from the VAE's z_channels (any value, 1 included)."""
    z = cfg().z_channels
    return [
        ((6, z, 2, 3), r"latents must have rank 5"),
        ((1, 6, z + 1, 3, z), rf"has {z + 1} channels on axis 2.*z_channels = {z}.*channel-last"),
        ((1, 6, 2 * z + 1, 2, z + 1), rf"has {2 * z + 1} channels on axis 2.*z_channels = {z} in the layout b f c h w$"),
        ((1, 0, z, 2, 3), r"empty axis"),
    ]


@pytest.mark.parametrize("shape, message", _bad_latents())
def test_bad_latents_are_rejected_up_front(shape, message):
    with pytest.raises(ValueError, match=message):
        abstract_model().decode(np.zeros(shape, np.float32))


def test_release_layout_directory_converts_like_the_fixture():
    release = fixtures_root() / "release_layout" / "stepvideo-t2v" / "vae"
    assert vae_convert.read_config(release) == cfg()
    source = vae_convert.tensor_source(release)
    assert "decoder.conv_out.weight" in source.keys()


def _rewrite(tmp_path, edit):
    source = TensorSource.single(WEIGHTS)
    tensors = {k: source.read(k) for k in source.keys()}
    edit(tensors)
    path = tmp_path / "vae_v2.safetensors"
    save_file(tensors, str(path))
    return tmp_path


def _convert(directory):
    return vae_convert.convert(vae_convert.read_config(directory), vae_convert.tensor_source(directory))


def test_module_state_dict_naming_is_named(tmp_path):
    def rename(t):
        t["decoder.conv_out.conv.weight"] = t.pop("decoder.conv_out.weight")
        t["decoder.conv_out.conv.bias"] = t.pop("decoder.conv_out.bias")

    with pytest.raises(CheckpointError, match=re.escape("names it 'decoder.conv_out.weight'")):
        vae_convert.read_config(_rewrite(tmp_path, rename))


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): encoder\.mid\.attn_1\.q\.conv\.bias"):
        _convert(_rewrite(tmp_path, lambda t: t.pop("encoder.mid.attn_1.q.conv.bias")))

    def widen(t):
        t["decoder.up.1.upsample.conv.weight"] = np.zeros((64, 64, 3, 5), np.float32)

    with pytest.raises(CheckpointError, match=r"'decoder\.up\.1\.upsample\.conv\.weight' has shape \(64, 64, 3, 5\)"):
        _convert(_rewrite(tmp_path, widen))


def test_not_a_v2_vae_or_no_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"vae_v2\.safetensors: not found"):
        vae_convert.read_config(tmp_path)
    with pytest.raises(CheckpointError, match=r"missing required tensor 'encoder\.conv_patchify"):
        vae_convert.read_config(_rewrite(tmp_path, lambda t: [t.pop(k) for k in list(t) if "patchify" in k]))
