"""Step-LLM (`Step1Model` as released): the 19.6B decoder-only text encoder of Step-Video-T2V.

Input: token ids (b, s) from the Step-LLM tokenizer (right-padded with id 2). Output: the residual
stream after the last block, (b, s, d), at every position, padded ones included: there is no final
norm and no output head, and the padding mask is not used by the attention (causality alone keeps
the valid prefix independent of the padding that follows it).

Block: `h = x + wo(attn(rms(x)))`, `x = h + down(silu(gate(rms(h))) * up(rms(h)))`. Attention is
causal grouped-query attention (query head n uses kv group n // (heads / groups)) with a square-root
ALiBi bias `-slope[n] * sqrt(i - j)` added after the 1/sqrt(head_dim) scaling; the official code runs
it in a closed CUDA kernel, whose semantics are documented in the `step_llm` fixture README.

Parameter layout (ours): kernels (in, out); the official fused `wqkv` (q, then k/v interleaved per
group) is stored as separate `wq`, `wk`, `wv`, and the fused SwiGLU `w1` as `gate` and `up`, so that
each kernel shards on whole heads / MLP columns.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepvideo_jax.models import layers, stack
from stepvideo_jax.models.attention import attention
from stepvideo_jax.models.layers import Linear, RMSNorm
from stepvideo_jax.parallel.rules import constrain

ACT = ("batch", "text_length", "act_embed")
HEADS = ("batch", "text_length", "act_heads", None)


@dataclasses.dataclass(frozen=True)
class StepLLMConfig:
    vocab_size: int = 65536
    hidden_size: int = 6144
    num_heads: int = 48
    num_kv_groups: int = 8
    num_layers: int = 48
    ffn_hidden_size: int = 16896  # as in config.json; the code rounds it up to a multiple of 256
    eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_groups:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_groups "
                             f"{self.num_kv_groups}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_inner(self) -> int:
        """SwiGLU width: `ffn_hidden_size` rounded up to a multiple of 256 (official FeedForward)."""
        return 256 * math.ceil(self.ffn_hidden_size / 256)

    @classmethod
    def full(cls) -> "StepLLMConfig":
        return cls()


def alibi_sqrt_slopes(num_heads: int) -> np.ndarray:
    """ALiBi slopes (num_heads,) float32 in query-head order (official two-branch formula).

    n = 2**floor(log2(heads)); slopes 2**(-8k/n) for k = 1..n, then, if n < heads, 2**(-4m/n) for the
    odd m = 1, 3, ... (heads - n of them).
    """
    n = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]
    slopes += [2.0 ** (-4.0 * m / n) for m in range(1, 2 * (num_heads - n), 2)]
    return np.asarray(slopes, np.float32)


@dataclasses.dataclass(frozen=True)
class AlibiSqrtBias:
    """`bias_fn` for `attention`: (q_pos (sq,), k_pos (sk,)) -> (h, sq, sk) float32 `-slope*sqrt(i-j)`.

    Evaluated per attention block, so no (h, s, s) tensor is kept; keys after the query (j > i) get
    0 here and are removed by the causal mask. Hashable (slopes as a tuple), as `attention` requires.
    """

    slopes: tuple[float, ...]

    def __call__(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
        dist = jnp.maximum(q_pos[:, None] - k_pos[None, :], 0).astype(jnp.float32)
        return -jnp.asarray(self.slopes, jnp.float32)[:, None, None] * jnp.sqrt(dist)[None]


class Attention(nnx.Module):
    """Causal GQA with square-root ALiBi; x (b, s, d) -> (b, s, d)."""

    def __init__(self, cfg: StepLLMConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg = cfg
        self.wq = Linear(d, cfg.num_heads * hd, axes=("embed", "heads"), **kw)
        self.wk = Linear(d, cfg.num_kv_groups * hd, axes=("embed", "kv_heads"), **kw)
        self.wv = Linear(d, cfg.num_kv_groups * hd, axes=("embed", "kv_heads"), **kw)
        self.wo = Linear(cfg.num_heads * hd, d, axes=("heads", "embed"), **kw)
        self.bias = AlibiSqrtBias(tuple(float(s) for s in alibi_sqrt_slopes(cfg.num_heads)))

    def __call__(self, x, *, backend: Optional[str] = None, capture: bool = False):
        b, s, _ = x.shape
        cfg = self.cfg
        q = constrain(self.wq(x).reshape(b, s, cfg.num_heads, cfg.head_dim), HEADS)
        k = constrain(self.wk(x).reshape(b, s, cfg.num_kv_groups, cfg.head_dim), HEADS)
        v = constrain(self.wv(x).reshape(b, s, cfg.num_kv_groups, cfg.head_dim), HEADS)
        o = attention(q, k, v, causal=True, bias_fn=self.bias, scale=cfg.head_dim ** -0.5, backend=backend)
        _sow(self, capture, q=q, k=k, v=v, core_out=o)
        return self.wo(o.reshape(b, s, cfg.num_heads * cfg.head_dim))


class FeedForward(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`, width `cfg.ffn_inner`."""

    def __init__(self, cfg: StepLLMConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.ffn_inner
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.up = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.down = Linear(f, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x, *, capture: bool = False):
        g, u = self.gate(x), self.up(x)
        _sow(self, capture, gate_out=g, up_out=u)
        h = constrain(jax.nn.silu(g) * u, ("batch", "text_length", "act_mlp"))
        return self.down(h)


class Block(nnx.Module):
    """Pre-norm block: attention then SwiGLU, each with an RMSNorm (float32 statistics)."""

    def __init__(self, cfg: StepLLMConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention_norm = RMSNorm(cfg.hidden_size, eps=cfg.eps, param_dtype=param_dtype)
        self.attention = Attention(cfg, **kw)
        self.ffn_norm = RMSNorm(cfg.hidden_size, eps=cfg.eps, param_dtype=param_dtype)
        self.feed_forward = FeedForward(cfg, **kw)

    def __call__(self, x, *, backend: Optional[str] = None, capture: bool = False):
        a = self.attention_norm(x)
        h = x + self.attention(a, backend=backend, capture=capture)
        f = self.ffn_norm(h)
        out = constrain(h + self.feed_forward(f, capture=capture), ACT)
        _sow(self, capture, attention_norm_out=a, ffn_norm_out=f, out=out)
        return out


class StepLLM(nnx.Module):
    """Token ids (b, s) int -> hidden states (b, s, d) in `dtype`; see the module docstring."""

    def __init__(self, cfg: StepLLMConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        self.embed = layers.param(rngs, lambda k, s, dt: jax.random.normal(k, s, jnp.float32).astype(dt),
                                  (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype)
        self.layers = stack.build(
            lambda r: Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.num_layers, rngs)
        self.unroll_layers = False  # True: the pre-scan program (N layer copies), for comparisons
        self.offload_layers = False  # True: `layers` lives in host memory (models/offload.py)

    def __call__(self, input_ids, *, backend: Optional[str] = None, capture: bool = False):
        """`capture` sows `embeddings` and the layers' internals and outputs (`layers/out`), each with
        the layer axis first (run it under `nnx.capture`). The layers are one stacked module run
        under one scan (`models/stack.py`)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids {input_ids.shape} should be (batch, length)")
        x = constrain(jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype), ACT)
        _sow(self, capture, embeddings=x)
        return stack.scan(self.layers, lambda block, h: block(h, backend=backend, capture=capture), x,
                          carry_axes=ACT, capture=capture, unroll=self.unroll_layers,
                          offload=self.offload_layers)


def _sow(module: nnx.Module, capture: bool, **arrays):
    if capture:
        for name, value in arrays.items():
            module.sow(nnx.Intermediate, name, value)
