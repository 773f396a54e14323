"""One generation job: a config checked into a `Job`, its models loaded, its videos written.

`resolve` checks every field before anything is built or compiled (a ValueError names the value and
the valid choices); `run` loads the models, generates the batch and writes the mp4 files (and the
latents), printing the resolved config, the live device memory after each stage and the time of
each phase. The command line is `python -m stepvideo_jax.generate`; the eval-set runner
(`sampling/eval_set.py`) and the training loop's samples use the same pieces.

By default (`release_text_encoders=True`) the run is staged so that the DiT has the devices' memory
to itself: the text encoders load, encode every prompt (host-side results), are released, and only
then the DiT and the VAE load, denoise and decode. The live device memory after each stage is
printed and kept in the summary (`live_bytes`).
"""
from __future__ import annotations

import dataclasses
import gc
import pathlib
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from stepvideo_jax import checkpoints, config_files, hub, logs, paths
from stepvideo_jax.dtypes import dtype_of
from stepvideo_jax.models import offload, quant
from stepvideo_jax.parallel.mesh import MeshConfig, make_mesh
from stepvideo_jax.sampling import components, image_condition, video_io
from stepvideo_jax.sampling.flow_matching import SamplerSettings
from stepvideo_jax.sampling.pipeline import TextToVideo, VideoSize, caption_prompts, check_prompts, encode_prompts
from stepvideo_jax.text.conditioning import LLM_LENGTH

DEFAULT_CONFIG = config_files.path("generate/demo.py")   # the embedded demo model


@dataclasses.dataclass(frozen=True)
class Job:
    """A checked config: everything the run needs, validated before any weight loads or anything
    compiles. `models` says where the four models come from (their configs read and checked against
    each other, on the job's mesh); each is built only when the run asks for it."""

    prompts: list[str]
    seeds: list[int]
    size: VideoSize
    settings: SamplerSettings
    outputs: list[epath.Path]
    checkpoint_dir: pathlib.Path | None
    dtypes: dict
    models: checkpoints.Loader
    images: list[np.ndarray] | None = None   # TI2V: one uint8 (H0, W0, 3) first frame per prompt
    motion_score: float | None = None        # TI2V
    weights: str = "bf16"                    # block-linear scheme (models/quant.py)
    offload: str = "none"                    # "blocks": DiT/Step-LLM layers in host memory (models/offload.py)
    cfg_sequential: bool = False             # CFG rows one after the other (flow_matching.denoise_step)


def resolve(config: ml_collections.ConfigDict, *, prompts=None, outputs=None, images=None,
            image_per_request: bool = False) -> Job:
    """Validate a config; every problem raises a ValueError naming the value and the valid choices.

    `prompts` / `outputs` replace the config's prompts and the file names derived from `output`.
    TI2V configs (`ti2v`, or an `image` given): `images` (one file per prompt) replaces `config.image`
    (one file for every prompt); each is read and its crop checked here, before any model loads. The
    models' configs are read and checked against each other (`build_loader`) before the size and the
    images: a checkpoint whose components do not fit is named before any weight loads, and the size's
    spatial factor is the VAE's. `image_per_request` (a server): no image
    is read now, each request brings its own; the DiT's task is checked against `config.ti2v`.
    """
    if prompts is None:
        prompts = config.prompts if config.prompts else config.prompt
    prompts = check_prompts(prompts)
    seeds = [int(config.seed) + i for i in range(len(prompts))]
    settings, dtypes, checkpoint_dir, models = check_models(config)
    if outputs is None:
        output = paths.as_path(config.output)
        outputs = [output] if len(prompts) == 1 else [
            output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(len(prompts))]
    outputs = [paths.as_path(p) for p in outputs]
    for path in outputs:
        if path.suffix.lower() != ".mp4":
            raise ValueError(f"output {path} must end in .mp4")
        video_io.check_writable(path)
    size = VideoSize(config.num_frames, config.height, config.width, models.vae_cfg.spatial_factor)
    loaded, motion_score = None, None
    if not image_per_request and (config.ti2v or config.image or images is not None):
        loaded, motion_score = resolve_images(config, images, len(prompts), size)
    check_task(models.dit_cfg.ti2v, image_config=bool(config.ti2v) if image_per_request else loaded is not None,
               where=config.dit_from or config.checkpoint_dir or "the tiny random models")
    return Job(prompts=prompts, seeds=seeds, size=size, settings=settings, outputs=outputs,
               checkpoint_dir=checkpoint_dir, dtypes=dtypes, models=models,
               images=loaded, motion_score=motion_score, weights=config.weights,
               offload=config.offload, cfg_sequential=config.cfg_sequential)


def check_models(config: ml_collections.ConfigDict):
    """(sampler settings, dtypes, checkpoint_dir, `build_loader`'s loader) of a generation config,
    each checked: the schedule, dtypes, weights scheme, mesh and offload, the checkpoint (hub ids
    resolved) and the models' configs against each other (read, no weights). Shared by `resolve` and
    the reflow teacher job."""
    settings = SamplerSettings(config.num_steps, float(config.guidance_scale), float(config.time_shift),
                               config.cfg_schedule)
    dtypes = {name: dtype_of(value, what=f"dtypes.{name}") for name, value in config.dtypes.items()}
    quant.check_scheme(config.weights)
    mesh = None
    if config.mesh:
        mesh = MeshConfig.from_string(config.mesh)
        mesh.resolve(jax.device_count())
        mesh = make_mesh(mesh)
    if offload.check_offload(config.offload):
        offload.check_mesh(mesh)
    checkpoint_dir = None
    if config.checkpoint_dir:
        checkpoint_dir = checkpoints.check_checkpoint_dir(hub.resolve(config.checkpoint_dir))
    elif config.tiny is None:
        raise ValueError("this config has no tiny random models: set --config.checkpoint_dir to a release "
                         "directory (transformer/, vae/, step_llm/, hunyuan_clip/) or its converted checkpoint")
    return settings, dtypes, checkpoint_dir, build_loader(config, checkpoint_dir, dtypes, mesh)


def check_task(ti2v_dit: bool, *, image_config: bool, where: str) -> None:
    """The DiT's task (its config, read without weights) must be the config's: a ValueError naming
    the mismatch and the way out otherwise."""
    if ti2v_dit and not image_config:
        raise ValueError(f"the DiT of {where} is Step-Video-TI2V (image to video), but this config is text to "
                         "video (no ti2v, no image): use configs/generate/ti2v.py "
                         "with --config.image=FIRST_FRAME, or a text-to-video "
                         "checkpoint")
    if image_config and not ti2v_dit:
        raise ValueError(f"the DiT of {where} is text to video, but this config is image to video (ti2v or an "
                         "image given): use a Step-Video-TI2V checkpoint (stepfun-ai/stepvideo-ti2v), "
                         "or a text-to-video config without --config.image")


def resolve_images(config: ml_collections.ConfigDict, images, n: int, size: VideoSize):
    """TI2V: (one uint8 image per prompt, the checked motion score); ValueError for a missing or
    unreadable image, a crop too unlike the video's aspect ratio, or a non-finite motion score."""
    motion_score = image_condition.check_motion_score(config.motion_score)
    if images is None:
        if not config.image:
            raise ValueError("this is an image-to-video config: set --config.image to the first frame's file")
        images = [config.image] * n
    if len(images) != n:
        raise ValueError(f"{len(images)} images for {n} prompts: give one image per prompt")
    cache = {}
    for path in images:
        if str(path) not in cache:
            cache[str(path)] = image_condition.load_image(path)
            image_condition.cover_crop(cache[str(path)].shape[:2], (size.height, size.width))
    return [cache[str(p)] for p in images], motion_score


def build_loader(config: ml_collections.ConfigDict, checkpoint_dir: pathlib.Path | None, dtypes: dict,
                 mesh=None) -> checkpoints.Loader:
    """Where the job's models come from: `checkpoint_dir`, else the config's tiny random models;
    their configs are read and checked now, each model is built when asked for."""
    kw = dict(mesh=mesh, dit_dtype=dtypes["dit"], vae_dtype=dtypes["vae"], llm_dtype=dtypes["step_llm"],
              clip_dtype=dtypes["clip"], attention_backend=config.attention_backend or None,
              bf16_mask_sum=config.bf16_mask_sum, weights=config.weights, offload=config.offload)
    if checkpoint_dir is not None:
        return checkpoints.loader(checkpoint_dir, dit_from=config.dit_from, **kw)
    return components.TinyRandomLoader(config.tiny.to_dict(), seed=config.tiny.seed, **kw)


def build_pipeline(config: ml_collections.ConfigDict, job: Job, *, text_encoder: bool = True) -> TextToVideo:
    """DiT + VAE decoder of `job.models`, and the text encoders unless `text_encoder=False` (then
    every call needs `cond=`)."""
    loader = job.models
    dit, vae = loader.dit(), loader.vae()
    ti2v = bool(dit.cfg.ti2v)
    check_task(ti2v, image_config=job.images is not None, where=str(job.checkpoint_dir or "the tiny random models"))
    return components.text_to_video(loader.text_encoder() if text_encoder else None, dit, vae,
                                    dtype=job.dtypes["dit"], attention_backend=config.attention_backend or None,
                                    mesh=loader.mesh, cfg_sequential=job.cfg_sequential)


def report_long_prompts(config: ml_collections.ConfigDict, loader: checkpoints.Loader, prompts: list[str],
                        settings: SamplerSettings) -> None:
    """Tokenize the prompts' caption rows with the loader's Step-LLM tokenizer alone (no weights),
    so that a prompt the model will cut is reported (one warning line, by the tokenizer) before any
    model loads; the text encoder then uses the same tokenizer, which names each text once."""
    tokenizer = loader.llm_tokenizer()
    if tokenizer is not None:
        tokenizer(caption_prompts(prompts, pos_magic=config.pos_magic, neg_magic=config.neg_magic,
                                  cfg=settings.cfg), max_length=LLM_LENGTH)


def live_bytes() -> int:
    """Bytes of every live JAX array, all devices together (a sharded array counts once, whole)."""
    return sum(a.nbytes for a in jax.live_arrays())


def note_memory(record: dict, stage: str) -> None:
    """Record and print the live device bytes after `stage`."""
    record[stage] = live_bytes()
    print(f"live device arrays after {stage}: {record[stage] / 2**20:.1f} MiB", flush=True)


def encode_batches(config: ml_collections.ConfigDict, encode_text, batches: list[list[str]],
                   settings: SamplerSettings, mesh=None) -> tuple[list[dict], list[float]]:
    """Host-side conditioning of each batch of prompts (CFG rows as the sampler needs them), and
    the seconds each took."""
    conds, seconds = [], []
    for prompts in batches:
        start = time.perf_counter()
        conds.append(encode_prompts(encode_text, prompts, pos_magic=config.pos_magic, neg_magic=config.neg_magic,
                                    cfg=settings.cfg, mesh=mesh))
        seconds.append(time.perf_counter() - start)
    return conds, seconds


def encode_stage(config: ml_collections.ConfigDict, loader: checkpoints.Loader, batches: list[list[str]],
                 settings: SamplerSettings, memory: dict) -> tuple[list[dict], list[float], dict]:
    """Load the text encoders, encode every batch, release the encoders (no reference kept, then
    `gc.collect()`), so that the DiT loaded next has the devices' memory to itself.

    Returns (host conditioning per batch, seconds per batch, {"load text encoders", "release"}
    seconds); `memory` gets the live bytes after each step.
    """
    start = time.perf_counter()
    text = loader.text_encoder()
    timings = {"load text encoders": time.perf_counter() - start}
    note_memory(memory, "text encoders loaded")
    conds, seconds = encode_batches(config, text, batches, settings, loader.mesh)
    note_memory(memory, "prompts encoded")
    start = time.perf_counter()
    del text
    gc.collect()
    timings["release"] = time.perf_counter() - start
    note_memory(memory, "text encoders released")
    return conds, seconds, timings


def generate(config: ml_collections.ConfigDict, job: Job, pipe: TextToVideo, cond: dict | None = None) -> dict:
    """Run one batch and write its files (process 0 only: every process computes); returns
    {"files", "latents", "timings"}. `cond`: the batch's conditioning encoded beforehand
    (`encode_batches`), else `pipe` encodes the prompts."""
    result = pipe(job.prompts, size=job.size, settings=job.settings, seeds=job.seeds,
                  pos_magic=config.pos_magic, neg_magic=config.neg_magic, crop=config.crop_540p,
                  progress=config.progress, cond=cond, images=job.images, motion_score=job.motion_score)
    start = time.perf_counter()
    latent_files = []
    for path, frames, latents in zip(job.outputs, result.frames, result.latents):
        if config.save_latents:
            latent_files.append(str(path.with_suffix(".npy")))
        if not paths.writes_shared_files():
            continue
        video_io.write_mp4(path, frames, denoise=config.denoise_filter)
        if config.save_latents:
            _save_npy(path.with_suffix(".npy"), latents[None])
    timings = dict(result.timings, write=time.perf_counter() - start)
    return {"files": [str(p) for p in job.outputs], "latents": latent_files, "timings": timings}


def _save_npy(path, array: np.ndarray) -> None:
    with paths.local_then_move(path, ".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def describe(config: ml_collections.ConfigDict, job: Job, *, full: bool = False) -> str:
    """The resolved config as a run prints it: the fields that shape the video (`full`: all)."""
    if full:
        return "resolved config:\n" + str(config)
    prompts = [f"  prompt: {job.prompts[0]}"] if len(job.prompts) == 1 else [
        f"  prompts: {len(job.prompts)} ({job.prompts[0]!r}, ...)"]
    s = job.settings
    dtypes = ", ".join(f"{k} {v}" for k, v in config.dtypes.items())
    return "\n".join([
        "resolved config (every field: --verbosity=1):",
        f"  weights: {job.checkpoint_dir or 'tiny random (config.tiny)'}",
        *prompts,
        f"  video: {job.size.num_frames} frames of {job.size.height} x {job.size.width}, seed {job.seeds[0]}",
        *([f"  first frame: {config.image or 'one image per prompt'}, motion score {job.motion_score:g}"]
          if job.images is not None else []),
        f"  sampler: {s.num_steps} steps, guidance {s.guidance_scale:g}, time shift {s.shift:g}",
        f"  dtypes: {dtypes}; block linears: {job.weights}, offload {job.offload}"
        f"{', CFG rows sequential' if job.cfg_sequential else ''}; mesh: {config.mesh or 'one device'}",
    ])


def format_timings(timings: dict) -> str:
    width = max(len(k) for k in timings)
    rows = [f"  {k:<{width}}  {v:8.2f} s" for k, v in timings.items()]
    return "\n".join(["time per phase:", *rows, f"  {'total':<{width}}  {sum(timings.values()):8.2f} s"])


def run(config: ml_collections.ConfigDict, job: Job) -> dict:
    """Build the models, generate the batch, write the files; prints the config, the live device
    memory after each stage and the timings.

    `config.release_text_encoders`: load the text encoders, encode the prompts, release them, and
    only then load the DiT and the VAE (peak memory: the larger stage, not the sum); else all load
    at once and the prompts are encoded inside the pipeline call.
    """
    print(describe(config, job, full=logs.verbosity() >= 1), flush=True)
    memory = {}
    report_long_prompts(config, job.models, job.prompts, job.settings)
    start = time.perf_counter()
    if config.release_text_encoders:
        conds, seconds, timings = encode_stage(config, job.models, [job.prompts], job.settings, memory)
        timings = {"load text encoders": timings["load text encoders"], "tokenize+encode": sum(seconds),
                   "release": timings["release"]}
        start = time.perf_counter()
        pipe = build_pipeline(config, job, text_encoder=False)
        timings["load dit+vae"] = time.perf_counter() - start
        note_memory(memory, "dit+vae loaded")
        summary = generate(config, job, pipe, cond=conds[0])
    else:
        pipe = build_pipeline(config, job)
        timings = {"load": time.perf_counter() - start}
        note_memory(memory, "all models loaded")
        summary = generate(config, job, pipe)
    note_memory(memory, "generation")
    summary["timings"] = {**timings, **summary["timings"]}
    summary["live_bytes"] = memory
    if paths.writes_shared_files():
        for path in summary["files"] + summary["latents"]:
            print(f"wrote {path}")
    print(format_timings(summary["timings"]), flush=True)
    return summary
