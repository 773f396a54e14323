"""Prompt -> video, as the official `StepVideoPipeline` (caption server + DiT + VAE server) does it.

1. Prompts: row i of the CFG batch is `prompt_i + pos_magic` (no separator); with guidance > 1 the
   uncond rows are `neg_magic` alone, placed after all cond rows ([cond..., uncond...]).
2. Text: Step-LLM states y (n, 320, d_llm), y_mask (n, 77 + 320) with 77 leading ones, CLIP states
   (n, 77, d_clip) — any `TextEncoder` returning that dict.
3. Noise (b, f, c, h, w), one PRNG stream per prompt from its own seed (so a prompt's video does
   not depend on the rest of the batch), rounded to bfloat16 values as the official
   `prepare_latents` draws it.
4. Flow-matching CFG sampling (`flow_matching.FlowMatchSampler`), float32 latents.
5. VAE decode of the final latents as they are (no scaling, no shift): video (b, F, 3, H, W).
6. Post-processing (official `VideoProcessor.postprocess_video`): clamp to [-1, 1], (x + 1) * 127.5,
   batch rows stacked along the height, clamp to [0, 255], truncating uint8 cast, (F, b*H, W, 3),
   then `crop_540p`. Done in float32 here; the official server runs it on a bf16 video.

Step-Video-TI2V (a DiT with `cfg.ti2v`, `images=` and `motion_score=` given): each prompt's first-frame
image is preprocessed, VAE-encoded (a posterior sample with its own noise) and laid out as condition
latents (`image_condition`); every CFG row of a prompt gets the same condition and motion score, which
ride in the conditioning pytree (`"condition"` (n, f, c, h, w), `"motion_score"` (n,)).

Sizes: each 17 video frames are 3 latent frames and 16 x 16 pixels one latent pixel (the release VAE's
`spatial_factor`; a VAE with fewer levels, as the demo's, has a smaller one). The official
code silently floors other sizes; here they are rejected before anything is compiled, naming the
nearest valid values.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepvideo_jax.sampling import image_condition as ic
from stepvideo_jax.sampling.flow_matching import FlowMatchSampler, SamplerSettings, VelocityFn

FRAMES_PER_CHUNK = 17          # video frames decoded from one chunk of latents
LATENT_FRAMES_PER_CHUNK = 3
SPATIAL_FACTOR = 16            # pixels per latent pixel along height and width, the release VAE's
# Upper bounds, checked before anything is allocated (a typo such as num_frames=2040 fails at once
# instead of in the allocator): twice the release's largest output, 204 frames at 544 x 992
# (36 x 34 x 62 = 75,888 latent positions), per axis and in latent positions. The DiT's attention
# cost grows with the square of the positions, so the bound is already 4x the release's attention work.
MAX_FRAMES = 2 * 204
MAX_SIDE = 2048
MAX_LATENT_POSITIONS = 2 * 36 * 34 * 62

# Defaults of the official CLI (`stepvideo/config.py`), used by `run_parallel.py`.
POS_MAGIC = ("超高清、HDR 视频、环境光、杜比全景声、画面稳定、流畅动作、逼真的细节、专业级构图、超现实主义、"
             "自然、生动、超细节、清晰。")
NEG_MAGIC = "画面暗、低分辨率、不良手、文本、缺少手指、多余的手指、裁剪、低质量、颗粒状、签名、水印、用户名、模糊。"


def _nearest_multiples(value: int, step: int) -> str:
    low = (value // step) * step
    options = [v for v in (low, low + step) if v >= step]
    return " or ".join(str(v) for v in dict.fromkeys(options))


@dataclasses.dataclass(frozen=True)
class VideoSize:
    """Requested video size: frames a multiple of 17, height and width multiples of the VAE's
    `spatial_factor` (`VAEConfig.spatial_factor`: 16 for the release VAE)."""

    num_frames: int
    height: int
    width: int
    spatial_factor: int = SPATIAL_FACTOR

    def __post_init__(self):
        problems = []
        f = self.spatial_factor
        if not isinstance(f, (int, np.integer)) or isinstance(f, bool) or f < 1:
            raise ValueError(f"spatial_factor={f!r} must be a positive integer (the VAE's pixels per latent pixel)")
        pixel = f"one latent pixel is {f} x {f} pixels"
        for name, value, step, limit, why in (
                ("num_frames", self.num_frames, FRAMES_PER_CHUNK, MAX_FRAMES,
                 f"the VAE decodes each {LATENT_FRAMES_PER_CHUNK} latent frames into {FRAMES_PER_CHUNK} video frames"),
                ("height", self.height, f, MAX_SIDE, pixel),
                ("width", self.width, f, MAX_SIDE, pixel)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                problems.append(f"{name}={value!r} must be an integer")
            elif value > limit:
                problems.append(f"{name}={value} is above the limit {limit} (twice the release's 204 frames at "
                                "544 x 992)")
            elif value < step or value % step:
                problems.append(f"{name}={value} must be a positive multiple of {step} ({why}); "
                                f"nearest valid: {_nearest_multiples(max(int(value), 0), step)}")
        if not problems:
            f, _, h, w = self.latent_shape(1, 1)[1:]
            if f * h * w > MAX_LATENT_POSITIONS:
                problems.append(f"{self.num_frames} frames at {self.height} x {self.width} is {f * h * w:,} latent "
                                f"positions ({f} x {h} x {w}), above the limit {MAX_LATENT_POSITIONS:,} (twice the "
                                "release's 204 frames at 544 x 992)")
        if problems:
            raise ValueError("invalid video size: " + "; ".join(problems))

    def latent_shape(self, batch: int, channels: int) -> tuple[int, int, int, int, int]:
        """(b, f, c, h, w) of the latents that decode to this size."""
        return (batch, self.num_frames // FRAMES_PER_CHUNK * LATENT_FRAMES_PER_CHUNK, channels,
                self.height // self.spatial_factor, self.width // self.spatial_factor)


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> jax.Array:
    """(b, f, c, h, w) float32 standard normal noise with bfloat16 values, row i from `seeds[i]`."""
    if len(seeds) != shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {shape[0]}")
    rows = [jax.random.normal(jax.random.key(int(s)), (1, *shape[1:]), jnp.float32) for s in seeds]
    return jnp.concatenate(rows).astype(jnp.bfloat16).astype(jnp.float32)


def postprocess(video: np.ndarray) -> np.ndarray:
    """Decoded video (b, F, 3, H, W) in about [-1, 1] -> uint8 frames (F, b*H, W, 3), uncropped.

    Official order and rounding: clamp(-1, 1), (x + 1) * 127.5, rows stacked along the height,
    clamp(0, 255), truncating cast (rounding instead would change ~44 % of the values).
    """
    video = np.asarray(video, np.float32)
    if video.ndim != 5 or video.shape[2] != 3:
        raise ValueError(f"video must be (b, f, 3, h, w), got {video.shape}")
    x = (np.clip(video, -1, 1) + np.float32(1)) * np.float32(127.5)
    x = np.concatenate(list(x), axis=2)                      # (F, 3, b*H, W)
    return np.clip(x, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def crop_540p(frames: np.ndarray) -> np.ndarray:
    """Center crop of (F, H, W, 3) frames to at most 540 x 960 (landscape) or 960 x 540 (portrait).

    The official `crop2standard540p` takes `[c - 270 : c + 270]` around the integer centres with
    half-sizes 270/480 (landscape: w//2 > h//2; portrait: w//2 < h//2; square frames unchanged).
    Where its start index is >= 0 this is the same crop (544 x 992 -> 540 x 960, 2 rows top and
    bottom, 16 columns left and right). Where the start is negative, Python slicing makes the
    official result depend on how negative: between -side and 0 it wraps around (e.g. 480 x 848 ->
    30 x 56), at or below -side it keeps the whole side. Here the bounds are clamped to the frame
    instead, which keeps the whole side in both cases: identical to the official crop for every
    size it crops sensibly, and a no-op where it would return a sliver.
    """
    _, h, w, _ = frames.shape
    top, bottom, left, right = crop_540p_window(h, w)
    return frames[:, top:bottom, left:right]


def crop_540p_window(h: int, w: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of `crop_540p` on h x w frames."""
    hc, wc = h // 2, w // 2
    if wc == hc:
        return 0, h, 0, w
    half_h, half_w = (270, 480) if wc > hc else (480, 270)
    return max(hc - half_h, 0), min(hc + half_h, h), max(wc - half_w, 0), min(wc + half_w, w)


def frame_shape(size: VideoSize, crop: bool) -> tuple[int, int, int]:
    """(frames, height, width) of the videos written for `size` (after `crop_540p` when `crop`)."""
    if not crop:
        return size.num_frames, size.height, size.width
    top, bottom, left, right = crop_540p_window(size.height, size.width)
    return size.num_frames, bottom - top, right - left


def dit_velocity_fn(graphdef: nnx.GraphDef, *, backend: str | None = None) -> VelocityFn:
    """Velocity function over the DiT's state: cond = {"y", "y_mask", "clip"} (+ TI2V: "condition",
    "motion_score") with the batch of x."""

    def velocity(state, x, t, cond):
        model = nnx.merge(graphdef, state)
        return model(x, t, cond["y"], cond["y_mask"], cond["clip"], condition=cond.get("condition"),
                     motion_score=cond.get("motion_score"), backend=backend)

    return velocity


class TextEncoder(Protocol):
    """prompts (n,) -> {"y": (n, l_text, d_llm), "y_mask": (n, l_clip + l_text), "clip": (n, l_clip, d_clip)}."""

    def __call__(self, prompts: Sequence[str]) -> Mapping[str, jax.Array]: ...


VideoDecoder = Callable[[jax.Array], jax.Array]   # latents (b, f, c, h, w) -> video (b, F, 3, H, W)
# (video (1, 1, 3, H, W), posterior noise (1, 1, c, h, w)) -> posterior sample (1, 1, c, h, w)
ImageEncoder = Callable[[jax.Array, jax.Array], jax.Array]


def caption_prompts(prompts: Sequence[str], *, pos_magic: str, neg_magic: str, cfg: bool) -> list[str]:
    """What the official pipeline sends the caption server: [p + pos_magic ...] (+ [neg_magic] * b)."""
    rows = [p + pos_magic for p in prompts]
    return rows + [neg_magic] * len(prompts) if cfg else rows


def check_prompts(prompts: str | Sequence[str]) -> list[str]:
    """A prompt or a list/tuple of prompts -> a list of non-empty strings; anything else is a
    ValueError naming the expected type (a dict would otherwise iterate as its keys)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a string or a list/tuple of strings, got {type(prompts).__name__} "
                         f"{_short(prompts)}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompt given: pass at least one non-empty prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} is of type {type(p).__name__} ({_short(p)}): every prompt must be a string")
        if not p.strip():
            raise ValueError(f"prompt {i} is empty ({p!r}): every prompt needs some text")
    return prompts


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def cond_rows(prompts: int, cfg: bool) -> int:
    """Rows of the conditioning for `prompts` prompts: [cond...] (+ [uncond...] with CFG)."""
    return 2 * prompts if cfg else prompts


def check_cond(cond: Mapping[str, np.ndarray], rows: int) -> dict[str, jax.Array]:
    """Given conditioning -> device arrays, checked for the keys and batch rows the sampler needs."""
    if set(cond) != {"y", "y_mask", "clip"}:
        raise ValueError(f"cond has keys {sorted(cond)}, expected ['clip', 'y', 'y_mask'] (as encode returns)")
    wrong = {k: np.shape(v) for k, v in cond.items() if np.ndim(v) < 2 or np.shape(v)[0] != rows}
    if wrong:
        raise ValueError(f"cond shapes {wrong} do not match the batch: {rows} rows expected (the prompts' cond "
                         "rows, then as many uncond rows with guidance > 1); encode the same prompts and settings")
    return {k: jnp.asarray(v) for k, v in cond.items()}


def encode_prompts(encode_text: TextEncoder, prompts: Sequence[str], *, pos_magic: str = POS_MAGIC,
                   neg_magic: str = NEG_MAGIC, cfg: bool, mesh: jax.sharding.Mesh | None = None
                   ) -> dict[str, np.ndarray]:
    """The DiT's text inputs for `prompts` (CFG uncond rows included) as host numpy arrays, so that
    they outlive the text encoders: {"y": (n, l_text, d_llm), "y_mask": (n, l_clip + l_text),
    "clip": (n, l_clip, d_clip)} with n = `cond_rows(len(prompts), cfg)`. Copies (`np.array`): on CPU
    `np.asarray` would be a view that keeps the device buffer alive."""
    prompts = check_prompts(prompts)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        cond = encode_text(caption_prompts(prompts, pos_magic=pos_magic, neg_magic=neg_magic, cfg=cfg))
        return {k: np.array(v) for k, v in cond.items()}


@dataclasses.dataclass
class Generation:
    """Result of one batch: final latents (b, f, c, h, w) float32, decoded video (b, F, 3, H, W)
    float32, per-prompt uint8 frames (F, H', W', 3) after post-processing, seconds per phase."""

    latents: np.ndarray
    video: np.ndarray
    frames: list[np.ndarray]
    timings: dict[str, float]


class TextToVideo:
    """The main job's library entry: text encoder + DiT + VAE decoder -> videos.

    `dit` is the `StepVideoDiT` (its state is split once; the sampler's step compiles once per
    shape); `encode_text` and `decode` are callables (see `TextEncoder`, `VideoDecoder`) that jit
    themselves. `encode_text` may be None when every call is given its conditioning (`cond=`, from
    `encode` or `encode_prompts` run while the text encoders were loaded): then no text encoder
    needs to be held while denoising. `dtype` is the DiT compute dtype the latents and t are cast
    to. With `mesh` (the models' parameters already placed on it) every phase runs under that mesh,
    so the models' logical-axis activation constraints apply. `cfg_sequential`: the CFG rows one
    after the other within a step (`flow_matching.denoise_step`). `spatial_factor`: the VAE's pixels
    per latent pixel (`VAEConfig.spatial_factor`); every call's `VideoSize` must have the same.
    """

    def __init__(self, *, encode_text: TextEncoder | None, dit: nnx.Module, decode: VideoDecoder,
                 dtype=jnp.float32, attention_backend: str | None = None,
                 mesh: jax.sharding.Mesh | None = None, encode_image: ImageEncoder | None = None,
                 cfg_sequential: bool = False, spatial_factor: int = SPATIAL_FACTOR):
        self.mesh = mesh
        self.spatial_factor = spatial_factor
        self.dit_graphdef, self.dit_state = nnx.split(dit)
        self.latent_channels = dit.cfg.in_channels
        self.ti2v = bool(getattr(dit.cfg, "ti2v", False))
        if self.ti2v and encode_image is None:
            raise ValueError("a TI2V DiT needs encode_image (components.vae_image_encoder(vae))")
        self.encode_image = encode_image
        self.encode_text = encode_text
        self.decode = decode
        self.sampler = FlowMatchSampler(dit_velocity_fn(self.dit_graphdef, backend=attention_backend),
                                        model_dtype=dtype, cfg_sequential=cfg_sequential)

    def conditioning(self, prompts: Sequence[str], *, pos_magic: str, neg_magic: str, cfg: bool):
        return self._text_encoder()(caption_prompts(prompts, pos_magic=pos_magic, neg_magic=neg_magic, cfg=cfg))

    def encode(self, prompts: Sequence[str], *, pos_magic: str = POS_MAGIC, neg_magic: str = NEG_MAGIC,
               cfg: bool) -> dict[str, np.ndarray]:
        """`conditioning` as host numpy arrays (`encode_prompts`), to pass back as `cond=`."""
        return encode_prompts(self._text_encoder(), prompts, pos_magic=pos_magic, neg_magic=neg_magic, cfg=cfg,
                              mesh=self.mesh)

    def _text_encoder(self) -> TextEncoder:
        if self.encode_text is None:
            raise ValueError("this pipeline holds no text encoder: pass the prompts' conditioning as cond= "
                             "(sampling.pipeline.encode_prompts, run while the text encoders are loaded)")
        return self.encode_text

    def __call__(self, prompts: Sequence[str], *, size: VideoSize, settings: SamplerSettings,
                 seeds: Sequence[int], pos_magic: str = POS_MAGIC, neg_magic: str = NEG_MAGIC,
                 crop: bool = True, noise: jax.Array | None = None, progress: bool = False,
                 on_step: Callable[[int, jax.Array], None] | None = None,
                 cond: Mapping[str, np.ndarray] | None = None, images: Sequence[np.ndarray] | None = None,
                 motion_score: float | None = None, image_noise: Sequence[jax.Array] | None = None
                 ) -> Generation:
        """Generate one video per prompt. `noise` (b, f, c, h, w) replaces the seeded noise. `cond`:
        the prompts' conditioning from `encode` (same prompts, magics and CFG), instead of encoding
        them here; the timings then have no "tokenize+encode". TI2V DiT only: `images` one uint8
        (H0, W0, 3) first frame per prompt, `motion_score` a finite number, `image_noise` per prompt
        (1, 1, c, h, w) replaces the seeded posterior noise (`image_condition.posterior_noise`)."""
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            return self._generate(prompts, size, settings, seeds, pos_magic, neg_magic, crop, noise,
                                  progress, on_step, cond, images, motion_score, image_noise)

    def image_condition(self, images: Sequence[np.ndarray], motion_score, *, size: VideoSize,
                        seeds: Sequence[int], cfg: bool, image_noise: Sequence[jax.Array] | None = None
                        ) -> dict[str, jax.Array]:
        """{"condition": (n, f, c, h, w) bf16 values, "motion_score": (n,)}, n the conditioning rows:
        one per prompt, repeated for the uncond rows with `cfg` (same image and score)."""
        if not self.ti2v:
            raise ValueError("images / motion_score given, but this DiT is text-to-video (DiTConfig.ti2v is "
                             "False): load a Step-Video-TI2V checkpoint")
        if images is None or len(images) != len(seeds):
            raise ValueError(f"the TI2V DiT needs one first-frame image per prompt ({len(seeds)}), got "
                             f"{'none' if images is None else len(images)}")
        if motion_score is None:
            raise ValueError("the TI2V DiT needs a motion_score (e.g. 5, the official default)")
        ms = ic.check_motion_score(motion_score)
        _, f, c, h, w = size.latent_shape(1, self.latent_channels)
        rows = []
        for i, (image, seed) in enumerate(zip(images, seeds)):
            video = ic.preprocess(image, size.height, size.width)
            eps = ic.posterior_noise(seed, (1, 1, c, h, w)) if image_noise is None else jnp.asarray(image_noise[i])
            rows.append(ic.condition_frames(self.encode_image(jnp.asarray(video), eps), f))
        condition = jnp.concatenate(rows * (2 if cfg else 1))
        return {"condition": condition, "motion_score": jnp.full((condition.shape[0],), ms, jnp.float32)}

    def _generate(self, prompts, size, settings, seeds, pos_magic, neg_magic, crop, noise, progress,
                  on_step, cond, images, motion_score, image_noise) -> Generation:
        prompts = check_prompts(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
        if size.spatial_factor != self.spatial_factor:
            raise ValueError(f"{size} has spatial_factor {size.spatial_factor}, but this pipeline's VAE turns "
                             f"{self.spatial_factor} x {self.spatial_factor} pixels into one latent pixel")
        shape = size.latent_shape(len(prompts), self.latent_channels)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise {tuple(noise.shape)} does not match the latent shape {shape} of {size}")
        timings = {}
        extra = {}
        if self.ti2v or images is not None or motion_score is not None:
            start = time.perf_counter()
            extra = jax.block_until_ready(self.image_condition(images, motion_score, size=size, seeds=seeds,
                                                               cfg=settings.cfg, image_noise=image_noise))
            timings["image encode"] = time.perf_counter() - start
        if cond is None:
            start = time.perf_counter()
            cond = jax.block_until_ready(self.conditioning(prompts, pos_magic=pos_magic, neg_magic=neg_magic,
                                                           cfg=settings.cfg))
            timings["tokenize+encode"] = time.perf_counter() - start
        else:
            cond = check_cond(cond, cond_rows(len(prompts), settings.cfg))
        cond = {**cond, **extra}

        start = time.perf_counter()
        if noise is None:
            noise = initial_noise(seeds, shape)
        latents = self.sampler.sample(self.dit_state, noise, cond, settings, progress=progress,
                                      on_step=on_step)
        latents = np.asarray(latents)
        timings["denoise"] = time.perf_counter() - start

        start = time.perf_counter()
        video = np.asarray(jax.block_until_ready(self.decode(jnp.asarray(latents))), np.float32)
        expected = (len(prompts), size.num_frames, 3, size.height, size.width)
        if video.shape != expected:
            raise ValueError(f"the VAE decoded {video.shape}, expected {expected}: the VAE and the "
                             "frame/size arithmetic of this pipeline disagree")
        frames = [postprocess(v[None]) for v in video]
        if crop:
            frames = [crop_540p(f) for f in frames]
        timings["decode"] = time.perf_counter() - start
        return Generation(latents=latents, video=video, frames=frames, timings=timings)
