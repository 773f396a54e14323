"""The Video-DPO objective of the training loop (`python -m stepvideo_jax.train_dpo` runs it).

The run is the training loop of `training/loop.py` (mesh, sharding rules, grain pipeline, Orbax
checkpoints with exact resume, metrics, NaN stop) with a DPO `Objective`:
- data: a preference set (`data/preferences.py`), `config.data.path`, or `config.data.synthetic`
  (the synthetic captioned-motion pairs, written into the workdir);
- step: `training/dpo_step.py`; the frozen reference (and, with LoRA, the policy's frozen base) is
  the step's third, never-donated argument, stored in `config.dpo.reference_dtype` (bfloat16 by
  default) and sharded by the same logical-axis rules as the policy; it is rebuilt from its source
  on resume, never checkpointed;
- policy: full fine-tuning (float32 master weights, as `train`), or LoRA adapters on the attention
  projections (`config.dpo.lora_rank > 0`, `models/lora.py`): only the adapters are optimised and
  checkpointed. With LoRA and the reference taken from the initial policy, the frozen base and the
  reference are the same arrays (one copy in memory).

Weight sources (`config.dpo.policy_from`, `config.dpo.reference_from`):
  ""                      the seed's random init (tiny configs); for the reference: the initial policy
  <training workdir>      its latest checkpoint (`checkpoints/`), raw weights; `<workdir>:ema` the EMA
  <release transformer/>  an official release's `transformer` directory (config.json + safetensors),
                          or the release directory itself
  <converted root>        a `python -m stepvideo_jax.convert` output (`conversion.json`), its transformer
(`stepvideo_jax.checkpoints` detects and loads each kind.)
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from stepvideo_jax import checkpoints
from stepvideo_jax.data import preferences
from stepvideo_jax.dtypes import dtype_of
from stepvideo_jax.models import lora
from stepvideo_jax.models.dit import DiTConfig, StepVideoDiT
from stepvideo_jax.parallel.rules import state_shardings
from stepvideo_jax.training import settings
from stepvideo_jax.training.dpo_step import DPOSettings, make_dpo_step
from stepvideo_jax.training.loop import Objective, TrainResult, fit
from stepvideo_jax.training.settings import TrainSettings


@dataclasses.dataclass(frozen=True)
class DPOSpec:
    """`config.dpo` checked: the loss, the weight sources of the policy and of the frozen reference
    (the initial policy's when the config leaves `reference_from` empty), the reference's storage
    dtype, and LoRA (`lora_rank > 0`) or full fine-tuning."""

    loss: DPOSettings
    policy_from: str
    reference_from: str
    reference_dtype: Any
    lora_rank: int
    lora_alpha: float
    lora_targets: tuple[str, ...]


def dpo_settings(dpo) -> DPOSettings:
    """DPOSettings from `config.dpo`."""
    return DPOSettings(beta=dpo.beta, beta_schedule=dpo.beta_schedule, sft_weight=dpo.sft_weight)


def resolve(config, workdir=None) -> tuple[TrainSettings, DPOSpec]:
    """Check a DPO config: the training family's fields (`settings.resolve`) and the `dpo` block,
    with the fields that do not apply to DPO refused by name. The kind of each weight source is
    detected here (`checkpoints.dit_source`), so a wrong path is named before the run starts."""
    if config.model.init_from:
        raise ValueError("DPO configs take the policy from config.dpo.policy_from; leave model.init_from empty")
    if config.eval_every:
        raise ValueError("the flow-matching held-out loss does not apply to DPO: set eval_every = 0")
    if config.step.cond_dropout:
        raise ValueError("DPO compares two videos of one prompt: set step.cond_dropout = 0")
    if config.samples.every:
        raise ValueError(f"samples.every = {config.samples.every}: sample videos are written by flow-matching "
                         "runs only; set samples.every = 0 for this objective")
    d = config.dpo
    loss = dpo_settings(d)
    run = settings.resolve(config, workdir)
    for source in dict.fromkeys(filter(None, (d.policy_from, d.reference_from))):
        checkpoints.dit_source(source)
    return run, DPOSpec(loss=loss, policy_from=d.policy_from, reference_from=d.reference_from or d.policy_from,
                        lora_rank=d.lora_rank, lora_alpha=d.lora_alpha, lora_targets=tuple(d.lora_targets),
                        reference_dtype=jnp.dtype(dtype_of(d.reference_dtype, what="dpo.reference_dtype")))


def open_preferences(d: settings.Data, workdir: pathlib.Path) -> preferences.PairDataset:
    """`data.path` when set (it wins over a config's default synthetic set), else the synthetic
    pairs written into the workdir (`Objective.check_data` has made sure one of them is given)."""
    if d.path:
        return preferences.PairDataset(d.path)
    root = workdir / "synthetic_preferences"
    if not (root / preferences.PAIRS_FILE).exists():
        s = d.synthetic
        preferences.write_synthetic(root, num_pairs=s["num_pairs"], frames=s["frames"], height=s["height"],
                                    width=s["width"], channels=s["channels"], time_factor=s["time_factor"],
                                    space_factor=s["space_factor"], text_length=s["text_length"],
                                    clip_length=s["clip_length"], caption_channels=tuple(s["caption_channels"]),
                                    seed=s["seed"])
    return preferences.PairDataset(root)


def load_weights(source: str, cfg: DiTConfig, *, dtype, param_dtype, seed: int, mesh=None) -> nnx.State:
    """Plain DiT params from a source (module docstring; `checkpoints.load_dit`): a converted
    checkpoint is restored in `param_dtype` straight into `mesh`'s rule shardings; the others load on
    the default device (the seed init in float32, as the policy's; cast and place them with
    `_cast_place`)."""
    if not source:
        return jax.jit(lambda: nnx.state(StepVideoDiT(cfg, dtype=dtype, param_dtype=jnp.float32,
                                                      rngs=nnx.Rngs(seed))))()
    params = nnx.state(checkpoints.load_dit(source, dtype=dtype, param_dtype=param_dtype, mesh=mesh))
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


def dpo_objective(run: TrainSettings, spec: DPOSpec) -> Objective:
    """The `Objective` of a DPO run (see the module docstring)."""
    cfg, dtype, ref_dtype = run.model, run.dtype, spec.reference_dtype
    use_lora = spec.lora_rank > 0
    ref_graphdef = nnx.graphdef(nnx.eval_shape(
        lambda: StepVideoDiT(cfg, dtype=dtype, param_dtype=ref_dtype, rngs=nnx.Rngs(0))))
    weights = functools.partial(load_weights, cfg=cfg, dtype=dtype, seed=run.seed)

    def aux(dataset, mesh):
        reference = _cast_place(weights(spec.reference_from, param_dtype=ref_dtype, mesh=mesh), ref_dtype, mesh)
        base = None
        if use_lora:
            base = reference if spec.reference_from == spec.policy_from else _cast_place(
                weights(spec.policy_from, param_dtype=dtype, mesh=mesh), dtype, mesh)
        frozen = {"reference": reference, "base": base}
        return frozen, jax.tree.map(lambda a: a.sharding, frozen)

    def init_params(state, state_sh):
        if use_lora or not spec.policy_from:
            return state
        params = weights(spec.policy_from, param_dtype=jnp.float32)
        params = jax.device_put(jax.tree.map(lambda a: a.astype(jnp.float32), params), state_sh.params)
        ema = jax.tree.map(jnp.copy, params) if state.ema is not None else None
        return state.replace(params=params, ema=ema)

    lora_kw = dict(rank=spec.lora_rank, alpha=spec.lora_alpha, targets=spec.lora_targets)
    prepare = (lambda m: lora.apply_lora(m, **lora_kw, seed=run.seed + 1)) if use_lora else (lambda m: m)
    records = {checkpoints.LORA_RECORD: checkpoints.lora_record(spec.policy_from, **lora_kw, seed=run.seed)
               } if use_lora else {}
    return Objective(open_dataset=open_preferences, prepare=prepare,
                     trainable=lora.LoRAParam if use_lora else nnx.Param,
                     make_step=functools.partial(make_dpo_step, ref_graphdef=ref_graphdef, dpo=spec.loss),
                     aux=aux, init_params=init_params, latents_key="mean_w",
                     forwards_per_sample=8.0,   # policy forward + backward of 2 videos, reference forward of 2
                     records=records, data_path=f"a {preferences.FORMAT} directory")


def train_dpo(config, workdir=None, *, printer=print) -> TrainResult:
    """Run or resume the DPO run of `config` in `workdir` (default `config.workdir`)."""
    run, spec = resolve(config, workdir)
    return fit(run, dpo_objective(run, spec), printer=printer)
