"""Sequence-parallel attention: Ulysses, ring, and Ulysses inside ring, via `jax.shard_map`.

Reached through the attention entry point (`attention(..., backend="ring")` or a
`SequenceParallel` config as the backend), so model code never names a mesh axis: the axes come
from the rules table, `batch` -> data/fsdp, `length` -> sequence (degree n), `act_heads` -> tensor.
Layouts are those of `models/attention.py`: q (b, s, h, d), k/v (b, s, hkv, d).

Modes of self-attention (all of q, k, v sharded along the sequence):
- "ulysses": all-to-all from sequence-sharded to head-sharded, local attention over the full
  length on h/n heads, all-to-all back. n must divide the local kv-head count.
- "ring": each device keeps its query block while the K/V blocks travel around the ring
  (`ppermute`, n steps); partial results are merged by log-sum-exp. Any n. Its backward is a second
  ring pass in which dK/dV travel with their blocks and arrive home after the last step.
- "ulysses_ring": Ulysses inside groups of u consecutive devices, ring across the n/u groups
  (for degrees Ulysses alone cannot reach); u defaults to the largest divisor of n that divides the
  local kv-head count.

A length that n does not divide is padded at the end: padded keys are masked, padded queries
dropped. Cross-attention (`cross=True`: k/v are a short replicated sequence such as text) shards
only the queries and attends each shard to all keys. Without an ambient mesh, or with a sequence
degree of 1, every mode is the local attention. The ring's per-block kernels are the forward and
backward of the blockwise backend.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from stepvideo_jax.models import attention_kernels as attn
from stepvideo_jax.parallel.rules import LOGICAL_RULES, Rules, logical_to_spec

MODES = ("ulysses", "ring", "ulysses_ring")


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """How self-attention is split along the sequence; pass it (or just `mode`) as the backend.

    ulysses_degree: "ulysses_ring" only, the Ulysses group size (None: the largest that works).
    local_backend: the attention backend each device runs (None: the platform default).
    block_q, block_k: block sizes of the local kernels.
    """

    mode: str = "ring"
    ulysses_degree: Optional[int] = None
    local_backend: Optional[str] = None
    block_q: int = 512
    block_k: int = 512

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown sequence-parallel mode {self.mode!r}; choose one of {MODES}")
        if self.ulysses_degree is not None and (self.mode != "ulysses_ring" or self.ulysses_degree < 1):
            raise ValueError(f"ulysses_degree={self.ulysses_degree} is only valid as a positive size "
                             "with mode 'ulysses_ring'")
        if self.local_backend is not None and self.local_backend not in attn.BACKENDS:
            raise ValueError(f"local_backend {self.local_backend!r} must be one of {attn.BACKENDS}")

    @classmethod
    def of(cls, backend) -> "SequenceParallel":
        return backend if isinstance(backend, cls) else cls(mode=backend)


def parse_backend(text: str):
    """A command line's attention backend: a kernel name ("splash", "blockwise", "xla", "cudnn"), or
    "mode:local" for sequence parallelism, e.g. "ulysses:splash" (a `SequenceParallel`)."""
    if ":" not in text:
        return text
    mode, local = text.split(":", 1)
    return SequenceParallel(mode=mode, local_backend=local or None)


def sequence_parallel_attention(q, k, v, config, *, key_mask=None, causal=False, bias_fn=None,
                                scale=None, cross=False, rules: Rules = LOGICAL_RULES,
                                key_mask_is_prefix: bool = False):
    """Attention (see `models/attention.py`) split over the mesh by `config` (a mode or
    `SequenceParallel`). Causal masks and `bias_fn` need the whole sequence on one device, so with
    n > 1 they are accepted by self-attention in "ulysses" mode only. `key_mask_is_prefix` reaches
    the per-device attention of the cross and Ulysses paths, where the keys are whole (padding
    keys added here go at the end, so a prefix stays a prefix)."""
    config = SequenceParallel.of(config)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    local = functools.partial(attn.local_attention, scale=scale, backend=config.local_backend,
                              block_q=config.block_q, block_k=config.block_k,
                              key_mask_is_prefix=key_mask_is_prefix or key_mask is None)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, key_mask=key_mask, causal=causal, bias_fn=bias_fn)
    b, s, h, d = q.shape
    hkv = k.shape[2]
    batch, seq, heads = _mesh_axes(mesh, rules, b, h, hkv)
    n = mesh.shape[seq] if seq else 1
    h_local, hkv_local = h // _size(mesh, heads), hkv // _size(mesh, heads)
    if n > 1 and (causal or bias_fn is not None) and (cross or config.mode != "ulysses"):
        raise ValueError(f"causal / bias_fn attention with sequence degree {n} needs mode 'ulysses' "
                         f"(self-attention), got mode {config.mode!r}{' (cross)' if cross else ''}")
    qkv_spec = P(batch, seq, heads, None)
    if cross:
        qp = attn.pad_to(q, 1, n)
        valid = jnp.ones(k.shape[:2], bool) if key_mask is None else key_mask.astype(bool)
        fn = lambda q, k, v, m: local(q, k, v, key_mask=m)
        kv_spec = P(batch, None, heads, None)
        out = jax.shard_map(fn, in_specs=(qkv_spec, kv_spec, kv_spec, P(batch, None)),
                            out_specs=qkv_spec, check_vma=False)(qp, k, v, valid)
        return out[:, :s]

    if k.shape[1] != s:
        raise ValueError(f"self-attention needs equal query and key lengths, got {s} and {k.shape[1]}; "
                         "pass cross=True for a separate key sequence")
    u = _ulysses_degree(config, n, h_local, hkv_local)
    masked = key_mask is not None or s % n != 0
    valid = jnp.ones((b, s), bool) if key_mask is None else key_mask.astype(bool)
    qp, kp, vp, valid = (attn.pad_to(x, 1, n) for x in (q, k, v, valid))
    shard = functools.partial(_self_attention_shard, axis=seq, n=n, u=u, masked=masked, local=local,
                              causal=causal, bias_fn=bias_fn, config=config, scale=scale)
    out = jax.shard_map(shard, in_specs=(qkv_spec, qkv_spec, qkv_spec, P(batch, seq)),
                        out_specs=qkv_spec, check_vma=False)(qp, kp, vp, valid)
    return out[:, :s]


def _self_attention_shard(q, k, v, valid, *, axis, n, u, masked, local, causal, bias_fn, config, scale):
    """Per device: q/k/v (b, s/n, h', d), valid (b, s/n) -> (b, s/n, h', d)."""
    groups = None if u == n else [list(range(g * u, (g + 1) * u)) for g in range(n // u)]
    if u > 1:
        q, k, v = (_sequence_to_heads(x, axis, groups) for x in (q, k, v))
        valid = jax.lax.all_gather(valid, axis, axis=1, tiled=True, axis_index_groups=groups)
    if u == n:
        o = local(q, k, v, key_mask=valid if masked else None, causal=causal, bias_fn=bias_fn)
    else:
        ring = _Ring(axis=axis, devices=n, stride=u)
        o = _ring_attention(q, k, v, valid, ring, scale=scale, block_q=config.block_q,
                           block_k=config.block_k)
    if u > 1:
        o = _heads_to_sequence(o, axis, groups)
    return o


def _sequence_to_heads(x, axis, groups):
    """(b, s', h, d) -> (b, u*s', h/u, d): gather the group's sequence, keep 1/u of the heads."""
    return jax.lax.all_to_all(x, axis, 2, 1, tiled=True, axis_index_groups=groups)


def _heads_to_sequence(x, axis, groups):
    """(b, u*s', h/u, d) -> (b, s', h, d), the inverse of `_sequence_to_heads`."""
    return jax.lax.all_to_all(x, axis, 1, 2, tiled=True, axis_index_groups=groups)


def _ulysses_degree(config: SequenceParallel, n: int, h_local: int, hkv_local: int) -> int:
    if config.mode == "ring" or n == 1:
        return 1
    if config.mode == "ulysses":
        if hkv_local % n:
            raise ValueError(f"Ulysses degree {n} must divide the local head counts (q {h_local}, "
                             f"kv {hkv_local} per tensor shard); use mode 'ring' or 'ulysses_ring'")
        return n
    u = config.ulysses_degree or math.gcd(n, hkv_local)
    if n % u or hkv_local % u:
        raise ValueError(f"ulysses_degree {u} must divide the sequence degree {n} and the local kv "
                         f"head count {hkv_local}")
    return u


def _mesh_axes(mesh, rules, b, h, hkv):
    """Mesh axes of (batch, sequence, heads); batch/head axes that do not divide are dropped."""
    batch, seq, heads = logical_to_spec(("batch", "length", "act_heads"), mesh, rules)
    if isinstance(seq, tuple):
        raise ValueError(f"sequence parallelism needs logical 'length' on one mesh axis, got {seq}")
    kept, prod = [], 1
    for a in (batch,) if isinstance(batch, str) else tuple(batch or ()):
        if b % (prod * mesh.shape[a]) == 0:
            kept.append(a)
            prod *= mesh.shape[a]
    batch = kept[0] if len(kept) == 1 else (tuple(kept) or None)
    if heads is not None and (h % _size(mesh, heads) or hkv % _size(mesh, heads)):
        heads = None
    return batch, seq, heads


def _size(mesh, axes) -> int:
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


# ----------------------------------------------------------------------------------------------
# ring attention


@dataclasses.dataclass(frozen=True)
class _Ring:
    """A ring over mesh axis `axis` of `devices` devices; neighbours are `stride` apart, so the
    ring visits devices / stride K/V blocks (stride = Ulysses group size)."""

    axis: str
    devices: int
    stride: int

    @property
    def size(self) -> int:
        return self.devices // self.stride

    def shift(self, *xs):
        perm = [(i, (i + self.stride) % self.devices) for i in range(self.devices)]
        return tuple(jax.lax.ppermute(x, self.axis, perm) for x in xs)


def _ring_attention(q, k, v, valid, ring: _Ring, *, scale, block_q=512, block_k=512):
    """Inside `shard_map`: local q (b, sq, h, d), k/v (b, sk, hkv, d), valid (b, sk) -> (b, sq, h, d)."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    bq, bk = min(block_q, sq), min(block_k, sk)
    cfg = attn.BlockwiseConfig(causal=False, bias_fn=None, scale=scale, bq=bq, bk=bk)
    qg = attn.pad_to(attn.grouped(q, hkv), 3, bq)
    kt = attn.pad_to(k.transpose(0, 2, 1, 3), 2, bk)
    vt = attn.pad_to(v.transpose(0, 2, 1, 3), 2, bk)
    out = _ring(cfg, ring, qg, kt, vt, attn.pad_to(valid, 1, bk))
    return attn.ungrouped(out[:, :, :, :sq]).astype(q.dtype)


def _ring_forward(cfg, ring, q, k, v, valid):
    """Grouped layout: q (b, hkv, g, sq, d), k/v (b, hkv, sk, d) -> out (q dtype), lse (float32)."""
    o, lse = attn.forward(cfg, q, k, v, valid)

    def step(carry, _):
        o, lse, k, v, valid = carry
        k, v, valid = ring.shift(k, v, valid)
        o_j, lse_j = attn.forward(cfg, q, k, v, valid)
        new = jnp.logaddexp(lse, lse_j)
        o = o * jnp.exp(lse - new)[..., None] + o_j.astype(jnp.float32) * jnp.exp(lse_j - new)[..., None]
        return (o, new, k, v, valid), None

    (o, lse, *_), _ = jax.lax.scan(step, (o.astype(jnp.float32), lse, k, v, valid), None,
                                   length=ring.size - 1)
    return o.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ring(cfg, ring, q, k, v, valid):
    return _ring_forward(cfg, ring, q, k, v, valid)[0]


def _ring_fwd(cfg, ring, q, k, v, valid):
    out, lse = _ring_forward(cfg, ring, q, k, v, valid)
    return out, (q, k, v, valid, out, lse)


def _ring_bwd(cfg, ring, res, dout):
    """With the global out/lse, each K/V block's flash backward gives its exact share of dq and
    its full dk/dv; dk/dv ride along with the block and one last shift brings them home."""
    q, k, v, valid, out, lse = res

    def grads(k, v, valid):
        dq, dk, dv, _ = attn.flash_backward(cfg, (q, k, v, valid, out, lse), dout)
        return dq.astype(jnp.float32), dk.astype(jnp.float32), dv.astype(jnp.float32)

    def step(carry, _):
        dq, k, v, valid, dk, dv = carry
        k, v, valid, dk, dv = ring.shift(k, v, valid, dk, dv)
        dq_j, dk_j, dv_j = grads(k, v, valid)
        return (dq + dq_j, k, v, valid, dk + dk_j, dv + dv_j), None

    dq, dk, dv = grads(k, v, valid)
    (dq, *_, dk, dv), _ = jax.lax.scan(step, (dq, k, v, valid, dk, dv), None, length=ring.size - 1)
    dk, dv = ring.shift(dk, dv)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)
