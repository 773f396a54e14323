"""Step-Video-TI2V image preprocessing and condition layout against fixture `ti2v` (image cases)."""
import logging

import numpy as np
import pytest
from PIL import Image

from stepvideo_jax.sampling import image_condition as ic
from tests.fixtures import assert_close, fixture_dir, load_json, load_npz

CASES = load_json("ti2v")["image_cases"]
VAE_IN_ATOL = 1e-6   # the README's bound with float32 resize weights, as torch computes them


@pytest.fixture(scope="module")
def arrays():
    return load_npz("ti2v", "image_cases.npz")


@pytest.mark.parametrize("name", sorted(CASES))
def test_image_case(arrays, name):
    d = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(name + ".")}
    image = ic.load_image(fixture_dir("ti2v") / CASES[name]["png"])
    np.testing.assert_array_equal(image, d["image"][..., :3])
    np.testing.assert_array_equal(ic.to_unit_range(image), d["image_tensor"])
    target = tuple(int(v) for v in d["target_hw"])
    (rh, rw), (top, left) = ic.cover_crop(image.shape[:2], target)
    np.testing.assert_array_equal([rh, rw], d["resize_hw"])
    np.testing.assert_array_equal([top, left], d["crop_top_left"])
    assert_close(ic.resize_antialiased(d["image_tensor"], (rh, rw)), d["resized"], atol=VAE_IN_ATOL, rtol=0,
                 name=f"{name}.resized")
    err = assert_close(ic.preprocess(image, *target), d["vae_in"], atol=VAE_IN_ATOL, rtol=0, name=f"{name}.vae_in")
    print(f"\n{name}: vae_in max abs err {err:.2e}")
    cond = np.asarray(ic.condition_frames(d["latent"], int(d["latent_frames"])))
    rows = d["condition_hidden_states"].shape[0]
    np.testing.assert_array_equal(np.concatenate([cond] * rows), d["condition_hidden_states"])


def test_mode_conversion_logs_one_line(tmp_path, caplog):
    gray = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    with caplog.at_level(logging.WARNING, logger=ic.__name__):
        img = ic.load_image(tmp_path / "g.png")
    np.testing.assert_array_equal(img, np.repeat(gray[..., None], 3, axis=2))
    assert len([r for r in caplog.records if r.name == ic.__name__]) == 1
    assert "mode L" in caplog.text


def test_bad_images_are_named(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        ic.load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot be read"):
        ic.load_image(tmp_path / "junk.png")
    with pytest.raises(ValueError, match="too unlike"):
        ic.cover_crop((10, 1000), (64, 64))
    with pytest.raises(ValueError, match="non-empty"):
        ic.cover_crop((0, 10), (64, 64))


def test_small_images_are_upscaled():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = ic.preprocess(image, 32, 48)
    assert out.shape == (1, 1, 3, 32, 48) and np.all(np.abs(out) <= 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "fast", None, True])
def test_motion_score_checked(bad):
    with pytest.raises(ValueError, match="motion_score"):
        ic.check_motion_score(bad)
    assert ic.check_motion_score(5) == 5.0
