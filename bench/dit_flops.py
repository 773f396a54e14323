"""The analytic FLOPs of the Step-Video DiT (`stepvideo_jax/models/flops.py`), printed by part and
cross-checked against XLA's `cost_analysis()`.

    python -m bench.dit_flops                      # full size, 204x544x992 px, 397 text keys
    python -m bench.dit_flops --check-layers 2     # + the cross-check on a small unrolled model

`cost_analysis()` counts a loop body once and cannot see inside Pallas kernels, so the cross-check
compiles a small model with the blocks unrolled (the Python loop of `StepVideoDiT`) and plain "xla"
attention, on CPU; its count also includes the elementwise work, hence a ratio slightly below 1. The
same model with "blockwise" attention (a loop over key blocks) shows the undercount once S exceeds
one block.
"""
from __future__ import annotations

import argparse
import dataclasses

from stepvideo_jax.models.dit import DiTConfig
from stepvideo_jax.models.flops import block_flops, forward_parts, video_tokens


def xla_flops(cfg: DiTConfig, *, batch: int, frames: int, height: int, width: int, l_text: int,
              l_clip: int, backend: str) -> float:
    """`cost_analysis()["flops"]` of the jitted forward on this machine (abstract inputs)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from stepvideo_jax.models.dit import StepVideoDiT

    model = nnx.eval_shape(lambda: StepVideoDiT(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    f32 = jnp.float32
    args = (jax.ShapeDtypeStruct((batch, frames, cfg.in_channels, height, width), f32),
            jax.ShapeDtypeStruct((batch,), f32),
            jax.ShapeDtypeStruct((batch, l_text, cfg.caption_channels[0]), f32),
            jax.ShapeDtypeStruct((batch, l_clip + l_text), f32),
            jax.ShapeDtypeStruct((batch, l_clip, cfg.caption_channels[1]), f32))

    def forward(state, *a):
        return nnx.merge(graphdef, state)(*a, backend=backend)

    cost = jax.jit(forward).lower(state, *args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def fmt_flops(x: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:8.3f} {unit}"
    return f"{x:8.0f} FLOP"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=36, help="latent frames")
    p.add_argument("--height", type=int, default=34, help="latent height")
    p.add_argument("--width", type=int, default=62, help="latent width")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-len", type=int, default=320)
    p.add_argument("--clip-len", type=int, default=77)
    p.add_argument("--steps", type=int, default=50, help="sampling steps (x2 for classifier-free guidance)")
    p.add_argument("--check-layers", type=int, default=2, help="layers of the cross-check model (0: skip)")
    p.add_argument("--check-heads", type=int, default=4)
    p.add_argument("--check-grid", default="4,16,16", help="frames,height,width of the cross-check model")
    a = p.parse_args(argv)

    cfg = DiTConfig.full()
    s = video_tokens(cfg, a.frames, a.height, a.width)
    l = a.text_len + a.clip_len
    print(f"full size: d {cfg.dim}, {cfg.num_layers} layers, S {s} video tokens, L {l} text keys, batch {a.batch}")
    for name, v in block_flops(cfg, s, l).items():
        print(f"  block {name:16s} {fmt_flops(a.batch * v)}")
    per_block = a.batch * sum(block_flops(cfg, s, l).values())
    print(f"  block total            {fmt_flops(per_block)}   (28 S d^2 = {fmt_flops(a.batch * 28 * s * cfg.dim ** 2)}, "
          f"4 S^2 d = {fmt_flops(a.batch * 4 * s * s * cfg.dim)})")
    fwd = {k: a.batch * v for k, v in forward_parts(cfg, frames=a.frames, height=a.height, width=a.width,
                                                     text_length=a.text_len, clip_length=a.clip_len).items()}
    for name, v in fwd.items():
        print(f"  forward {name:14s} {fmt_flops(v)}")
    total = sum(fwd.values())
    print(f"  forward total          {fmt_flops(total)}")
    print(f"  sampling ({a.steps} steps x 2 CFG) {fmt_flops(2 * a.steps * total)}")

    if a.check_layers:
        f, h, w = (int(x) for x in a.check_grid.split(","))
        small = dataclasses.replace(cfg, num_layers=a.check_layers, num_heads=a.check_heads,
                                    caption_channels=(256, 128))
        l_text, l_clip = 24, 8
        ana = sum(forward_parts(small, frames=f, height=h, width=w, text_length=l_text, clip_length=l_clip).values())
        print(f"cross-check: {small.num_layers} layers, d {small.dim}, grid {f}x{h}x{w} (S {video_tokens(small, f, h, w)}), "
              f"L {l_text + l_clip}")
        for backend in ("xla", "blockwise"):
            xla = xla_flops(small, batch=1, frames=f, height=h, width=w, l_text=l_text, l_clip=l_clip,
                            backend=backend)
            print(f"  attention {backend:9s}: analytic {fmt_flops(ana)}, cost_analysis {fmt_flops(xla)}, "
                  f"analytic / cost_analysis = {ana / xla:.4f}")


if __name__ == "__main__":
    main()
