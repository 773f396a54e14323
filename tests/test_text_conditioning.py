"""Both encoders -> DiT text inputs, against the official caption server's outputs of the release
layout's end-to-end cases (fixture `release_layout`) and the `step_llm` fixture's padded masks."""
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from stepvideo_jax import checkpoints
from stepvideo_jax.text.conditioning import dit_text_mask
from tests.fixtures import assert_close, fixture_dir, load_json, load_npz

ATOL, RTOL = 5e-5, 1e-4  # release_layout README: text embeddings of a float32 port


@functools.lru_cache(maxsize=None)
def conditioner():
    return checkpoints.text_encoder(fixture_dir("release_layout") / "stepvideo-t2v",
                                        llm_dtype=jnp.float32, clip_dtype=jnp.float32)


@functools.lru_cache(maxsize=None)
def e2e():
    return load_npz("release_layout", "e2e_cases.npz")


CASES = sorted({k.split(".")[0] for k in load_json("release_layout", "e2e_cases.json")["cases"]})


@pytest.mark.parametrize("case", CASES)
def test_release_caption_server_outputs(case):
    ref = {k.split(".", 1)[1]: v for k, v in e2e().items() if k.startswith(case + ".")}
    prompts = [str(p) for p in ref["caption_prompts"]]
    cond = conditioner()
    llm, clip = cond.tokenize(prompts)
    np.testing.assert_array_equal(llm.input_ids, ref["llm_input_ids"])
    np.testing.assert_array_equal(llm.attention_mask, ref["llm_attention_mask"])
    np.testing.assert_array_equal(clip.input_ids, ref["clip_input_ids"])
    np.testing.assert_array_equal(clip.attention_mask, ref["clip_attention_mask"])
    out = cond(prompts)
    assert_close(out["y"], ref["y"], atol=ATOL, rtol=RTOL, name=f"{case}.y")
    assert_close(out["clip"], ref["clip_embedding"], atol=ATOL, rtol=RTOL, name=f"{case}.clip_embedding")
    assert out["y_mask"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out["y_mask"]), ref["y_mask"])


def test_y_mask_with_clip_of_step_llm_fixture():
    c = load_npz("step_llm", "cases.npz")
    for b in ("a", "b"):
        want = c[f"{b}_y_mask_with_clip"]
        got = dit_text_mask(c[f"{b}_y_mask"], want.shape[1] - c[f"{b}_y_mask"].shape[1])
        np.testing.assert_array_equal(got, want)


def test_bf16_mask_sum_quirk():
    """77 + valid above 256 rounds to the nearest even count (ties to even mantissa), as in bf16."""
    valid = np.array([2, 179, 180, 200, 202, 320])
    llm_mask = (np.arange(320)[None, :] < valid[:, None]).astype(np.int32)
    exact = dit_text_mask(llm_mask)
    np.testing.assert_array_equal(exact.sum(1), 77 + valid)
    quirk = dit_text_mask(llm_mask, bf16_mask_sum=True)
    np.testing.assert_array_equal(quirk.sum(1), [79, 256, 256, 276, 280, 396])
    assert (np.diff(quirk, axis=1) <= 0).all()  # still a prefix of ones
    np.testing.assert_array_equal(dit_text_mask(quirk[:, 77:], bf16_mask_sum=True), quirk)


def test_no_prompt_is_rejected():
    with pytest.raises(ValueError, match="no prompts"):
        conditioner()([])
