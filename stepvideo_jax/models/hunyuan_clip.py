"""Hunyuan-CLIP text encoder: a BERT encoder (transformers `BertModel`, no pooler), 351M parameters.

Inputs: `input_ids` (b, s) int, `attention_mask` (b, s) 1 = real token (keys only: every position,
padding included, is computed as a query), `token_type_ids` (b, s) (zeros when omitted, as the
official call passes none). Output: `last_hidden_state` (b, s, d) at all s positions; the DiT
consumes all 77 of them, padded ones included.

Post-LN BERT: embeddings `LN(word[ids] + token_type[tt] + position[0..s))`, then per layer
`h = LN(x + Dense(SelfAttn(x)))`, `x = LN(h + Dense(GELU(Dense(h))))`, exact (erf) GELU, LayerNorm
eps 1e-12. The pooler is left out: the release has no pooler weights (transformers initialised it at
random) and the pipeline discards its output.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from stepvideo_jax.models import layers
from stepvideo_jax.models.attention import attention
from stepvideo_jax.models.layers import LayerNorm, Linear
from stepvideo_jax.parallel.rules import constrain

ACT = ("batch", "text_length", "act_embed")


@dataclasses.dataclass(frozen=True)
class HunyuanClipConfig:
    """`BertConfig` values the encoder uses (defaults: the released full size)."""

    vocab_size: int = 47020
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def full(cls) -> "HunyuanClipConfig":
        return cls()


class Embeddings(nnx.Module):
    """Word + token-type + absolute position embeddings, then LayerNorm."""

    def __init__(self, cfg: HunyuanClipConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.02)
        # Sharded over the width only: the released vocabulary (47,020 = 4 x 11,755) does not split
        # over a tensor axis of 8, and the table (48M parameters) is small.
        self.word_embeddings = layers.param(rngs, init, (cfg.vocab_size, cfg.hidden_size),
                                            (None, "embed"), param_dtype)
        self.position_embeddings = layers.param(rngs, init, (cfg.max_position_embeddings, cfg.hidden_size),
                                                (None, "embed"), param_dtype)
        self.token_type_embeddings = layers.param(rngs, init, (cfg.type_vocab_size, cfg.hidden_size),
                                                  (None, "embed"), param_dtype)
        self.layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.dtype = dtype

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        s = input_ids.shape[1]
        x = jnp.take(self.word_embeddings[...], input_ids, axis=0).astype(self.dtype)
        x = x + jnp.take(self.token_type_embeddings[...], token_type_ids, axis=0).astype(self.dtype)
        x = x + self.position_embeddings[...][:s].astype(self.dtype)[None]
        return self.layer_norm(x)


class SelfAttention(nnx.Module):
    """Bidirectional multi-head attention with padded keys masked; q/k/v/out Linear with bias."""

    def __init__(self, cfg: HunyuanClipConfig, *, dtype, param_dtype, backend: Optional[str], rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = Linear(d, d, axes=("embed", "heads"), **kw)
        self.key = Linear(d, d, axes=("embed", "heads"), **kw)
        self.value = Linear(d, d, axes=("embed", "heads"), **kw)
        self.out = Linear(d, d, axes=("heads", "embed"), **kw)
        self.num_heads = cfg.num_heads
        self.backend = backend

    def __call__(self, x: jax.Array, key_mask: Optional[jax.Array]) -> jax.Array:
        b, s, d = x.shape

        def heads(t):  # (b, s, d) -> (b, s, h, d/h)
            return constrain(t.reshape(b, s, self.num_heads, d // self.num_heads),
                             ("batch", "text_length", "act_heads", None))

        o = attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
                      key_mask=key_mask, backend=self.backend)
        return self.out(o.reshape(b, s, d))


class Layer(nnx.Module):
    """One post-LN BERT layer."""

    def __init__(self, cfg: HunyuanClipConfig, *, dtype, param_dtype, backend: Optional[str], rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention = SelfAttention(cfg, backend=backend, **kw)
        self.attention_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.intermediate = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.output = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)
        self.output_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, key_mask: Optional[jax.Array]) -> jax.Array:
        h = self.attention_norm(x + self.attention(x, key_mask))
        f = jax.nn.gelu(self.intermediate(h), approximate=False)
        f = constrain(f, ("batch", "text_length", "act_mlp"))
        return constrain(self.output_norm(h + self.output(f)), ACT)


class HunyuanClip(nnx.Module):
    """The BERT text tower of Hunyuan-CLIP; see the module docstring for inputs and output.

    `dtype`: compute dtype (the official deployment runs float32); `param_dtype`: storage dtype.
    `attention_backend`: see `models/attention.py` (None = the platform default).
    """

    def __init__(self, cfg: HunyuanClipConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_backend: Optional[str] = None, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = cfg
        self.embeddings = Embeddings(cfg, **kw)
        self.layers = nnx.List([Layer(cfg, backend=attention_backend, **kw) for _ in range(cfg.num_layers)])

    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
                 token_type_ids: Optional[jax.Array] = None, *, capture: bool = False) -> jax.Array:
        """`last_hidden_state` (b, s, d). `attention_mask=None` attends to every key.

        `capture=True` sows `embedding_out` (the embedding output) and `layer_out` (each layer's
        output) as `nnx.Intermediate`s.
        """
        b, s = input_ids.shape
        if s > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {s} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if attention_mask is not None and attention_mask.shape != (b, s):
            raise ValueError(f"attention_mask {attention_mask.shape} does not match input_ids {(b, s)}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, s), jnp.int32)
        key_mask = None if attention_mask is None else attention_mask.astype(bool)
        x = constrain(self.embeddings(input_ids, token_type_ids), ACT)
        if capture:
            self.sow(nnx.Intermediate, "embedding_out", x)
        for layer in self.layers:
            x = layer(x, key_mask)
            if capture:
                self.sow(nnx.Intermediate, "layer_out", x)
        return x
