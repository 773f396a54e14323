"""Median wall time of one jitted DiT forward, after warm-up, for any model / video size.

    python -m bench.dit_forward                                   # full size (needs a big accelerator)
    python -m bench.dit_forward --layers 4 --frames 36 --height 34 --width 62     # 4 of 48 blocks
    python -m bench.dit_forward --layers 1 --heads 2 --frames 2 --height 8 --width 8 \\
        --text-len 16 --clip-len 8 --dtype float32                # CPU smoke run

Random weights (initialised on the device inside jit, nothing on the host), random latents and text
states, every text key valid. Prints the device, the compile time, the median / min step time over
`--iters` timed calls and the achieved TFLOP/s from the analytic count of `bench/dit_flops.py`.
`--backend` picks the attention backend (default: by platform, cudnn on GPU, splash on TPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from bench.dit_flops import fmt_flops
from stepvideo_jax import dtypes
from stepvideo_jax.models import quant
from stepvideo_jax.models.attention import BACKENDS
from stepvideo_jax.models.dit import DiTConfig, StepVideoDiT
from stepvideo_jax.models.flops import forward_flops, video_tokens

DTYPES = {**dtypes.DTYPES, "float16": jnp.float16}


def build_state(cfg: DiTConfig, dtype, weights: str = "bf16"):
    """(graphdef, params on the default device) without a host copy; `weights`: the block linears'
    scheme (`models/quant.py`), quantised on the device."""
    make = lambda: quant.quantize(StepVideoDiT(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)), weights)
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    return graphdef, jax.jit(lambda: nnx.state(make()))()


def inputs(cfg: DiTConfig, *, batch, frames, height, width, text_len, clip_len, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(k[0], (batch, frames, cfg.in_channels, height, width), dtype),
            jax.random.uniform(k[1], (batch,), jnp.float32),
            jax.random.normal(k[2], (batch, text_len, cfg.caption_channels[0]), dtype),
            jnp.ones((batch, clip_len + text_len), dtype),
            jax.random.normal(k[3], (batch, clip_len, cfg.caption_channels[1]), dtype))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    full = DiTConfig.full()
    p.add_argument("--layers", type=int, default=full.num_layers)
    p.add_argument("--heads", type=int, default=full.num_heads)
    p.add_argument("--frames", type=int, default=36, help="latent frames")
    p.add_argument("--height", type=int, default=34, help="latent height")
    p.add_argument("--width", type=int, default=62, help="latent width")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-len", type=int, default=320, help="Step-LLM tokens")
    p.add_argument("--clip-len", type=int, default=77, help="CLIP tokens")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--backend", default=None, choices=BACKENDS)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--weights", default="bf16", choices=list(quant.SCHEMES),
                   help="the block linears: as --dtype, or int8 / fp8 weight-only (docs/quantization.md)")
    a = p.parse_args(argv)

    cfg = dataclasses.replace(full, num_layers=a.layers, num_heads=a.heads)
    dtype = DTYPES[a.dtype]
    s = video_tokens(cfg, a.frames, a.height, a.width)
    print(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), {a.dtype}, weights {a.weights}, backend "
          f"{a.backend or 'default'}; {cfg.num_layers} layers, {cfg.num_heads} heads x {cfg.head_dim}; "
          f"batch {a.batch}, latents {a.frames}x{a.height}x{a.width} = {s} tokens, "
          f"text {a.clip_len} + {a.text_len}", flush=True)

    t0 = time.perf_counter()
    graphdef, state = build_state(cfg, dtype, a.weights)
    args = inputs(cfg, batch=a.batch, frames=a.frames, height=a.height, width=a.width,
                  text_len=a.text_len, clip_len=a.clip_len, dtype=dtype)
    jax.block_until_ready((state, args))
    print(f"init {time.perf_counter() - t0:.1f}s", flush=True)

    @jax.jit
    def forward(state, x, t, y, y_mask, clip):
        return nnx.merge(graphdef, state)(x, t, y, y_mask, clip, backend=a.backend)

    t0 = time.perf_counter()
    compiled = forward.lower(state, *args).compile()
    print(f"compile {time.perf_counter() - t0:.1f}s", flush=True)
    for _ in range(a.warmup):
        compiled(state, *args).block_until_ready()
    times = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        compiled(state, *args).block_until_ready()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    flops = a.batch * forward_flops(cfg, frames=a.frames, height=a.height, width=a.width, text_length=a.text_len,
                                    clip_length=a.clip_len)
    print(f"forward median {med * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms over {a.iters} "
          f"(after {a.warmup} warm-up); {fmt_flops(flops).strip()} -> {flops / med / 1e12:.2f} TFLOP/s")


if __name__ == "__main__":
    main()
