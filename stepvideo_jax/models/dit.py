"""The Step-Video-T2V DiT (`StepVideoModel` as released), 29.3B parameters at full size.

Inputs: latents `x` (b, f, c, h, w); timestep `t` (b,) in [0, 1] (t = 0 noise, t = 1 data; x1000
inside); Step-LLM states `y` (b, l_text, caption_channels[0]); CLIP states `clip` (b, l_clip,
caption_channels[1]); `y_mask` (b, l_clip + l_text), 1 = valid, a prefix of ones per row. Output: the
velocity (data - noise), (b, f, c_out, h, w).

Step-Video-TI2V (`ti2v=True`, the release's `use_additional_conditions`): the patch embedding reads
`cat([x, condition], channels)` (2c input channels; `condition` (b, f, c, h, w) holds the image latent
on frame 0 and zeros after), and a motion-score embedding (the timestep's sinusoid -> MLP, of the raw
score: no x1000) is added to the timestep embedding, so it reaches both the blocks' AdaLN modulation
and the final layer's shift/scale. Everything else is the T2V forward; `ti2v=False` is T2V unchanged.

Tokens are ordered `(f h w)`; activations are (b, s, d). Cross-attention keeps every text key (static
shapes, no recompilation per prompt) and masks the invalid ones, where the official code truncates
to the longest valid length of the batch: the results are equal.

bf16 inference (`dtype=param_dtype=bfloat16`, as the released weights) reproduces the official bf16
casts: the timestep is cast to the compute dtype and multiplied by 1000 there (0.75 -> 752;
`timestep_in_compute_dtype`), the sinusoid is float32; RoPE angles are rounded to the token dtype
before cos/sin; RMSNorm normalises in float32 and casts back before the weight multiply; LayerNorm
statistics and the attention softmax are float32; with `mask_sum_in_compute_dtype` the text-mask
length is rounded to the compute dtype (397 -> 396). These two roundings are pinned with
`reduce_precision`: XLA otherwise keeps excess precision (0.75 would give 750). Error against the
float32 fixture: `tests/test_dit_bf16.py`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from stepvideo_jax.models import layers, stack
from stepvideo_jax.models.attention import attention
from stepvideo_jax.models.layers import Linear, LayerNorm, RMSNorm
from stepvideo_jax.models.rope import apply_rope, grid_positions
from stepvideo_jax.parallel.rules import constrain

ACT = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    num_layers: int = 48
    num_heads: int = 48
    head_dim: int = 128
    in_channels: int = 64
    out_channels: int = 64
    patch_size: int = 1
    caption_channels: tuple[int, int] = (6144, 1024)  # (Step-LLM width, CLIP width)
    norm_eps: float = 1e-6            # final norm, caption norm, q/k RMSNorm
    block_norm_eps: float = 1e-5      # norm1/norm2 of the blocks (fixed in the official code)
    rope_splits: tuple[int, int, int] = (64, 32, 32)
    rope_theta: float = 10000.0
    timestep_scale: float = 1000.0
    timestep_dim: int = 256
    # Reproduce the official bf16 pipeline's text-mask sum in the compute dtype (sums above 256 round
    # to even: 397 valid keys -> 396). Off by default: the exact count is used.
    mask_sum_in_compute_dtype: bool = False
    # Reproduce the official pipeline's timestep rounding: t cast to the compute dtype and x1000 there
    # (in bf16 0.75 -> 752, not 750). Off: x1000 in float32 (exact timestep, any compute dtype).
    timestep_in_compute_dtype: bool = True
    # Step-Video-TI2V: condition latents concatenated to the input, motion-score embedding.
    ti2v: bool = False

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def full(cls) -> "DiTConfig":
        return cls()


def rounded(x: jax.Array, dtype) -> jax.Array:
    """x cast to `dtype` and rounded to its precision even where XLA keeps excess precision.

    XLA may compute bf16 arithmetic in float32 and skip the rounding of intermediates
    (`xla_allow_excess_precision`); `reduce_precision` pins the official per-op bf16 rounding.
    """
    x = x.astype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        return x
    info = jnp.finfo(dtype)
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def timestep_sinusoid(t: jax.Array, dim: int, scale: float, dtype) -> jax.Array:
    """(b,) -> (b, dim) `[cos(a), sin(a)]`, a = (t*scale) * exp(-ln(1e4) j / (dim/2)), float32 math.

    As the official pipeline, t is cast to the compute dtype and multiplied there (in bf16,
    t = 0.9923 -> 992.0); the sinusoid is then computed in float32.
    """
    half = dim // 2
    t = rounded(rounded(t, dtype) * jnp.asarray(scale, dtype), dtype).astype(jnp.float32)
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    a = t[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(a), jnp.sin(a)], axis=-1)


class _Attention(nnx.Module):
    """q/k/v/o projections (no biases) and per-head q/k RMSNorm, shared by both attentions."""

    def __init__(self, cfg: DiTConfig, *, dtype, param_dtype, rngs):
        d, kw = cfg.dim, dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg = cfg
        self.q = Linear(d, d, axes=("embed", "heads"), **kw)
        self.k = Linear(d, d, axes=("embed", "heads"), **kw)
        self.v = Linear(d, d, axes=("embed", "heads"), **kw)
        self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.o = Linear(d, d, axes=("heads", "embed"), **kw)


class SelfAttention(_Attention):
    """QK-RMSNorm, 3-D RoPE, unmasked attention over all video tokens."""

    def __call__(self, x, positions, *, backend, capture):
        b, s, _ = x.shape
        heads = lambda z: z.reshape(b, s, self.cfg.num_heads, self.cfg.head_dim)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        q, k = self.q_norm(q), self.k_norm(k)
        _sow(self, capture, q_normed=q, k_normed=k, v_heads=v)
        q = apply_rope(q, positions, self.cfg.rope_splits, self.cfg.rope_theta)
        k = apply_rope(k, positions, self.cfg.rope_splits, self.cfg.rope_theta)
        o = attention(q, k, v, backend=backend)
        _sow(self, capture, q_rope=q, k_rope=k, core_out=o)
        return self.o(o.reshape(b, s, -1))


class CrossAttention(_Attention):
    """Video queries attend to [clip; text] keys; QK-RMSNorm, no RoPE, key mask."""

    def __call__(self, x, tokens, key_mask, *, backend, capture):
        b, s, _ = x.shape
        n, hd = self.cfg.num_heads, self.cfg.head_dim
        q = self.q_norm(self.q(x).reshape(b, s, n, hd))
        l = tokens.shape[1]
        k = self.k_norm(self.k(tokens).reshape(b, l, n, hd))
        v = self.v(tokens).reshape(b, l, n, hd)
        _sow(self, capture, q_normed=q, k_normed=k)
        o = attention(q, k, v, key_mask=key_mask, key_mask_is_prefix=True, backend=backend, cross=True)
        return self.o(o.reshape(b, s, -1))


class FeedForward(nnx.Module):
    def __init__(self, dim: int, *, dtype, param_dtype, rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(dim, 4 * dim, axes=("embed", "mlp"), **kw)
        self.fc2 = Linear(4 * dim, dim, axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        h = jax.nn.gelu(self.fc1(x), approximate=True)
        return self.fc2(constrain(h, ("batch", "length", "act_mlp")))


class Block(nnx.Module):
    """AdaLN-modulated self-attention, un-modulated cross-attention, modulated GELU-tanh MLP."""

    def __init__(self, cfg: DiTConfig, *, dtype, param_dtype, rngs):
        d = cfg.dim
        self.norm1 = LayerNorm(d, eps=cfg.block_norm_eps, param_dtype=param_dtype)
        self.attn1 = SelfAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn2 = CrossAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, eps=cfg.block_norm_eps, param_dtype=param_dtype)
        self.ff = FeedForward(d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.scale_shift_table = layers.param(
            rngs, lambda k, s, dt: jax.random.normal(k, s, dt) / math.sqrt(d), (6, d), (None, "embed"),
            param_dtype)
        self.dtype = dtype

    def __call__(self, x, modulation, tokens, key_mask, positions, *, backend=None, capture=False):
        """x (b, s, d); modulation (b, 6, d); tokens (b, l, d); key_mask (b, l) valid keys
        a prefix of each row (as `embed_text` builds it); positions (s, 3)."""
        m = (self.scale_shift_table[...][None].astype(self.dtype) + modulation)[:, :, None, :]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (m[:, i] for i in range(6))
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        a = self.attn1(h, positions, backend=backend, capture=capture)
        x = x + gate_msa * a
        c = self.attn2(x, tokens, key_mask, backend=backend, capture=capture)
        x = x + c
        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        f = self.ff(h)
        x = x + gate_mlp * f
        _sow(self, capture, attn1_out=a, attn2_out=c, ff_out=f, out=x)
        return constrain(x, ACT)


class StepVideoDiT(nnx.Module):
    """See the module docstring. Parameter layout: kernels (in, out); q/k/v de-interleaved. The
    blocks are one stacked module (`models/stack.py`: leading layer axis, run under one scan)."""

    def __init__(self, cfg: DiTConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d, p = cfg.dim, cfg.patch_size
        if sum(cfg.rope_splits) != cfg.head_dim:
            raise ValueError(f"rope_splits {cfg.rope_splits} must sum to head_dim {cfg.head_dim}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg, self.dtype = cfg, dtype
        in_ch = cfg.in_channels * (2 if cfg.ti2v else 1)
        self.patch_embed = Linear(in_ch * p * p, d, axes=("conv_in", "embed"), **kw)
        self.time_linear_1 = Linear(cfg.timestep_dim, d, axes=(None, "embed"), **kw)
        self.time_linear_2 = Linear(d, d, axes=("embed", "mlp"), **kw)
        if cfg.ti2v:
            self.motion_linear_1 = Linear(cfg.timestep_dim, d, axes=(None, "embed"), **kw)
            self.motion_linear_2 = Linear(d, d, axes=("embed", "mlp"), **kw)
        self.adaln = Linear(d, 6 * d, axes=("embed", "modulation"), **kw)
        self.caption_norm = LayerNorm(cfg.caption_channels[0], eps=cfg.norm_eps, affine=False)
        self.caption_linear_1 = Linear(cfg.caption_channels[0], d, axes=("caption", "embed"), **kw)
        self.caption_linear_2 = Linear(d, d, axes=("embed", "mlp"), **kw)
        self.clip_projection = Linear(cfg.caption_channels[1], d, axes=(None, "embed"), **kw)
        self.blocks = stack.build(
            lambda r: Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.num_layers, rngs)
        self.unroll_layers = False  # True: the pre-scan program (N block copies), for comparisons
        self.offload_layers = False  # True: `blocks` lives in host memory (models/offload.py)
        self.norm_out = LayerNorm(d, eps=cfg.norm_eps, affine=False)
        self.scale_shift_table = layers.param(
            rngs, lambda k, s, dt: jax.random.normal(k, s, dt) / math.sqrt(d), (2, d), (None, "embed"),
            param_dtype)
        self.proj_out = Linear(d, p * p * cfg.out_channels, axes=("embed", None), **kw)

    # -- pieces, each usable on its own (sequence-parallel and training code call them) --

    def embed_timestep(self, t, motion_score=None, *, capture=False):
        """(b,) [, motion score () or (b,)] -> modulation (b, 6, d), embedded timestep (b, d).

        TI2V: the motion score's sinusoid uses the raw score (scale 1, the timestep's is x1000),
        cast to the compute dtype like the timestep (the official `torch.tensor([ms], dtype)`).
        """
        t_dtype = self.dtype if self.cfg.timestep_in_compute_dtype else jnp.float32
        sin = timestep_sinusoid(t, self.cfg.timestep_dim, self.cfg.timestep_scale, t_dtype)
        emb = self.time_linear_2(jax.nn.silu(self.time_linear_1(sin.astype(self.dtype))))
        _sow(self, capture, timestep_proj=sin, timestep_emb=emb)
        if self.cfg.ti2v:
            if motion_score is None:
                raise ValueError("this TI2V DiT needs a motion_score (one scalar, or one per row)")
            ms = jnp.broadcast_to(jnp.asarray(motion_score, jnp.float32), t.shape)
            ms_sin = timestep_sinusoid(ms, self.cfg.timestep_dim, 1.0, t_dtype)
            ms_emb = self.motion_linear_2(jax.nn.silu(self.motion_linear_1(ms_sin.astype(self.dtype))))
            _sow(self, capture, motion_score_proj=ms_sin, motion_score_emb=ms_emb)
            emb = emb + ms_emb
        elif motion_score is not None:
            raise ValueError("motion_score given to a T2V DiT (DiTConfig.ti2v is False)")
        mod = self.adaln(jax.nn.silu(emb))
        _sow(self, capture, embedded_timestep=emb, adaln_modulation=mod)
        return mod.reshape(mod.shape[0], 6, -1), emb

    def embed_text(self, y, clip, y_mask, *, capture=False):
        """-> tokens (b, l_clip + l_text, d) [clip first], key_mask (b, l_clip + l_text) bool."""
        text = self.caption_linear_2(jax.nn.gelu(self.caption_linear_1(self.caption_norm(y.astype(self.dtype))),
                                                 approximate=True))
        clip_tokens = self.clip_projection(clip.astype(self.dtype))
        tokens = jnp.concatenate([clip_tokens, text], axis=1)
        total = tokens.shape[1]
        if y_mask.shape != tokens.shape[:2]:
            raise ValueError(f"y_mask {y_mask.shape} should be (b, l_clip + l_text) = {tokens.shape[:2]}")
        kv_len = jnp.sum(y_mask.astype(jnp.float32), axis=-1)
        if self.cfg.mask_sum_in_compute_dtype:
            kv_len = rounded(kv_len, self.dtype)
        kv_len = kv_len.astype(jnp.int32)
        key_mask = jnp.arange(total)[None, :] < kv_len[:, None]
        _sow(self, capture, caption_projection_out=text, clip_projection_out=clip_tokens,
             caption_tokens_full=tokens, key_mask=key_mask)
        return tokens, key_mask

    def patchify(self, x):
        """(b, f, c, h, w) -> tokens (b, f*h'*w', c*p*p), features ordered (c, p, q)."""
        b, f, c, h, w = x.shape
        p = self.cfg.patch_size
        x = x.reshape(b, f, c, h // p, p, w // p, q := p)
        return x.transpose(0, 1, 3, 5, 2, 4, 6).reshape(b, f * (h // p) * (w // p), c * p * q)

    def unpatchify(self, tokens, f, h, w):
        """(b, s, p*p*c) with features ordered (p, q, c) -> (b, f, c, h, w)."""
        b, p, c = tokens.shape[0], self.cfg.patch_size, self.cfg.out_channels
        x = tokens.reshape(b, f, h // p, w // p, p, p, c)
        return x.transpose(0, 1, 6, 2, 4, 3, 5).reshape(b, f, c, h, w)

    def final_layer(self, x, emb):
        shift = self.scale_shift_table[...][0].astype(self.dtype)[None, None] + emb[:, None]
        scale = self.scale_shift_table[...][1].astype(self.dtype)[None, None] + emb[:, None]
        return self.proj_out(self.norm_out(x) * (1 + scale) + shift)

    def embed_video(self, x, condition=None):
        """Latents (b, f, c, h, w) [+ TI2V condition, same shape] -> patch tokens (b, s, d)."""
        cfg = self.cfg
        b, f, c, h, w = x.shape
        p = cfg.patch_size
        if c != cfg.in_channels or h % p or w % p:
            raise ValueError(f"latents {x.shape} must be (b, f, {cfg.in_channels}, h, w) with h, w "
                             f"multiples of patch_size {p}")
        x = x.astype(self.dtype)
        if cfg.ti2v:
            if condition is None or tuple(condition.shape) != tuple(x.shape):
                got = None if condition is None else tuple(condition.shape)
                raise ValueError(f"this TI2V DiT needs condition latents shaped like the latents "
                                 f"{tuple(x.shape)} (image latent on frame 0, zeros after); got {got}")
            x = jnp.concatenate([x, condition.astype(self.dtype)], axis=2)
        elif condition is not None:
            raise ValueError("condition latents given to a T2V DiT (DiTConfig.ti2v is False)")
        return self.patch_embed(self.patchify(x))

    def __call__(self, x, t, y, y_mask, clip, *, condition=None, motion_score=None,
                 backend: Optional[str] = None, capture: bool = False, remat_policy=None):
        """Velocity (b, f, c_out, h, w); see the module docstring. `capture` sows intermediates (run
        it under `nnx.capture`); the blocks' ones carry the layer axis first ((L, ...) each).
        `remat_policy` (a `jax.checkpoint_policies` entry; None: no remat) applies to the scan body.

        TI2V only: `condition` (b, f, c, h, w) condition latents, `motion_score` () or (b,).
        """
        cfg = self.cfg
        b, f, c, h, w = x.shape
        p = cfg.patch_size
        hidden = self.embed_video(x, condition)
        modulation, emb = self.embed_timestep(t, motion_score, capture=capture)
        tokens, key_mask = self.embed_text(y, clip, y_mask, capture=capture)
        hidden = constrain(hidden, ACT)
        _sow(self, capture, blocks_in=hidden)
        positions = grid_positions(f, h // p, w // p)
        hidden = stack.scan(
            self.blocks, lambda block, h: block(h, modulation, tokens, key_mask, positions, backend=backend,
                                                capture=capture),
            hidden, carry_axes=ACT, remat_policy=remat_policy, remat=remat_policy is not None, capture=capture,
            unroll=self.unroll_layers, offload=self.offload_layers)
        out = self.final_layer(hidden, emb)
        _sow(self, capture, proj_out_out=out)
        return self.unpatchify(out, f, h, w)


def _sow(module: nnx.Module, capture: bool, **arrays):
    if capture:
        for name, value in arrays.items():
            module.sow(nnx.Intermediate, name, value)
