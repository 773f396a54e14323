"""DiT parity with the official `StepVideoModel` (fixture `dit`), through the project's converter."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepvideo_jax.convert import dit as dit_convert
from stepvideo_jax.convert.safetensors_io import TensorSource
from tests.fixtures import assert_close, fixture_dir, load_json, load_npz

ATOL = RTOL = 1e-4
CASES = load_json("dit")["cases"]


@functools.lru_cache(maxsize=None)
def fixture_model():
    cfg = dit_convert.config_from_dict(load_json("dit")["constructor_args"])
    source = TensorSource.single(fixture_dir("dit") / "weights.safetensors")
    return dit_convert.convert(cfg, source, label="fixture dit")


def run(model, case, *, backend=None, capture=True):
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, x, t, y, y_mask, clip):
        m = nnx.merge(graphdef, state)
        return nnx.capture(m, nnx.Intermediate)(x, t, y, y_mask, clip, backend=backend, capture=capture)

    out, inter = fwd(state, case["hidden_states"], case["timestep"], case["encoder_hidden_states"],
                     case["encoder_attention_mask"], case["encoder_hidden_states_2"])
    return np.asarray(out), nnx.to_pure_dict(inter)


def _get(inter, *path):
    node = inter
    for p in path:
        node = node[p]
    return np.asarray(node[0] if isinstance(node, tuple) else node)


@pytest.fixture(scope="module", params=CASES)
def case_run(request):
    case = load_npz("dit", f"{request.param}.npz")
    out, inter = run(fixture_model(), case)
    return request.param, case, out, inter


def test_output(case_run):
    name, case, out, _ = case_run
    assert_close(out, case["output"], atol=ATOL, rtol=RTOL, name=f"{name}.output")


def test_embeddings_and_tokens(case_run):
    name, case, _, inter = case_run
    b, f, c, h, w = case["hidden_states"].shape
    for key in ("timestep_proj", "embedded_timestep", "adaln_modulation", "caption_projection_out",
                "clip_projection_out", "caption_tokens_full", "blocks_in"):
        assert_close(_get(inter, key), case[key], atol=ATOL, rtol=RTOL, name=f"{name}.{key}")
    # The official code truncates the text keys to the longest valid length L; we keep all of them.
    L = case["caption_tokens"].shape[1]
    assert_close(_get(inter, "caption_tokens_full")[:, :L], case["caption_tokens"], atol=ATOL, rtol=RTOL)
    key_mask = _get(inter, "key_mask")
    assert not key_mask[:, L:].any()
    s = case["cross_attn_mask"].shape[1]
    np.testing.assert_array_equal(np.broadcast_to(key_mask[:, None, :L], (b, s, L)).astype(np.int32),
                                  case["cross_attn_mask"])
    assert_close(_get(inter, "blocks_in").reshape(b * f, h * w, -1), case["patch_embed_out"],
                 atol=ATOL, rtol=RTOL, name=f"{name}.patch_embed_out")
    assert_close(_get(inter, "proj_out_out").reshape(b * f, h * w, -1), case["proj_out_out"],
                 atol=ATOL, rtol=RTOL, name=f"{name}.proj_out_out")


def test_blocks(case_run):
    """Per-block intermediates captured inside the layer scan carry the layer axis first."""
    name, case, _, inter = case_run
    outs = _get(inter, "blocks", "out")
    assert outs.shape[0] == load_json("dit")["constructor_args"]["num_layers"]
    for i in range(outs.shape[0]):
        assert_close(outs[i], case[f"block{i}_out"], atol=ATOL, rtol=RTOL, name=f"{name}.block{i}_out")
    blk = jax.tree.map(lambda a: a[0], inter["blocks"])
    for ours, theirs in [("attn1_out", "block0_attn1_out"), ("attn2_out", "block0_attn2_out"),
                         ("ff_out", "block0_ff_out")]:
        assert_close(_get(blk, ours), case[theirs], atol=ATOL, rtol=RTOL, name=f"{name}.{theirs}")
    for ours, theirs in [("q_normed", "q_normed"), ("k_normed", "k_normed"), ("v_heads", "v"),
                         ("q_rope", "q_rope"), ("k_rope", "k_rope"), ("core_out", "core_out")]:
        assert_close(_get(blk, "attn1", ours), case[f"block0_attn1_{theirs}"], atol=ATOL, rtol=RTOL,
                     name=f"{name}.block0_attn1_{theirs}")
    L = case["block0_attn2_k_normed"].shape[1]
    assert_close(_get(blk, "attn2", "q_normed"), case["block0_attn2_q_normed"], atol=ATOL, rtol=RTOL)
    assert_close(_get(blk, "attn2", "k_normed")[:, :L], case["block0_attn2_k_normed"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("backend", ["xla", "blockwise"])
def test_backends_agree(backend):
    case = load_npz("dit", f"{CASES[0]}.npz")
    out, _ = run(fixture_model(), case, backend=backend, capture=False)
    assert_close(out, case["output"], atol=ATOL, rtol=RTOL, name=backend)


def test_rows_are_independent_of_padding_keys():
    """Garbage in masked text positions must not change the output (static-shape masking)."""
    case = dict(load_npz("dit", f"{CASES[0]}.npz"))
    mask = case["encoder_attention_mask"]
    n_clip = case["encoder_hidden_states_2"].shape[1]
    text_invalid = mask[:, n_clip:] == 0
    y = case["encoder_hidden_states"].copy()
    y[text_invalid] = 1e3
    case2 = dict(case, encoder_hidden_states=y)
    out1, _ = run(fixture_model(), case, capture=False)
    out2, _ = run(fixture_model(), case2, capture=False)
    np.testing.assert_allclose(out1, out2, atol=1e-5)


def test_bad_latent_shape_is_rejected():
    case = load_npz("dit", f"{CASES[0]}.npz")
    model = fixture_model()
    x = case["hidden_states"][:, :, :-1]
    with pytest.raises(ValueError, match="must be"):
        model(x, case["timestep"], case["encoder_hidden_states"], case["encoder_attention_mask"],
              case["encoder_hidden_states_2"])
