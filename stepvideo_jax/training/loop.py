"""The training loop: config -> mesh, model, state, data, jitted step, metrics, checkpoints.

`train(config, workdir)` runs (or resumes) a run described by an ml_collections config (see
`configs/train/`). The step is jitted once per bucket shape with explicit shardings from the
logical-axis rules, the state donated. The loop checks the loss of every step on the host before
anything else happens, so a NaN/inf stops the run before a bad state can be saved.

Workdir layout: `checkpoints/<step>/`, `metrics.jsonl`, `tensorboard/`, `dit_config.json` (the
model config, read back by `load_dit` and the exporter), `samples/` (with `samples.every`: latents
and mp4s of held-out prompts, see `TrainingSampler`), `synthetic_data/` (tiny configs only).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from stepvideo_jax import hub, paths
from stepvideo_jax.data import format as data_format
from stepvideo_jax.data import pipeline, synthetic
from stepvideo_jax.models import stack
from stepvideo_jax.models.dit import DiTConfig, StepVideoDiT
from stepvideo_jax.parallel.rules import STATE_RULES, logical_to_spec, state_shardings
from stepvideo_jax.training import optimizer as optim
from stepvideo_jax.training import startup, train_state
from stepvideo_jax.training.checkpoint import CheckpointError, Checkpointer, abstract_with_shardings, short_reason
from stepvideo_jax.training.metrics import MetricsWriter, peak_flops_per_device, train_flops
from stepvideo_jax.training.train_step import StepSettings, heldout_loss, make_train_step

MESH_AXES = ("data", "fsdp", "sequence", "tensor")


class NonFiniteLoss(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Objective:
    """The parts of `train` that depend on what is optimised; the defaults are flow matching.

    - `open_dataset(config, workdir)`: a dataset (`len`, `bucket(i)`, `load(i)`, `meta`, `negative()`).
    - `prepare(model)`: the module to train, made from the freshly built DiT (e.g. with adapters).
    - `trainable`: nnx filter of the trained (optimised, checkpointed) variables of that module.
    - `make_step(graphdef, optimizer, schedule, settings)` -> `step(state, batch, aux) -> (state,
      metrics)`; metrics hold at least `loss`, `grad_norm`, `learning_rate`, `finite`; all are logged.
    - `aux(config, dataset, mesh)` -> (aux, its shardings): the step's third argument, never donated
      and never checkpointed (None: the negative prompt's conditioning, replicated).
    - `init_params(config, state, state_shardings)` -> state with the trained variables of a fresh
      run (None: `config.model.init_from` or the seed's init).
    - `latents_key`: the batch array whose (f, h, w) sizes the FLOP count.
    - `forwards_per_sample`: cost of one batch row in DiT forwards (3: forward + backward).
    """

    open_dataset: Optional[Callable] = None
    prepare: Callable = lambda model: model
    trainable: Any = nnx.Param
    make_step: Callable = make_train_step
    aux: Optional[Callable] = None
    init_params: Optional[Callable] = None
    latents_key: str = "mean"
    forwards_per_sample: float = 3.0


@dataclasses.dataclass
class TrainResult:
    state: train_state.TrainState
    history: list[dict]                  # per step: step, loss, grad_norm, learning_rate
    heldout: list[tuple[int, float]]     # (step, held-out loss), step 0 = before training


def build_mesh(sizes, devices=None) -> Mesh:
    """(data, fsdp, sequence, tensor) mesh; one size may be -1 (the remaining devices). Sizes whose
    product is below the device count use the first devices (e.g. a one-device run on a host with 8)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    unknown = [a for a, v in sizes.items() if v == -1]
    known = math.prod(v for v in sizes.values() if v != -1)
    if len(unknown) > 1 or (unknown and len(devices) % known) or (not unknown and len(devices) % known):
        raise ValueError(f"mesh sizes {sizes} do not fit {len(devices)} devices (at most one may be -1; "
                         "the product must divide the device count)")
    for a in unknown:
        sizes[a] = len(devices) // known
    devices = devices[: math.prod(sizes.values())]
    return Mesh(np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)


def dit_config(model_cfg) -> DiTConfig:
    """DiTConfig from `config.model` (fields of DiTConfig; `preset="full"` for the official size)."""
    raw = dict(model_cfg)
    raw.pop("init_from", None)
    base = DiTConfig.full() if raw.pop("preset", "") == "full" else DiTConfig()
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"config.model has unknown keys {unknown}; DiTConfig fields are {sorted(fields)}")
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return dataclasses.replace(base, **raw)


def step_settings(config) -> StepSettings:
    """StepSettings from `config.step` ("" as attention backend means the platform default)."""
    raw = dict(config.step)
    raw["attention_backend"] = raw.get("attention_backend") or None
    return StepSettings(**raw)


def optimizer_of(config):
    o = config.optim
    schedule = optim.learning_rate_schedule(o.learning_rate, warmup_steps=o.warmup_steps,
                                            total_steps=config.total_steps, kind=o.schedule,
                                            end_fraction=o.end_fraction)
    return schedule, optim.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                                 clip_norm=o.clip_norm or None)


def open_dataset(config, workdir: epath.Path) -> data_format.Dataset:
    """`config.data.path` when set (it wins over a config's default synthetic set), else the
    synthetic set written into the workdir."""
    d = config.data
    if d.get("path"):
        return data_format.Dataset(d.path)
    if d.get("synthetic"):
        root = workdir / "synthetic_data"
        if not (root / "meta.json").exists():
            s = d.synthetic
            synthetic.write(root, num_samples=s.num_samples, buckets=tuple(tuple(b) for b in s.buckets),
                            channels=s.channels, text_length=s.text_length, clip_length=s.clip_length,
                            caption_channels=tuple(s.caption_channels), seed=s.seed)
        return data_format.Dataset(root)
    raise ValueError("config.data needs `path` (a stepvideo-latents-v1 directory) or `synthetic`")


def _resume(ckpt: Checkpointer, abstract_state, config, writer: MetricsWriter, printer):
    """(state, data_state) of the newest checkpoint that restores (`config.checkpoint.fallback`,
    default True: an unreadable newest step is set aside, see `Checkpointer.restore_latest`); the
    metrics of the steps the run will replay are dropped from `metrics.jsonl`."""
    step, state, data_state = ckpt.restore_latest(abstract_state, fallback=config.checkpoint.get("fallback", True),
                                                  printer=printer)
    writer.discard_after(step)
    if printer:
        printer(f"resumed from {ckpt.directory}/{step}")
    return state, data_state


def batch_shardings(example: dict, mesh: Mesh) -> dict:
    """Rows over the batch axes of the mesh, everything else replicated."""
    return {k: NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (np.ndim(v) - 1), mesh))
            for k, v in example.items()}


def to_global(local: dict, shardings: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in local.items()}


def make_heldout(dataset: data_format.Dataset, size: int, seed: int) -> dict:
    """A fixed evaluation set: posterior means of the first `size` samples of the largest bucket,
    with fixed noise and t ~ U(0, 1) from `seed`."""
    by_bucket: dict = {}
    for i in range(len(dataset)):
        by_bucket.setdefault(dataset.bucket(i), []).append(i)
    idx = max(by_bucket.values(), key=len)[:size]
    samples = [dataset.load(i) for i in idx]
    out = {k: jnp.asarray(np.stack([s[k] for s in samples])) for k in ("y", "y_mask", "clip")}
    out["x"] = jnp.asarray(np.stack([s["mean"] for s in samples]), jnp.float32)
    k_noise, k_t = jax.random.split(jax.random.key(seed))
    out["noise"] = jax.random.normal(k_noise, out["x"].shape, jnp.float32)
    out["t"] = jax.random.uniform(k_t, (len(idx),), jnp.float32)
    return out


def train(config, workdir=None, *, printer: Optional[Callable[[str], Any]] = print,
          objective: Optional[Objective] = None) -> TrainResult:
    """Run or resume the run of `config` in `workdir` (default `config.workdir`); `objective`
    replaces the flow-matching parts (see `Objective`)."""
    objective = objective or Objective()
    workdir = paths.absolute(workdir or config.workdir)
    startup.check_run_directories(workdir, workdir / "checkpoints")
    dataset = (objective.open_dataset or open_dataset)(config, workdir)
    startup.check_dataset(dataset, config.data.get("path") or workdir, headers=config.data.get("check_headers", True))
    mesh = build_mesh(dict(config.mesh))
    init_from = hub.dit_source(config.model.get("init_from", ""))
    cfg = _init_config(init_from) if init_from else dit_config(config.model)
    if paths.writes_shared_files():
        paths.write_text(workdir / "dit_config.json", json.dumps(dataclasses.asdict(cfg), indent=1))
    dtype = jnp.dtype(config.compute_dtype)
    settings = step_settings(config)
    schedule, optimizer = optimizer_of(config)
    use_ema = settings.ema_decay > 0

    def init_state():
        model = objective.prepare(StepVideoDiT(cfg, dtype=dtype, param_dtype=jnp.float32,
                                               rngs=nnx.Rngs(config.seed)))
        return train_state.create(nnx.state(model, objective.trainable), optimizer, seed=config.seed,
                                  use_ema=use_ema)

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: objective.prepare(
        StepVideoDiT(cfg, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))))
    if cfg.ti2v and settings.motion_score is None:
        raise ValueError("this DiT is Step-Video-TI2V: training conditions on each sample's first latent frame "
                         "and a motion score; set step.motion_score (e.g. 5, the TI2V default)")
    sampler = None
    if config.get("samples") and config.samples.every:
        if objective.aux is not None:
            raise ValueError(f"samples.every = {config.samples.every}: sample videos are written by flow-matching "
                             "runs only; set samples.every = 0 for this objective")
        sampler = TrainingSampler(graphdef, config.samples, backend=settings.attention_backend, dtype=dtype,
                                  in_channels=cfg.in_channels,
                                  motion_score=settings.motion_score if cfg.ti2v else None)

    abstract_state = jax.eval_shape(init_state)
    state_sh = state_shardings(abstract_state, mesh, STATE_RULES)   # ZeRO-style: over fsdp x sequence

    data_iter = pipeline.batches(dataset, config.data.global_batch, seed=config.data.seed,
                                 process_index=jax.process_index(), process_count=jax.process_count(),
                                 num_threads=config.data.num_threads, prefetch=config.data.prefetch)
    replicated = NamedSharding(mesh, PartitionSpec())
    if objective.aux is None:
        aux_sh = replicated
        aux = jax.device_put({k: jnp.asarray(v) for k, v in dataset.negative().items()}, replicated)
    else:
        aux, aux_sh = objective.aux(config, dataset, mesh)
    example = dataset.load(0)
    batch_sh = batch_shardings({k: v[None] for k, v in example.items()}, mesh)

    ckpt = Checkpointer(workdir / "checkpoints", save_every=config.checkpoint.every,
                        keep=config.checkpoint.keep, async_save=config.checkpoint.get("async_save", True))
    writer = MetricsWriter(workdir, tensorboard=config.metrics.tensorboard, printer=printer)
    step_fn = jax.jit(objective.make_step(graphdef, optimizer, schedule, settings),
                      in_shardings=(state_sh, batch_sh, aux_sh), out_shardings=(state_sh, replicated),
                      donate_argnums=0)
    eval_fn = jax.jit(lambda params, held: heldout_loss(graphdef, params, held,
                                                        backend=settings.attention_backend,
                                                        motion_score=settings.motion_score))
    peak = peak_flops_per_device(jax.devices()[0].device_kind, config.metrics.get("peak_flops"))
    text_length, clip_length = dataset.meta["text_length"], dataset.meta["clip_length"]
    history: list[dict] = []
    heldout_curve: list[tuple[int, float]] = []
    try:
        with jax.set_mesh(mesh):
            if ckpt.latest_step() is not None:
                state, data_state = _resume(ckpt, abstract_with_shardings(abstract_state, state_sh), config,
                                            writer, printer)
                data_iter.set_state(data_state)
            else:
                writer.discard_after(-1)  # records of an earlier attempt that saved no checkpoint
                state = jax.jit(init_state, out_shardings=state_sh)()
                if objective.init_params is not None:
                    state = objective.init_params(config, state, state_sh)
                elif init_from:
                    state = _with_initial_weights(state, init_from, dtype, state_sh, mesh)
            step = int(state.step)
            heldout = (jax.device_put(make_heldout(dataset, config.eval_size, config.seed + 1), replicated)
                       if config.eval_every or sampler is not None else None)
            if config.eval_every and step == 0:
                heldout_curve.append((0, float(eval_fn(state.params, heldout))))
                writer.write(0, {"heldout_loss": heldout_curve[0][1]})
            stop = min(config.total_steps, config.get("stop_at_step") or config.total_steps)
            window = {"t0": time.perf_counter(), "samples": 0, "tokens": 0, "flops": 0.0, "steps": 0}
            while step < stop:
                local = next(data_iter)
                state, metrics = step_fn(state, to_global(local, batch_sh), aux)
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                step += 1
                if not m.pop("finite"):
                    ckpt.wait()
                    raise NonFiniteLoss(
                        f"loss is {m['loss']} at step {step} (grad norm {m['grad_norm']}): stopping. The last "
                        f"good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")
                history.append({"step": step, **m})
                f, _, h, w = local[objective.latents_key].shape[1:]
                b = config.data.global_batch
                window["samples"] += b
                window["tokens"] += b * f * (h // cfg.patch_size) * (w // cfg.patch_size)
                window["flops"] += b * objective.forwards_per_sample / 3.0 * train_flops(
                    cfg, frames=f, height=h, width=w, text_length=text_length, clip_length=clip_length)
                window["steps"] += 1
                scalars = dict(m)
                if config.eval_every and step % config.eval_every == 0:
                    t_eval = time.perf_counter()
                    scalars["heldout_loss"] = float(eval_fn(state.params, heldout))
                    heldout_curve.append((step, scalars["heldout_loss"]))
                    window["t0"] += time.perf_counter() - t_eval  # throughput counts training only
                if step % config.log_every == 0 or step == stop:
                    dt = time.perf_counter() - window["t0"]
                    scalars.update(step_time_s=dt / window["steps"], samples_per_s=window["samples"] / dt,
                                   tokens_per_s=window["tokens"] / dt)
                    if peak:
                        scalars["mfu"] = window["flops"] / dt / (peak * mesh.size)
                    writer.write(step, scalars)
                    window = {"t0": time.perf_counter(), "samples": 0, "tokens": 0, "flops": 0.0, "steps": 0}
                if sampler is not None and step % config.samples.every == 0:
                    t_samples = time.perf_counter()
                    sampler(workdir, step, state.ema if state.ema is not None else state.params, heldout, aux)
                    window["t0"] += time.perf_counter() - t_samples
                ckpt.save(step, state, data_iter.get_state())
                ckpt.poll()
            ckpt.save(step, state, data_iter.get_state(), force=step not in ckpt.all_steps())
            ckpt.wait()
    finally:
        ckpt.close()
        writer.close()
    return TrainResult(state=state, history=history, heldout=heldout_curve)


class TrainingSampler:
    """Sample videos during training (`config.samples`): the first `count` held-out prompts from
    fixed noise with the official schedule (CFG against the negative prompt), saved as latents
    `samples/step_<n>.npy` (b f c h w) and, with `vae` (a release `vae/` directory), as mp4s
    `samples/step_<n>_<i>.mp4`. The sampler step and the VAE decoder are built once, so they
    compile once per run, not at every sampled step."""

    def __init__(self, graphdef, sample_cfg, *, backend, dtype, in_channels: int,
                 motion_score: Optional[float] = None):
        from stepvideo_jax.sampling.flow_matching import FlowMatchSampler, SamplerSettings
        from stepvideo_jax.sampling.pipeline import dit_velocity_fn

        if sample_cfg.count < 1 or sample_cfg.num_steps < 1:
            raise ValueError(f"samples.count ({sample_cfg.count}) and samples.num_steps "
                             f"({sample_cfg.num_steps}) must be >= 1")
        self.cfg, self.motion_score = sample_cfg, motion_score
        self.settings = SamplerSettings(num_steps=sample_cfg.num_steps, guidance_scale=sample_cfg.guidance,
                                        shift=sample_cfg.shift)
        self.sampler = FlowMatchSampler(dit_velocity_fn(graphdef, backend=backend), model_dtype=dtype)
        self.decode = None
        if sample_cfg.get("vae"):
            from stepvideo_jax.convert import vae as vae_convert
            from stepvideo_jax.sampling.components import vae_decoder

            vae = vae_convert.load(sample_cfg.vae)
            if vae.cfg.z_channels != in_channels:
                raise ValueError(f"samples.vae {sample_cfg.vae}: its z_channels ({vae.cfg.z_channels}) must be "
                                 f"the DiT's in_channels ({in_channels})")
            self.decode = vae_decoder(vae)

    def __call__(self, workdir, step: int, params, heldout: dict, negative: dict) -> epath.Path:
        """Sample with `params` (the EMA or raw weights) and write the files of `step` (process 0;
        every process samples)."""
        from stepvideo_jax.sampling.pipeline import postprocess
        from stepvideo_jax.sampling.video_io import write_mp4

        n = min(self.cfg.count, heldout["x"].shape[0])
        cond = {k: heldout[k][:n] for k in ("y", "y_mask", "clip")}
        if self.settings.cfg:
            cond = {k: jnp.concatenate([v, jnp.broadcast_to(negative[k].astype(v.dtype), v.shape)])
                    for k, v in cond.items()}
        if self.motion_score is not None:  # TI2V: the held-out videos' first latent frames, both CFG rows
            from stepvideo_jax.sampling.image_condition import condition_frames

            x = heldout["x"][:n]
            condition = condition_frames(x[:, :1], x.shape[1])
            rows = 2 if self.settings.cfg else 1
            cond["condition"] = jnp.concatenate([condition] * rows)
            cond["motion_score"] = jnp.full((rows * n,), self.motion_score, jnp.float32)
        noise = jax.random.normal(jax.random.key(self.cfg.seed), heldout["x"][:n].shape, jnp.float32)
        latents = self.sampler.sample(params, noise, cond, self.settings)
        out = paths.as_path(workdir) / "samples"
        path = out / f"step_{step:08d}.npy"
        video = np.asarray(self.decode(latents)) if self.decode is not None else None
        if not paths.writes_shared_files():
            return path
        out.mkdir(parents=True, exist_ok=True)
        with paths.local_then_move(path, ".npy") as tmp:
            np.save(tmp, np.asarray(latents))
        if video is not None:
            for i in range(n):
                write_mp4(out / f"step_{step:08d}_{i}.mp4", postprocess(video[i:i + 1]))
        return path


def _converted_root(init_from) -> Optional[epath.Path]:
    path = paths.as_path(init_from)
    return path if (path / "transformer" / "manifest.json").is_file() else None


def _init_config(init_from) -> DiTConfig:
    """DiTConfig of `init_from`: a converter output root (`python -m stepvideo_jax.convert`) or an
    official `transformer/` directory."""
    root = _converted_root(init_from)
    if root is not None:
        from stepvideo_jax.convert import cli, orbax_io

        return cli.config_from_record(orbax_io.read_manifest(root / "transformer")["config"])
    from stepvideo_jax.convert import dit as dit_convert

    return dit_convert.read_config(init_from)


def _with_initial_weights(state, init_from, dtype, state_sh, mesh):
    """`state` with params (and EMA) from `init_from`, as float32 master weights in `state_sh`.
    A converter output is restored straight into the mesh shardings, and so is an official
    `transformer/` directory, tensor by tensor (`convert.release_restore`)."""
    root = _converted_root(init_from)
    if root is not None:
        from stepvideo_jax.convert import cli

        model = cli.load_converted(root, "transformer", dtype=dtype, param_dtype=jnp.float32, mesh=mesh)
    else:
        from stepvideo_jax.convert.release_restore import load_release_component

        model = load_release_component(init_from, "transformer", param_dtype=jnp.float32, dtype=dtype, mesh=mesh)
    params = jax.device_put(nnx.state(model), state_sh.params)
    ema = jax.tree.map(jnp.copy, params) if state.ema is not None else None
    return state.replace(params=params, ema=ema)


def load_dit(workdir, *, step: Optional[int] = None, ema: bool = False, dtype=jnp.float32) -> StepVideoDiT:
    """The DiT of a training checkpoint (raw weights, or the EMA with `ema=True`), unsharded. A
    checkpoint of the layout before the blocks were stacked (`blocks/<i>/...`) is stacked at load."""
    workdir = paths.absolute(workdir)
    cfg = DiTConfig(**{k: tuple(v) if isinstance(v, list) else v
                       for k, v in json.loads((workdir / "dit_config.json").read_text()).items()})
    model = nnx.eval_shape(lambda: StepVideoDiT(cfg, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    mngr = ocp.CheckpointManager(workdir / "checkpoints")
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {workdir / 'checkpoints'}")
    try:
        raw = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    except Exception as e:  # noqa: BLE001  (corrupt files: tensorstore, msgpack, OS errors alike)
        raise CheckpointError(f"checkpoint step {step} in {workdir / 'checkpoints'} does not restore "
                              f"({short_reason(e)}); `python -m stepvideo_jax.verify --checkpoint {workdir}` "
                              "lists the steps that do") from e
    finally:
        mngr.close()
    which = "ema" if ema else "params"
    if raw.get(which) is None:
        raise ValueError(f"checkpoint {step} holds no {which!r} weights (train with step.ema_decay > 0 for EMA)")
    nnx.replace_by_pure_dict(abstract, stack.stack_unrolled(_strip_value_level(raw[which])))
    return nnx.merge(graphdef, abstract)


def _strip_value_level(tree):
    """Orbax restores an `nnx.Variable` without a target as `{"value": array}`; keep the array."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return jnp.asarray(tree["value"])
        return {k: _strip_value_level(v) for k, v in tree.items()}
    return jnp.asarray(tree)
