r"""Train the demo model end to end on CPU: `python -m stepvideo_jax.demo.build`.

    python -m stepvideo_jax.demo.build --config configs/demo/train.py --workdir /tmp/stepvideo_demo \
        [--export_to stepvideo_jax/assets/demo]

Stages (see `configs/demo/train.py`): VAE -> latents -> DiT -> export -> evaluation. A stage whose
output exists in the workdir is skipped, so a rerun resumes after the last finished stage (the DiT
stage also resumes from its own checkpoints). Prints the time of every stage; writes
`<workdir>/demo/` (the four components, bf16, converted-checkpoint format), `<workdir>/curves.json`
(VAE and DiT loss per step) and `<workdir>/evaluation.json`.
"""
from __future__ import annotations

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
from flax import nnx
from ml_collections import config_flags

from stepvideo_jax import checkpoints, compile_cache, config_files, logs
from stepvideo_jax.data import synthetic_motion as sm
from stepvideo_jax.demo import architecture, evaluate, export, latents
from stepvideo_jax.models.dit import StepVideoDiT
from stepvideo_jax.models.vae import VideoVAE
from stepvideo_jax.sampling import components
from stepvideo_jax.sampling.flow_matching import SamplerSettings
from stepvideo_jax.sampling.pipeline import TextToVideo, VideoSize
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
    step = jax.jit(vae_train.make_vae_train_step(graphdef, optimizer, schedule,
                                                 vae_train.VAELossSettings(t.kl_weight)), donate_argnums=0)
    pool = render_pool(latents.TRAINING_SCENES, t.pool, frames=v.frames, height=t.render_size,
                       width=t.render_size, seed=t.seed)
    batches = crop_batches(pool, t.batch, t.crop, seed=t.seed + 1)
    state, history = vae_train.fit(state, step, batches, t.steps if num_steps is None else num_steps,
                                   log_every=t.log_every, printer=printer)
    return nnx.merge(graphdef, state.params), history


def _stage(name: str, printer):
    class Timer:
        def __enter__(self):
            self.start = time.perf_counter()
            printer(f"== stage {name}")
            return self

        def __exit__(self, *exc):
            self.seconds = time.perf_counter() - self.start
            printer(f"== stage {name}: {self.seconds:.1f} s")
    return Timer()


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
    return TextToVideo(encode_text=models.text, dit=models.dit if dit is None else dit,
                       decode=components.vae_decoder(models.vae, stream_frames=32))


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
    return (VideoSize(v.frames, v.height, v.width),
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
            result = evaluate.evaluate(pipe, scenes[:limit], size=size, settings=settings, seeds=tuple(e.seeds),
                                       languages=tuple(e.languages), batch=e.batch)
            result.pop("videos")
            out[f"{name}/{split}"] = result
            printer(f"{name} on {split} scenes: accuracy {result['accuracy']:.3f} (with shape "
                    f"{result['accuracy_with_shape']:.3f}, {len(result['results'])} videos)")
    return out


def build(config, workdir, *, export_to: str = "", printer=print) -> dict:
    workdir = pathlib.Path(workdir or config.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    times_path = workdir / "stage_seconds.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    curves_path = workdir / "curves.json"
    curves = json.loads(curves_path.read_text()) if curves_path.exists() else {}

    def record(name, timer):
        times[name] = timer.seconds
        times_path.write_text(json.dumps(times, indent=1))

    # the VAE as shipped (bf16 weights) encodes the DiT's training set
    vae = None
    for phase in config.vae_phases:
        phase_dir = workdir / phase
        if not checkpoints.is_converted(phase_dir):
            with _stage(phase, printer) as timer:
                vae, history = train_vae(config, printer, phase=phase, init=vae)
                export.write_checkpoint(phase_dir, {"vae": vae}, dtype="bfloat16")
            curves[phase] = history
            curves_path.write_text(json.dumps(curves))
            record(phase, timer)
        vae = checkpoints.load_component(phase_dir, "vae")
    step_llm, clip = architecture.text_encoders(config)

    latents_dir = workdir / "latents"
    if not (latents_dir / "meta.json").exists():
        shutil.rmtree(latents_dir, ignore_errors=True)
        with _stage("latents", printer) as timer:
            write_training_latents(config, latents_dir, vae, step_llm, clip)
        record("latents", timer)

    dit_config = dit_train_config(config, workdir)
    if "dit" not in curves:
        with _stage("dit", printer) as timer:
            result = loop.train(dit_config, printer=printer)
        curves["dit"] = result.history
        curves["dit_heldout"] = result.heldout
        curves_path.write_text(json.dumps(curves))
        record("dit", timer)
    dit = checkpoints.load_dit(dit_config.workdir)

    demo_dir = workdir / "demo"
    with _stage("export", printer) as timer:
        export.write_checkpoint(demo_dir, {"transformer": dit, "vae": vae, "step_llm": step_llm,
                                           "hunyuan_clip": clip}, dtype="bfloat16")
        shutil.copyfile(curves_path, demo_dir / "curves.json")
    record("export", timer)

    with _stage("evaluate", printer) as timer:
        evaluation = evaluate_checkpoint(config, demo_dir, printer)
    record("evaluate", timer)
    summary = {"accuracy": {k: v["accuracy"] for k, v in evaluation.items() if isinstance(v, dict)},
               "accuracy_with_shape": {k: v["accuracy_with_shape"] for k, v in evaluation.items()
                                       if isinstance(v, dict)},
               "chance": evaluation["chance"], "stage_seconds": times}
    (workdir / "evaluation.json").write_text(json.dumps(evaluation, indent=1, ensure_ascii=False))
    (demo_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if export_to:
        export_to = pathlib.Path(export_to)
        shutil.rmtree(export_to, ignore_errors=True)
        shutil.copytree(demo_dir, export_to)
        printer(f"copied {demo_dir} to {export_to}")
    return {"workdir": str(workdir), **summary}


def main(argv=None):
    # the flags are defined when the command runs, not when the module is imported (tests import it)
    config_flag = config_flags.DEFINE_config_file("config", str(config_files.path("demo/train.py")),
                                                  "demo build config")
    flags.DEFINE_string("workdir", None, "run directory; default config.workdir")
    flags.DEFINE_string("export_to", "", "also copy the trained demo checkpoint and curves here")

    def _main(args):
        logs.quiet_unless_asked()

        compile_cache.setup(config_flag.value)
        summary = build(config_flag.value, flags.FLAGS.workdir, export_to=flags.FLAGS.export_to)
        print(json.dumps(summary, indent=1))

    app.run(_main, argv=config_files.resolve_argv(argv))


if __name__ == "__main__":
    main()
