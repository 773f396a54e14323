"""Per-chip memory of ONE full-size Video-DPO train step, compiled ahead of time for a TPU slice.

    TPU_LIBRARY_PATH=/path/to/libtpu.so python -m bench.dpo_memory --slice v5p-64 --mesh fsdp=2,sequence=4,tensor=4
    python -m bench.dpo_memory --slice v5p-64 --mesh fsdp=2,sequence=4,tensor=4 --lora-rank 64

The production step (`training/dpo_step.py`) as the loop jits it: the `TrainState` (float32 master
weights and AdamW moments of the policy, or of the LoRA adapters only) sharded by the rules and
donated; the frozen reference (bf16 by default, not donated) sharded by the same rules; with LoRA
the policy's frozen base IS the reference (one copy). The batch holds `data * fsdp` pairs (the
loop shards pairs over the batch axes) of 36x34x62 latents (204x544x992 px, 75,888 tokens per
video), 77 + 320 text tokens; the policy forward + backward and the reference forward each see
both videos of every pair. Nothing runs: `memory_analysis()` of the TPU compilation is the plan
(`stepvideo_jax/parallel/aot.py`).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host computes nothing; TPU devices are compile-only

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from stepvideo_jax.dtypes import DTYPES  # noqa: E402
from stepvideo_jax.models.sequence_parallel import parse_backend  # noqa: E402
from stepvideo_jax.models.dit import DiTConfig, StepVideoDiT  # noqa: E402
from stepvideo_jax.parallel import aot  # noqa: E402
from stepvideo_jax.parallel.rules import STATE_RULES, state_shardings  # noqa: E402
from stepvideo_jax.models import lora  # noqa: E402
from stepvideo_jax.training import train_state  # noqa: E402
from stepvideo_jax.training.checkpoint import abstract_with_shardings  # noqa: E402
from stepvideo_jax.training import optimizer as optim  # noqa: E402
from stepvideo_jax.training.dpo_step import DPOSettings, make_dpo_step  # noqa: E402
from stepvideo_jax.training.train_step import StepSettings  # noqa: E402


def compile_dpo_step(cfg: DiTConfig, mesh, *, pairs, frames, height, width, text_len, clip_len, compute_dtype,
                     ref_dtype, lora_rank, remat, backend):
    shaped = lambda tree, sh: abstract_with_shardings(tree, sh)  # noqa: E731
    policy = lambda: StepVideoDiT(cfg, dtype=compute_dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))  # noqa: E731
    ref_graphdef, ref_params = nnx.split(nnx.eval_shape(
        lambda: StepVideoDiT(cfg, dtype=compute_dtype, param_dtype=ref_dtype, rngs=nnx.Rngs(0))))
    reference = shaped(ref_params, state_shardings(ref_params, mesh))
    if lora_rank:
        model = nnx.eval_shape(lambda: lora.apply_lora(policy(), rank=lora_rank, alpha=float(lora_rank)))
        graphdef, trained = nnx.graphdef(model), nnx.state(model, lora.LoRAParam)
        frozen = {"reference": reference, "base": reference}
    else:
        graphdef, trained = nnx.split(nnx.eval_shape(policy))
        frozen = {"reference": reference, "base": None}
    schedule = optax.constant_schedule(1e-5)
    opt = optim.adamw(schedule)
    abstract_state = jax.eval_shape(lambda p: train_state.create(p, opt, seed=0, use_ema=False), trained)
    state_sh = state_shardings(abstract_state, mesh, STATE_RULES)   # ZeRO-style, as training/loop.py
    state = shaped(abstract_state, state_sh)
    c_text, c_clip = cfg.caption_channels
    latent = (pairs, frames, cfg.in_channels, height, width)
    bax = ("batch", None, None, None, None)
    batch = {"mean_w": aot.abstract(latent, jnp.float32, mesh, bax),
             "logvar_w": aot.abstract(latent, jnp.float32, mesh, bax),
             "mean_l": aot.abstract(latent, jnp.float32, mesh, bax),
             "logvar_l": aot.abstract(latent, jnp.float32, mesh, bax),
             "y": aot.abstract((pairs, text_len, c_text), jnp.float32, mesh, ("batch", None, None)),
             "y_mask": aot.abstract((pairs, clip_len + text_len), jnp.int32, mesh, ("batch", None)),
             "clip": aot.abstract((pairs, clip_len, c_clip), jnp.float32, mesh, ("batch", None, None))}
    settings = StepSettings(remat=remat, attention_backend=backend)
    step = make_dpo_step(graphdef, opt, schedule, settings, ref_graphdef=ref_graphdef, dpo=DPOSettings())
    frozen_sh = jax.tree.map(lambda a: a.sharding, frozen)
    jitted = jax.jit(step, in_shardings=(state_sh, jax.tree.map(lambda a: a.sharding, batch), frozen_sh),
                     out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())), donate_argnums=0)
    with jax.set_mesh(mesh):
        return jitted.lower(state, batch, frozen).compile()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    full = DiTConfig.full()
    p.add_argument("--slice", default="v5p-64", choices=sorted(aot.SLICES))
    p.add_argument("--mesh", default="fsdp=2,sequence=4,tensor=4", help="mesh axes, e.g. fsdp=8,tensor=4")
    p.add_argument("--layers", type=int, default=full.num_layers)
    p.add_argument("--frames", type=int, default=36, help="latent frames")
    p.add_argument("--height", type=int, default=34, help="latent height")
    p.add_argument("--width", type=int, default=62, help="latent width")
    p.add_argument("--pairs", type=int, default=0, help="pairs per step (default: data * fsdp)")
    p.add_argument("--text-len", type=int, default=320)
    p.add_argument("--clip-len", type=int, default=77)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="policy compute dtype")
    p.add_argument("--reference-dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--lora-rank", type=int, default=0, help="> 0: LoRA on the attention projections")
    p.add_argument("--remat", default="full", help="remat policy of a block (training/train_step.py)")
    p.add_argument("--backend", default="ulysses:splash", help="attention backend (mode:local with a "
                                                                "sequence axis)")
    a = p.parse_args(argv)

    cfg = dataclasses.replace(full, num_layers=a.layers)
    axes = aot.parse_axes(a.mesh)
    mesh = aot.mesh_over(aot.tpu_devices(a.slice), axes)
    pairs = a.pairs or axes.get("data", 1) * axes.get("fsdp", 1)
    print(f"{a.slice} ({mesh.devices.size} x {mesh.devices.flat[0].device_kind}), mesh {dict(mesh.shape)}; "
          f"DiT {cfg.num_layers} layers, compute {a.dtype}, reference {a.reference_dtype}, "
          f"{'LoRA rank ' + str(a.lora_rank) if a.lora_rank else 'full fine-tuning'}, remat {a.remat}, "
          f"backend {a.backend}; {pairs} pairs of {a.frames}x{a.height}x{a.width} latents, "
          f"text {a.clip_len} + {a.text_len}", flush=True)
    t0 = time.perf_counter()
    compiled = compile_dpo_step(cfg, mesh, pairs=pairs, frames=a.frames, height=a.height, width=a.width,
                                text_len=a.text_len, clip_len=a.clip_len, compute_dtype=DTYPES[a.dtype],
                                ref_dtype=DTYPES[a.reference_dtype], lora_rank=a.lora_rank, remat=a.remat,
                                backend=parse_backend(a.backend))
    print(f"DPO step: {aot.format_memory(aot.memory(compiled))}  (compiled in {time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    main()
