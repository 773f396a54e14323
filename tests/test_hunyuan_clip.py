"""Hunyuan-CLIP encoder parity with the official float32 run (fixture `hunyuan_clip`), full-size
parameter count, and a sharded forward on the fake 8-device mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepvideo_jax.convert import hunyuan_clip as convert_clip
from stepvideo_jax.models.hunyuan_clip import HunyuanClip, HunyuanClipConfig
from stepvideo_jax.parallel.rules import state_shardings
from stepvideo_jax.text.wordpiece_tokenizer import WordPieceTokenizer
from tests.fixtures import assert_close, fixture_dir, load_json, load_npz

ATOL, RTOL = 2e-5, 1e-4  # fixture README: suggested float32 parity tolerance


def _forward(model, input_ids, attention_mask):
    """Jitted forward returning (last_hidden_state, {intermediate name: value})."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, mask):
        return nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(ids, mask, capture=True)

    out, inter = run(state, input_ids, attention_mask)
    return out, nnx.to_pure_dict(inter)


@pytest.fixture(scope="module")
def clip():
    return convert_clip.load(fixture_dir("hunyuan_clip"))


@pytest.fixture(scope="module")
def cases():
    return load_npz("hunyuan_clip", "cases.npz")


def test_cases_inputs_come_from_our_tokenizer(cases):
    texts = load_json("hunyuan_clip")["_fixture"]["batch"]
    tok = WordPieceTokenizer.from_dir(fixture_dir("hunyuan_clip") / "tokenizer")
    batch = tok(texts, max_length=cases["input_ids"].shape[1])
    np.testing.assert_array_equal(batch.input_ids, cases["input_ids"])
    np.testing.assert_array_equal(batch.attention_mask, cases["attention_mask"])
    np.testing.assert_array_equal(cases["token_type_ids"], 0)


def test_parity_with_official(clip, cases):
    out, inter = _forward(clip, cases["input_ids"], cases["attention_mask"])
    errs = {
        "hidden_embeddings": assert_close(inter["embedding_out"][0], cases["hidden_embeddings"],
                                          atol=ATOL, rtol=RTOL, name="hidden_embeddings"),
        "hidden_layer0_out": assert_close(inter["layer_out"][0], cases["hidden_layer0_out"],
                                          atol=ATOL, rtol=RTOL, name="hidden_layer0_out"),
        "last_hidden_state": assert_close(out, cases["last_hidden_state"], atol=ATOL, rtol=RTOL,
                                          name="last_hidden_state"),
        "last_hidden_state (last layer_out)": assert_close(inter["layer_out"][-1], cases["last_hidden_state"],
                                                           atol=ATOL, rtol=RTOL, name="layer_out[-1]"),
        "last_hidden_state_fp64": assert_close(out, cases["last_hidden_state_fp64"], atol=ATOL, rtol=RTOL,
                                               name="last_hidden_state_fp64"),
    }
    # The caption server ships the output rounded to bfloat16: ours rounds to the same values except
    # where float32 noise straddles a rounding boundary (then one bf16 ulp apart: at most 2^-7 relative).
    bf16 = np.asarray(out.astype(jnp.bfloat16).astype(jnp.float32))
    errs["clip_embedding_bf16_as_fp32"] = assert_close(bf16, cases["clip_embedding_bf16_as_fp32"], atol=ATOL,
                                                       rtol=2.0 ** -7, name="clip_embedding_bf16_as_fp32")
    flips = int(np.sum(bf16 != cases["clip_embedding_bf16_as_fp32"]))
    assert flips <= 1e-3 * bf16.size, f"{flips} bf16 values differ"
    print("max abs errors:", {k: f"{v:.2e}" for k, v in errs.items()}, f"bf16 values differing: {flips}")


def test_parity_without_mask(clip, cases):
    out = nnx.jit(lambda m, ids: m(ids))(clip, cases["input_ids"])
    err = assert_close(out, cases["last_hidden_state_no_mask"], atol=ATOL, rtol=RTOL,
                       name="last_hidden_state_no_mask")
    print(f"last_hidden_state_no_mask max abs err {err:.2e}")


def test_token_types_are_embedded(clip, cases):
    """`token_type_ids=None` is all zeros; another type changes the output (row 1 of the table)."""
    ids, mask = cases["input_ids"][:1], cases["attention_mask"][:1]
    run = nnx.jit(lambda m, tt: m(ids, mask, tt))
    zeros = np.asarray(run(clip, jnp.zeros_like(ids)))
    np.testing.assert_array_equal(zeros, np.asarray(run(clip, None)))
    assert not np.allclose(np.asarray(run(clip, jnp.ones_like(ids))), zeros)


def test_bad_inputs_are_named(clip, cases):
    ids = cases["input_ids"]
    too_long = np.zeros((1, clip.config.max_position_embeddings + 1), np.int32)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        clip(too_long)
    with pytest.raises(ValueError, match="attention_mask"):
        clip(ids, cases["attention_mask"][:, :-1])
    with pytest.raises(ValueError, match="not a multiple of num_heads"):
        HunyuanClipConfig(hidden_size=64, num_heads=5)


def test_full_size_parameter_count():
    """Released size (fixture `_fixture.full_size_config`) = `HunyuanClipConfig.full()`: 350,986,240."""
    cfg = convert_clip.config_from_dict(load_json("hunyuan_clip")["_fixture"]["full_size_config"])
    assert cfg == HunyuanClipConfig.full()
    model = nnx.eval_shape(lambda: HunyuanClip(cfg, rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == 350_986_240


@pytest.mark.sharding
def test_sharded_forward_matches(clip, cases):
    """Params sharded by the logical rules on an (fsdp=2, tensor=4) mesh; output equals the fixture."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"))
    graphdef, state = nnx.split(clip)
    with jax.set_mesh(mesh):
        state = jax.device_put(state, state_shardings(state, mesh))
        kernel = state["layers"][0]["attention"]["query"]["kernel"].get_value()
        assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
        out = jax.jit(lambda s, ids, mask: nnx.merge(graphdef, s)(ids, mask))(
            state, cases["input_ids"], cases["attention_mask"])
    assert_close(out, cases["last_hidden_state"], atol=ATOL, rtol=RTOL, name="sharded last_hidden_state")
