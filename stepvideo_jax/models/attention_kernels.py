"""Single-device attention kernels and their dispatch, shared by `models/attention.py` and
`models/sequence_parallel.py` (whose ring attention runs the blockwise forward and backward per
key shard).

Layouts: q (b, sq, h, d), k/v (b, sk, hkv, d) with hkv dividing h; the kernels group the query heads
per key head, (b, hkv, g, sq, d), head n = kv_head * g + j. Softmax statistics are float32.

- `xla`: materialises the (b, h, sq, sk) scores (small inputs, the reference in tests);
- `blockwise`: online softmax over key blocks inside a map over query blocks, O(block_q x block_k)
  memory per head, with a custom backward that recomputes scores block by block (flash attention's
  algorithm): `forward` and `flash_backward` on grouped, padded inputs, `BlockwiseConfig` its
  static settings;
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`;
- "splash": Pallas splash attention (`models/splash.py`).
`local_attention` picks one by name (None: `models/attention_backend.choose`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from stepvideo_jax.models.attention_backend import choose as choose_backend, cudnn_attention, device_facts

BiasFn = Callable[[jax.Array, jax.Array], jax.Array]
BACKENDS = ("xla", "blockwise", "cudnn", "splash")
_NEG = -1e30  # finite "minus infinity": keeps fully masked blocks NaN-free


def local_attention(q, k, v, *, key_mask=None, causal: bool = False, bias_fn: Optional[BiasFn] = None,
                    scale: float, backend: Optional[str] = None, block_q: int = 512, block_k: int = 512,
                    interpret: bool = False, key_mask_is_prefix: bool = False):
    """Attention on one device (or inside a `shard_map`) by the kernel `backend` (one of `BACKENDS`;
    None: the selection rule's choice). Arguments as `models.attention.attention`, shapes checked there."""
    if backend in (None, "cudnn"):
        choice = choose_backend(q, k, causal=causal, key_mask=key_mask, key_mask_is_prefix=key_mask_is_prefix,
                                bias_fn=bias_fn, facts=None if backend is None else _as_gpu(device_facts()))
        backend = choice.backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "xla":
        return xla(q, k, v, key_mask, causal, bias_fn, scale)
    if backend == "blockwise":
        return blockwise(q, k, v, key_mask, causal, bias_fn, scale, block_q, block_k)
    if backend == "cudnn":
        return cudnn(q, k, v, key_mask, causal, bias_fn, scale, block_q, block_k)
    if bias_fn is not None:
        return blockwise(q, k, v, key_mask, causal, bias_fn, scale, block_q, block_k)
    # imported when splash runs: it loads the TPU Pallas kernels, which other platforms never need
    from stepvideo_jax.models.splash import splash_attention

    return splash_attention(q, k, v, key_mask=key_mask, causal=causal, scale=scale, interpret=interpret)


def _as_gpu(facts):
    """An explicit "cudnn" is checked as if on a GPU (on another platform cuDNN cannot run at all)."""
    return facts if facts.platform == "gpu" else dataclasses.replace(facts, platform="gpu")


def grouped(q, hkv):
    """(b, sq, h, d) -> (b, hkv, g, sq, d) with head n = kv_head * g + j (GQA grouping)."""
    b, sq, h, d = q.shape
    return q.reshape(b, sq, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4)


def ungrouped(o):
    b, hkv, g, sq, d = o.shape
    return o.transpose(0, 3, 1, 2, 4).reshape(b, sq, hkv * g, d)


def mask_bias(q_pos, k_pos, key_mask_blk, causal, bias_fn, hkv, g):
    """Additive float32 bias (b|1, hkv, g, bq, bk) for one (query block, key block) pair."""
    bias = jnp.zeros((1, 1, 1, q_pos.shape[0], k_pos.shape[0]), jnp.float32)
    if bias_fn is not None:
        hb = jnp.broadcast_to(bias_fn(q_pos, k_pos).astype(jnp.float32),
                              (hkv * g, q_pos.shape[0], k_pos.shape[0]))
        bias = bias + hb.reshape(1, hkv, g, q_pos.shape[0], k_pos.shape[0])
    allowed = jnp.ones((1, 1, 1, q_pos.shape[0], k_pos.shape[0]), bool)
    if causal:
        allowed = allowed & (k_pos[None, :] <= q_pos[:, None])[None, None, None]
    if key_mask_blk is not None:
        allowed = allowed & key_mask_blk[:, None, None, None, :]
    return jnp.where(allowed, bias, _NEG)


def xla(q, k, v, key_mask, causal, bias_fn, scale):
    hkv, g = k.shape[2], q.shape[2] // k.shape[2]
    qg = grouped(q, hkv).astype(jnp.float32)
    kt = k.transpose(0, 2, 1, 3).astype(jnp.float32)
    vt = v.transpose(0, 2, 1, 3).astype(jnp.float32)
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qg, kt) * scale
    s = s + mask_bias(jnp.arange(q.shape[1]), jnp.arange(k.shape[1]), key_mask, causal, bias_fn, hkv, g)
    p = jax.nn.softmax(s, axis=-1)
    return ungrouped(jnp.einsum("bhgqk,bhkd->bhgqd", p, vt)).astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# blockwise (flash) attention in pure JAX


def pad_to(x, axis, multiple):
    n = x.shape[axis]
    pad = (-n) % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def blockwise(q, k, v, key_mask, causal, bias_fn, scale, block_q, block_k):
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    bq, bk = min(block_q, sq), min(block_k, sk)
    valid = jnp.ones((b, sk), bool) if key_mask is None else key_mask.astype(bool)
    valid = pad_to(valid, 1, bk)  # padded keys are masked out
    qg = pad_to(grouped(q, hkv), 3, bq)
    kt = pad_to(k.transpose(0, 2, 1, 3), 2, bk)
    vt = pad_to(v.transpose(0, 2, 1, 3), 2, bk)
    cfg = BlockwiseConfig(causal=causal, bias_fn=bias_fn, scale=scale, bq=bq, bk=bk)
    out = flash(cfg, qg, kt, vt, valid)
    return ungrouped(out[:, :, :, :sq]).astype(q.dtype)


class BlockwiseConfig:
    """Static (hashable) settings of one blockwise call."""

    def __init__(self, *, causal, bias_fn, scale, bq, bk):
        self.causal, self.bias_fn, self.scale, self.bq, self.bk = causal, bias_fn, scale, bq, bk

    def key(self):
        return (self.causal, self.bias_fn, self.scale, self.bq, self.bk)

    def __hash__(self):
        return hash(self.key())

    def __eq__(self, other):
        return isinstance(other, BlockwiseConfig) and self.key() == other.key()


def _scores(cfg, qi, kj, i, j, valid_j):
    """float32 scores + bias for query block i and key block j: (b, hkv, g, bq, bk)."""
    hkv, g = qi.shape[1], qi.shape[2]
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qi, kj, preferred_element_type=jnp.float32) * cfg.scale
    q_pos = i * cfg.bq + jnp.arange(cfg.bq)
    k_pos = j * cfg.bk + jnp.arange(cfg.bk)
    return s + mask_bias(q_pos, k_pos, valid_j, cfg.causal, cfg.bias_fn, hkv, g)


def _blocks(x, axis, size):
    """Split `axis` into (n, size) and move n to the front: (n, ..., size, ...)."""
    shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def forward(cfg, q, k, v, valid):
    """Returns out (b, hkv, g, sq, d) in q's dtype and logsumexp (b, hkv, g, sq) float32."""
    kb, vb = _blocks(k, 2, cfg.bk), _blocks(v, 2, cfg.bk)
    validb = _blocks(valid, 1, cfg.bk)

    def one_q_block(args):
        i, qi = args

        def step(carry, xs):
            m, l, acc = carry
            j, kj, vj, valid_j = xs
            s = _scores(cfg, qi, kj, i, j, valid_j)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(-1)
            acc = acc * corr[..., None] + jnp.einsum(
                "bhgqk,bhkd->bhgqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
            return (m_new, l, acc), None

        shape = qi.shape[:-1]
        init = (jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(qi.shape, jnp.float32))
        (m, l, acc), _ = jax.lax.scan(step, init, (jnp.arange(kb.shape[0]), kb, vb, validb))
        l = jnp.maximum(l, 1e-30)
        return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

    qb = _blocks(q, 3, cfg.bq)
    out, lse = jax.lax.map(one_q_block, (jnp.arange(qb.shape[0]), qb))
    b, hkv, g, sq, d = q.shape
    return (jnp.moveaxis(out, 0, 3).reshape(b, hkv, g, sq, d),
            jnp.moveaxis(lse, 0, 3).reshape(b, hkv, g, sq))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def flash(cfg, q, k, v, valid):
    return forward(cfg, q, k, v, valid)[0]


def _flash_fwd(cfg, q, k, v, valid):
    out, lse = forward(cfg, q, k, v, valid)
    return out, (q, k, v, valid, out, lse)


def flash_backward(cfg, res, dout):
    """Flash-attention backward: per key block, accumulate dk/dv over query blocks; dq is carried."""
    q, k, v, valid, out, lse = res
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)  # (b, hkv, g, sq)
    qb, dob = _blocks(q, 3, cfg.bq), _blocks(dout, 3, cfg.bq)
    lseb, deltab = _blocks(lse, 3, cfg.bq), _blocks(delta, 3, cfg.bq)
    kb, vb, validb = _blocks(k, 2, cfg.bk), _blocks(v, 2, cfg.bk), _blocks(valid, 1, cfg.bk)

    def key_block(dq, xs):
        j, kj, vj, valid_j = xs

        def query_block(carry, ys):
            dk, dv = carry
            i, qi, doi, lsei, deltai = ys
            s = _scores(cfg, qi, kj, i, j, valid_j)
            p = jnp.exp(s - lsei[..., None])
            dv = dv + jnp.einsum("bhgqk,bhgqd->bhkd", p, doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bhgqd,bhkd->bhgqk", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - deltai[..., None]) * cfg.scale
            dk = dk + jnp.einsum("bhgqk,bhgqd->bhkd", ds, qi, preferred_element_type=jnp.float32)
            dqi = jnp.einsum("bhgqk,bhkd->bhgqd", ds, kj, preferred_element_type=jnp.float32)
            return (dk, dv), dqi

        init = (jnp.zeros(kj.shape, jnp.float32), jnp.zeros(vj.shape, jnp.float32))
        (dk, dv), dq_j = jax.lax.scan(query_block, init, (jnp.arange(qb.shape[0]), qb, dob, lseb, deltab))
        return dq + dq_j, (dk, dv)

    dq0 = jnp.zeros(qb.shape, jnp.float32)
    dqb, (dkb, dvb) = jax.lax.scan(key_block, dq0, (jnp.arange(kb.shape[0]), kb, vb, validb))
    b, hkv, g, sq, d = q.shape
    dq = jnp.moveaxis(dqb, 0, 3).reshape(q.shape)
    dk = jnp.moveaxis(dkb, 0, 2).reshape(k.shape)
    dv = jnp.moveaxis(dvb, 0, 2).reshape(v.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


flash.defvjp(_flash_fwd, flash_backward)


# ----------------------------------------------------------------------------------------------
# cuDNN


def cudnn(q, k, v, key_mask, causal, bias_fn, scale, block_q, block_k):
    """cuDNN flash attention. A key mask must be a prefix of valid keys (passed as lengths; the
    selection rule sends no other here)."""
    if bias_fn is not None or q.dtype not in (jnp.bfloat16, jnp.float16):
        return blockwise(q, k, v, key_mask, causal, bias_fn, scale, block_q, block_k)
    return cudnn_attention(q, k, v, key_mask=key_mask, causal=causal, scale=scale)
