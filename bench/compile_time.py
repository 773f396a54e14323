"""Compile time of the DiT forward and of the flow-matching training step against depth, on CPU.

    python -m bench.compile_time [--layers 2 16] [--heads 2] [--head_dim 32] [--remat full]

For each depth, the scanned blocks (the default: one `lax.scan` over the stacked layers) and the
unrolled program (`unroll_layers=True`: N copies of the block, the layout before the scan) are
lowered and compiled from abstract inputs (nothing is allocated); printed: process CPU seconds of
building the abstract model (and training state) and of `lower + compile` (wall time on a shared
host measures the neighbours), the ratio deepest / shallowest of `lower + compile`, and the
compiled program's text size. The persistent compilation cache is off here
(a cache hit would measure nothing).
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from stepvideo_jax.models.dit import DiTConfig, StepVideoDiT
from stepvideo_jax.training import train_state
from stepvideo_jax.training.train_step import StepSettings, make_train_step

B, F, H, W, L_TEXT, L_CLIP = 1, 2, 8, 8, 16, 8


def _model(cfg: DiTConfig, unroll: bool):
    model = nnx.eval_shape(lambda: StepVideoDiT(cfg, rngs=nnx.Rngs(0)))
    model.unroll_layers = unroll
    return nnx.split(model)


def _cond(cfg):
    s = jax.ShapeDtypeStruct
    return {"y": s((B, L_TEXT, cfg.caption_channels[0]), jnp.float32), "y_mask": s((B, L_CLIP + L_TEXT), jnp.int32),
            "clip": s((B, L_CLIP, cfg.caption_channels[1]), jnp.float32)}


def forward_program(cfg, unroll):
    graphdef, state = _model(cfg, unroll)
    s = jax.ShapeDtypeStruct
    fn = jax.jit(lambda st, x, t, c: nnx.merge(graphdef, st)(x, t, c["y"], c["y_mask"], c["clip"], backend="xla"))
    return fn, (state, s((B, F, cfg.in_channels, H, W), jnp.float32), s((B,), jnp.float32), _cond(cfg))


def train_program(cfg, unroll, remat):
    graphdef, params = _model(cfg, unroll)
    opt = optax.adam(1e-4)
    schedule = optax.constant_schedule(1e-4)
    state = jax.eval_shape(lambda p: train_state.create(p, opt, seed=0, use_ema=True), params)
    step = make_train_step(graphdef, opt, schedule, StepSettings(remat=remat, attention_backend="xla",
                                                                 ema_decay=0.99))
    s = jax.ShapeDtypeStruct
    lat = s((B, F, cfg.in_channels, H, W), jnp.float32)
    batch = {"mean": lat, "logvar": lat, **_cond(cfg)}
    return jax.jit(step, donate_argnums=0), (state, batch)


def measure(fn, args) -> tuple[float, float, int]:
    cpu, wall = time.process_time(), time.perf_counter()
    compiled = fn.lower(*args).compile()
    return time.process_time() - cpu, time.perf_counter() - wall, len(compiled.as_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 16])
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=32)
    p.add_argument("--remat", default="none", help="remat policy of the training step")
    args = p.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    hd = args.head_dim
    split = (hd // 2, hd // 4, hd // 4)
    base = DiTConfig(num_heads=args.heads, head_dim=hd, in_channels=16, out_channels=16, caption_channels=(64, 32),
                     rope_splits=split)
    rows = {}
    print(f"CPU compile (lower + compile), width {args.heads} x {hd}, {jax.devices()[0].platform}, "
          f"train remat {args.remat!r}")
    print(f"{'program':<8} {'layout':<9} {'layers':>6} {'init cpu s':>10} {'cpu s':>8} {'wall s':>8} "
          f"{'HLO chars':>10}")
    for program in ("forward", "train"):
        for layout in ("scanned", "unrolled"):
            for n in args.layers:
                cfg = dataclasses.replace(base, num_layers=n)
                init = time.process_time()
                fn, fargs = (forward_program(cfg, layout == "unrolled") if program == "forward"
                             else train_program(cfg, layout == "unrolled", args.remat))
                init = time.process_time() - init
                cpu, wall, size = measure(fn, fargs)
                rows[program, layout, n] = cpu
                print(f"{program:<8} {layout:<9} {n:>6} {init:>10.2f} {cpu:>8.2f} {wall:>8.2f} {size:>10}",
                      flush=True)
    lo, hi = min(args.layers), max(args.layers)
    for program in ("forward", "train"):
        for layout in ("scanned", "unrolled"):
            print(f"{program} {layout}: {hi} / {lo} layers = {rows[program, layout, hi] / rows[program, layout, lo]:.2f}x")


if __name__ == "__main__":
    main()
