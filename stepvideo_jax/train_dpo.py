"""Video-DPO fine-tuning of the DiT: `python -m stepvideo_jax.train_dpo --config configs/dpo/<name>.py`.

The run is the training loop of `training/loop.py` (mesh, sharding rules, grain pipeline, Orbax
checkpoints with exact resume, metrics, NaN stop) with a DPO `Objective`:
- data: a preference set (`data/preferences.py`), `config.data.path`, or `config.data.synthetic`
  (the synthetic captioned-motion pairs, written into the workdir);
- step: `training/dpo_step.py`; the frozen reference (and, with LoRA, the policy's frozen base) is
  the step's third, never-donated argument, stored in `config.dpo.reference_dtype` (bfloat16 by
  default) and sharded by the same logical-axis rules as the policy; it is rebuilt from its source
  on resume, never checkpointed;
- policy: full fine-tuning (float32 master weights, as `train`), or LoRA adapters on the attention
  projections (`config.dpo.lora_rank > 0`, `training/lora.py`): only the adapters are optimised and
  checkpointed. With LoRA and the reference taken from the initial policy, the frozen base and the
  reference are the same arrays (one copy in memory).

Weight sources (`config.dpo.policy_from`, `config.dpo.reference_from`):
  ""                      the seed's random init (tiny configs); for the reference: the initial policy
  <training workdir>      its latest checkpoint (`checkpoints/`), raw weights; `<workdir>:ema` the EMA
  <release transformer/>  an official release's `transformer` directory (config.json + safetensors)
  <org/name[@revision]>   a Hugging Face repo id: its `transformer/` (downloaded into the hub cache)
  <converted root>        a `python -m stepvideo_jax.convert` output (`conversion.json`), its transformer
Re-running the same command resumes. `--workdir` overrides `config.workdir`.
"""
from __future__ import annotations

import functools
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from stepvideo_jax import config_files, hub, logs
from stepvideo_jax.data import preferences
from stepvideo_jax.models.dit import DiTConfig, StepVideoDiT
from stepvideo_jax.parallel.rules import state_shardings
from stepvideo_jax.training import lora
from stepvideo_jax.training.dpo_step import DPOSettings, make_dpo_step
from stepvideo_jax.training.failure import run_or_exit
from stepvideo_jax.training.loop import Objective, TrainResult, dit_config, train

SOURCES = ('"" (seed init / initial policy)', "a training workdir [:ema]", "a release transformer dir",
           "a Hugging Face repo id (org/name[@revision])", "a converted checkpoint root")


def dpo_settings(config) -> DPOSettings:
    d = config.dpo
    return DPOSettings(beta=d.beta, beta_schedule=d.beta_schedule, sft_weight=d.sft_weight)


def open_preferences(config, workdir: pathlib.Path) -> preferences.PairDataset:
    """`config.data.path` when set (it wins over a config's default synthetic set), else the
    synthetic pairs written into the workdir."""
    d = config.data
    if d.get("path"):
        return preferences.PairDataset(d.path)
    if d.get("synthetic"):
        root = workdir / "synthetic_preferences"
        if not (root / preferences.PAIRS_FILE).exists():
            s = d.synthetic
            preferences.write_synthetic(root, num_pairs=s.num_pairs, frames=s.frames, height=s.height,
                                        width=s.width, channels=s.channels, time_factor=s.time_factor,
                                        space_factor=s.space_factor, text_length=s.text_length,
                                        clip_length=s.clip_length, caption_channels=tuple(s.caption_channels),
                                        seed=s.seed)
        return preferences.PairDataset(root)
    raise ValueError("config.data needs `path` (a stepvideo-preferences-v1 directory) or `synthetic`")


def load_weights(source: str, cfg: DiTConfig, *, dtype, param_dtype, seed: int, mesh=None) -> nnx.State:
    """Plain DiT params from a source (module docstring; a Hugging Face repo id means its
    `transformer/`): a converted checkpoint or a release `transformer/` is restored in `param_dtype`
    straight into `mesh`'s rule shardings; the others load on the default device (the seed init in
    float32, as the policy's; cast and place them with `_cast_place`)."""
    if not source:
        return jax.jit(lambda: nnx.state(StepVideoDiT(cfg, dtype=dtype, param_dtype=jnp.float32,
                                                      rngs=nnx.Rngs(seed))))()
    path, _, which = source.partition(":")
    root = pathlib.Path(hub.dit_source(path))
    if (root / "checkpoints").is_dir():
        from stepvideo_jax.training.loop import load_dit

        if which not in ("", "ema"):
            raise ValueError(f"{source!r}: a training workdir takes the suffix ':ema' or none")
        params = nnx.state(load_dit(root, ema=which == "ema", dtype=dtype))
    elif (root / "conversion.json").is_file():
        from stepvideo_jax.convert.cli import load_converted

        params = nnx.state(load_converted(root, "transformer", dtype=dtype, param_dtype=param_dtype, mesh=mesh))
    elif (root / "config.json").is_file():
        from stepvideo_jax.convert.release_restore import load_release_component

        params = nnx.state(load_release_component(root, "transformer", param_dtype=param_dtype, dtype=dtype,
                                                  mesh=mesh))
    else:
        raise ValueError(f"weight source {source!r} is none of: {', '.join(SOURCES)}")
    want = jax.eval_shape(lambda: nnx.state(StepVideoDiT(cfg, dtype=dtype, param_dtype=jnp.float32,
                                                         rngs=nnx.Rngs(0))))
    if _shapes(params) != _shapes(want):   # (shapes compared per state path: tuples are pytrees themselves)
        raise ValueError(f"weights of {source!r} do not fit the configured DiT {cfg}")
    return params


def _shapes(state: nnx.State) -> dict[str, tuple[int, ...]]:
    return {"/".join(map(str, path)): tuple(v.get_value().shape) for path, v in nnx.to_flat_state(state)}


def _cast_place(params: nnx.State, dtype, mesh) -> nnx.State:
    sh = state_shardings(params, mesh)
    return jax.jit(lambda p: jax.tree.map(lambda a: a.astype(dtype), p), out_shardings=sh)(params)


def dpo_objective(config) -> Objective:
    """The `Objective` of a DPO config (see the module docstring)."""
    d = config.dpo
    if config.model.get("init_from"):
        raise ValueError("DPO configs take the policy from config.dpo.policy_from; leave model.init_from empty")
    if config.eval_every:
        raise ValueError("the flow-matching held-out loss does not apply to DPO: set eval_every = 0")
    if config.step.cond_dropout:
        raise ValueError("DPO compares two videos of one prompt: set step.cond_dropout = 0")
    cfg = dit_config(config.model)
    dtype = jnp.dtype(config.compute_dtype)
    ref_dtype = jnp.dtype(d.reference_dtype)
    use_lora = d.lora_rank > 0
    ref_graphdef = nnx.graphdef(nnx.eval_shape(
        lambda: StepVideoDiT(cfg, dtype=dtype, param_dtype=ref_dtype, rngs=nnx.Rngs(0))))
    weights = functools.partial(load_weights, cfg=cfg, dtype=dtype, seed=config.seed)

    def aux(config, dataset, mesh):
        policy_src, ref_src = d.policy_from, d.reference_from or d.policy_from
        reference = _cast_place(weights(ref_src, param_dtype=ref_dtype, mesh=mesh), ref_dtype, mesh)
        base = None
        if use_lora:
            base = reference if ref_src == policy_src else _cast_place(
                weights(policy_src, param_dtype=dtype, mesh=mesh), dtype, mesh)
        frozen = {"reference": reference, "base": base}
        return frozen, jax.tree.map(lambda a: a.sharding, frozen)

    def init_params(config, state, state_sh):
        if use_lora or not d.policy_from:
            return state
        params = weights(d.policy_from, param_dtype=jnp.float32)
        params = jax.device_put(jax.tree.map(lambda a: a.astype(jnp.float32), params), state_sh.params)
        ema = jax.tree.map(jnp.copy, params) if state.ema is not None else None
        return state.replace(params=params, ema=ema)

    prepare = (lambda m: lora.apply_lora(m, rank=d.lora_rank, alpha=d.lora_alpha, targets=tuple(d.lora_targets),
                                         seed=config.seed + 1)) if use_lora else (lambda m: m)
    return Objective(open_dataset=open_preferences, prepare=prepare,
                     trainable=lora.LoRAParam if use_lora else nnx.Param,
                     make_step=functools.partial(make_dpo_step, ref_graphdef=ref_graphdef, dpo=dpo_settings(config)),
                     aux=aux, init_params=init_params, latents_key="mean_w",
                     forwards_per_sample=8.0)   # policy forward + backward of 2 videos, reference forward of 2


def train_dpo(config, workdir=None, *, printer=print) -> TrainResult:
    return train(config, workdir, printer=printer, objective=dpo_objective(config))


_CONFIG = config_flags.DEFINE_config_file("config", None, "DPO config file (configs/dpo/*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics); default config.workdir")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "initialise jax.distributed (one process per host)")


def main(argv) -> None:
    del argv
    from stepvideo_jax import compile_cache

    logs.quiet_unless_asked()
    if _MULTIHOST.value:
        jax.distributed.initialize()
    compile_cache.setup(_CONFIG.value)
    run_or_exit(train_dpo, _CONFIG.value, _WORKDIR.value, prog="train_dpo")


def cli() -> None:
    """The `stepvideo-train-dpo` console script (a shipped `--config` resolves from any directory)."""
    flags.mark_flags_as_required(["config"])
    app.run(main, argv=config_files.resolve_argv())


if __name__ == "__main__":
    cli()
