"""Video-VAE frame/size arithmetic (the official code's, probed in the fixture's report.json), input
validation and converter errors. No model run here: everything is rejected before any compute."""
import functools
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

from stepvideo_jax.convert import vae as vae_convert
from stepvideo_jax.convert.safetensors_io import CheckpointError, TensorSource
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
            with pytest.raises(ValueError, match=rf"cannot encode {n} frames.*must be one of 0, 1-4, 9-12"):
                vae_model.latent_frames(cfg(), int(n))
        else:
            assert vae_model.latent_frames(cfg(), int(n)) == want
    # the pipeline's counts: 204 frames <-> 36 latents
    assert vae_model.latent_frames(cfg(), 204) == 36 and vae_model.video_frames(cfg(), 36) == 204
    assert [vae_model.video_frames(cfg(), n) for n in (1, 2, 3, 4, 5, 6, 8)] == [1, 9, 17, 18, 26, 34, 43]


def test_spatial_sizes():
    f = cfg().spatial_factor
    for size, want in PROBES["spatial"].items():
        size = int(size)
        shape = (1, 17, 3, size, 2 * f)
        if size % f == 0:
            vae_model.check_video(cfg(), shape)
            assert want == size // f
        else:  # rejected, also where the official code silently does not round-trip (30, 33)
            with pytest.raises(ValueError, match=rf"height {size} is not a multiple of {f}; use e\.g\."):
                vae_model.check_video(cfg(), shape)


@pytest.mark.parametrize("shape, message", [
    ((17, 3, 32, 48), r"rank 5 \(b f c h w\)"),
    ((1, 17, 32, 48, 3), r"has 32 channels on axis 2.*expects 3.*channel-last"),
    ((1, 17, 4, 32, 48), r"has 4 channels on axis 2; the VAE expects 3"),
    ((1, 17, 3, 32, 40), r"width 40 is not a multiple of 16; use e\.g\. 32 or 48"),
    ((1, 17, 3, 8, 48), r"height 8 is not a multiple of 16; use e\.g\. 16"),
    ((1, 30, 3, 32, 48), r"cannot encode 30 frames.*0, 1-4, 9-12.*nearest valid counts: 29 or 34"),
    ((1, 5, 3, 32, 48), r"cannot encode 5 frames.*nearest valid counts: 4 or 9"),
])
def test_bad_video_is_rejected_up_front(shape, message):
    with pytest.raises(ValueError, match=message):
        abstract_model().encode_moments(np.zeros(shape, np.float32))


@pytest.mark.parametrize("shape, message", [
    ((6, 4, 2, 3), r"latents must have rank 5"),
    ((1, 6, 2, 3, 4), r"have 2 channels on axis 2.*z_channels = 4.*channel-last"),
    ((1, 6, 8, 2, 3), r"have 8 channels on axis 2.*z_channels = 4 in the layout b f c h w$"),
    ((1, 0, 4, 2, 3), r"empty axis"),
])
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
