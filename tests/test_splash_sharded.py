"""Splash attention under a mesh runs per device in `shard_map` and equals the unsharded result.

Mosaic kernels cannot be partitioned by GSPMD, so `splash_attention` shards batch, heads and (unless
causal) query tokens itself; keys are gathered whole. Checked on 8 fake CPU devices in interpret mode.
"""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

from stepvideo_jax.models.attention import attention
from stepvideo_jax.parallel.rules import logical_to_spec

pytestmark = pytest.mark.sharding


def _inputs(b, sq, sk, h, hkv, d=128, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, sq, h, d))
    k = jax.random.normal(ks[1], (b, sk, hkv, d))
    v = jax.random.normal(ks[2], (b, sk, hkv, d))
    mask = np.arange(sk)[None, :] < np.array([sk, sk // 3])[:b, None]
    return q, k, v, mask


@pytest.mark.parametrize("causal,hkv", [(False, 4), (True, 2)])
def test_sharded_splash_matches_unsharded(causal, hkv):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("fsdp", "sequence", "tensor"))
    q, k, v, mask = _inputs(b=2, sq=256, sk=256, h=4, hkv=hkv)
    ref = attention(q, k, v, key_mask=mask, causal=causal, backend="xla")
    act = NamedSharding(mesh, logical_to_spec(("batch", "length", "act_heads", None), mesh))

    @jax.jit
    def sharded(q, k, v, mask):
        q = jax.lax.with_sharding_constraint(q, act)
        return attention(q, k, v, key_mask=mask, causal=causal, backend="splash", interpret=True)

    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(sharded)(q, k, v, mask))
        out = sharded(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-5)
