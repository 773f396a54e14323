"""Analytic FLOPs of the Step-Video DiT: 2 per multiply-add of every matmul, attention included.

Per block (S video tokens, L text keys, width d):
    self-attention projections q, k, v, o    8 S d^2
    self-attention scores and values         4 S^2 d
    cross-attention q, o                     4 S d^2
    cross-attention k, v (text tokens)       4 L d^2
    cross-attention scores and values        4 S L d
    feed-forward d -> 4d -> d               16 S d^2
  = 28 S d^2 + 4 S^2 d + 4 L d^2 + 4 S L d. Per forward: layers x block + patch embedding, timestep
MLP and AdaLN, caption and CLIP projections, final projection. Norms, RoPE, softmax and modulation
(O(S d) each) are left out. Counted from the architecture, not from XLA's `cost_analysis()`, which
counts a scanned or rematerialised layer once or twice and cannot see inside Pallas kernels
(`bench/dit_flops.py` cross-checks the count on a small unrolled model).
"""
from __future__ import annotations

from stepvideo_jax.models.dit import DiTConfig


def video_tokens(cfg: DiTConfig, frames: int, height: int, width: int) -> int:
    """S: the tokens of a latent (frames, height, width) after patching."""
    return frames * (height // cfg.patch_size) * (width // cfg.patch_size)


def block_flops(cfg: DiTConfig, s: int, l: int) -> dict[str, float]:
    """FLOPs of one block by part: `s` video tokens, `l` text keys (CLIP + Step-LLM)."""
    d = cfg.dim
    return {"self_attn_proj": 8 * s * d * d, "self_attn_core": 4 * s * s * d,
            "cross_attn_proj": 4 * s * d * d + 4 * l * d * d, "cross_attn_core": 4 * s * l * d,
            "ffn": 16 * s * d * d}


def forward_parts(cfg: DiTConfig, *, frames: int, height: int, width: int, text_length: int,
                  clip_length: int) -> dict[str, float]:
    """FLOPs of one sample's forward by part: latent (frames, height, width), `text_length`
    Step-LLM + `clip_length` CLIP tokens."""
    d, p = cfg.dim, cfg.patch_size
    s = video_tokens(cfg, frames, height, width)
    c_text, c_clip = cfg.caption_channels
    return {
        "blocks": cfg.num_layers * sum(block_flops(cfg, s, text_length + clip_length).values()),
        "patch_embed": 2 * s * cfg.in_channels * p * p * d,
        "timestep": 2 * (cfg.timestep_dim * d + d * d + d * 6 * d),
        "caption": 2 * text_length * (c_text * d + d * d) + 2 * clip_length * c_clip * d,
        "proj_out": 2 * s * d * p * p * cfg.out_channels,
    }


def forward_flops(cfg: DiTConfig, **shape) -> float:
    """FLOPs of one sample's forward (`forward_parts` summed)."""
    return float(sum(forward_parts(cfg, **shape).values()))
