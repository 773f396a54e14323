r"""Train the demo model end to end on CPU: `python -m stepvideo_jax.demo.build`.

    python -m stepvideo_jax.demo.build --config configs/demo/train.py --workdir /tmp/stepvideo_demo \
        [--export_to stepvideo_jax/assets/demo]

Stages (see `configs/demo/train.py`): VAE -> latents -> DiT -> export -> evaluation. A config with a
`ti2v` field (`configs/demo/ti2v.py`) runs `build_ti2v` instead: the shipped demo DiT fine-tuned
with the first-frame condition. A stage whose
output exists in the workdir is skipped, so a rerun resumes after the last finished stage (the DiT
stage also resumes from its own checkpoints). Prints the time of every stage; writes
`<workdir>/demo/` (the four components, bf16, converted-checkpoint format), `<workdir>/curves.json`
(VAE and DiT loss per step) and `<workdir>/evaluation.json`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import shutil
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from PIL import Image
from flax import nnx
from ml_collections import config_flags

from stepvideo_jax import checkpoints, compile_cache, config_files, logs
from stepvideo_jax.data import synthetic_motion as sm
from stepvideo_jax.demo import architecture, evaluate, export, latents
from stepvideo_jax.models.dit import StepVideoDiT
from stepvideo_jax.models.vae import VideoVAE
from stepvideo_jax.sampling import components
from stepvideo_jax.sampling.flow_matching import SamplerSettings
from stepvideo_jax.sampling.pipeline import VideoSize
from stepvideo_jax.training import loop
from stepvideo_jax.training import optimizer as optim
from stepvideo_jax.training import train_state, vae_train

DEFAULT_EXPORT = pathlib.Path(__file__).resolve().parents[1] / "assets" / "demo"

def render_pool(scenes, count: int, *, frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """`count` renders (b f c h w, float32 in [-1, 1]) cycling over `scenes`, start/size from `seed`."""
    rng = np.random.default_rng(seed)
    return np.stack([sm.to_model_range(sm.render(scenes[i % len(scenes)], frames=frames, height=height,
                                                 width=width, seed=int(rng.integers(2**31))))
                     for i in range(count)])


def crop_batches(pool: np.ndarray, batch: int, crop: int, *, seed: int) -> Iterator[jax.Array]:
    """Endless batches of `batch` videos from `pool`, each a random `crop` x `crop` window (the same
    window in every frame; `crop` = 0 or the full size keeps the whole frame)."""
    rng = np.random.default_rng(seed)
    _, _, _, h, w = pool.shape
    crop_h, crop_w = (crop, crop) if crop else (h, w)
    while True:
        idx = rng.integers(len(pool), size=batch)
        y0 = rng.integers(h - crop_h + 1, size=batch)
        x0 = rng.integers(w - crop_w + 1, size=batch)
        yield jnp.asarray(np.stack([pool[i, :, :, a:a + crop_h, b:b + crop_w] for i, a, b in zip(idx, y0, x0)]))


def train_vae(config, printer=print, num_steps: int | None = None, *, phase: str = "vae_train",
              init: VideoVAE | None = None) -> tuple[VideoVAE, list[dict]]:
    """One VAE phase (`config.<phase>`): a fresh VAE (or `init`) trained on renders of the training
    scenes at `render_size` pixels, in random `crop` windows (`training.vae_train`); `num_steps`
    stops early (the schedule still spans `steps`)."""
    v, t = config.video, config[phase]
    model = VideoVAE(architecture.vae_config(config), rngs=nnx.Rngs(t.seed)) if init is None else init
    graphdef, params = nnx.split(model)
    schedule = optim.learning_rate_schedule(t.learning_rate, warmup_steps=t.warmup_steps,
                                            total_steps=t.steps, kind=t.schedule, end_fraction=t.end_fraction)
    optimizer = optim.adamw(schedule, clip_norm=t.clip_norm or None)
    state = train_state.create(params, optimizer, seed=t.seed, use_ema=False)
    loss = vae_train.VAELossSettings(t.kl_weight, t.foreground_weight, t.foreground_threshold)
    step = jax.jit(vae_train.make_vae_train_step(graphdef, optimizer, schedule, loss), donate_argnums=0)
    pool = render_pool(latents.TRAINING_SCENES, t.pool, frames=v.frames, height=t.render_size,
                       width=t.render_size, seed=t.seed)
    batches = crop_batches(pool, t.batch, t.crop, seed=t.seed + 1)
    state, history = vae_train.fit(state, step, batches, t.steps if num_steps is None else num_steps,
                                   log_every=t.log_every, printer=printer)
    return nnx.merge(graphdef, state.params), history


class BuildDir:
    """A build's workdir and its bookkeeping, shared by `build` and `build_ti2v`: `config.json`, and
    the stage times and loss curves recorded so far (`stage_seconds.json`, `curves.json`), which a
    resumed build reads back, so that the final summary covers every stage, resumed or not."""

    def __init__(self, config, workdir, printer):
        self.root = pathlib.Path(workdir or config.workdir).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "config.json").write_text(config.to_json_best_effort(indent=1))
        self.printer = printer
        self.times = self._read("stage_seconds.json")
        self.curves = self._read("curves.json")

    def _read(self, name: str) -> dict:
        path = self.root / name
        return json.loads(path.read_text()) if path.exists() else {}

    @contextlib.contextmanager
    def stage(self, name: str):
        """Prints the stage's start and time; records the time once the stage has finished."""
        start = time.perf_counter()
        self.printer(f"== stage {name}")
        yield
        self.times[name] = time.perf_counter() - start
        self.printer(f"== stage {name}: {self.times[name]:.1f} s")
        (self.root / "stage_seconds.json").write_text(json.dumps(self.times, indent=1))

    def add_curves(self, **curves) -> None:
        self.curves.update(curves)
        (self.root / "curves.json").write_text(json.dumps(self.curves))

    def train_dit(self, dit_config) -> StepVideoDiT:
        """The DiT stage (flow matching with `dit_config`, resuming from its own checkpoints), unless
        a finished one is recorded; the trained DiT."""
        if "dit" not in self.curves:
            with self.stage("dit"):
                result = loop.train(dit_config, printer=self.printer)
                self.add_curves(dit=result.history, dit_heldout=result.heldout)
        return checkpoints.load_dit(dit_config.workdir)

    def finish(self, out_dir: pathlib.Path, evaluation: dict, summary: dict, export_to: str) -> dict:
        """Writes `evaluation.json` and `summary.json` (with the stage times) into the exported
        `out_dir`, and copies that to `export_to` when given; the summary with the workdir."""
        summary = {**summary, "stage_seconds": self.times}
        (self.root / "evaluation.json").write_text(json.dumps(evaluation, indent=1, ensure_ascii=False))
        (out_dir / "evaluation.json").write_text(json.dumps(evaluation, indent=1, ensure_ascii=False))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if export_to:
            export_to = pathlib.Path(export_to)
            shutil.rmtree(export_to, ignore_errors=True)
            shutil.copytree(out_dir, export_to)
            self.printer(f"copied {out_dir} to {export_to}")
        return {"workdir": str(self.root), **summary}


def accuracies(evaluation: dict) -> dict:
    """{"accuracy", "accuracy_with_shape"}: {run: fraction} of an evaluation's runs; "by_seed":
    {run: {seed: [accuracy, accuracy_with_shape]}} of the runs evaluated per seed."""
    runs = {k: v for k, v in evaluation.items() if isinstance(v, dict) and "accuracy" in v}
    return {"accuracy": {k: v["accuracy"] for k, v in runs.items()},
            "accuracy_with_shape": {k: v["accuracy_with_shape"] for k, v in runs.items()},
            "by_seed": {k: {s: [r["accuracy"], r["accuracy_with_shape"]] for s, r in v["by_seed"].items()}
                        for k, v in runs.items() if "by_seed" in v}}


def write_training_latents(config, root, vae, step_llm, clip):
    """The DiT's training set (`demo.latents`) from the trained VAE and the frozen text encoders."""
    v = config.video
    text = architecture.conditioner(step_llm, clip, llm_length=config.latents.llm_length)
    return latents.write_latents(root, vae=vae, text=text, scenes=latents.TRAINING_SCENES,
                                 renders_per_scene=config.latents.renders_per_scene, frames=v.frames,
                                 height=v.height, width=v.width, seed=config.latents.seed)


def dit_train_config(config, workdir: pathlib.Path):
    """`config.dit_train` with the workdir, data path and DiT channels of this build filled in."""
    if config.dit_train.data.path:
        raise ValueError(f"dit_train.data.path = {config.dit_train.data.path!r}: the build trains on the latents it "
                         "writes (<workdir>/latents); leave it empty")
    d = config.dit_train.copy_and_resolve_references()
    d.unlock()
    d.workdir = str(workdir / "dit")
    d.data.path = str(workdir / "latents")
    d.model = ml_collections.ConfigDict(architecture.dit_model_config(config))
    return d


def demo_models(checkpoint_dir, *, dtype=jnp.float32, weights: str = "bf16"):
    """The four components of a demo checkpoint, compute and parameters in `dtype`; `weights`: the
    DiT's and Step-LLM's block linears (`models.quant.SCHEMES`; "bf16": unquantised, in `dtype`)."""
    return checkpoints.loader(checkpoint_dir, dit_dtype=dtype, vae_dtype=dtype, llm_dtype=dtype,
                              clip_dtype=dtype, weights=weights).models()


def pipeline_of(models, dit=None):
    return components.text_to_video(models.text, models.dit if dit is None else dit, models.vae, stream_frames=32)


def reconstruct(vae: VideoVAE, videos: np.ndarray) -> jax.Array:
    """videos (b f c h w) in [-1, 1] -> decode(posterior mean), the VAE's reconstruction."""
    graphdef, state = nnx.split(vae)

    @jax.jit
    def run(state, videos):
        model = nnx.merge(graphdef, state)
        return model.decode(model.encode_mean(videos, stream_frames=32), stream_frames=32)

    return run(state, jnp.asarray(videos))


CEILING_SCENES = tuple(sm.HELD_OUT) + tuple(latents.TRAINING_SCENES[::2])


def vae_ceiling(vae: VideoVAE, *, frames: int, height: int, width: int, render_seeds=(10_000,),
                scenes=CEILING_SCENES) -> dict:
    """The checker on the VAE's reconstructions of ground-truth renders: what a DiT that produced
    perfect latents could score. Every scene is rendered once per entry of `render_seeds` (scene i
    with seed + i). Returns `evaluate.summarise`'s accuracies (colour and motion, with shape, per
    field) over all, and "per_seed": the same per render seed."""
    results = []
    for base in render_seeds:
        videos = np.stack([sm.to_model_range(sm.render(s, frames=frames, height=height, width=width, seed=base + i))
                           for i, s in enumerate(scenes)])
        recon = np.asarray(reconstruct(vae, videos))
        for scene, video in zip(scenes, recon):
            reading = evaluate.motion_checker.read_video(video.transpose(0, 2, 3, 1))
            caption = scene.caption()
            results.append({"caption": caption, "seed": base, **dataclasses.asdict(reading),
                            "ok": evaluate.motion_checker.matches(reading, caption),
                            "ok_with_shape": evaluate.motion_checker.matches(reading, caption,
                                                                             evaluate.motion_checker.FIELDS)})
    per_seed = {base: evaluate.summarise([r for r in results if r["seed"] == base]) for base in render_seeds}
    return {**evaluate.summarise(results), "per_seed": per_seed, "results": results}


def sampling_settings(config):
    s, v = config.sample, config.video
    return (VideoSize(v.frames, v.height, v.width, architecture.vae_config(config).spatial_factor),
            SamplerSettings(s.num_steps, float(s.guidance_scale), float(s.time_shift)))


def evaluate_checkpoint(config, checkpoint_dir, printer=print) -> dict:
    """Checker accuracy of the trained DiT and of a randomly initialised one (same VAE and text
    encoders) on the held-out scenes and every `config.eval.train_stride`-th training scene (none
    when 0)."""
    e = config.eval
    models = demo_models(checkpoint_dir)
    size, settings = sampling_settings(config)
    random_dit = StepVideoDiT(models.dit.cfg, rngs=nnx.Rngs(e.random_dit_seed))
    limit = e.max_scenes or None
    out = {"chance": evaluate.motion_checker.CHANCE, "seeds": list(e.seeds), "languages": list(e.languages)}
    v = config.video
    out["vae_reconstruction"] = vae_ceiling(models.vae, frames=v.frames, height=v.height, width=v.width)
    printer(f"VAE reconstructions: checker accuracy {out['vae_reconstruction']['accuracy']:.3f} "
            f"(with shape {out['vae_reconstruction']['accuracy_with_shape']:.3f})")
    for name, dit in (("demo", None), ("random_dit", random_dit)):
        pipe = pipeline_of(models, dit)
        splits = [("held_out", sm.HELD_OUT)]
        if e.train_stride:
            splits.append(("train", latents.TRAINING_SCENES[::e.train_stride]))
        for split, scenes in splits:
            result = evaluate.recorded(evaluate.evaluate(
                pipe, scenes[:limit], size=size, settings=settings, seeds=tuple(e.seeds),
                languages=tuple(e.languages), batch=e.batch), e.seeds)
            out[f"{name}/{split}"] = result
            printer(f"{name} on {split} scenes: {evaluate.score_line(result)}")
    return out


def build(config, workdir, *, export_to: str = "", printer=print) -> dict:
    bd = BuildDir(config, workdir, printer)
    # the VAE as shipped (bf16 weights) encodes the DiT's training set
    vae = None
    for phase in config.vae_phases:
        phase_dir = bd.root / phase
        if not checkpoints.is_converted(phase_dir):
            with bd.stage(phase):
                vae, history = train_vae(config, printer, phase=phase, init=vae)
                export.write_checkpoint(phase_dir, {"vae": vae}, dtype="bfloat16")
                bd.add_curves(**{phase: history})
        vae = checkpoints.load_component(phase_dir, "vae")
    step_llm, clip = architecture.text_encoders(config)

    latents_dir = bd.root / "latents"
    if not (latents_dir / "meta.json").exists():
        shutil.rmtree(latents_dir, ignore_errors=True)
        with bd.stage("latents"):
            write_training_latents(config, latents_dir, vae, step_llm, clip)

    dit = bd.train_dit(dit_train_config(config, bd.root))

    demo_dir = bd.root / "demo"
    with bd.stage("export"):
        export.write_checkpoint(demo_dir, {"transformer": dit, "vae": vae, "step_llm": step_llm,
                                           "hunyuan_clip": clip}, dtype="bfloat16")
        shutil.copyfile(bd.root / "curves.json", demo_dir / "curves.json")

    with bd.stage("evaluate"):
        evaluation = evaluate_checkpoint(config, demo_dir, printer)
    return bd.finish(demo_dir, evaluation, {**accuracies(evaluation), "chance": evaluation["chance"]}, export_to)


# ---------------------------------------------------------------------------------------------
# the TI2V demo: the shipped T2V demo DiT fine-tuned with the first-frame condition


def ti2v_from_t2v(dit: StepVideoDiT, *, seed: int = 0) -> StepVideoDiT:
    """A TI2V DiT (`DiTConfig.ti2v`) that computes exactly what the T2V `dit` computes: every shared
    parameter copied; the patch embedding's rows for the condition channels (the second half of
    the 2c input features, ordered (c, p, q)) zero, so the condition is ignored at first; the
    motion-score MLP's output layer zero, so the score adds nothing at first (its first layer keeps
    its random init, else no gradient would ever reach it). Float32."""
    if dit.cfg.ti2v:
        raise ValueError("ti2v_from_t2v takes a text-to-video DiT; this one is already TI2V")
    model = StepVideoDiT(dataclasses.replace(dit.cfg, ti2v=True), rngs=nnx.Rngs(seed))
    src = dict(nnx.to_flat_state(nnx.state(dit, nnx.Param)))
    dst = nnx.state(model, nnx.Param)
    flat = []
    for path, var in nnx.to_flat_state(dst):
        value = jnp.asarray(var[...], jnp.float32)
        if path[:2] == ("patch_embed", "kernel"):
            t2v = jnp.asarray(src[path][...], jnp.float32)
            value = jnp.concatenate([t2v, jnp.zeros_like(t2v)], axis=0)
        elif path[0] == "motion_linear_2":
            value = jnp.zeros_like(value)
        elif path in src:
            value = jnp.asarray(src[path][...], jnp.float32)
        flat.append((path, var.replace(value)))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


FIRST_FRAME = "first_frame.png"   # written beside the TI2V demo's DiT: an image to try it with


def default_first_frame(config) -> np.ndarray:
    """Frame 0 (uint8 h w 3) of a render of the scene of `config.ti2v.image_caption` with
    `config.ti2v.image_seed` (a held-out scene): the build writes it beside the TI2V DiT."""
    v, t = config.video, config.ti2v
    return first_frames([sm.parse_caption(t.image_caption)], [t.image_seed], frames=v.frames, height=v.height,
                        width=v.width)[0]


def first_frames(scenes, seeds, *, frames: int, height: int, width: int) -> list[np.ndarray]:
    """The held-out TI2V inputs: frame 0 (uint8 h w 3) of a render of each scene with its seed."""
    return [sm.render(s, frames=frames, height=height, width=width, seed=seed)[0] for s, seed in zip(scenes, seeds)]


def evaluate_ti2v(config, checkpoint_dir, *, dit=None, printer=print, baselines: bool = True) -> dict:
    """Checker accuracy of the TI2V demo DiT (`dit`, default `<checkpoint_dir>/transformer`) and of
    a randomly initialised TI2V DiT, with the T2V demo's VAE and text encoders
    (`config.ti2v.base`), on the held-out scenes: every (scene, language, seed) gets frame 0 of a
    render of that scene drawn with that seed as its first-frame image, and the caption. Also the T2V
    demo (the base DiT) on the same captions without the image ("t2v_demo_no_image"): where a model
    starts unconditioned, against the TI2V demo's start offset (`evaluate.start_summary`).
    `baselines=False`: the TI2V demo alone. `eval.max_scenes` (0: all) cuts the held-out scenes, as
    in `evaluate_checkpoint`."""
    e, t, v = config.eval, config.ti2v, config.video
    models = demo_models(t.base)
    dit = dit if dit is not None else checkpoints.load_component(checkpoint_dir, "transformer", dtype=jnp.float32)
    size, settings = sampling_settings(config)
    random_dit = StepVideoDiT(dit.cfg, rngs=nnx.Rngs(e.random_dit_seed))
    out = {"chance": evaluate.motion_checker.CHANCE, "chance_with_shape": evaluate.motion_checker.CHANCE_ALL,
           "seeds": list(e.seeds), "languages": list(e.languages), "motion_score": float(t.motion_score)}
    runs = [("demo_ti2v", dit), ("random_dit", random_dit), ("t2v_demo_no_image", models.dit)]
    for name, model in runs if baselines else runs[:1]:
        pipe = pipeline_of(models, model)
        result = evaluate.recorded(evaluate.evaluate(
            pipe, sm.HELD_OUT[:e.max_scenes or None], size=size, settings=settings, seeds=tuple(e.seeds),
            languages=tuple(e.languages), batch=e.batch, motion_score=float(t.motion_score),
            first_frame=lambda scene, seed: first_frames([scene], [seed], frames=v.frames, height=v.height,
                                                         width=v.width)[0]), e.seeds)
        out[f"{name}/held_out"] = result
        printer(f"{name} on held-out scenes: {evaluate.score_line(result)}; start {result['start']}")
    return out


def build_ti2v(config, workdir, *, export_to: str = "", printer=print) -> dict:
    """The TI2V demo (`configs/demo/ti2v.py`): latents of the training scenes with the base demo's
    VAE and text encoders -> `ti2v_from_t2v(base DiT)` -> flow matching with the first-frame
    condition (`config.dit_train`, `step.motion_score`) -> `<workdir>/demo_ti2v/transformer` (bf16)
    -> held-out evaluation. Stages resume like `build`'s."""
    bd = BuildDir(config, workdir, printer)
    base = demo_models(config.ti2v.base)
    latents_dir = bd.root / "latents"
    if not (latents_dir / "meta.json").exists():
        shutil.rmtree(latents_dir, ignore_errors=True)
        with bd.stage("latents"):
            write_training_latents(config, latents_dir, base.vae,
                                   checkpoints.load_component(config.ti2v.base, "step_llm"),
                                   checkpoints.load_component(config.ti2v.base, "hunyuan_clip"))

    init_dir = bd.root / "ti2v_init"
    if not checkpoints.is_converted(init_dir):
        export.write_checkpoint(init_dir, {"transformer": ti2v_from_t2v(base.dit, seed=config.seed)}, dtype="float32")
    dit_config = dit_train_config(config, bd.root)
    with dit_config.unlocked():
        dit_config.model.init_from = str(init_dir)
        dit_config.step.motion_score = float(config.ti2v.motion_score)
    dit = bd.train_dit(dit_config)

    demo_dir = bd.root / "demo_ti2v"
    with bd.stage("export"):
        export.write_checkpoint(demo_dir, {"transformer": dit}, dtype="bfloat16")
        Image.fromarray(default_first_frame(config)).save(demo_dir / FIRST_FRAME)
        shutil.copyfile(bd.root / "curves.json", demo_dir / "curves.json")

    with bd.stage("evaluate"):
        evaluation = evaluate_ti2v(config, demo_dir, printer=printer)
    return bd.finish(demo_dir, evaluation, {**accuracies(evaluation), "chance": evaluation["chance"],
                                            "motion_score": evaluation["motion_score"]}, export_to)


def main(argv=None):
    # the flags are defined when the command runs, not when the module is imported (tests import it)
    config_flag = config_flags.DEFINE_config_file("config", str(config_files.path("demo/train.py")),
                                                  "demo build config")
    flags.DEFINE_string("workdir", None, "run directory; default config.workdir")
    flags.DEFINE_string("export_to", "", "also copy the trained demo checkpoint and curves here")

    def _main(args):
        logs.quiet_unless_asked()

        compile_cache.setup(config_flag.value)
        run = build_ti2v if "ti2v" in config_flag.value else build
        summary = run(config_flag.value, flags.FLAGS.workdir, export_to=flags.FLAGS.export_to)
        print(json.dumps(summary, indent=1))

    app.run(_main, argv=config_files.resolve_argv(argv))


if __name__ == "__main__":
    main()
