"""Pallas splash attention (TPU) behind the common `attention` layout.

q (b, sq, h, d), k/v (b, sk, hkv, d) -> (b, sq, h, d). Sequences are padded to the kernel's block
size; padded and masked keys get segment id 0, queries segment id 1, so they are never attended.
With `interpret=True` the same kernel runs on CPU (slowly), which is how the tests check it.

Under an ambient mesh the kernel runs per device inside `shard_map` (Mosaic kernels cannot be
partitioned automatically): batch and heads are split as the logical rules say (`batch`,
`act_heads`), query tokens as `length` unless causal, and keys/values are gathered whole.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from stepvideo_jax.parallel.rules import logical_to_spec


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def splash_attention(q, k, v, *, key_mask=None, causal=False, scale, block: int = 512,
                     interpret: bool = False):
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and any(t != jax.sharding.AxisType.Manual and n > 1
                              for t, n in zip(mesh.axis_types, mesh.axis_sizes)):
        return _over_mesh(mesh, q, k, v, key_mask=key_mask, causal=causal, scale=scale, block=block,
                          interpret=interpret)
    return _splash_local(q, k, v, key_mask=key_mask, causal=causal, scale=scale, block=block,
                         interpret=interpret)


def _over_mesh(mesh, q, k, v, *, key_mask, causal, **kw):
    """`_splash_local` per device; a mesh axis that does not divide its dimension is not used."""

    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))

    def fit(entry, *dims):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        n = 1
        for a in names:
            n *= sizes[a]
        return entry if all(dim % n == 0 for dim in dims) else None

    b, sq, h, _ = q.shape
    batch_ax, len_ax, head_ax, _ = logical_to_spec(("batch", "length", "act_heads", None), mesh)
    batch_ax = fit(batch_ax, b)
    head_ax = fit(head_ax, h, k.shape[2])
    len_ax = None if causal else fit(len_ax, sq)
    q_spec = P(batch_ax, len_ax, head_ax, None)
    kv_spec = P(batch_ax, None, head_ax, None)
    key_mask = jnp.ones(k.shape[:2], bool) if key_mask is None else key_mask
    local = lambda q, k, v, m: _splash_local(q, k, v, key_mask=m, causal=causal, **kw)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(batch_ax, None)),
                         out_specs=q_spec, check_vma=False)(q, k, v, key_mask)


def _splash_local(q, k, v, *, key_mask=None, causal=False, scale, block: int = 512,
                  interpret: bool = False):
    b, sq, h, d = q.shape
    sk_len, hkv = k.shape[1], k.shape[2]
    bq = min(block, _round_up(sq, 128))
    bkv = min(block, _round_up(sk_len, 128))
    sq_p, sk_p = _round_up(sq, bq), _round_up(sk_len, bkv)
    g = h // hkv
    head_mask = sm.CausalMask((sq_p, sk_p)) if causal else sm.FullMask((sq_p, sk_p))
    n_mask_heads = h if g == 1 else g
    kernel = sk.make_splash_mha(
        sm.MultiHeadMask([head_mask] * n_mask_heads),
        block_sizes=sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                                  block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                                  block_q_dq=bq, block_kv_dq=bkv),
        is_mqa=g > 1, head_shards=1, q_seq_shards=1, interpret=interpret)

    valid = jnp.ones((b, sk_len), bool) if key_mask is None else key_mask.astype(bool)
    kv_seg = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, sk_p - sk_len)))
    q_seg = jnp.ones((b, sq_p), jnp.int32)

    qh = jnp.pad(q * jnp.asarray(scale, q.dtype), ((0, 0), (0, sq_p - sq), (0, 0), (0, 0)))
    kh = jnp.pad(k, ((0, 0), (0, sk_p - sk_len), (0, 0), (0, 0)))
    vh = jnp.pad(v, ((0, 0), (0, sk_p - sk_len), (0, 0), (0, 0)))
    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (qh, kh, vh))  # b h s d

    def one(qb, kb, vb, qs, ks):
        seg = sk.SegmentIds(q=qs, kv=ks)
        if g == 1:
            return kernel(qb, kb, vb, segment_ids=seg)
        # GQA: one MQA kernel call per kv head over its g query heads.
        qg = qb.reshape(hkv, g, sq_p, d)
        return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=seg))(qg, kb, vb).reshape(h, sq_p, d)

    out = jax.vmap(one)(qh, kh, vh, q_seg, kv_seg)
    return out.transpose(0, 2, 1, 3)[:, :sq].astype(q.dtype)
