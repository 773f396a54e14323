"""Per-chip memory of ONE full-size DiT block, compiled ahead of time for a TPU slice from this machine.

    TPU_LIBRARY_PATH=/path/to/libtpu.so python -m bench.dit_block_memory --slice v5p-8 --mesh tensor=4

bf16 params and activations; 75,888 video tokens (204x544x992 px -> 36x34x62 latents) and 397 text keys
(77 CLIP + 320 Step-LLM) by default. For each attention backend it compiles (1) the self-attention alone,
q/k/v (b, s, h, d), and (2) the production `Block` forward, params sharded by `parallel/rules.py`, and
prints `memory_analysis()`: per chip arguments / outputs / temporaries. The splash kernel alone, on
inputs already in its (b, h, s, d) layout, shows how little scratch the kernel itself needs. "xla" materialises the
(b, h, s, s) float32 scores and is expected to fail with RESOURCE_EXHAUSTED (~258 GiB per chip with
heads over 4 chips); splash and blockwise keep O(block) temporaries. With a `sequence` mesh axis,
"ulysses:splash" / "ring:blockwise" run the sequence-parallel attention of `models/sequence_parallel.py`.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host computes nothing; TPU devices are compile-only

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from stepvideo_jax.models.attention import attention  # noqa: E402
from stepvideo_jax.models.dit import ACT, Block, DiTConfig  # noqa: E402
from stepvideo_jax.parallel import aot  # noqa: E402
from stepvideo_jax.dtypes import DTYPES  # noqa: E402
from stepvideo_jax.parallel.rules import state_shardings  # noqa: E402
from stepvideo_jax.models.sequence_parallel import parse_backend  # noqa: E402

def compile_attention(cfg: DiTConfig, mesh, *, batch, seq, dtype, backend):
    qkv = aot.abstract((batch, seq, cfg.num_heads, cfg.head_dim), dtype, mesh,
                       ("batch", "length", "act_heads", None))
    fn = lambda q, k, v: attention(q, k, v, backend=backend)
    return aot.compile_aot(fn, (qkv,) * 3, in_shardings=(qkv.sharding,) * 3, out_shardings=qkv.sharding,
                           mesh=mesh)


def compile_splash_kernel(cfg: DiTConfig, mesh, *, batch, seq, dtype, block=512):
    """The splash kernel alone on (b, h, s, d) inputs already padded to the block size, heads over
    `tensor`: the kernel's own scratch, without the layout copies of the `attention` wrapper."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    from jax.sharding import PartitionSpec as P

    s_pad = -(-seq // block) * block
    h_local = cfg.num_heads // mesh.shape.get("tensor", 1)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.FullMask((s_pad, s_pad))] * h_local),
                                block_sizes=sk.BlockSizes(block_q=block, block_kv=block,
                                                          block_kv_compute=block),
                                head_shards=1, q_seq_shards=1)
    qkv = aot.abstract((batch, cfg.num_heads, s_pad, cfg.head_dim), dtype, mesh,
                       ("batch", "act_heads", None, None))
    spec = qkv.sharding.spec
    fn = jax.shard_map(lambda q, k, v: jax.vmap(kernel)(q, k, v), mesh=mesh, in_specs=(spec,) * 3,
                       out_specs=spec, check_vma=False)
    return aot.compile_aot(fn, (qkv,) * 3, in_shardings=(qkv.sharding,) * 3, out_shardings=qkv.sharding,
                           mesh=mesh)


def compile_block(cfg: DiTConfig, mesh, *, batch, seq, text, dtype, backend):
    block = nnx.eval_shape(lambda: Block(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(block)
    d = cfg.dim
    args = (aot.abstract((batch, seq, d), dtype, mesh, ACT),
            aot.abstract((batch, 6, d), dtype, mesh, ("batch", None, "act_embed")),
            aot.abstract((batch, text, d), dtype, mesh, ("batch", "text_length", "act_embed")),
            aot.abstract((batch, text), jnp.bool_, mesh, ("batch", "text_length")),
            aot.abstract((seq, 3), jnp.int32, mesh, ("length", None)))

    def forward(state, x, modulation, tokens, key_mask, positions):
        return nnx.merge(graphdef, state)(x, modulation, tokens, key_mask, positions, backend=backend)

    return aot.compile_aot(forward, (state, *args),
                           in_shardings=(state_shardings(state, mesh), *(a.sharding for a in args)),
                           out_shardings=args[0].sharding, mesh=mesh)


def report(label: str, build):
    t0 = time.perf_counter()
    try:
        compiled = build()
    except Exception as e:  # the point of the xla rows: show the failure and its size
        msg = str(e).splitlines()[0][:300]
        print(f"{label:34s} FAILED after {time.perf_counter() - t0:5.1f}s: {type(e).__name__}: {msg}",
              flush=True)
        return None
    mem = aot.memory(compiled)
    print(f"{label:34s} {aot.format_memory(mem)}  (compiled in {time.perf_counter() - t0:.1f}s)", flush=True)
    return mem


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slice", default="v5p-8", choices=sorted(aot.SLICES))
    p.add_argument("--mesh", default="tensor=4", help="mesh axes, e.g. tensor=4 or sequence=4")
    p.add_argument("--frames", type=int, default=36, help="latent frames")
    p.add_argument("--height", type=int, default=34, help="latent height")
    p.add_argument("--width", type=int, default=62, help="latent width")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text", type=int, default=397, help="cross-attention keys (CLIP + Step-LLM)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--backends", default="splash,blockwise,xla",
                   help="comma-separated; mode:local for sequence parallelism, e.g. ulysses:splash")
    p.add_argument("--parts", default="kernel,attention,block",
                   help="any of kernel (splash alone), attention (entry point), block")
    a = p.parse_args(argv)

    cfg = DiTConfig.full()
    mesh = aot.mesh_over(aot.tpu_devices(a.slice), aot.parse_axes(a.mesh))
    seq = a.frames * (a.height // cfg.patch_size) * (a.width // cfg.patch_size)
    dtype = DTYPES[a.dtype]
    print(f"{a.slice} ({mesh.devices.size} x {mesh.devices.flat[0].device_kind}), mesh {dict(mesh.shape)}; "
          f"{a.dtype}; batch {a.batch}, {seq} video tokens, {a.text} text keys, "
          f"{cfg.num_heads} heads x {cfg.head_dim}, d {cfg.dim}", flush=True)
    if "kernel" in a.parts:
        report("splash kernel alone (b h s d)", lambda: compile_splash_kernel(
            cfg, mesh, batch=a.batch, seq=seq, dtype=dtype))
    for name in a.backends.split(","):
        backend = parse_backend(name)
        if "attention" in a.parts:
            report(f"self-attention [{name}]", lambda: compile_attention(
                cfg, mesh, batch=a.batch, seq=seq, dtype=dtype, backend=backend))
        if "block" in a.parts:
            report(f"block [{name}]", lambda: compile_block(
                cfg, mesh, batch=a.batch, seq=seq, text=a.text, dtype=dtype, backend=backend))


if __name__ == "__main__":
    main()
