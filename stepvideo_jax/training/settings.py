"""The settings of a training run: its ml_collections config, read once and checked, as frozen
dataclasses of plain values.

`resolve(config, workdir)` is the one reader of a training config (the family of
`configs/train/common.py`: flow matching, reflow, Video-DPO, the demo's DiT stage). Every problem
raises a ValueError naming the field and the valid choices before any directory is made, any
dataset opened or anything compiled; below it no function sees the config, only these settings.
The DPO trainer adds its own block (`training/dpo.py`) to the same `TrainSettings`.

The sections' own dataclasses live with their users (`DiTConfig`, `StepSettings`,
`OptimSettings`, `MeshConfig`); the sections that only the loop reads are here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp
from etils import epath

from stepvideo_jax import checkpoints, paths
from stepvideo_jax.convert import config_records
from stepvideo_jax.dtypes import dtype_of
from stepvideo_jax.models.dit import DiTConfig
from stepvideo_jax.parallel.mesh import MeshConfig
from stepvideo_jax.training.optimizer import OptimSettings
from stepvideo_jax.training.train_step import StepSettings


@dataclasses.dataclass(frozen=True)
class Data:
    """`config.data`: a dataset directory, else the synthetic set (its writer's arguments, the
    objective's format) written into the workdir; the global batch and the grain pipeline."""

    path: str
    synthetic: Optional[dict]
    global_batch: int
    seed: int
    num_threads: int
    prefetch: int
    check_headers: bool     # start-up reads every sample file's npy headers (local paths)


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    """`config.checkpoint`: save every `every` steps, keep the newest `keep`; `fallback`: an
    unreadable newest step is set aside on resume and the one before restores."""

    every: int
    keep: int
    async_save: bool
    fallback: bool


@dataclasses.dataclass(frozen=True)
class Logging:
    """Metrics every `log_every` steps (and the last), the held-out loss of `eval_size` samples
    every `eval_every` steps (0: never); `peak_flops` overrides the chip's peak for the MFU."""

    log_every: int
    eval_every: int
    eval_size: int
    tensorboard: bool
    peak_flops: float


@dataclasses.dataclass(frozen=True)
class Samples:
    """`config.samples`: latents (and mp4s, with a release `vae`) of the first `count` held-out
    prompts every `every` steps (0: never), `num_steps` Euler steps, CFG `guidance`, time `shift`."""

    every: int
    count: int
    num_steps: int
    guidance: float
    shift: float
    seed: int
    vae: str


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """A checked training config: everything a run needs, as plain values."""

    objective: str
    workdir: epath.Path               # absolute (a URI stays one)
    seed: int
    model: DiTConfig                  # `config.model`, or the config of `init_from`
    init_from: str                    # a DiT source of `stepvideo_jax.checkpoints` ("": the seed's init)
    dtype: Any                        # compute dtype (float32 master weights whatever it is)
    mesh: MeshConfig
    total_steps: int                  # the end of the schedule
    stop: int                         # this invocation stops at this step (`stop_at_step`)
    step: StepSettings
    optim: OptimSettings
    data: Data
    checkpoint: Checkpointing
    logging: Logging
    samples: Samples


def dit_config(model) -> DiTConfig:
    """The DiT of `config.model`: `init_from`'s config when set (any DiT source of
    `stepvideo_jax.checkpoints`, read without weights), else the fields given (fields of DiTConfig;
    `preset="full"` for the official size)."""
    raw = dict(model)
    init_from = raw.pop("init_from", "")
    if init_from:
        return checkpoints.dit_config(init_from)
    base = DiTConfig.full() if raw.pop("preset", "") == "full" else DiTConfig()
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"config.model has unknown keys {unknown}; DiTConfig fields are {sorted(fields)}")
    return config_records.config_from_values(DiTConfig, {**dataclasses.asdict(base), **raw})


def step_settings(step) -> StepSettings:
    """StepSettings from `config.step` ("" as attention backend means the platform default)."""
    raw = dict(step)
    raw["attention_backend"] = raw.get("attention_backend") or None
    return StepSettings(**raw)


def optim_settings(optim, total_steps: int) -> OptimSettings:
    """OptimSettings from `config.optim`; the schedule ends at `total_steps`."""
    return OptimSettings(**dict(optim), total_steps=total_steps)


def resolve(config, workdir=None) -> TrainSettings:
    """Check a training config and return its settings; `workdir` replaces `config.workdir`.

    The sections first, then the model (`model.init_from`'s DiT config is read, no weights, so a
    source that is not a DiT is named here), then the dtype, the mesh and the workdir.
    """
    step, s, d, c = step_settings(config.step), config.samples, config.data, config.checkpoint
    if d.global_batch % step.accum_steps:
        raise ValueError(f"step.accum_steps {step.accum_steps} must divide data.global_batch {d.global_batch}")
    if s.every and (s.count < 1 or s.num_steps < 1):
        raise ValueError(f"samples.count ({s.count}) and samples.num_steps ({s.num_steps}) must be >= 1")
    sections = dict(
        step=step, optim=optim_settings(config.optim, config.total_steps),
        data=Data(path=d.path, synthetic=d.synthetic.to_dict() if d.synthetic else None, global_batch=d.global_batch,
                  seed=d.seed, num_threads=d.num_threads, prefetch=d.prefetch, check_headers=d.check_headers),
        checkpoint=Checkpointing(every=c.every, keep=c.keep, async_save=c.async_save, fallback=c.fallback),
        logging=Logging(log_every=config.log_every, eval_every=config.eval_every, eval_size=config.eval_size,
                        tensorboard=config.metrics.tensorboard, peak_flops=config.metrics.peak_flops),
        samples=Samples(**dict(s)))
    model = dit_config(config.model)
    if model.ti2v and step.motion_score is None:
        raise ValueError("this DiT is Step-Video-TI2V: training conditions on each sample's first latent frame "
                         "and a motion score; set step.motion_score (e.g. 5, the TI2V default)")
    return TrainSettings(
        objective=config.objective, seed=config.seed, total_steps=config.total_steps,
        stop=min(config.total_steps, config.stop_at_step or config.total_steps), **sections,
        model=model, init_from=config.model.init_from,
        dtype=jnp.dtype(dtype_of(config.compute_dtype, what="compute_dtype")),
        mesh=MeshConfig.from_mapping(dict(config.mesh)), workdir=paths.absolute(workdir or config.workdir))
