"""Step-LLM parity with the official `STEP1TextEncoder` (fixture `step_llm`), through the converter."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from stepvideo_jax.convert import step_llm as llm_convert
from stepvideo_jax.models.attention import attention
from stepvideo_jax.models.step_llm import AlibiSqrtBias, StepLLMConfig, alibi_sqrt_slopes
from stepvideo_jax.parallel.rules import state_shardings
from stepvideo_jax.text.sentencepiece_tokenizer import StepLLMTokenizer
from tests.fixtures import assert_close, fixture_dir, load_json, load_npz

# README: 10x the observed float32-vs-float64 error.
ATOL, RTOL = 5e-5, 1e-4
FULL_SIZE_PARAMS = 19_579_600_896


@functools.lru_cache(maxsize=None)
def fixture_model():
    d = fixture_dir("step_llm")
    return llm_convert.load(d, weights=d / "weights.safetensors")


@functools.lru_cache(maxsize=None)
def cases():
    return load_npz("step_llm", "cases.npz")


def run(model, input_ids, *, backend=None, capture=True):
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, ids):
        m = nnx.merge(graphdef, state)
        return nnx.capture(m, nnx.Intermediate)(ids, backend=backend, capture=capture)

    y, inter = fwd(state, jnp.asarray(input_ids))
    return np.asarray(y), nnx.to_pure_dict(inter)


def _get(inter, *path, index=0):
    node = inter
    for p in path:
        node = node[p]
    return np.asarray(node[index])


@functools.lru_cache(maxsize=None)
def batch_result(b):
    c = cases()
    return (b, c, *run(fixture_model(), c[f"{b}_input_ids"]))


@pytest.fixture(scope="module", params=["a", "b"])
def batch_run(request):
    return batch_result(request.param)


def test_output_and_hidden_states(batch_run):
    b, c, y, inter = batch_run
    assert_close(y, c[f"{b}_y"], atol=ATOL, rtol=RTOL, name=f"{b}_y")
    assert_close(y, c[f"{b}_y_fp64"], atol=ATOL, rtol=RTOL, name=f"{b}_y_fp64")
    hidden = [_get(inter, "embeddings"), *_get(inter, "layers", "out")]  # layer outputs: (layers, ...)
    assert len(hidden) == fixture_model().cfg.num_layers + 1
    assert_close(hidden[0], c[f"{b}_hidden_embeddings"], atol=0, rtol=0, name=f"{b}_hidden_embeddings")
    assert_close(hidden[1], c[f"{b}_hidden_layer0_out"], atol=ATOL, rtol=RTOL, name=f"{b}_hidden_layer0_out")
    np.testing.assert_array_equal(hidden[-1], y)


def test_layer0_internals():
    b, c, _, inter = batch_result("a")  # the fixture records layer-0 internals for batch a only
    blk = jax.tree.map(lambda a: a[0], inter["layers"])
    att = blk["attention"]
    q, k, v = (_get(att, n) for n in ("q", "k", "v"))
    bsz, s, h, hd = q.shape
    groups = k.shape[2]
    interleaved = np.stack([k, v], axis=3).reshape(bsz, s, groups * 2 * hd)  # official [k_g, v_g] per group
    wqkv_out = np.concatenate([q.reshape(bsz, s, h * hd), interleaved], axis=-1)
    ffn = np.concatenate([_get(blk, "feed_forward", "gate_out"), _get(blk, "feed_forward", "up_out")], -1)
    n_first = c[f"{b}_l0_w1_out_first16"].shape[1]
    for got, name in [(_get(blk, "attention_norm_out"), "l0_attention_norm_out"), (wqkv_out, "l0_wqkv_out"),
                      (q, "l0_q"), (np.repeat(k, h // groups, axis=2), "l0_k_expanded"),
                      (np.repeat(v, h // groups, axis=2), "l0_v_expanded"),
                      (_get(att, "core_out"), "l0_attn_core_out"), (_get(blk, "ffn_norm_out"), "l0_ffn_norm_out"),
                      (ffn[:, :n_first], "l0_w1_out_first16")]:
        assert_close(got, c[f"{b}_{name}"], atol=ATOL, rtol=RTOL, name=f"{b}_{name}")


def test_mask_is_the_tokenizer_mask_and_tokens_match():
    c, cfg = cases(), load_json("step_llm")
    tok = StepLLMTokenizer(fixture_dir("step_llm") / "step1_chat_tokenizer.model")
    for b in ("a", "b"):
        batch = tok(cfg["_fixture"][f"batch_{b}"], max_length=c[f"{b}_input_ids"].shape[1])
        np.testing.assert_array_equal(batch.input_ids, c[f"{b}_input_ids"])
        np.testing.assert_array_equal(batch.attention_mask, c[f"{b}_attention_mask"])
        np.testing.assert_array_equal(batch.attention_mask, c[f"{b}_y_mask"])


def test_valid_prefix_does_not_depend_on_padding():
    """Causality alone protects the valid tokens: the most padded prompt of the case, alone with at
    most 3 pads, gives the same rows as in its fully padded batch."""
    c = cases()
    ids, mask = c["a_input_ids"], c["a_attention_mask"]
    row = int(np.argmin(mask.sum(1)))
    n = int(mask[row].sum())
    y, _ = run(fixture_model(), ids[row:row + 1, :min(n + 3, ids.shape[1])], capture=False)
    assert_close(y[0, :n], c["a_y"][row, :n], atol=ATOL, rtol=RTOL, name="prefix")


def test_alibi_slopes_and_bias():
    c = cases()
    np.testing.assert_allclose(alibi_sqrt_slopes(c["alibi_slopes"].shape[0]), c["alibi_slopes"], rtol=1e-7)
    np.testing.assert_allclose(alibi_sqrt_slopes(c["alibi_slopes_full48"].shape[0]), c["alibi_slopes_full48"],
                               rtol=1e-7)
    assert fixture_model().layers.attention.bias.slopes == tuple(float(s) for s in c["alibi_slopes"])
    ref = c["alibi_bias_first24"]
    n = ref.shape[-1]
    pos = jnp.arange(n)
    bias = np.asarray(AlibiSqrtBias(tuple(float(s) for s in c["alibi_slopes"]))(pos, pos))
    below = np.tril(np.ones((n, n), bool))
    assert np.isneginf(ref[:, ~below]).all()  # the causal part is the attention's `causal=True`
    np.testing.assert_allclose(bias[:, below], ref[:, below], rtol=1e-6, atol=1e-7)


def test_alibi_blockwise_matches_dense_over_several_blocks():
    """The per-block bias positions: blockwise with small blocks equals the dense reference."""
    h, g, d, s = 6, 2, 16, 45
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, s, h, d))
    k = jax.random.normal(kk, (2, s, g, d))
    v = jax.random.normal(kv, (2, s, g, d))
    bias = AlibiSqrtBias(tuple(float(x) for x in alibi_sqrt_slopes(h)))
    dense = attention(q, k, v, causal=True, bias_fn=bias, backend="xla")
    blocks = attention(q, k, v, causal=True, bias_fn=bias, backend="blockwise", block_q=16, block_k=8)
    assert_close(blocks, dense, atol=1e-5, rtol=1e-5, name="blockwise vs xla")
    # and the dense reference itself: explicit softmax with the official bias
    kf = np.repeat(np.asarray(k), h // g, 2)
    vf = np.repeat(np.asarray(v), h // g, 2)
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    full = -np.asarray(bias.slopes)[:, None, None] * np.sqrt(np.maximum(i - j, 0))
    full = np.where(j <= i, full, -np.inf)
    sc = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), kf) / np.sqrt(d) + full
    p = np.exp(sc - sc.max(-1, keepdims=True))
    ref = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), vf)
    assert_close(dense, ref, atol=1e-5, rtol=1e-5, name="xla vs numpy")


def test_xla_backend_agrees():
    c = cases()
    y, _ = run(fixture_model(), c["a_input_ids"], backend="xla", capture=False)
    assert_close(y, c["a_y"], atol=ATOL, rtol=RTOL, name="xla a_y")


@pytest.mark.sharding
def test_sharded_forward_matches():
    """FSDP x tensor mesh on 8 host devices: parameters sharded by the logical rules, same output."""
    c = cases()
    model = fixture_model()
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh)
    sharded = jax.device_put(state, shardings)
    assert sharded["layers"]["attention"]["wq"]["kernel"][...].sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    rows = [0, min(1, len(c["b_input_ids"]) - 1)]  # two rows for data=2; a one-row case is repeated
    ids = jax.device_put(jnp.asarray(c["b_input_ids"][rows]), NamedSharding(mesh, PartitionSpec(("data",))))

    @jax.jit
    def fwd(state, ids):
        return nnx.merge(graphdef, state)(ids)

    with jax.set_mesh(mesh):
        y = fwd(sharded, ids)
    assert_close(np.asarray(y), c["b_y"][rows], atol=ATOL, rtol=RTOL, name="sharded b_y")


def test_full_size_parameter_count_and_specs():
    cfg = StepLLMConfig.full()
    model = nnx.eval_shape(lambda: llm_convert.build(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                     rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    assert n == FULL_SIZE_PARAMS == load_json("step_llm")["_fixture"]["full_size_derived"]["parameters"]
    mesh = jax.sharding.AbstractMesh((2, 4), ("fsdp", "tensor"))
    from stepvideo_jax.parallel.rules import state_specs

    specs = nnx.to_flat_state(state_specs(state, mesh))
    by_path = {"/".join(map(str, p)): s for p, s in specs}
    assert by_path["embed"] == PartitionSpec("tensor", "fsdp")
    assert by_path["layers/attention/wk/kernel"] == PartitionSpec(None, "fsdp", "tensor")  # (layers, in, out)
    assert by_path["layers/feed_forward/down/kernel"] == PartitionSpec(None, "tensor", "fsdp")


def test_config_matches_fixture_derived_sizes():
    raw = load_json("step_llm")
    cfg = llm_convert.read_config(fixture_dir("step_llm"))
    derived = raw["_fixture"]["derived"]
    assert cfg.head_dim == derived["head_dim"]
    assert cfg.ffn_inner == derived["ffn_hidden_size_after_rounding"]
    full = llm_convert.config_from_dict(raw["_fixture"]["full_size_config_released"])
    assert full == StepLLMConfig.full()
    assert full.ffn_inner == raw["_fixture"]["full_size_derived"]["ffn_hidden_size_after_rounding"]


def test_bad_input_rank_is_rejected():
    with pytest.raises(ValueError, match="batch, length"):
        fixture_model()(jnp.zeros((4,), jnp.int32))


def test_bfloat16_deployment_dtype():
    """bf16 params and compute (the official deployment) stay within 2x the official bf16 error."""
    c = cases()
    observed = load_json("step_llm")["_fixture"]["tolerance_observed"]
    d = fixture_dir("step_llm")
    model = llm_convert.load(d, weights=d / "weights.safetensors", dtype=jnp.bfloat16)
    for b in ("a", "b"):
        y, _ = run(model, c[f"{b}_input_ids"], capture=False)
        assert y.dtype == jnp.bfloat16
        err = float(np.abs(y.astype(np.float32) - c[f"{b}_y_fp64"]).max())
        official = observed[f"batch_{b}"]["bf16_vs_fp64_everywhere"]["max_abs"]
        assert err <= 2 * official, f"{b}: bf16 max abs err {err:.3g}, official bf16 {official:.3g}"
