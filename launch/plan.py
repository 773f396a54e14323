"""Full-size memory plan: per-chip memory of the compiled pipeline programs on TPU topologies.

    TPU_LIBRARY_PATH=/path/to/libtpu.so python launch/plan.py [--targets v5p-1,v5p-4,...]
        [--programs denoise,step_llm,clip,vae_decode] [--mesh sequence=2,tensor=2] [--layers N]
        [--weights bf16|int8|fp8] [--offload none|blocks] [--cfg_sequential] [--hlo_dir DIR]

Compiles ahead of time for real TPU topologies from a CPU machine (libtpu compile-only devices,
`stepvideo_jax/parallel/aot.py`; nothing runs) and prints `memory_analysis()` per chip (arguments,
outputs, temporaries, peak) with analytic FLOPs, for:

- `denoise`: one CFG denoising step of the DiT (velocity on the [cond, uncond] batch of 2, guidance,
  Euler update) at 204x544x992 px = latents (1, 36, 64, 34, 62), 75,888 tokens, 397 text keys; bf16.
- `step_llm`, `clip`: the text encoders on 2 prompts (Step-LLM 320 tokens bf16, CLIP 77 tokens f32).
- `vae_decode`: the Video-VAE decode of those latents (bf16, splash mid attention, the default
  `stream_frames=1`, `chunks_per_step=1`, as in bench/vae_tpu_memory.py) over the target's whole mesh:
  the 12 independent 3-latent chunks are split over every chip (`models/vae.py` `spread_over_devices`,
  logical axis `vae_chunks`), padded with zero chunks to a multiple of the chips (8 chips: 16, two
  per chip; 16 chips: one per chip, 4 of them on zero chunks), the VAE replicated on each chip.

`--weights int8|fp8`: the DiT's and Step-LLM's block linears quantised (`models/quant.py`: one byte
per weight plus a float32 scale per output channel, dequantised before each matmul); the abstract
models are quantised with `quant.quantize`, so the plan holds exactly what a quantised restore holds.

`--offload blocks`: the DiT's and Step-LLM's stacked layers in host memory (`models/offload.py`;
reported apart, they leave the chip's arguments), fetched one layer ahead inside the scan.
`--cfg_sequential`: the denoising step runs the cond and uncond rows one after the other
(`flow_matching.denoise_step`). docs/offload.md has the one-chip rows.

Each target uses one mesh for every program (parameters sharded by `parallel/rules.py`: tensor
parallelism keeps each chip's share of the weights without FSDP gathers; attention sequence-parallel
over `sequence`). The pipeline runs the programs one after the other, releasing each model before the
next (text encoders first), so a target fits when every program's peak fits the chip's HBM. Layer
stacks are Python loops, compiled unrolled at their real depth (`--layers N` compiles N layers
instead, for a quick look; such rows are marked).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import sys
import time
from typing import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host computes nothing; TPU devices are compile-only
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from stepvideo_jax.models import offload as offload_mod  # noqa: E402
from stepvideo_jax.models import quant  # noqa: E402
from stepvideo_jax.models.dit import DiTConfig, StepVideoDiT  # noqa: E402
from stepvideo_jax.models.flops import forward_flops  # noqa: E402
from stepvideo_jax.models.hunyuan_clip import HunyuanClip, HunyuanClipConfig  # noqa: E402
from stepvideo_jax.models.step_llm import StepLLM, StepLLMConfig  # noqa: E402
from stepvideo_jax.models.vae import VAEConfig, VideoVAE  # noqa: E402
from stepvideo_jax.parallel import aot  # noqa: E402
from stepvideo_jax.parallel.mesh import MeshConfig  # noqa: E402
from stepvideo_jax.parallel.rules import state_shardings  # noqa: E402
from stepvideo_jax.models.sequence_parallel import SequenceParallel  # noqa: E402
from stepvideo_jax.sampling.flow_matching import denoise_step  # noqa: E402
from stepvideo_jax.sampling.pipeline import dit_velocity_fn  # noqa: E402

GB, GIB = 1e9, 2**30
LATENTS = (1, 36, 64, 34, 62)   # 204 x 544 x 992 px
TEXT, CLIP_LEN, PROMPTS = 320, 77, 2


@dataclasses.dataclass(frozen=True)
class Target:
    """`chips` chips of TPU slice `slice_name`, HBM per chip, and the mesh every program uses."""

    slice_name: str
    chips: int
    hbm: float
    mesh: str


TARGETS = {
    "v5p-1": Target("v5p-8", 1, 95 * GB, "fsdp=1"),
    "v5p-4": Target("v5p-8", 4, 95 * GB, "sequence=2,tensor=2"),
    "v5p-8": Target("v5p-16", 8, 95 * GB, "sequence=4,tensor=2"),
    "v6e-1": Target("v6e-8", 1, 32 * GB, "fsdp=1"),
    "v6e-8": Target("v6e-8", 8, 32 * GB, "sequence=2,tensor=4"),
    "v6e-16": Target("v6e-16", 16, 32 * GB, "sequence=4,tensor=4"),
}


@dataclasses.dataclass
class Program:
    """A compilable program: `build(mesh, layers, weights) -> (fn, abstract args, in_shardings, donate)`
    (`weights`: the block-linear scheme, `models.quant.SCHEMES`; ignored by CLIP and the VAE)."""

    build: Callable
    layers: int | None          # real depth of the layer stack; None: no stack
    flops: float                # analytic FLOPs of one call


def attention_backend(mesh, heads: int):
    """Sequence parallelism over `sequence` when it is > 1: Ulysses when the degree divides the
    heads per tensor shard, else Ulysses inside ring; the local kernel is splash."""
    n, t = mesh.shape.get("sequence", 1), mesh.shape.get("tensor", 1)
    if n == 1:
        return None
    mode = "ulysses" if (heads // t) % n == 0 else "ulysses_ring"
    return SequenceParallel(mode, local_backend="splash")


def _abstract_state(module_fn, mesh, weights="bf16", offload=False):
    model = quant.quantize(nnx.eval_shape(module_fn), weights)
    if offload:
        offload_mod.mark(model)
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh)
    return graphdef, state, offload_mod.host_shardings(model, shardings) if offload else shardings


def build_denoise(mesh, layers, weights="bf16", offload=False, cfg_sequential=False):
    cfg = dataclasses.replace(DiTConfig.full(), num_layers=layers)
    graphdef, state, shardings = _abstract_state(
        lambda: StepVideoDiT(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), mesh, weights,
        offload)
    velocity = dit_velocity_fn(graphdef, backend=attention_backend(mesh, cfg.num_heads))
    bf16 = jnp.bfloat16
    latents = aot.abstract(LATENTS, jnp.float32, mesh, None)
    cond = {"y": aot.abstract((PROMPTS, TEXT, cfg.caption_channels[0]), bf16, mesh, ("batch", "text_length", None)),
            "y_mask": aot.abstract((PROMPTS, CLIP_LEN + TEXT), bf16, mesh, ("batch", "text_length")),
            "clip": aot.abstract((PROMPTS, CLIP_LEN, cfg.caption_channels[1]), bf16, mesh,
                                 ("batch", "text_length", None))}
    scalar = aot.abstract((), jnp.float32, mesh, None)

    def step(state, latents, cond, t, sigma, sigma_next, guidance):
        return denoise_step(velocity, state, latents, cond, t, sigma, sigma_next, guidance, cfg=True,
                            model_dtype=bf16, cfg_sequential=cfg_sequential)

    args = (state, latents, cond, scalar, scalar, scalar, scalar)
    shard = lambda a: jax.tree.map(lambda x: x.sharding, a)
    return step, args, (shardings, *(shard(a) for a in args[1:])), (1,)


def build_step_llm(mesh, layers, weights="bf16", offload=False, **_):
    cfg = dataclasses.replace(StepLLMConfig.full(), num_layers=layers)
    graphdef, state, shardings = _abstract_state(
        lambda: StepLLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), mesh, weights,
        offload)
    ids = aot.abstract((PROMPTS, TEXT), jnp.int32, mesh, ("batch", "text_length"))
    fn = lambda state, ids: nnx.merge(graphdef, state)(ids)
    return fn, (state, ids), (shardings, ids.sharding), ()


def build_clip(mesh, layers, weights="bf16", **_):
    cfg = dataclasses.replace(HunyuanClipConfig.full(), num_layers=layers)
    graphdef, state, shardings = _abstract_state(lambda: HunyuanClip(cfg, rngs=nnx.Rngs(0)), mesh)
    ids = aot.abstract((PROMPTS, CLIP_LEN), jnp.int32, mesh, ("batch", "text_length"))
    mask = aot.abstract((PROMPTS, CLIP_LEN), jnp.int32, mesh, ("batch", "text_length"))
    fn = lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask)
    return fn, (state, ids, mask), (shardings, ids.sharding, mask.sharding), ()


def build_vae_decode(mesh, layers, weights="bf16", **_):
    """The Video-VAE decode over all of `mesh` (chunks split by `spread_over_devices`)."""
    vae = nnx.eval_shape(lambda: VideoVAE(VAEConfig.full(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                          rngs=nnx.Rngs(0), attention_backend="splash"))
    graphdef, state = nnx.split(vae)
    fn = lambda state, x: nnx.merge(graphdef, state).decode(x, stream_frames=1, chunks_per_step=1)
    x = aot.abstract(LATENTS, jnp.bfloat16, mesh, None)   # replicated, like the VAE's parameters
    return fn, (state, x), (jax.tree.map(lambda _: x.sharding, state), x.sharding), ()


def vae_chunk_split(chips: int) -> str:
    """How `spread_over_devices` splits the decode's chunks over `chips` chips."""
    chunks = LATENTS[1] // VAEConfig.full().latent_len
    padded = -(-chunks // chips) * chips
    return (f"{chunks} chunks, {padded // chips} per chip"
            + (f" (padded to {padded})" if padded != chunks else ""))


def dit_flops() -> float:
    return PROMPTS * forward_flops(DiTConfig.full(), frames=LATENTS[1], height=LATENTS[3], width=LATENTS[4],
                                   text_length=TEXT, clip_length=CLIP_LEN)


def encoder_flops(params: int, layers: int, d: int, s: int, causal: bool) -> float:
    """2 x params x tokens for the matmuls, plus 4 s^2 d per layer for scores and values (half when
    causal), per prompt."""
    return PROMPTS * (2 * params * s + layers * 4 * s * s * d * (0.5 if causal else 1.0))


def programs() -> dict[str, Program]:
    llm, clip = StepLLMConfig.full(), HunyuanClipConfig.full()
    count = lambda make: sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(nnx.eval_shape(make))))
    llm_params = count(lambda: StepLLM(llm, rngs=nnx.Rngs(0)))
    clip_params = count(lambda: HunyuanClip(clip, rngs=nnx.Rngs(0)))
    return {
        "denoise": Program(build_denoise, DiTConfig.full().num_layers, dit_flops()),
        "step_llm": Program(build_step_llm, llm.num_layers,
                            encoder_flops(llm_params - llm.vocab_size * llm.hidden_size, llm.num_layers,
                                          llm.hidden_size, TEXT, True)),
        "clip": Program(build_clip, clip.num_layers,
                        encoder_flops(clip_params, clip.num_layers, clip.hidden_size, CLIP_LEN, False)),
        "vae_decode": Program(build_vae_decode, None, float("nan")),
    }


def compile_memory(program: Program, mesh, layers: int, weights: str = "bf16", hlo_path: str = "",
                   **levers) -> dict[str, int]:
    """Per-chip memory of `program` (`levers`: `offload`, `cfg_sequential`; see `build_denoise`);
    `host_argument_size_in_bytes`: the arguments held in host memory (offloaded layers). With
    `hlo_path`, the compiled HLO text is written there."""
    fn, args, shardings, donate = program.build(mesh, layers, weights, **levers)
    jitted = jax.jit(fn, in_shardings=shardings, donate_argnums=donate)
    with jax.set_mesh(mesh):
        compiled = jitted.lower(*args).compile()
    if hlo_path:
        pathlib.Path(hlo_path).write_text(compiled.as_text())
    mem = aot.memory(compiled)
    mem["host_argument_size_in_bytes"] = int(compiled.memory_analysis().host_argument_size_in_bytes)
    return mem


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, from {sorted(TARGETS)}")
    p.add_argument("--programs", default="denoise,step_llm,clip,vae_decode")
    p.add_argument("--mesh", default=None, help="override every target's mesh, e.g. fsdp=2,sequence=2")
    p.add_argument("--layers", type=int, default=None, help="compile this many layers (default: real depth)")
    p.add_argument("--weights", default="bf16", choices=list(quant.SCHEMES),
                   help="the DiT's and Step-LLM's block linears (docs/quantization.md)")
    p.add_argument("--offload", default="none", choices=list(offload_mod.CHOICES),
                   help="blocks: the DiT's and Step-LLM's stacked layers in host memory (docs/offload.md)")
    p.add_argument("--cfg_sequential", action="store_true", help="denoise: the CFG rows one after the other")
    p.add_argument("--hlo_dir", default="", help="write each program's compiled HLO text there")
    a = p.parse_args(argv)
    progs = programs()
    unknown = [t for t in a.targets.split(",") if t not in TARGETS] + [
        q for q in a.programs.split(",") if q not in progs]
    if unknown:
        raise SystemExit(f"unknown targets/programs {unknown}; targets {sorted(TARGETS)}, programs {sorted(progs)}")

    print("| target | mesh | program | arguments | outputs | temporaries | peak / chip | HBM | fits | "
          "TFLOPs / call | how |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in a.targets.split(","):
        target = TARGETS[name]
        devices = aot.tpu_devices(target.slice_name)[:target.chips]
        sizes = MeshConfig.from_string(a.mesh or target.mesh).resolve(len(devices))
        mesh = aot.mesh_over(devices, sizes)
        mesh_text = ",".join(f"{k}={v}" for k, v in sizes.items() if v > 1) or "1 chip"
        for prog_name in a.programs.split(","):
            t0 = time.perf_counter()
            try:
                prog = progs[prog_name]
                layers = prog.layers if a.layers is None or prog.layers is None else a.layers
                hlo = (f"{a.hlo_dir}/{name}_{prog_name}_{a.weights}_{a.offload}"
                       f"{'_cfgseq' if a.cfg_sequential else ''}.hlo.txt") if a.hlo_dir else ""
                mem = compile_memory(prog, mesh, layers or 0, a.weights, hlo, offload=a.offload == "blocks",
                                     cfg_sequential=a.cfg_sequential)
                how = f"{layers} layers" if layers else (
                    vae_chunk_split(mesh.size) if prog_name == "vae_decode" else "compiled")
                how += "" if layers == prog.layers else f" of {prog.layers} (partial)"
                how += f", weights {a.weights}" if a.weights != "bf16" and prog_name in ("denoise", "step_llm") else ""
                how += (f", offload blocks ({mem['host_argument_size_in_bytes'] / GIB:.2f} GiB in host memory)"
                        if a.offload == "blocks" and prog_name in ("denoise", "step_llm") else "")
                how += ", CFG rows sequential" if a.cfg_sequential and prog_name == "denoise" else ""
            except Exception as e:  # noqa: BLE001 - one failed program must not hide the others
                print(f"| {name} | {mesh_text} | {prog_name} | failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]} | | | | | | | |", flush=True)
                continue
            fits = "yes" if mem["peak"] <= target.hbm else "NO"
            flops = progs[prog_name].flops
            print(f"| {name} | {mesh_text} | {prog_name} | "
                  f"{mem['argument_size_in_bytes'] / GIB:.2f} GiB | {mem['output_size_in_bytes'] / GIB:.2f} GiB | "
                  f"{mem['temp_size_in_bytes'] / GIB:.2f} GiB | {mem['peak'] / GIB:.2f} GiB | "
                  f"{target.hbm / GIB:.1f} GiB | {fits} | "
                  f"{'-' if math.isnan(flops) else f'{flops / 1e12:.1f}'} | {how}, "
                  f"{time.perf_counter() - t0:.0f} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
