"""Per-chip memory of the full-size Video-VAE, compiled ahead of time for ONE TPU chip from this machine.

    TPU_LIBRARY_PATH=/path/to/libtpu.so python -m bench.vae_tpu_memory [--slice v5p-8] [--what decode,encode]
    (or `pip install libtpu==0.0.42.1` into the venv instead of TPU_LIBRARY_PATH)

Official widths, 64 latent channels, bf16 parameters and activations. Decodes 36 latents (1, 36, 64, 34,
62) to 204 frames at 544x992 and encodes 204 frames (12 chunks of 17) with the default settings
(chunks under one `lax.map`, the full-resolution sections streamed over time slabs, splash attention
for the 42,160-position mid attention), prints `memory_analysis()` of the compiled program (per chip:
arguments, outputs, temporaries, peak) and the FLOPs of the program, counted from the shapes of its
convolutions and matmuls (the mid attention counted dense; its causal half is what must be computed).
Nothing runs: the TPU devices are compile-only.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host computes nothing; TPU devices are compile-only

import jax  # noqa: E402
import jax.extend  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from stepvideo_jax.models.vae import VAEConfig, VideoVAE  # noqa: E402
from stepvideo_jax.parallel import aot  # noqa: E402

GIB = 2 ** 30


def abstract_vae(dtype, backend):
    return nnx.eval_shape(lambda: VideoVAE(VAEConfig.full(), dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0),
                                           attention_backend=backend))


def program(method: str, dtype, backend, kw):
    graphdef, state = nnx.split(abstract_vae(dtype, backend))

    def fn(state, x):
        return getattr(nnx.merge(graphdef, state), method)(x, **kw)

    return fn, state


def flops(fn, *args) -> dict[str, float]:
    """FLOPs (2 x multiply-adds) of the convolutions and matmuls in `fn`'s jaxpr, loops unrolled by
    their trip counts. `attention` = the dense (b, s, s) score and value matmuls of the mid attention."""
    totals = {"conv": 0.0, "matmul": 0.0, "attention": 0.0}

    def walk(jaxpr, mult):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "conv_general_dilated":
                out, rhs = eqn.outvars[0].aval, eqn.invars[1].aval
                dn = eqn.params["dimension_numbers"]
                window = np.prod([rhs.shape[i] for i in dn.rhs_spec[2:]])
                cin = rhs.shape[dn.rhs_spec[1]]
                totals["conv"] += mult * 2.0 * np.prod(out.shape) * window * cin
            elif name == "dot_general":
                (lc, _), (lb, _) = eqn.params["dimension_numbers"]
                lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
                n = mult * 2.0 * np.prod(out.shape) * np.prod([lhs.shape[i] for i in lc])
                totals["attention" if lb else "matmul"] += n  # only attention batches its matmuls
            for sub in _subjaxprs(eqn.params):
                walk(sub, mult * (eqn.params["length"] if name == "scan" else 1))

    walk(jax.make_jaxpr(fn)(*args).jaxpr, 1)
    totals["total"] = sum(totals.values())
    return totals


def _subjaxprs(params):
    for v in params.values():
        for item in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slice", default="v5p-8", help=f"TPU slice whose chip is the target: {sorted(aot.SLICES)}")
    p.add_argument("--what", default="decode,encode")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--frames", type=int, default=204)
    p.add_argument("--height", type=int, default=544)
    p.add_argument("--width", type=int, default=992)
    p.add_argument("--decode-stream-frames", type=int, default=1)
    p.add_argument("--encode-stream-frames", type=int, default=1)
    p.add_argument("--chunks-per-step", type=int, default=1)
    p.add_argument("--attention", default="splash", help="backend of the mid attention (splash, blockwise)")
    args = p.parse_args(argv)

    cfg, dtype = VAEConfig.full(), jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    from stepvideo_jax.models.vae import latent_frames

    f, h, w = args.frames, args.height, args.width
    lat = (1, latent_frames(cfg, f), cfg.z_channels, h // cfg.spatial_factor, w // cfg.spatial_factor)
    device = aot.tpu_devices(args.slice)[0]
    mesh = aot.mesh_over([device], {"data": 1})
    print(f"target: one chip of {args.slice} ({device.device_kind}); {args.dtype}; video (1, {f}, 3, {h}, {w}) "
          f"<-> latents {lat}; attention {args.attention}")
    jobs = {
        "decode": ("decode", lat, dict(stream_frames=args.decode_stream_frames, chunks_per_step=args.chunks_per_step)),
        "encode": ("encode_moments", (1, f, 3, h, w),
                   dict(stream_frames=args.encode_stream_frames, chunks_per_step=args.chunks_per_step)),
    }
    for what in filter(None, args.what.split(",")):
        method, shape, kw = jobs[what]
        fn, state = program(method, dtype, args.attention, kw)
        x = aot.abstract(shape, dtype, mesh, None)
        state_sharding = jax.tree.map(lambda _: x.sharding, state)
        counted = flops(program(method, dtype, "xla", kw)[0], state, jax.ShapeDtypeStruct(shape, dtype))
        t0 = time.perf_counter()
        try:
            compiled = aot.compile_aot(fn, (state, x), in_shardings=(state_sharding, x.sharding), mesh=mesh)
        except Exception as e:  # noqa: BLE001 - report and go on with the next program
            print(f"{what} {kw}: compile failed after {time.perf_counter() - t0:.0f} s: {type(e).__name__}: "
                  f"{str(e)[:2000]}")
            continue
        mem = aot.memory(compiled)
        print(f"{what} {kw}: compiled in {time.perf_counter() - t0:.0f} s")
        print(f"  memory per chip: {aot.format_memory(mem)}; peak {mem['peak'] / GIB:.2f} GiB "
              f"({'fits' if mem['peak'] <= 16 * GIB else 'does NOT fit'} in 16 GiB)")
        print("  FLOPs: " + ", ".join(f"{k} {v / 1e12:.1f} T" for k, v in counted.items())
              + f" (causal attention needs {counted['attention'] / 2e12:.1f} T)")


if __name__ == "__main__":
    main()
