"""Sequence-parallel attention on 8 fake CPU devices equals one device, forward and backward.

Random q/k/v on a 105-token sequence (not divisible by any degree used), compared with the plain
XLA attention on one device as max|a - b| / max|b| <= 1e-5 for the output and dq, dk, dv of a
scalar loss; the compiled HLO must hold the mode's collective.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepvideo_jax.models.attention import attention
from stepvideo_jax.parallel.mesh import MeshConfig, make_mesh
from stepvideo_jax.models.sequence_parallel import SequenceParallel

pytestmark = pytest.mark.sharding

REL = 1e-5


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def inputs(b=2, s=105, sk=None, h=8, hkv=8, d=16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    sk = s if sk is None else sk
    return (jax.random.normal(ks[0], (b, s, h, d)), jax.random.normal(ks[1], (b, sk, hkv, d)),
            jax.random.normal(ks[2], (b, sk, hkv, d)), jax.random.normal(ks[3], (b, s, h, d)))


def out_and_grads(q, k, v, w, backend, *, key_mask=None, cross=False, mesh=None):
    def loss(q, k, v):
        o = attention(q, k, v, key_mask=key_mask, backend=backend, cross=cross)
        return jnp.sum(o * w), o

    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    if mesh is None:
        grads, out = fn(q, k, v)
        return out, grads, ""
    with jax.set_mesh(mesh):
        compiled = fn.lower(q, k, v).compile()
        grads, out = compiled(q, k, v)
    return out, grads, compiled.as_text()


def check(q, k, v, w, backend, mesh_spec, *, key_mask=None, cross=False, collectives=(), absent=()):
    ref_out, ref_grads, _ = out_and_grads(q, k, v, w, "xla", key_mask=key_mask)
    mesh = make_mesh(MeshConfig.from_string(mesh_spec))
    out, grads, hlo = out_and_grads(q, k, v, w, backend, key_mask=key_mask, cross=cross, mesh=mesh)
    errs = {"out": rel_err(out, ref_out)}
    errs.update({name: rel_err(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    print(f"\n{backend} [{mesh_spec}]{' cross' if cross else ''}: "
          + ", ".join(f"{k} {e:.1e}" for k, e in errs.items()))
    assert max(errs.values()) <= REL, errs
    for op in collectives:
        assert op in hlo, f"no {op} in the compiled HLO"
    for op in absent:
        assert op not in hlo, f"unexpected {op} in the compiled HLO"


@pytest.mark.parametrize("backend, mesh_spec, heads, collectives", [
    ("ring", "sequence=8", (8, 8), ("collective-permute",)),
    ("ring", "data=2,sequence=2,tensor=2", (4, 2), ("collective-permute",)),
    ("ulysses", "sequence=8", (8, 8), ("all-to-all",)),
    ("ulysses", "sequence=4,tensor=2", (16, 8), ("all-to-all",)),
    ("ulysses_ring", "sequence=8", (12, 12), ("all-to-all", "collective-permute")),
    (SequenceParallel("ulysses_ring", ulysses_degree=2), "fsdp=2,sequence=4", (8, 4),
     ("all-to-all", "collective-permute")),
])
def test_self_attention(backend, mesh_spec, heads, collectives):
    q, k, v, w = inputs(h=heads[0], hkv=heads[1])
    check(q, k, v, w, backend, mesh_spec, collectives=collectives)


@pytest.mark.parametrize("backend, heads", [("ring", 8), ("ulysses_ring", 12)])
def test_self_attention_key_mask(backend, heads):
    q, k, v, w = inputs(s=37, h=heads, hkv=heads)
    key_mask = jnp.arange(37)[None] < jnp.array([37, 20])[:, None]
    check(q, k, v, w, backend, "sequence=8", key_mask=key_mask, collectives=("collective-permute",))


def test_cross_attention_shards_queries_only():
    q, k, v, w = inputs(s=105, sk=13)
    key_mask = jnp.arange(13)[None] < jnp.array([13, 6])[:, None]
    check(q, k, v, w, "ring", "sequence=8", key_mask=key_mask, cross=True,
          absent=("collective-permute", "all-to-all"))


def test_no_mesh_is_local_attention():
    q, k, v, _ = inputs(s=24)
    np.testing.assert_allclose(attention(q, k, v, backend="ring"), attention(q, k, v, backend="xla"),
                               rtol=1e-5, atol=1e-6)


def test_errors_name_the_choices():
    q, k, v, _ = inputs(s=16, h=4, hkv=4)
    with jax.set_mesh(make_mesh(MeshConfig.from_string("sequence=8"))):
        with pytest.raises(ValueError, match="ulysses_ring"):
            jax.jit(lambda q, k, v: attention(q, k, v, backend="ulysses"))(q, k, v)
        with pytest.raises(ValueError, match="causal"):
            jax.jit(lambda q, k, v: attention(q, k, v, backend="ring", causal=True))(q, k, v)
    with pytest.raises(ValueError, match="ulysses_ring"):
        SequenceParallel("rings")
    with pytest.raises(ValueError, match="ulysses"):
        attention(q, k, v, backend="flash")
