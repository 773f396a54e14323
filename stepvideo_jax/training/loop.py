"""The training loop: settings -> mesh, model, state, data, jitted step, metrics, checkpoints.

`train(config, workdir)` runs (or resumes) a run described by an ml_collections config (see
`configs/train/`): the config is read and checked once (`settings.resolve`), and `fit` runs the
checked `TrainSettings` with an `Objective` (`setup`, `restore`, then `train_step` and `log_step`
per step). The step is jitted once per bucket shape with explicit shardings from the
logical-axis rules, the state donated. The loop checks the loss of every step on the host before
anything else happens, so a NaN/inf stops the run before a bad state can be saved.

Workdir layout: `checkpoints/<step>/`, `metrics.jsonl`, `tensorboard/`, `dit_config.json` (the
model config, read back by `checkpoints.load_dit` and the exporter), `samples/` (with `samples.every`: latents
and mp4s of held-out prompts, `training/samples.py`), `synthetic_data/` (tiny configs only).
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from stepvideo_jax import checkpoints, paths
from stepvideo_jax.data import format as data_format
from stepvideo_jax.data import pipeline, synthetic
from stepvideo_jax.models.dit import StepVideoDiT
from stepvideo_jax.parallel.mesh import make_mesh
from stepvideo_jax.parallel.rules import STATE_RULES, logical_to_spec, state_shardings
from stepvideo_jax.training import optimizer, reflow, settings, startup, train_state
from stepvideo_jax.training.checkpoint import Checkpointer, abstract_with_shardings
from stepvideo_jax.training.metrics import MetricsWriter, peak_flops_per_device, train_flops
from stepvideo_jax.training.samples import TrainingSampler
from stepvideo_jax.training.settings import TrainSettings
from stepvideo_jax.training.train_step import heldout_loss, make_train_step


class NonFiniteLoss(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Objective:
    """The parts of a run (`fit`) that depend on what is optimised; the defaults are flow matching.

    - `open_dataset(data, workdir)`: the dataset of `data` (`settings.Data`): `len`, `bucket(i)`, `load(i)`,
      `meta`, `negative()`.
    - `prepare(model)`: the module to train, made from the freshly built DiT (e.g. with adapters).
    - `trainable`: nnx filter of the trained (optimised, checkpointed) variables of that module.
    - `make_step(graphdef, optimizer, schedule, settings)` -> `step(state, batch, aux) -> (state,
      metrics)`; metrics hold at least `loss`, `grad_norm`, `learning_rate`, `finite`; all are logged.
    - `aux(dataset, mesh)` -> (aux, its shardings): the step's third argument, never donated
      and never checkpointed (None: the negative prompt's conditioning, replicated).
    - `init_params(state, state_shardings)` -> state with the trained variables of a fresh
      run (None: `model.init_from` or the seed's init).
    - `make_heldout(dataset, size, seed)` -> the held-out set of `eval_fn` (None: `make_heldout`).
    - `latents_key`: the batch array whose (f, h, w) sizes the FLOP count.
    - `forwards_per_sample`: cost of one batch row in DiT forwards (3: forward + backward).
    - `records`: JSON files written into the workdir beside `dit_config.json`, {name: object} (e.g.
      `checkpoints.LORA_RECORD`, which `checkpoints.load_dit` needs to rebuild a LoRA run's DiT).
    - `data_path`: what `data.path` names (for the error of a config without data); `synthetic`:
      whether `data.synthetic` can stand in for it.
    """

    open_dataset: Optional[Callable] = None
    prepare: Callable = lambda model: model
    trainable: Any = nnx.Param
    make_step: Callable = make_train_step
    aux: Optional[Callable] = None
    init_params: Optional[Callable] = None
    make_heldout: Optional[Callable] = None
    latents_key: str = "mean"
    forwards_per_sample: float = 3.0
    records: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    data_path: str = f"a {data_format.FORMAT} directory"
    synthetic: bool = True

    def check_data(self, data: settings.Data) -> None:
        """A ValueError unless `data` names a dataset this objective opens (`fit` asks before
        anything is made on disk)."""
        if not (data.path or (self.synthetic and data.synthetic)):
            raise ValueError(f"config.data needs `path` ({self.data_path})"
                             + (" or `synthetic`" if self.synthetic else ""))


# `config.objective` of `train` (DPO has its own entry point and passes its objective to `fit`)
OBJECTIVES = ("flow_matching", "reflow")


def objective_of(name: str) -> Objective:
    """The `Objective` called `name` (`config.objective`): flow matching on latents
    (`configs/train/`) or reflow step distillation on teacher pairs (`training/reflow.py`,
    `configs/distill/`)."""
    if name == "flow_matching":
        return Objective()
    if name == "reflow":
        return Objective(open_dataset=reflow.open_pairs, make_step=reflow.make_reflow_step, latents_key="z1",
                         make_heldout=reflow.make_reflow_heldout, data_path=reflow.PAIRS, synthetic=False)
    hint = " (Video-DPO runs with python -m stepvideo_jax.train_dpo)" if name == "dpo" else ""
    raise ValueError(f"unknown objective {name!r}; choose one of {OBJECTIVES}{hint}")


@dataclasses.dataclass
class TrainResult:
    state: train_state.TrainState
    history: list[dict]                  # per step: step, loss, grad_norm, learning_rate
    heldout: list[tuple[int, float]]     # (step, held-out loss), step 0 = before training


def open_dataset(d: settings.Data, workdir: epath.Path) -> data_format.Dataset:
    """`data.path` when set (it wins over a config's default synthetic set), else the synthetic set
    written into the workdir (`Objective.check_data` has made sure one of them is given)."""
    if d.path:
        return data_format.Dataset(d.path)
    root = workdir / "synthetic_data"
    if not (root / "meta.json").exists():
        s = d.synthetic
        synthetic.write(root, num_samples=s["num_samples"], buckets=tuple(tuple(b) for b in s["buckets"]),
                        channels=s["channels"], text_length=s["text_length"], clip_length=s["clip_length"],
                        caption_channels=tuple(s["caption_channels"]), seed=s["seed"])
    return data_format.Dataset(root)


def _resume(ckpt: Checkpointer, abstract_state, fallback: bool, writer: MetricsWriter, printer):
    """(state, data_state) of the newest checkpoint that restores (`fallback`: an unreadable newest
    step is set aside, see `Checkpointer.restore_latest`); the metrics of the steps the run will
    replay are dropped from `metrics.jsonl`."""
    step, state, data_state = ckpt.restore_latest(abstract_state, fallback=fallback, printer=printer)
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


@dataclasses.dataclass
class Run:
    """Everything a run builds before its first step (`setup`): its settings and objective, the
    mesh, shardings, data, the jitted step and held-out loss, the checkpointer and the metrics writer."""

    settings: TrainSettings
    objective: Objective
    printer: Optional[Callable[[str], Any]]
    mesh: Mesh
    init_state: Callable             # () -> a fresh TrainState (the seed's init)
    abstract_state: Any
    state_sh: Any
    dataset: Any
    data_iter: Any
    aux: Any                         # the step's third, never donated argument
    batch_sh: dict
    replicated: NamedSharding
    step_fn: Callable                # (state, batch, aux) -> (state, metrics)
    eval_fn: Callable                # (params, heldout) -> held-out loss
    sampler: Optional[TrainingSampler]
    ckpt: Checkpointer
    writer: MetricsWriter


def open_data(s: TrainSettings, objective: Objective):
    """The run's directories checked (made when missing), its dataset opened and checked."""
    startup.check_run_directories(s.workdir, s.workdir / "checkpoints")
    dataset = (objective.open_dataset or open_dataset)(s.data, s.workdir)
    startup.check_dataset(dataset, s.data.path or s.workdir, headers=s.data.check_headers)
    return dataset


def write_records(s: TrainSettings, objective: Objective) -> None:
    """`dit_config.json` (read back by `checkpoints.load_dit` and the exporter) and the objective's
    records, into the workdir (process 0)."""
    if paths.writes_shared_files():
        paths.write_text(s.workdir / checkpoints.WORKDIR_DIT_CONFIG, json.dumps(dataclasses.asdict(s.model), indent=1))
        for name, record in objective.records.items():
            paths.write_text(s.workdir / name, json.dumps(record, indent=1))


def setup(s: TrainSettings, objective: Objective, *, printer: Optional[Callable[[str], Any]] = print) -> Run:
    """Check the run's directories and data, and build everything `fit` needs; nothing is trained
    and no parameter is initialised yet (`restore` does that)."""
    dataset = open_data(s, objective)
    mesh = make_mesh(s.mesh, subset=True)
    write_records(s, objective)
    schedule, tx = optimizer.build(s.optim)

    def model(seed: int):
        return objective.prepare(StepVideoDiT(s.model, dtype=s.dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(seed)))

    def init_state():
        return train_state.create(nnx.state(model(s.seed), objective.trainable), tx, seed=s.seed,
                                  use_ema=s.step.ema_decay > 0)

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: model(0)))
    sampler = TrainingSampler(graphdef, s.samples, backend=s.step.attention_backend, dtype=s.dtype,
                              in_channels=s.model.in_channels,
                              motion_score=s.step.motion_score if s.model.ti2v else None) if s.samples.every else None
    abstract_state = jax.eval_shape(init_state)
    state_sh = state_shardings(abstract_state, mesh, STATE_RULES)   # ZeRO-style: over fsdp x sequence

    d = s.data
    data_iter = pipeline.batches(dataset, d.global_batch, seed=d.seed, process_index=jax.process_index(),
                                 process_count=jax.process_count(), num_threads=d.num_threads, prefetch=d.prefetch)
    replicated = NamedSharding(mesh, PartitionSpec())
    if objective.aux is None:
        aux_sh = replicated
        aux = jax.device_put({k: jnp.asarray(v) for k, v in dataset.negative().items()}, replicated)
    else:
        aux, aux_sh = objective.aux(dataset, mesh)
    batch_sh = batch_shardings({k: v[None] for k, v in dataset.load(0).items()}, mesh)

    step_fn = jax.jit(objective.make_step(graphdef, tx, schedule, s.step),
                      in_shardings=(state_sh, batch_sh, aux_sh), out_shardings=(state_sh, replicated),
                      donate_argnums=0)
    eval_fn = jax.jit(lambda params, held: heldout_loss(graphdef, params, held, backend=s.step.attention_backend,
                                                        motion_score=s.step.motion_score))
    c = s.checkpoint
    ckpt = Checkpointer(s.workdir / "checkpoints", save_every=c.every, keep=c.keep, async_save=c.async_save)
    writer = MetricsWriter(s.workdir, tensorboard=s.logging.tensorboard, printer=printer)
    return Run(s, objective, printer, mesh, init_state, abstract_state, state_sh, dataset, data_iter, aux, batch_sh,
               replicated, step_fn, eval_fn, sampler, ckpt, writer)


def restore(run: Run):
    """The state to train from: the newest checkpoint that restores (the data position with it), or
    a fresh state with the objective's, `model.init_from`'s or the seed's weights."""
    if run.ckpt.latest_step() is not None:
        state, data_state = _resume(run.ckpt, abstract_with_shardings(run.abstract_state, run.state_sh),
                                    run.settings.checkpoint.fallback, run.writer, run.printer)
        run.data_iter.set_state(data_state)
        return state
    run.writer.discard_after(-1)  # records of an earlier attempt that saved no checkpoint
    state = jax.jit(run.init_state, out_shardings=run.state_sh)()
    if run.objective.init_params is not None:
        return run.objective.init_params(state, run.state_sh)
    if run.settings.init_from:
        return _with_initial_weights(state, run.settings.init_from, run.settings.dtype, run.state_sh, run.mesh)
    return state


def heldout_set(run: Run) -> Optional[dict]:
    """The fixed held-out set, replicated (`eval_size` samples; for the held-out loss and the
    samples' prompts), or None when neither is asked for."""
    s = run.settings
    if not (s.logging.eval_every or run.sampler is not None):
        return None
    make = run.objective.make_heldout or make_heldout
    return jax.device_put(make(run.dataset, s.logging.eval_size, s.seed + 1), run.replicated)


def train_step(run: Run, state, step: int):
    """One optimiser step on the next batch: (state, host metrics, the batch's latents shape); a
    non-finite loss stops the run before anything is saved (`NonFiniteLoss`)."""
    local = next(run.data_iter)
    state, metrics = run.step_fn(state, to_global(local, run.batch_sh), run.aux)
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not m.pop("finite"):
        run.ckpt.wait()
        raise NonFiniteLoss(
            f"loss is {m['loss']} at step {step + 1} (grad norm {m['grad_norm']}): stopping. The last "
            f"good checkpoint is step {run.ckpt.latest_step()} in {run.ckpt.directory}")
    return state, m, local[run.objective.latents_key].shape[1:]


class Throughput:
    """Step time, samples/s, tokens/s and MFU (analytic FLOPs, `metrics.train_flops`) over the steps
    since the last `scalars()`; time spent outside training (held-out loss, samples) is `exclude`d."""

    def __init__(self, run: Run):
        self.run = run
        self.peak = peak_flops_per_device(jax.devices()[0].device_kind, run.settings.logging.peak_flops)
        self.lengths = dict(text_length=run.dataset.meta["text_length"],
                            clip_length=run.dataset.meta["clip_length"])
        self.reset()

    def reset(self) -> None:
        self.t0, self.samples, self.tokens, self.flops, self.steps = time.perf_counter(), 0, 0, 0.0, 0

    def add(self, latents_shape) -> None:
        f, _, h, w = latents_shape
        b, cfg = self.run.settings.data.global_batch, self.run.settings.model
        self.samples += b
        self.tokens += b * f * (h // cfg.patch_size) * (w // cfg.patch_size)
        self.flops += b * self.run.objective.forwards_per_sample / 3.0 * train_flops(
            cfg, frames=f, height=h, width=w, **self.lengths)
        self.steps += 1

    def exclude(self, seconds: float) -> None:
        self.t0 += seconds

    def scalars(self) -> dict:
        dt = time.perf_counter() - self.t0
        out = dict(step_time_s=dt / self.steps, samples_per_s=self.samples / dt, tokens_per_s=self.tokens / dt)
        if self.peak:
            out["mfu"] = self.flops / dt / (self.peak * self.run.mesh.size)
        self.reset()
        return out


def log_step(run: Run, state, step: int, metrics: dict, heldout, throughput: Throughput,
             heldout_curve: list) -> None:
    """After step `step`: the held-out loss (`eval_every`), the metrics and throughput (`log_every`,
    and the last step), sample videos (`samples.every`)."""
    s, scalars = run.settings, dict(metrics)
    if s.logging.eval_every and step % s.logging.eval_every == 0:
        t_eval = time.perf_counter()
        scalars["heldout_loss"] = float(run.eval_fn(state.params, heldout))
        heldout_curve.append((step, scalars["heldout_loss"]))
        throughput.exclude(time.perf_counter() - t_eval)  # throughput counts training only
    if step % s.logging.log_every == 0 or step == s.stop:
        scalars.update(throughput.scalars())
        run.writer.write(step, scalars)
    if run.sampler is not None and step % s.samples.every == 0:
        t_samples = time.perf_counter()
        run.sampler(s.workdir, step, state.ema if state.ema is not None else state.params, heldout, run.aux)
        throughput.exclude(time.perf_counter() - t_samples)


def train(config, workdir=None, *, printer: Optional[Callable[[str], Any]] = print) -> TrainResult:
    """Run or resume the run of `config` (its objective: `config.objective`, `objective_of`) in
    `workdir` (default `config.workdir`)."""
    s = settings.resolve(config, workdir)
    return fit(s, objective_of(s.objective), printer=printer)


def fit(s: TrainSettings, objective: Objective, *, printer: Optional[Callable[[str], Any]] = print) -> TrainResult:
    """Run or resume the run of `s` with `objective` (see `Objective`) up to step `s.stop`."""
    objective.check_data(s.data)
    run = setup(s, objective, printer=printer)
    history: list[dict] = []
    heldout_curve: list[tuple[int, float]] = []
    try:
        with jax.set_mesh(run.mesh):
            state = restore(run)
            step = int(state.step)
            heldout = heldout_set(run)
            if s.logging.eval_every and step == 0:
                heldout_curve.append((0, float(run.eval_fn(state.params, heldout))))
                run.writer.write(0, {"heldout_loss": heldout_curve[0][1]})
            throughput = Throughput(run)
            while step < s.stop:
                state, metrics, latents_shape = train_step(run, state, step)
                step += 1
                history.append({"step": step, **metrics})
                throughput.add(latents_shape)
                log_step(run, state, step, metrics, heldout, throughput, heldout_curve)
                run.ckpt.save(step, state, run.data_iter.get_state())
                run.ckpt.poll()
            run.ckpt.save(step, state, run.data_iter.get_state(), force=step not in run.ckpt.all_steps())
            run.ckpt.wait()
    finally:
        run.ckpt.close()
        run.writer.close()
    return TrainResult(state=state, history=history, heldout=heldout_curve)


def _with_initial_weights(state, init_from, dtype, state_sh, mesh):
    """`state` with params (and EMA) from `init_from` (any DiT source of `checkpoints`), as float32
    master weights in `state_sh`. A converted checkpoint or a release `transformer/` is restored
    straight into the mesh shardings; a training workdir loads in host memory first."""
    model = checkpoints.load_dit(init_from, dtype=dtype, param_dtype=jnp.float32, mesh=mesh)
    params = jax.device_put(nnx.state(model), state_sh.params)
    ema = jax.tree.map(jnp.copy, params) if state.ema is not None else None
    return state.replace(params=params, ema=ema)
