"""The one attention entry point, with a backend per platform.

`attention(q, k, v, ...)`: q (b, sq, h, d), k/v (b, sk, hkv, d) with hkv dividing h (grouped-query
attention), returns (b, sq, h, d) in q's dtype. Softmax statistics are float32 in every backend.

Backends:
- "xla": materialises the (b, h, sq, sk) scores; for small inputs and as the reference in tests.
- "blockwise": pure JAX, online softmax over key blocks inside a map over query blocks, so memory is
  O(block_q x block_k) per head, with a custom backward that recomputes scores block by block (flash
  attention's algorithm). The CPU default and the fallback everywhere.
- "cudnn": cuDNN flash attention via `jax.nn.dot_product_attention` (GPU, bf16/f16).
- "splash": Pallas splash attention (TPU; `interpret=True` runs it on CPU for tests).

The kernels live in `models/attention_kernels.py`, the sequence-parallel modes in
`models/sequence_parallel.py`. `backend=None` asks the one selection rule,
`models/attention_backend.py` (TPU -> splash, GPU -> cudnn where cuDNN can run the case, else
blockwise; CPU -> blockwise); an explicit "cudnn" is checked by the same rule and falls back to
blockwise, logged once, where cuDNN cannot run the case.
"""
from __future__ import annotations

import math
from typing import Optional

from stepvideo_jax.models import attention_kernels as kernels
from stepvideo_jax.models.attention_kernels import BACKENDS, BiasFn
from stepvideo_jax.models.sequence_parallel import MODES as SEQUENCE_PARALLEL_BACKENDS
from stepvideo_jax.models.sequence_parallel import sequence_parallel_attention


def attention(q, k, v, *, key_mask=None, causal: bool = False, bias_fn: Optional[BiasFn] = None,
              scale: Optional[float] = None, backend=None,
              block_q: int = 512, block_k: int = 512, interpret: bool = False, cross: bool = False,
              key_mask_is_prefix: bool = False):
    """Scaled dot-product attention; see the module docstring for layouts and backends.

    key_mask: (b, sk) bool, True where a key may be attended. causal: query i sees keys j <= i.
    bias_fn(q_pos, k_pos) -> float32 bias broadcastable to (h, len(q_pos), len(k_pos)), evaluated per
    block (e.g. ALiBi), never as a full (h, sq, sk) tensor. `key_mask_is_prefix=True` promises that
    each row's valid keys are a prefix (e.g. the DiT's text keys), which cuDNN takes as lengths.
    backend may also be a sequence-parallel mode ("ulysses", "ring", "ulysses_ring") or a
    `models.sequence_parallel.SequenceParallel`; `cross=True` tells it that k/v are a separate,
    unsharded sequence (e.g. text keys), so only the queries are split.
    """
    b, sq, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} are not (b, sq, h, d) / "
                         "(b, sk, hkv, d) with hkv dividing h")
    if key_mask is not None and key_mask.shape != (b, k.shape[1]):
        raise ValueError(f"attention: key_mask {key_mask.shape} should be (b, sk) = {(b, k.shape[1])}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if not isinstance(backend, (str, type(None))) or backend in SEQUENCE_PARALLEL_BACKENDS:
        return sequence_parallel_attention(q, k, v, backend, key_mask=key_mask, causal=causal,
                                           bias_fn=bias_fn, scale=scale, cross=cross,
                                           key_mask_is_prefix=key_mask_is_prefix)
    if backend is not None and backend not in kernels.BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of "
                         f"{kernels.BACKENDS + SEQUENCE_PARALLEL_BACKENDS}")
    return kernels.local_attention(q, k, v, key_mask=key_mask, causal=causal, bias_fn=bias_fn, scale=scale,
                                   backend=backend, block_q=block_q, block_k=block_k, interpret=interpret,
                                   key_mask_is_prefix=key_mask_is_prefix)
