"""Per-chip TPU memory of one full-size training step, compiled ahead of time (libtpu, no chips).

    TPU_LIBRARY_PATH=/path/to/libtpu.so python -m bench.train_memory \
        [--configs pod_544x992:v5p-128,pod_192x320:v5p-256] [--layers 2,4]

For each training config (`configs/train/<name>.py:<slice>`) the jitted, donated train step of
`training/train_step.py` (flow-matching loss, backward, clipping, AdamW, EMA; float32 master
weights, Adam moments and EMA; bf16 compute; remat per the config) is lowered for the slice's
compile-only devices with the config's mesh and compiled; `memory_analysis()` gives arguments,
outputs, temporaries and the peak per chip. The training state is laid out ZeRO-style over
fsdp x sequence (`parallel.rules.STATE_RULES`, as the training loop). The blocks are one scanned
module (`models/stack.py`); when they were a Python loop compiled unrolled, `--layers 48` took about
6 minutes of CPU on v5p-128 (mostly the XLA compile) and 10-11 GiB of host memory; `--layers a,b` compiles two depths and extrapolates linearly to the real
depth (state, gradients and saved activations are per layer; the rows say "extrapolated"). The
extrapolation can be wrong: for pod_192x320 on v5p-128 the temporaries shrink from 1 to 2 layers.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from stepvideo_jax.models.dit import StepVideoDiT  # noqa: E402
from stepvideo_jax.parallel import aot  # noqa: E402
from stepvideo_jax.parallel.rules import STATE_RULES, state_shardings  # noqa: E402
from stepvideo_jax.models.sequence_parallel import SequenceParallel  # noqa: E402
from stepvideo_jax.training import optimizer, train_state  # noqa: E402
from stepvideo_jax.training.settings import dit_config, optim_settings, step_settings  # noqa: E402
from stepvideo_jax.training.train_step import make_train_step  # noqa: E402

GIB = 2**30
HBM_V5P = 95.74e9
LATENTS = {"pod_544x992": (36, 34, 62), "pod_192x320": (36, 12, 20)}
TEXT, CLIP = 320, 77


def load_config(spec: str):
    name, _, arg = spec.partition(":")
    s = importlib.util.spec_from_file_location(name, ROOT / "configs/train" / f"{name}.py")
    module = importlib.util.module_from_spec(s)
    s.loader.exec_module(module)
    return name, arg, (module.get_config(arg) if arg else module.get_config())


def compile_step(config, name: str, slice_name: str, layers: int) -> dict[str, int]:
    """Per-chip memory of the compiled step, plus "phases": its process CPU seconds per phase
    (devices: the slice's topology; init: abstract model and training state, shardings; lower; compile)."""
    phases = aot.CpuPhases()
    cfg = dataclasses.replace(dit_config(config.model), num_layers=layers)
    settings = step_settings(config.step)
    devices = aot.tpu_devices(slice_name)
    sizes = {k: int(v) for k, v in config.mesh.items()}
    if sizes["fsdp"] == -1:
        sizes["fsdp"] = len(devices) // (sizes["data"] * sizes["sequence"] * sizes["tensor"])
    mesh = aot.mesh_over(devices, sizes)
    phases.mark("devices")
    backend = settings.attention_backend
    if backend in ("ulysses", "ring", "ulysses_ring"):
        backend = SequenceParallel(backend, local_backend="splash")
    settings = dataclasses.replace(settings, attention_backend=backend or "splash")
    schedule, tx = optimizer.build(optim_settings(config.optim, config.total_steps))
    dtype = jnp.dtype(config.compute_dtype)
    graphdef = nnx.graphdef(nnx.eval_shape(
        lambda: StepVideoDiT(cfg, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))))
    abstract_state = jax.eval_shape(lambda: train_state.create(
        nnx.state(StepVideoDiT(cfg, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))), tx,
        seed=0, use_ema=settings.ema_decay > 0))
    state_sh = state_shardings(abstract_state, mesh, STATE_RULES)   # ZeRO-style, as training/loop.py
    b = config.data.global_batch
    f, h, w = LATENTS[name]
    c0, c1 = cfg.caption_channels
    batch = {"mean": aot.abstract((b, f, cfg.in_channels, h, w), jnp.float16, mesh, ("batch", None, None, None, None)),
             "logvar": aot.abstract((b, f, cfg.in_channels, h, w), jnp.float16, mesh, ("batch", None, None, None, None)),
             "y": aot.abstract((b, TEXT, c0), jnp.float16, mesh, ("batch", None, None)),
             "y_mask": aot.abstract((b, CLIP + TEXT), jnp.int32, mesh, ("batch", None)),
             "clip": aot.abstract((b, CLIP, c1), jnp.float16, mesh, ("batch", None, None))}
    negative = {"y": aot.abstract((1, TEXT, c0), jnp.float16, mesh, None),
                "y_mask": aot.abstract((1, CLIP + TEXT), jnp.int32, mesh, None),
                "clip": aot.abstract((1, CLIP, c1), jnp.float16, mesh, None)}
    step = make_train_step(graphdef, tx, schedule, settings)
    state_args = jax.tree.map(lambda s, x: jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), x), state_sh, abstract_state,
        is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    jitted = jax.jit(step, in_shardings=(state_sh, jax.tree.map(lambda a: a.sharding, batch),
                                         jax.tree.map(lambda a: a.sharding, negative)),
                     out_shardings=(state_sh, None), donate_argnums=0)
    phases.mark("init")
    with jax.set_mesh(mesh):
        lowered = jitted.lower(state_args, batch, negative)
    phases.mark("lower")
    compiled = lowered.compile()
    phases.mark("compile")
    mem = aot.memory(compiled)
    mem["phases"] = phases
    mem["mesh"] = ",".join(f"{k}={v}" for k, v in sizes.items() if v > 1)
    mem["chips"] = len(devices)
    return mem


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="pod_544x992:v5p-128,pod_544x992:v5p-256,pod_192x320:v5p-128,"
                                        "pod_192x320:v5p-256")
    p.add_argument("--layers", default="2,4", help="one depth (compiled as is) or two (extrapolated)")
    a = p.parse_args(argv)
    depths = [int(x) for x in a.layers.split(",")]
    print("| config | slice (chips) | mesh | batch | layers | arguments | temporaries | peak / chip | fits 95.7 GB | how |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for spec in a.configs.split(","):
        name, slice_name, config = load_config(spec)
        real = dit_config(config.model).num_layers
        t0 = time.perf_counter()
        mems = [compile_step(config, name, slice_name, n) for n in depths]
        for n, m in zip(depths, mems):
            print(f"{name}:{slice_name} {n} layers: {m['phases'].format()}", flush=True)
        if len(mems) == 2:
            (n1, m1), (n2, m2) = zip(depths, mems)
            at = lambda k: m1[k] + (m2[k] - m1[k]) * (real - n1) / (n2 - n1)
            mem = {k: at(k) for k in ("argument_size_in_bytes", "temp_size_in_bytes", "peak")}
            layers = real
            how = (f"extrapolated from {n1} layers (temporaries {m1['temp_size_in_bytes'] / GIB:.2f} GiB) and "
                   f"{n2} (temporaries {m2['temp_size_in_bytes'] / GIB:.2f} GiB)")
            if m2["temp_size_in_bytes"] < m1["temp_size_in_bytes"]:
                how += "; NOT linear (temporaries shrink with depth): compile the real depth instead"
        else:
            mem, layers, how = mems[0], depths[0], "compiled"
        fits = "yes" if mem["peak"] <= HBM_V5P else "NO"
        print(f"| {name} | {slice_name} ({mems[0]['chips']}) | {mems[0]['mesh']} | {config.data.global_batch} | "
              f"{layers} | {mem['argument_size_in_bytes'] / GIB:.2f} GiB | {mem['temp_size_in_bytes'] / GIB:.2f} GiB | "
              f"{mem['peak'] / GIB:.2f} GiB | {fits} | {how}, {time.perf_counter() - t0:.0f} s |", flush=True)
    print(f"process total {time.process_time():.1f} CPU s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
