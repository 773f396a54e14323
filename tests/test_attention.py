"""All attention backends agree with the plain softmax reference, forward and backward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepvideo_jax.models.attention import attention


def _inputs(b=2, sq=37, sk=53, h=4, hkv=2, d=32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, sq, h, d))
    k = jax.random.normal(ks[1], (b, sk, hkv, d))
    v = jax.random.normal(ks[2], (b, sk, hkv, d))
    lengths = jnp.array([sk, sk // 3])[:b]
    mask = jnp.arange(sk)[None, :] < lengths[:, None]
    return q, k, v, mask


def _alibi(q_pos, k_pos):
    slopes = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)[:, None, None]
    return -slopes * jnp.sqrt(jnp.abs(q_pos[:, None] - k_pos[None, :]).astype(jnp.float32))[None]


def _numpy_reference(q, k, v, mask, causal, bias_fn):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, sq, h, d = q.shape
    g = h // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    if bias_fn is not None:
        s = s + np.asarray(bias_fn(jnp.arange(sq), jnp.arange(k.shape[1])), np.float64)[None]
    allowed = np.asarray(mask)[:, None, None, :]
    if causal:
        allowed = allowed & (np.arange(k.shape[1])[None, :] <= np.arange(sq)[:, None])
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("causal,use_bias", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("backend", ["xla", "blockwise"])
def test_forward_matches_numpy(backend, causal, use_bias):
    q, k, v, mask = _inputs(sq=53) if causal else _inputs()
    bias_fn = _alibi if use_bias else None
    out = attention(q, k, v, key_mask=mask, causal=causal, bias_fn=bias_fn, backend=backend,
                    block_q=16, block_k=16)
    ref = _numpy_reference(q, k, v, mask, causal, bias_fn)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("causal,use_bias", [(False, False), (True, True)])
def test_blockwise_gradients_match_xla(causal, use_bias):
    q, k, v, mask = _inputs(sq=53) if causal else _inputs()
    bias_fn = _alibi if use_bias else None
    w = jax.random.normal(jax.random.key(7), q.shape)

    def loss(backend, q, k, v):
        o = attention(q, k, v, key_mask=mask, causal=causal, bias_fn=bias_fn, backend=backend,
                      block_q=16, block_k=16)
        return jnp.sum(o * w)

    g_ref = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
    g_blk = jax.jit(jax.grad(lambda *a: loss("blockwise", *a), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_blk, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hkv", [4, 2])
def test_splash_interpret_matches_xla(causal, hkv):
    q, k, v, mask = _inputs(b=1, sq=150, sk=150 if causal else 200, h=4, hkv=hkv, d=128)
    out = attention(q, k, v, key_mask=mask, causal=causal, backend="splash", interpret=True)
    ref = attention(q, k, v, key_mask=mask, causal=causal, backend="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-5)


def test_bad_shapes_are_rejected():
    q, k, v, mask = _inputs()
    with pytest.raises(ValueError, match="hkv dividing h"):
        attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="flash")
