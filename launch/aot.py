"""Compile the full DiT forward ahead of time for a TPU slice and print its per-chip memory.

    TPU_LIBRARY_PATH=/path/to/libtpu.so python -m launch.aot --slice v5p-8 --mesh tensor=4
    python -m launch.aot --slice v5p-8 --mesh sequence=4 --backend ulysses:splash --layers 8

No TPU is needed: the devices of the slice are compile-only (`stepvideo_jax/parallel/aot.py`).
Parameters are sharded by `parallel/rules.py` on the given mesh; latents, text states and the key
mask are batch-sharded. The result is what one sampling step (one forward, one CFG branch per batch
row) needs per chip: parameters, inputs, output and XLA's temporaries.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host computes nothing; TPU devices are compile-only

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from stepvideo_jax.dtypes import DTYPES  # noqa: E402
from stepvideo_jax.models import quant  # noqa: E402
from stepvideo_jax.models.dit import DiTConfig, StepVideoDiT  # noqa: E402
from stepvideo_jax.parallel import aot  # noqa: E402
from stepvideo_jax.parallel.rules import state_shardings  # noqa: E402
from stepvideo_jax.models.sequence_parallel import parse_backend  # noqa: E402


def compile_forward(cfg: DiTConfig, mesh, *, batch, frames, height, width, text_len, clip_len, dtype,
                    backend, weights: str = "bf16", phases=None):
    """The compiled forward. `weights`: the block linears' scheme (`models.quant.SCHEMES`);
    `phases` (an `aot.CpuPhases`) gets "init" (abstract model and inputs), "lower" and "compile"
    charged."""
    phases = phases or aot.CpuPhases()
    model = quant.quantize(nnx.eval_shape(lambda: StepVideoDiT(cfg, dtype=dtype, param_dtype=dtype,
                                                               rngs=nnx.Rngs(0))), weights)
    graphdef, state = nnx.split(model)
    c_text, c_clip = cfg.caption_channels
    args = (aot.abstract((batch, frames, cfg.in_channels, height, width), dtype, mesh,
                         ("batch", "frames", None, None, None)),
            aot.abstract((batch,), jnp.float32, mesh, ("batch",)),
            aot.abstract((batch, text_len, c_text), dtype, mesh, ("batch", "text_length", None)),
            aot.abstract((batch, clip_len + text_len), dtype, mesh, ("batch", "text_length")),
            aot.abstract((batch, clip_len, c_clip), dtype, mesh, ("batch", "text_length", None)))

    def forward(state, x, t, y, y_mask, clip):
        return nnx.merge(graphdef, state)(x, t, y, y_mask, clip, backend=backend)

    in_shardings = (state_shardings(state, mesh), *(a.sharding for a in args))
    phases.mark("init")
    return aot.compile_aot(forward, (state, *args), in_shardings=in_shardings,
                           out_shardings=args[0].sharding, mesh=mesh, phases=phases)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    full = DiTConfig.full()
    p.add_argument("--slice", default="v5p-8", choices=sorted(aot.SLICES))
    p.add_argument("--mesh", default="tensor=4", help="mesh axes, e.g. tensor=4, fsdp=2,tensor=2")
    p.add_argument("--layers", type=int, default=full.num_layers)
    p.add_argument("--frames", type=int, default=36, help="latent frames")
    p.add_argument("--height", type=int, default=34, help="latent height")
    p.add_argument("--width", type=int, default=62, help="latent width")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-len", type=int, default=320)
    p.add_argument("--clip-len", type=int, default=77)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--weights", default="bf16", choices=list(quant.SCHEMES),
                   help="the block linears: bf16, or int8 / fp8 weight-only (docs/quantization.md)")
    p.add_argument("--backend", default="splash", help="attention backend; mode:local for sequence "
                                                        "parallelism, e.g. ulysses:splash")
    a = p.parse_args(argv)

    cfg = dataclasses.replace(full, num_layers=a.layers)
    mesh = aot.mesh_over(aot.tpu_devices(a.slice), aot.parse_axes(a.mesh))
    print(f"{a.slice} ({mesh.devices.size} x {mesh.devices.flat[0].device_kind}), mesh {dict(mesh.shape)}; "
          f"DiT {cfg.num_layers} layers, {a.dtype}, weights {a.weights}, backend {a.backend}; batch {a.batch}, latents "
          f"{a.frames}x{a.height}x{a.width}, text {a.clip_len} + {a.text_len}", flush=True)
    t0, phases = time.perf_counter(), aot.CpuPhases()
    compiled = compile_forward(cfg, mesh, batch=a.batch, frames=a.frames, height=a.height, width=a.width,
                               text_len=a.text_len, clip_len=a.clip_len, dtype=DTYPES[a.dtype],
                               backend=parse_backend(a.backend), weights=a.weights, phases=phases)
    print(f"forward: {aot.format_memory(aot.memory(compiled))}  (compiled in {time.perf_counter() - t0:.1f}s)")
    print(f"phases: {phases.format()}; process total {time.process_time():.1f} CPU s")


if __name__ == "__main__":
    main()
