"""The GPU path, checked and timed in one run (~4 minutes on one H100/H200); prints one table.

    python bench/gpu_check.py --out $OUT                       # on the GPU machine
    python bench/gpu_check.py --smoke --cpu --out /tmp/gc      # the same code at tiny sizes on CPU
    python bench/gpu_check.py --write-demo-cond bench/demo_cond.npz  # where the tokenizers exist

Sets the platform itself (GPU plus the host CPU for references; `--cpu`: CPU alone), needs no
TensorFlow, grain or ml-collections, no tokenizers and nothing from `../shared`: weights are random
(the demo model ships in the package), text embeddings precomputed (`--demo-cond`, by default
`bench/demo_cond.npz`, written by `--write-demo-cond`) or random.
Rows, each timed as the median of `--repeats` runs after one compiled warm-up:
- parity: one DiT block (full width, few tokens) and one Video-VAE decode chunk (full widths, small
  frame) in bfloat16 on the GPU against float32 on the CPU, same (bf16-valued) weights; error =
  ||gpu - cpu|| / ||cpu|| over the block's update (out - x) and over the decoded video;
- one full-size DiT block (48 x 128 heads, d 6144, 75,888 tokens = 204x544x992, 397 text keys)
  forward and forward+backward in bf16 with the attention the selection rule picks (cuDNN on
  H100/H200): time, TFLOP/s and MFU from `bench/dit_flops.py`'s analytic count (forward+backward =
  3 x forward, the model FLOPs; recomputation is not counted) against `--peak-tflops` (H100/H200 SXM
  dense bf16, datasheet: 989);
- the attention core alone (same shapes) and the feed-forward's first GEMM, to see what bounds the
  block;
- the 48-block forward at `--stack-frames` latent frames, random weights (scan over stacked blocks);
- one Video-VAE decode chunk (3 latent frames -> 17 frames) at 544x992, random weights;
- the demo generate (the shipped demo model, 17x32x32, 20 steps, CFG 4) with the prompt's
  precomputed embeddings, float32 (as `configs/generate/demo.py`) and bfloat16 (cuDNN attention),
  with the motion checker's reading of each video.
Logs go to `--out` (log.txt, results.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import statistics
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_PROMPT = "a blue square moves up"


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds on CPU)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU alone (no GPU needed)")
    p.add_argument("--out", default="", help="folder for log.txt and results.json")
    p.add_argument("--parts", default="parity,block,attention,stack,vae,demo",
                   help="comma-separated subset of parity,block,attention,stack,vae,demo")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stack-frames", type=int, default=12, help="latent frames of the 48-block forward")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200 SXM)")
    p.add_argument("--demo-cond", default=str(ROOT / "bench" / "demo_cond.npz"),
                   help="npz of the demo prompt's embeddings (--write-demo-cond); '' for random ones")
    p.add_argument("--write-demo-cond", default="", help="encode the demo prompt with the demo text encoders "
                   "(needs the tokenizers) into this npz, then exit")
    a = p.parse_args(argv)
    unknown = set(a.parts.split(",")) - {"parity", "block", "attention", "stack", "vae", "demo"}
    if unknown:
        p.error(f"unknown --parts {sorted(unknown)}; choose from parity,block,attention,stack,vae,demo")
    return a


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ["JAX_PLATFORMS"] = "cpu" if ARGS.cpu or ARGS.write_demo_cond else "cuda,cpu"
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from stepvideo_jax.models import attention_backend  # noqa: E402
from stepvideo_jax.models.attention import attention  # noqa: E402
from stepvideo_jax.models.dit import Block, DiTConfig  # noqa: E402
from stepvideo_jax.models.flops import block_flops  # noqa: E402
from stepvideo_jax.models.rope import grid_positions  # noqa: E402
from stepvideo_jax.models.vae import VAEConfig, VideoVAE  # noqa: E402

DEMO_DIR = ROOT / "stepvideo_jax" / "assets" / "demo"
BF16, F32 = jnp.bfloat16, jnp.float32
# ||bf16 - f32|| / ||f32||: bf16 operands land between 1e-3 and 1e-2 (the device README's METHOD.md).
# The block's output (the residual stream) is bounded by that; its update (out - x), a difference
# of bf16 outputs, carries more (2.55e-2 on CPU bf16 at full width, docs/gpu.md) and is reported.
PARITY_BOUND = 1e-2
VAE_PARITY_BOUND = 2e-2   # ~30 bf16 layers (convs, GroupNorms) deep; CPU bf16 baseline in docs/gpu.md
VAE_STREAM_FRAMES = 4   # time slabs of the decoder's high-resolution section (docs/vae.md: memory)


@dataclasses.dataclass(frozen=True)
class Sizes:
    dit: DiTConfig
    vae: VAEConfig
    parity_grid: tuple[int, int, int]      # latent (f, h, w) of the parity block
    block_grid: tuple[int, int, int]       # latent (f, h, w) of the full-size block
    text_keys: tuple[int, int]             # (clip, llm) text tokens
    vae_parity_hw: tuple[int, int]         # latent (h, w) of the parity VAE chunk
    vae_hw: tuple[int, int]                # latent (h, w) of the timed VAE chunk
    stack_layers: int


FULL = Sizes(dit=DiTConfig.full(), vae=VAEConfig.full(), parity_grid=(2, 8, 16), block_grid=(36, 34, 62),
             text_keys=(77, 320), vae_parity_hw=(2, 2), vae_hw=(34, 62), stack_layers=48)
SMOKE = Sizes(dit=DiTConfig(num_layers=1, num_heads=2, head_dim=64, rope_splits=(32, 16, 16),
                            caption_channels=(64, 32)),
              vae=VAEConfig(z_channels=4, encoder_stem=16, encoder_widths=(32, 32, 64, 64),
                            decoder_widths=(32, 32, 64, 64), groups=8),
              parity_grid=(2, 4, 4), block_grid=(3, 4, 6), text_keys=(5, 12), vae_parity_hw=(2, 2),
              vae_hw=(2, 3), stack_layers=3)


# ------------------------------------------------------------------------------------------------


class Report:
    def __init__(self, out: str):
        self.rows, self.results = [], {}
        self.out = pathlib.Path(out) if out else None
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            self.log_file = open(self.out / "log.txt", "a")

    def log(self, *parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        if self.out:
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def row(self, check: str, result: str, detail: str = "", **numbers):
        self.rows.append((check, result, detail))
        self.results[check] = {"result": result, "detail": detail, **numbers}
        self.log(f"[row] {check}: {result} {detail}")

    def table(self) -> str:
        w0 = max(len(r[0]) for r in self.rows)
        w1 = max(len(r[1]) for r in self.rows)
        lines = [f"| {'check':{w0}} | {'result':{w1}} | detail", f"|{'-' * (w0 + 2)}|{'-' * (w1 + 2)}|--------"]
        lines += [f"| {c:{w0}} | {r:{w1}} | {d}" for c, r, d in self.rows]
        return "\n".join(lines)

    def save(self):
        if self.out:
            tmp = self.out / "results.json.tmp"
            tmp.write_text(json.dumps(self.results, indent=1))
            tmp.rename(self.out / "results.json")


def timed(fn, *args, repeats: int):
    """(median seconds, compile seconds, output): `fn` jitted, compiled ahead, one warm-up run."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), compile_s, out


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(got)):
        return float("nan")
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def bf16_values(state):
    """float32 state with bfloat16-representable values (the weights both sides share)."""
    return jax.tree.map(lambda x: x.astype(BF16).astype(F32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        state)


def cast(state, dtype, device):
    return jax.device_put(jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state), device)


def fmt_s(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


# ------------------------------------------------------------------------------------------------


class Context:
    def __init__(self, args):
        self.args = args
        self.sizes = SMOKE if args.smoke else FULL
        self.label = "smoke size" if args.smoke else "full size"
        self.cpu = jax.devices("cpu")[0]
        self.dev = jax.devices()[0]
        self.key = jax.random.key(0)
        self.block_f32 = None     # (graphdef, float32 state with bf16 values: device, CPU)
        self.vae_f32 = None

    def next_key(self):
        self.key, k = jax.random.split(self.key)
        return k

    def _init(self, build, seed):
        """(graphdef, float32 state with bf16 values on the device, the same on the CPU): built in
        one jitted program on the device (eager init would compile one kernel per parameter)."""
        graphdef = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))))[0]
        with jax.default_device(self.dev):
            state = jax.jit(lambda key: bf16_values(nnx.split(build(nnx.Rngs(key)))[1]))(jax.random.key(seed))
        return graphdef, state, jax.device_put(state, self.cpu)

    def block_state(self):
        if self.block_f32 is None:
            self.block_f32 = self._init(lambda rngs: Block(self.sizes.dit, dtype=F32, param_dtype=F32,
                                                           rngs=rngs), 1)
        return self.block_f32

    def vae_state(self):
        if self.vae_f32 is None:
            self.vae_f32 = self._init(lambda rngs: VideoVAE(self.sizes.vae, dtype=F32, param_dtype=F32,
                                                            rngs=rngs), 2)
        return self.vae_f32

    def block_inputs(self, grid, dtype, device, batch=1):
        cfg, (l_clip, l_text) = self.sizes.dit, self.sizes.text_keys
        f, h, w = grid
        s, l = f * h * w, l_clip + l_text
        ks = jax.random.split(jax.random.key(7), 4)
        with jax.default_device(self.cpu):
            x = jax.random.normal(ks[0], (batch, s, cfg.dim), F32)
            mod = 0.1 * jax.random.normal(ks[1], (batch, 6, cfg.dim), F32)
            tokens = jax.random.normal(ks[2], (batch, l, cfg.dim), F32)
            valid = l_clip + (3 * l_text) // 4          # a prefix of valid keys, as embed_text builds
            mask = jnp.broadcast_to(jnp.arange(l)[None] < valid, (batch, l))
            pos = grid_positions(f, h, w)
        return jax.device_put((x.astype(dtype), mod.astype(dtype), tokens.astype(dtype), mask, pos), device)


def block_graph(ctx, dtype):
    """Graphdef of a Block computing in `dtype` with `dtype` parameters."""
    return nnx.split(nnx.eval_shape(lambda: Block(ctx.sizes.dit, dtype=dtype, param_dtype=dtype,
                                                  rngs=nnx.Rngs(0))))[0]


def block_fn(graphdef, backend=None):
    def run(state, x, mod, tokens, mask, pos):
        return nnx.merge(graphdef, state)(x, mod, tokens, mask, pos, backend=backend)

    return run


def backend_of(ctx, cfg: DiTConfig, s: int, l: int, dtype) -> str:
    q = jax.ShapeDtypeStruct((1, s, cfg.num_heads, cfg.head_dim), dtype)
    k = jax.ShapeDtypeStruct((1, l, cfg.num_heads, cfg.head_dim), dtype)
    facts = attention_backend.device_facts(ctx.dev)
    self_b = attention_backend.select_backend(attention_backend.case_of(q, q, facts=facts)).backend
    cross_b = attention_backend.select_backend(attention_backend.case_of(
        q, k, key_mask=True, key_mask_is_prefix=True, facts=facts)).backend
    return f"self {self_b}, cross {cross_b}"


# -- parts ----------------------------------------------------------------------------------------


def part_parity(ctx: Context, rep: Report):
    # DiT block: bf16 on the device vs float32 on the CPU, same bf16-valued weights.
    g32, s32_dev, s32 = ctx.block_state()
    x, mod, tokens, mask, pos = ctx.block_inputs(ctx.sizes.parity_grid, F32, ctx.cpu)
    with jax.default_device(ctx.cpu):
        ref = jax.jit(block_fn(g32, backend="xla"))(s32, x, mod, tokens, mask, pos)
    ref_update = np.asarray(ref) - np.asarray(x)
    g16 = block_graph(ctx, BF16)
    args16 = ctx.block_inputs(ctx.sizes.parity_grid, BF16, ctx.dev)
    out = jax.jit(block_fn(g16))(cast(s32_dev, BF16, ctx.dev), *args16)
    got_update = np.asarray(out, np.float32) - np.asarray(args16[0], np.float32)
    err_out, err_upd = rel_err(out, ref), rel_err(got_update, ref_update)
    s = math.prod(ctx.sizes.parity_grid)
    rep.row("parity DiT block bf16 vs CPU f32", "OK" if err_out <= PARITY_BOUND else "FAIL",
            f"rel err output {err_out:.2e} (bound {PARITY_BOUND:.0e}), update out-x {err_upd:.2e}; {s} tokens, "
            f"d {ctx.sizes.dit.dim}, {backend_of(ctx, ctx.sizes.dit, s, sum(ctx.sizes.text_keys), BF16)}",
            rel_err_update=err_upd, rel_err_out=err_out)

    # Video-VAE decode of one chunk.
    gv, sv_dev, sv = ctx.vae_state()
    cfg = ctx.sizes.vae
    h, w = ctx.sizes.vae_parity_hw
    with jax.default_device(ctx.cpu):
        z = jax.random.normal(jax.random.key(9), (1, cfg.latent_len, cfg.z_channels, h, w), F32)
    decode = lambda g: (lambda st, z: nnx.merge(g, st).decode(z, stream_frames=32).astype(F32))
    with jax.default_device(ctx.cpu):   # the selection rule then sees the CPU
        vref = jax.jit(decode(gv))(sv, z)
    gv16 = nnx.split(nnx.eval_shape(lambda: VideoVAE(cfg, dtype=BF16, param_dtype=BF16, rngs=nnx.Rngs(0))))[0]
    vgot = jax.jit(decode(gv16))(cast(sv_dev, BF16, ctx.dev), jax.device_put(z, ctx.dev))
    err = rel_err(vgot, vref)
    rep.row("parity VAE chunk bf16 vs CPU f32", "OK" if err <= VAE_PARITY_BOUND else "FAIL",
            f"rel err video {err:.2e} (bound {VAE_PARITY_BOUND:.0e}); {tuple(vref.shape)}", rel_err_video=err)


def part_block(ctx: Context, rep: Report):
    cfg, grid = ctx.sizes.dit, ctx.sizes.block_grid
    s, l = math.prod(grid), sum(ctx.sizes.text_keys)
    _, s32, _ = ctx.block_state()
    g16, state = block_graph(ctx, BF16), cast(s32, BF16, ctx.dev)
    args = ctx.block_inputs(grid, BF16, ctx.dev)
    flops = sum(block_flops(cfg, s, l).values())
    peak = ctx.args.peak_tflops * 1e12
    backends = backend_of(ctx, cfg, s, l, BF16)
    fwd = block_fn(g16)
    t, c, out = timed(fwd, state, *args, repeats=ctx.args.repeats)
    finite = bool(jnp.isfinite(out.astype(F32)).all())
    del out
    rep.row(f"DiT block fwd ({ctx.label})", f"{fmt_s(t)}, MFU {100 * flops / t / peak:.1f}%",
            f"{flops / t / 1e12:.0f} TFLOP/s of {flops / 1e12:.1f} TFLOP; S {s}, L {l}, {backends}; "
            f"compile {c:.0f} s; finite {finite}", seconds=t, flops=flops, compile_s=c)

    with jax.default_device(ctx.dev):
        ct = jax.random.normal(jax.random.key(11), args[0].shape, BF16)

    def loss(state, x, mod, tokens, mask, pos, ct):
        return jnp.sum(fwd(state, x, mod, tokens, mask, pos).astype(F32) * ct.astype(F32))

    grad = jax.grad(loss, argnums=(0, 1))
    t, c, (gs, gx) = timed(grad, state, *args, ct, repeats=ctx.args.repeats)
    finite = bool(jnp.isfinite(gx.astype(F32)).all())
    del gs, gx
    rep.row(f"DiT block fwd+bwd ({ctx.label})", f"{fmt_s(t)}, MFU {100 * 3 * flops / t / peak:.1f}%",
            f"{3 * flops / t / 1e12:.0f} TFLOP/s of 3 x {flops / 1e12:.1f} TFLOP; compile {c:.0f} s; finite {finite}",
            seconds=t, flops=3 * flops, compile_s=c)


def part_attention(ctx: Context, rep: Report):
    cfg, grid = ctx.sizes.dit, ctx.sizes.block_grid
    s = math.prod(grid)
    ks = jax.random.split(jax.random.key(12), 4)
    with jax.default_device(ctx.dev):
        q, k, v, ct = (jax.random.normal(kk, (1, s, cfg.num_heads, cfg.head_dim), BF16) for kk in ks)
    flops = 4 * s * s * cfg.dim
    peak = ctx.args.peak_tflops * 1e12
    name = backend_of(ctx, cfg, s, 1, BF16).split(",")[0].replace("self ", "")

    # The DiT's cross-attention shape (odd key count, prefix mask) differentiated: the kernel the
    # rule picks in bf16 against float32 XLA attention on the device, output and gradients.
    l = sum(ctx.sizes.text_keys)
    sq = 2 * l + 1
    kc = jax.random.split(jax.random.key(16), 4)
    with jax.default_device(ctx.dev):
        qc = jax.random.normal(kc[0], (1, sq, cfg.num_heads, cfg.head_dim), F32)
        kk_, vv_ = (jax.random.normal(x, (1, l, cfg.num_heads, cfg.head_dim), F32) for x in kc[1:3])
        wc = jax.random.normal(kc[3], qc.shape, F32)
        maskc = jnp.arange(l)[None] < (3 * l) // 4

    def cross(backend, dtype):
        def loss(q, k, v):
            o = attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), key_mask=maskc,
                          key_mask_is_prefix=True, backend=backend)
            return jnp.sum(o.astype(F32) * wc), o
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(qc, kk_, vv_)

    (g16, o16), (g32, o32) = cross(None, BF16), cross("xla", F32)
    errs = [rel_err(o16, o32)] + [rel_err(a, b) for a, b in zip(g16, g32)]
    rep.row(f"cross-attention grads ({backend_of(ctx, cfg, sq, l, BF16).split(', ')[1]}) vs f32",
            "OK" if max(errs) <= 2e-2 else "FAIL",
            "rel err out / dq / dk / dv " + " / ".join(f"{e:.1e}" for e in errs) +
            f" (bound 2e-2); q {sq}, keys {l}", rel_errs=errs)
    t, c, _ = timed(lambda q, k, v: attention(q, k, v), q, k, v, repeats=ctx.args.repeats)
    rep.row(f"self-attention core fwd ({name})", f"{fmt_s(t)}, {flops / t / 1e12:.0f} TFLOP/s",
            f"{100 * flops / t / peak:.1f}% of peak; (1, {s}, {cfg.num_heads}, {cfg.head_dim}); compile {c:.0f} s",
            seconds=t, flops=flops)
    grad = jax.grad(lambda q, k, v, ct: jnp.sum(attention(q, k, v).astype(F32) * ct.astype(F32)), argnums=(0, 1, 2))
    t, c, _ = timed(grad, q, k, v, ct, repeats=ctx.args.repeats)
    rep.row(f"self-attention core fwd+bwd ({name})", f"{fmt_s(t)}, {3 * flops / t / 1e12:.0f} TFLOP/s",
            f"{100 * 3 * flops / t / peak:.1f}% of peak (3 x fwd FLOPs; flash recomputes 3.5x); compile {c:.0f} s",
            seconds=t, flops=3 * flops)

    # The feed-forward's first GEMM, (S, d) @ (d, 4d): the matrix rate the block's GEMMs can reach.
    with jax.default_device(ctx.dev):
        a = jax.random.normal(ks[0], (s, cfg.dim), BF16)
        b = jax.random.normal(ks[1], (cfg.dim, 4 * cfg.dim), BF16) / math.sqrt(cfg.dim)
    t, c, _ = timed(jnp.dot, a, b, repeats=ctx.args.repeats)
    flops = 2 * s * cfg.dim * 4 * cfg.dim
    rep.row(f"GEMM ({s} x {cfg.dim}) @ ({cfg.dim} x {4 * cfg.dim})", f"{fmt_s(t)}, {flops / t / 1e12:.0f} TFLOP/s",
            f"{100 * flops / t / peak:.1f}% of peak; bf16", seconds=t, flops=flops)


def part_stack(ctx: Context, rep: Report):
    cfg = ctx.sizes.dit
    f = ctx.args.stack_frames if not ctx.args.smoke else ctx.sizes.block_grid[0]
    grid = (f,) + ctx.sizes.block_grid[1:]
    s, l, n = math.prod(grid), sum(ctx.sizes.text_keys), ctx.sizes.stack_layers
    _, _, s32 = ctx.block_state()
    g16 = block_graph(ctx, BF16)
    leaves, treedef = jax.tree.flatten(s32)
    stats = [(float(np.mean(x)), float(np.std(x))) for x in leaves]
    shapes = [x.shape for x in leaves]

    @jax.jit
    def make(key):
        keys = jax.random.split(key, len(shapes))
        return jax.tree.unflatten(treedef, [
            (m + sd * jax.random.normal(kk, (n,) + shape, BF16)).astype(BF16)
            for kk, shape, (m, sd) in zip(keys, shapes, stats)])

    with jax.default_device(ctx.dev):
        stacked = jax.block_until_ready(make(jax.random.key(13)))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(stacked))
    args = ctx.block_inputs(grid, BF16, ctx.dev)
    one = block_fn(g16)

    def forward(stacked, x, mod, tokens, mask, pos):
        return jax.lax.scan(lambda h, st: (one(st, h, mod, tokens, mask, pos), None), x, stacked)[0]

    t, c, out = timed(forward, stacked, *args, repeats=max(1, ctx.args.repeats - 1))
    finite = bool(jnp.isfinite(out.astype(F32)).all())
    flops = n * sum(block_flops(cfg, s, l).values())
    peak = ctx.args.peak_tflops * 1e12
    rep.row(f"{n}-block forward ({f} latent frames)", f"{fmt_s(t)}, MFU {100 * flops / t / peak:.1f}%",
            f"{flops / t / 1e12:.0f} TFLOP/s; S {s}; weights {nbytes / 2**30:.1f} GiB bf16 random; "
            f"compile {c:.0f} s; finite {finite}", seconds=t, flops=flops, compile_s=c)


def part_vae(ctx: Context, rep: Report):
    cfg = ctx.sizes.vae
    _, sv, _ = ctx.vae_state()
    gv16 = nnx.split(nnx.eval_shape(lambda: VideoVAE(cfg, dtype=BF16, param_dtype=BF16, rngs=nnx.Rngs(0))))[0]
    state = cast(sv, BF16, ctx.dev)
    h, w = ctx.sizes.vae_hw
    with jax.default_device(ctx.dev):
        z = jax.random.normal(jax.random.key(14), (1, cfg.latent_len, cfg.z_channels, h, w), BF16)
    decode = lambda st, z: nnx.merge(gv16, st).decode(z, stream_frames=VAE_STREAM_FRAMES)
    t, c, video = timed(decode, state, z, repeats=max(1, ctx.args.repeats - 1))
    finite = bool(jnp.isfinite(video.astype(F32)).all())
    mid = attention_backend.select_backend(attention_backend.case_of(
        jax.ShapeDtypeStruct((1, cfg.latent_len * h * w, 1, cfg.decoder_widths[-1]), BF16),
        jax.ShapeDtypeStruct((1, cfg.latent_len * h * w, 1, cfg.decoder_widths[-1]), BF16),
        causal=True, facts=attention_backend.device_facts(ctx.dev)))
    rep.row(f"VAE decode chunk {tuple(video.shape[1:])}", fmt_s(t),
            f"bf16, random weights, stream_frames {VAE_STREAM_FRAMES}; mid attention {mid.backend} "
            f"(1 head x {cfg.decoder_widths[-1]}); "
            f"compile {c:.0f} s; finite {finite}", seconds=t, compile_s=c)


def part_demo(ctx: Context, rep: Report):
    from stepvideo_jax import checkpoints
    from stepvideo_jax.eval import motion_checker
    from stepvideo_jax.sampling import components
    from stepvideo_jax.sampling.flow_matching import SamplerSettings
    from stepvideo_jax.sampling.pipeline import VideoSize

    cond_path = ctx.args.demo_cond
    with jax.default_device(ctx.dev):
        for dtype in (F32, BF16):
            dit = checkpoints.load_converted(DEMO_DIR, "transformer", dtype=dtype, param_dtype=dtype)
            vae = checkpoints.load_converted(DEMO_DIR, "vae", dtype=F32, param_dtype=F32)
            if cond_path:
                cond = dict(np.load(cond_path))
                source = f"embeddings of {DEMO_PROMPT!r}"
            else:
                c_llm, c_clip = dit.cfg.caption_channels
                ks = jax.random.split(jax.random.key(15), 2)
                cond = {"y": np.asarray(jax.random.normal(ks[0], (2, 320, c_llm))),
                        "clip": np.asarray(jax.random.normal(ks[1], (2, 77, c_clip))),
                        "y_mask": np.ones((2, 397), np.int32)}
                source = "random embeddings"
            pipe = components.text_to_video(None, dit, vae, stream_frames=32, dtype=dtype)
            run = lambda: pipe([DEMO_PROMPT], size=VideoSize(17, 32, 32, vae.cfg.spatial_factor),
                               settings=SamplerSettings(20, 4.0, 3.0), seeds=[1234], pos_magic="",
                               neg_magic="", crop=False, cond=cond)
            start = time.perf_counter()
            run()
            first = time.perf_counter() - start
            start = time.perf_counter()
            result = run()
            t = time.perf_counter() - start
            reading = motion_checker.read_video(result.frames[0])
            judged = cond_path and (reading.colour, reading.motion) == ("blue", "up")
            verdict = ("OK" if judged else "FAIL") if cond_path else "ran"
            rep.row(f"demo generate {jnp.dtype(dtype).name}", f"{verdict}, {fmt_s(t)}",
                    f"{source}; reads colour {reading.colour}, motion {reading.motion}; first call "
                    f"(compiles) {first:.1f} s; denoise {result.timings['denoise']:.2f} s, "
                    f"decode {result.timings['decode']:.2f} s", seconds=t)


def write_demo_cond(path):
    from stepvideo_jax import checkpoints
    from stepvideo_jax.sampling.pipeline import encode_prompts

    text = checkpoints.loader(DEMO_DIR).text_encoder()
    cond = encode_prompts(text, [DEMO_PROMPT], pos_magic="", neg_magic="", cfg=True)
    tmp = pathlib.Path(str(path) + ".tmp.npz")
    np.savez_compressed(tmp, **{k: np.asarray(v, np.float32 if np.issubdtype(v.dtype, np.floating) or v.dtype.kind == "V"
                                   else v.dtype) for k, v in cond.items()})
    tmp.rename(path)
    print(f"wrote {path}: " + ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in cond.items()))


PARTS = {"parity": part_parity, "block": part_block, "attention": part_attention, "stack": part_stack,
         "vae": part_vae, "demo": part_demo}


def main(args):
    if args.write_demo_cond:
        return write_demo_cond(args.write_demo_cond)
    if args.demo_cond and not pathlib.Path(args.demo_cond).is_file():
        raise SystemExit(f"--demo-cond {args.demo_cond}: no such file")
    rep = Report(args.out)
    dev = jax.devices()[0]
    facts = attention_backend.device_facts(dev)
    rep.log(f"jax {jax.__version__}, devices {jax.devices()}, {facts}; sizes {'smoke' if args.smoke else 'full'}; "
            f"peak {args.peak_tflops} TFLOP/s")
    if not args.cpu and dev.platform != "gpu":
        raise SystemExit(f"no GPU found (default device {dev}); use --cpu to run on the CPU")
    ctx = Context(args)
    start = time.perf_counter()
    for name in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            PARTS[name](ctx, rep)
        except Exception as e:  # noqa: BLE001  (one failing part must not hide the others' rows)
            rep.log(traceback.format_exc())
            rep.row(name, "ERROR", f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        rep.log(f"[part] {name}: {time.perf_counter() - t0:.1f} s")
        rep.save()
    rep.log(f"total {time.perf_counter() - start:.1f} s on {facts.device_kind} ({facts.platform}), "
            f"cc {facts.compute_capability}, cuDNN {facts.cudnn_version}, jax {jax.__version__}")
    rep.log(rep.table())
    rep.save()
    return 1 if any(r[1].startswith(("FAIL", "ERROR")) for r in rep.rows) else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
