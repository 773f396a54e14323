"""The Step-Video Video-VAE, version 2 (`AutoencoderKL(z_channels=64, version=2)` as released).

Videos and latents are `b f c h w` at the interface (videos in [-1, 1] by convention; the VAE neither
normalises nor clamps); inside, activations are channel-last `b t h w c`. 16x16 spatial and 8x
temporal compression: a chunk of 17 frames gives 3 latent frames and 3 latents decode to 17 frames.

`encode` splits the frames into chunks of `frame_len` (17) and `decode` the latents into chunks of
`latent_len` (3); every chunk is coded independently from a fresh causal start, exactly as the
official code does, so chunks run under one `lax.map` (compile time and memory do not grow with the
number of chunks). `decode` then blends the two frames at every chunk boundary (`blend_boundaries`).

Memory at full resolution: inside a chunk, the high-resolution section — in the decoder from the
last x2 temporal upsampling to the output (256 channels x 20 frames x 544 x 992 after the 2-D
upsampling), in the encoder from the input to the first temporal downsampling — only holds per-frame
ops and causal convolutions, so it is streamed over slabs of a few frames with each causal conv's
context carried from slab to slab (`stream_over_time`): exact, and it never holds the whole chunk
at full resolution. The single-head mid attention goes through the memory-efficient `attention`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from stepvideo_jax.parallel.rules import logical_to_spec
from stepvideo_jax.models.vae_blocks import (AttentionBlock, CausalConv3d, CausalHistory, Conv2d,
                                             GroupNorm, Level, ResnetBlock, Upsample2D, Upsample3D,
                                             channel_group_mean, depth_to_space_time,
                                             space_time_to_depth)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of the version-2 VAE. Level widths are `ch * ch_mult` of the official code."""

    z_channels: int = 64
    in_channels: int = 3
    out_channels: int = 3
    encoder_stem: int = 32                                  # encoder `ch` (conv_in width)
    encoder_widths: tuple[int, ...] = (128, 256, 512, 512)  # per level, level 0 first
    decoder_widths: tuple[int, ...] = (128, 256, 512, 512)  # per level; level 3 runs first
    num_res_blocks: int = 2                                 # encoder; the decoder has one more
    encoder_temporal_levels: tuple[int, ...] = (1, 2)       # levels ending in a 3-D (t,h,w) downsample
    decoder_temporal_levels: tuple[int, ...] = (2, 3)       # levels ending in a 3-D upsample
    temporal_downsample: int = 4                            # decoder drops its first 4 - 1 frames
    frame_len: int = 17                                     # video frames per encoder chunk
    latent_len: int = 3                                     # latent frames per decoder chunk
    groups: int = 32
    eps: float = 1e-5
    logvar_range: tuple[float, float] = (-30.0, 20.0)
    blend_remain: float = 0.6                               # `mix`: share a boundary frame keeps

    @property
    def patch_channels(self) -> int:
        """Channels of the (un)patchify stage, `4 * z * 2^3`."""
        return 4 * self.z_channels * 8

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along h and w: one halving per encoder resampler, one in the patchify."""
        return 2 ** len(self.encoder_widths)

    @classmethod
    def full(cls) -> "VAEConfig":
        return cls()


# ------------------------------------------------------------------------------------------------
# frame and size arithmetic (the official code's, see the fixture README)


def chunk_latent_frames(cfg: VAEConfig, n: int) -> Optional[int]:
    """Latent frames of one encoder chunk of n frames, or None where the official code fails."""
    t = n
    for _ in cfg.encoder_temporal_levels:
        t = -(-t // 2)
    return (t + 1) // 2 if t % 2 else None


def latent_frames(cfg: VAEConfig, num_frames: int) -> int:
    """Latent frames `encode` gives for `num_frames` video frames; ValueError if unsupported."""
    full, rest = divmod(num_frames, cfg.frame_len)
    per_rest = chunk_latent_frames(cfg, rest) if rest else 0
    if num_frames < 1 or per_rest is None:
        raise ValueError(f"cannot encode {num_frames} frames: {_valid_frames_text(cfg, num_frames)}")
    return full * chunk_latent_frames(cfg, cfg.frame_len) + per_rest


def chunk_video_frames(cfg: VAEConfig, k: int) -> int:
    """Video frames of one decoder chunk of k latents: 2k-1 after unpatchify, x2 per 3-D upsample,
    minus the first `temporal_downsample - 1` (k = 1, 2, 3 -> 1, 9, 17)."""
    return (2 * k - 1) * 2 ** len(cfg.decoder_temporal_levels) - (cfg.temporal_downsample - 1)


def video_frames(cfg: VAEConfig, num_latents: int) -> int:
    """Video frames `decode` gives for `num_latents` latent frames."""
    full, rest = divmod(num_latents, cfg.latent_len)
    return full * chunk_video_frames(cfg, cfg.latent_len) + (chunk_video_frames(cfg, rest) if rest else 0)


def _valid_frames_text(cfg: VAEConfig, n: int) -> str:
    ok = [r for r in range(1, cfg.frame_len) if chunk_latent_frames(cfg, r) is not None]
    runs, start = ["0"], ok[0] if ok else None
    for a, b in zip(ok, ok[1:] + [None]):
        if b != a + 1:
            runs.append(str(start) if start == a else f"{start}-{a}")
            start = b
    valid = lambda m: m % cfg.frame_len == 0 or m % cfg.frame_len in ok
    lower = next((m for m in range(n - 1, 0, -1) if valid(m)), None)
    upper = next(m for m in range(max(n + 1, 1), n + 2 * cfg.frame_len) if valid(m))
    near = f"{lower} or {upper}" if lower else f"{upper}"
    return (f"the frame count modulo {cfg.frame_len} must be one of {', '.join(runs)} (whole chunks of "
            f"{cfg.frame_len} frames plus a last chunk the official encoder accepts); nearest valid "
            f"counts: {near}")


def _check_layout(shape: tuple[int, ...], what: str, channels: int, expected: str) -> None:
    """Rank 5 with `channels` on axis 2 (b f c h w); the error names a channel-last array."""
    if len(shape) != 5:
        raise ValueError(f"{what} must have rank 5 (b f c h w), got shape {tuple(shape)}")
    if shape[2] != channels:
        hint = " (it looks channel-last, b f h w c: transpose it to b f c h w)" if shape[-1] == channels else ""
        raise ValueError(f"{what} shape {tuple(shape)} has {shape[2]} channels on axis 2; the VAE expects "
                         f"{expected} in the layout b f c h w{hint}")


def check_video(cfg: VAEConfig, shape: tuple[int, ...]) -> None:
    """Reject what the official code would crash on (or silently not round-trip), naming the fix."""
    _check_layout(shape, "video", cfg.in_channels, str(cfg.in_channels))
    b, f, c, h, w = shape
    s = cfg.spatial_factor
    for name, n in (("height", h), ("width", w)):
        if n < s or n % s:
            options = sorted({max(s, n // s * s), (n // s + 1) * s})
            raise ValueError(f"video {name} {n} is not a multiple of {s}; use e.g. "
                             f"{' or '.join(map(str, options))}")
    latent_frames(cfg, f)


def check_latents(cfg: VAEConfig, shape: tuple[int, ...]) -> None:
    _check_layout(shape, "latents", cfg.z_channels, f"z_channels = {cfg.z_channels}")
    b, f, c, h, w = shape
    if min(b, f, h, w) < 1:
        raise ValueError(f"latents shape {tuple(shape)} has an empty axis")


# ------------------------------------------------------------------------------------------------
# chunking, streaming, blending


def map_chunks(fn: Callable[[jax.Array], jax.Array], x: jax.Array, size: int,
               chunks_per_step: int = 1) -> jax.Array:
    """`concat([fn(c) for c in x.split(size, axis=1)], axis=1)`, full chunks under one `lax.map`.

    x (b t ...). The last chunk, if shorter, is a separate call (a different shape).
    `chunks_per_step` full chunks run together (vmapped) per map step: faster, more memory.
    """
    b, t = x.shape[:2]
    full, rest = divmod(t, size)
    parts = []
    if full:
        xs = jnp.moveaxis(x[:, :full * size].reshape((b, full, size) + x.shape[2:]), 1, 0)
        batch = chunks_per_step if chunks_per_step > 1 else None
        ys = spread_over_devices(lambda c: jax.lax.map(fn, c, batch_size=batch), xs)
        parts.append(jnp.moveaxis(ys, 0, 1).reshape((b, -1) + ys.shape[3:]))
    if rest:
        parts.append(fn(x[:, full * size:]))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def spread_over_devices(fn: Callable[[jax.Array], jax.Array], xs: jax.Array) -> jax.Array:
    """`fn(xs)` for a per-item `fn` over the leading (chunk) axis, split over the ambient mesh.

    Chunks are independent, so under a mesh (`jax.set_mesh`) each device runs `fn` on its share
    (logical axis `vae_chunks`), with the VAE's parameters replicated; the chunk count is padded
    with zero chunks to a multiple of the devices used, and their outputs dropped. Without a mesh,
    `fn(xs)`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(xs)
    axes = logical_to_spec(("vae_chunks",), mesh)[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    n = math.prod(sizes[a] for a in axes)
    if n == 1:
        return fn(xs)
    pad = (-xs.shape[0]) % n
    if pad:
        xs = jnp.concatenate([xs, jnp.zeros((pad,) + xs.shape[1:], xs.dtype)])
    spec = P(axes)
    ys = jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(xs)
    return ys[:ys.shape[0] - pad]


def stream_over_time(fn, x: jax.Array, frames: int):
    """Run a causal section `fn(x_slab, history) -> (y_slab, taps)` over slabs of `frames` frames.

    x (b t h w c). Valid for sections made of per-frame ops and stride-1 causal convs: each causal
    conv gets the previous slab's last input frames through `history` (see `CausalHistory`), so the
    result equals one call on all t frames. t is padded at the end to a whole number of slabs
    (causality: padding frames change no earlier output) and the outputs are cut back. Returns
    (y, taps) with every array (b, t * ratio, ...), ratio = output frames per input frame.
    """
    b, t = x.shape[:2]
    frames = max(1, min(frames, t))
    n = -(-t // frames)
    xp = jnp.pad(x, ((0, 0), (0, n * frames - t)) + ((0, 0),) * (x.ndim - 2))
    slabs = jnp.moveaxis(xp.reshape((b, n, frames) + x.shape[2:]), 1, 0)

    def context_shapes(xs):
        history = CausalHistory()
        fn(xs, history)
        return history.new

    init = [jnp.zeros(s.shape, s.dtype) for s in jax.eval_shape(context_shapes, slabs[0])]

    def step(past, xs):
        history = CausalHistory(past)
        y, taps = fn(xs, history)
        return history.new, (y, taps)

    _, (ys, taps) = jax.lax.scan(step, init, slabs)

    def join(a):
        per_slab = a.shape[2]
        a = jnp.moveaxis(a, 0, 1).reshape((b, n * per_slab) + a.shape[3:])
        return a[:, :t * per_slab // frames]

    return join(ys), {k: join(v) for k, v in taps.items()}


def blend_boundaries(video: jax.Array, frame_len: int, remain: float = 0.6) -> jax.Array:
    """The official `mix` on video (b f ...): at every chunk boundary j (front = j*frame_len - 1,
    back = j*frame_len), sequentially `back = r*back + (1-r)*front`, then `front = r*front +
    (1-r)*back` with the already-updated back. No other frame changes."""
    f = video.shape[1]
    front = list(range(frame_len - 1, f - 1, frame_len))
    back = list(range(frame_len, f, frame_len))
    if not back:
        return video
    x_front, x_back = video[:, jnp.array(front)], video[:, jnp.array(back)]
    new_back = x_back * remain + x_front * (1.0 - remain)
    new_front = x_front * remain + new_back * (1.0 - remain)
    return video.at[:, jnp.array(back)].set(new_back).at[:, jnp.array(front)].set(new_front)


# ------------------------------------------------------------------------------------------------
# posterior


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """The posterior, all (b f z h w): `mean`, clamped `logvar`, `std = exp(logvar / 2)`."""

    mean: jax.Array
    logvar: jax.Array
    std: jax.Array

    def sample(self, key: jax.Array) -> jax.Array:
        """`mean + std * noise`, noise ~ N(0, 1) drawn in float32 from `key`, cast to mean's dtype."""
        noise = jax.random.normal(key, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.sample_from_noise(noise)

    def sample_from_noise(self, noise: jax.Array) -> jax.Array:
        return self.mean + self.std * noise.astype(self.mean.dtype)


def posterior(moments: jax.Array, logvar_range: tuple[float, float] = (-30.0, 20.0)) -> DiagonalGaussian:
    """moments (b f 2z h w): the first z channels are the mean, the others the log-variance."""
    z = moments.shape[2] // 2
    logvar = jnp.clip(moments[:, :, z:], logvar_range[0], logvar_range[1])
    return DiagonalGaussian(mean=moments[:, :, :z], logvar=logvar, std=jnp.exp(0.5 * logvar))


# ------------------------------------------------------------------------------------------------
# encoder and decoder (one chunk each)


def _sow(module: nnx.Module, capture: bool, taps: dict) -> None:
    """Intermediates as `nnx.Intermediate` named `tap_<name>` (names are the fixture's, `.` -> `_`)."""
    if capture:
        for name, value in taps.items():
            module.sow(nnx.Intermediate, f"tap_{name}", value)


def level_steps(levels, order) -> list[tuple[int, str]]:
    """The steps of `levels` taken in `order`: (level, "blocks"), then (level, "resample") where the
    level resamples."""
    out = []
    for level in order:
        out.append((level, "blocks"))
        if levels[level].resample is not None:
            out.append((level, "resample"))
    return out


def run_levels(levels, name: str, h: jax.Array, steps, history, taps: dict) -> jax.Array:
    """Runs `steps` (`level_steps`) of `levels` on h; each step's output goes into `taps` under the
    official intermediate names (`{name}{level}`, `{name}{level}_blocks` before a resample,
    `{name}{level}_interp` between a 3-D upsample's interpolation and its refining conv)."""
    for level, kind in steps:
        lv = levels[level]
        if kind == "blocks":
            for block in lv.blocks:
                h = block(h, history)
            taps[f"{name}{level}_blocks" if lv.resample is not None else f"{name}{level}"] = h
        elif isinstance(lv.resample, Upsample3D):
            h = lv.resample.interpolate(h)
            taps[f"{name}{level}_interp"] = h
            h = lv.resample.refine(h, history)
            taps[f"{name}{level}"] = h
        else:
            h = lv.resample(h)
            taps[f"{name}{level}"] = h
    return h


class Encoder(nnx.Module):
    """One chunk of video (b t h w c_in), t <= frame_len -> moments (b t' h/s w/s 2z)."""

    def __init__(self, cfg: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, attention_backend: Optional[str] = None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        gn = dict(groups=cfg.groups, eps=cfg.eps)
        self.cfg = cfg
        self.conv_in = CausalConv3d(cfg.in_channels, cfg.encoder_stem, 3, **kw)
        levels, cin, last = [], cfg.encoder_stem, len(cfg.encoder_widths) - 1
        for level, width in enumerate(cfg.encoder_widths):
            blocks = [ResnetBlock(cin if j == 0 else width, width, **gn, **kw) for j in range(cfg.num_res_blocks)]
            if level == last:
                resample = None
            elif level in cfg.encoder_temporal_levels:
                resample = CausalConv3d(width, width, 3, stride=2, **kw)
            else:
                resample = Conv2d(width, width, 3, stride=2, padding=((0, 1), (0, 1)), **kw)
            levels.append(Level(blocks, resample))
            cin = width
        self.down = nnx.List(levels)
        self.mid_block_1 = ResnetBlock(cin, cin, **gn, **kw)
        self.mid_attn_1 = AttentionBlock(cin, **gn, **kw, backend=attention_backend)
        self.mid_block_2 = ResnetBlock(cin, cin, **gn, **kw)
        self.norm_out = GroupNorm(cin, **gn, param_dtype=param_dtype)
        self.conv_patchify = CausalConv3d(cin, cfg.patch_channels // 8, 3, **kw)
        self.conv_out = CausalConv3d(cfg.patch_channels, 2 * cfg.z_channels, 3, **kw)
        self.dtype = dtype

    def _steps(self) -> list[tuple[int, str]]:
        return level_steps(self.down, range(len(self.down)))

    def _run(self, h, steps, history, taps):
        return run_levels(self.down, "down", h, steps, history, taps)

    def __call__(self, x: jax.Array, *, stream_frames: int = 1, capture: bool = False) -> jax.Array:
        """`stream_frames`: frames per slab of the full-resolution section (input to the first
        temporal downsampling)."""
        steps = self._steps()
        split = next((i for i, (level, kind) in enumerate(steps)
                      if kind == "resample" and isinstance(self.down[level].resample, CausalConv3d)),
                     len(steps))

        def section(xs, history):
            taps = {}
            h = self.conv_in(xs, history)
            taps["stem"] = h
            h = self._run(h, steps[:split], history, taps)
            return h, (taps if capture else {})

        h, taps = stream_over_time(section, x.astype(self.dtype), stream_frames)
        h = self._run(h, steps[split:], None, taps)
        h = self.mid_block_1(h)
        taps["mid_block_1"] = h
        h = self.mid_attn_1(h)
        taps["mid_attn_1"] = h
        h = self.mid_block_2(h)
        taps["mid"] = h
        h = self.norm_out(h, silu=True)
        taps["norm_out"] = h
        shortcut = channel_group_mean(space_time_to_depth(h), self.cfg.patch_channels)
        patch = space_time_to_depth(self.conv_patchify(h))
        h = patch + shortcut
        shortcut_out = channel_group_mean(h, 2 * self.cfg.z_channels)
        out = self.conv_out(h)
        moments = out + shortcut_out
        taps.update(shortcut_pathify=shortcut, conv_patchify=patch, patchified=h,
                    shortcut_out=shortcut_out, conv_out=out, moments=moments)
        _sow(self, capture, taps)
        return moments


class Decoder(nnx.Module):
    """One chunk of latents (b k h w z), k <= latent_len -> video (b, 8k-7, s h, s w, c_out), s the
    spatial factor (16 released)."""

    def __init__(self, cfg: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, attention_backend: Optional[str] = None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        gn = dict(groups=cfg.groups, eps=cfg.eps)
        self.cfg = cfg
        top = cfg.decoder_widths[-1]
        self.conv_in = CausalConv3d(cfg.z_channels, cfg.patch_channels, 3, **kw)
        self.conv_unpatchify = CausalConv3d(cfg.patch_channels, top * 8, 3, **kw)
        self.mid_block_1 = ResnetBlock(top, top, **gn, **kw)
        self.mid_attn_1 = AttentionBlock(top, **gn, **kw, backend=attention_backend)
        self.mid_block_2 = ResnetBlock(top, top, **gn, **kw)
        levels: list[Optional[Level]] = [None] * len(cfg.decoder_widths)
        cin = top
        for level in reversed(range(len(cfg.decoder_widths))):
            width = cfg.decoder_widths[level]
            blocks = [ResnetBlock(cin if j == 0 else width, width, **gn, **kw)
                      for j in range(cfg.num_res_blocks + 1)]
            if level == 0:
                resample = None
            elif level in cfg.decoder_temporal_levels:
                resample = Upsample3D(width, **gn, **kw)
            else:
                resample = Upsample2D(width, **kw)
            levels[level] = Level(blocks, resample)
            cin = width
        self.up = nnx.List(levels)
        self.norm_out = GroupNorm(cin, **gn, param_dtype=param_dtype)
        self.conv_out = CausalConv3d(cin, cfg.out_channels, 3, **kw)
        self.dtype = dtype

    def _steps(self) -> list[tuple[int, str]]:
        return level_steps(self.up, reversed(range(len(self.up))))

    def _run(self, h, steps, history, taps):
        return run_levels(self.up, "up", h, steps, history, taps)

    def __call__(self, z: jax.Array, *, stream_frames: int = 1, capture: bool = False) -> jax.Array:
        """`stream_frames`: frames per slab of the high-resolution section, counted at its input
        (before the last x2 temporal upsampling; 1 -> 2 output frames per slab)."""
        cfg, taps = self.cfg, {}
        z = z.astype(self.dtype)
        conv_in = self.conv_in(z)
        shortcut_in = jnp.repeat(z, cfg.patch_channels // cfg.z_channels, axis=-1)
        h = conv_in + shortcut_in
        top = cfg.decoder_widths[-1]
        shortcut = depth_to_space_time(jnp.repeat(h, top * 8 // cfg.patch_channels, axis=-1))
        unpatch = depth_to_space_time(self.conv_unpatchify(h))
        taps.update(conv_in=conv_in, shortcut_in=shortcut_in, conv_in_sum=h,
                    shortcut_unpathify=shortcut, conv_unpatchify=unpatch)
        h = unpatch + shortcut
        taps["unpatchified"] = h
        h = self.mid_block_1(h)
        taps["mid_block_1"] = h
        h = self.mid_attn_1(h)
        taps["mid_attn_1"] = h
        h = self.mid_block_2(h)
        taps["mid"] = h

        steps = self._steps()
        split = max((i for i, (level, kind) in enumerate(steps)
                     if kind == "resample" and isinstance(self.up[level].resample, Upsample3D)), default=0)
        h = self._run(h, steps[:split], None, taps)

        def section(xs, history):
            section_taps = {}
            y = self._run(xs, steps[split:], history, section_taps)
            y = self.conv_out(self.norm_out(y, silu=True), history)
            section_taps["conv_out"] = y
            return y, (section_taps if capture else {})

        y, section_taps = stream_over_time(section, h, stream_frames)
        taps.update(section_taps)
        out = y[:, cfg.temporal_downsample - 1:]
        taps["out"] = out
        _sow(self, capture, taps)
        return out


# ------------------------------------------------------------------------------------------------
# the autoencoder


class VideoVAE(nnx.Module):
    """Encoder + decoder with the official chunking, blending and posterior.

    `attention_backend`: backend of the two mid attentions (None: the platform default).
    """

    def __init__(self, cfg: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, attention_backend: Optional[str] = None):
        for name, widths in (("encoder_widths", cfg.encoder_widths), ("decoder_widths", cfg.decoder_widths)):
            bad = [w for w in widths if w % cfg.groups]
            if bad:
                raise ValueError(f"{name} {widths}: every width must be a multiple of groups={cfg.groups}")
        self.cfg, self.dtype = cfg, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention_backend=attention_backend)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)

    def encode_moments(self, video: jax.Array, *, stream_frames: int = 1,
                       chunks_per_step: int = 1) -> jax.Array:
        """video (b f c h w) -> moments (b f' 2z h/s w/s), chunks of `frame_len` frames."""
        check_video(self.cfg, video.shape)

        def one(chunk):
            m = self.encoder(chunk.transpose(0, 1, 3, 4, 2), stream_frames=stream_frames)
            return m.transpose(0, 1, 4, 2, 3)

        return map_chunks(one, jnp.asarray(video).astype(self.dtype), self.cfg.frame_len, chunks_per_step)

    def posterior(self, moments: jax.Array) -> DiagonalGaussian:
        return posterior(moments, self.cfg.logvar_range)

    def encode(self, video: jax.Array, key: jax.Array, **kw) -> jax.Array:
        """The posterior sample `mean + std * N(0, 1)` (what the official `encode` returns)."""
        return self.posterior(self.encode_moments(video, **kw)).sample(key)

    def encode_mean(self, video: jax.Array, **kw) -> jax.Array:
        return self.posterior(self.encode_moments(video, **kw)).mean

    def decode_chunks(self, latents: jax.Array, *, stream_frames: int = 1,
                      chunks_per_step: int = 1) -> jax.Array:
        """latents (b f c h w) -> video (b F 3 16h 16w) before the boundary blending."""
        check_latents(self.cfg, latents.shape)

        def one(chunk):
            v = self.decoder(chunk.transpose(0, 1, 3, 4, 2), stream_frames=stream_frames)
            return v.transpose(0, 1, 4, 2, 3)

        return map_chunks(one, jnp.asarray(latents).astype(self.dtype), self.cfg.latent_len, chunks_per_step)

    def decode(self, latents: jax.Array, *, tile: Optional[tuple[int, int]] = None,
               tile_overlap: tuple[int, int] = (4, 4), **kw) -> jax.Array:
        """latents (b f c h w) -> video (b F 3 16h 16w), F = `video_frames(cfg, f)`, blended.

        `tile` (latent rows, cols): optional spatial tiling, off by default. An APPROXIMATION: each
        tile is decoded on its own (convolutions see zeros past the tile edge and the mid attention
        only the tile), and tiles overlapping by `tile_overlap` latents are cross-faded linearly.
        Only useful beyond what time-slab streaming fits (larger videos, smaller chips).
        """
        if tile is None:
            video = self.decode_chunks(latents, **kw)
        else:
            video = self._decode_tiled(latents, tile, tile_overlap, **kw)
        return blend_boundaries(video, self.cfg.frame_len, self.cfg.blend_remain)

    def _decode_tiled(self, latents, tile, overlap, **kw):
        check_latents(self.cfg, latents.shape)
        if len(tile) != 2 or len(overlap) != 2 or min(tile) < 1 or min(overlap) < 0 or any(
                o >= t for t, o in zip(tile, overlap)):
            raise ValueError(f"tile {tuple(tile)} / tile_overlap {tuple(overlap)}: need (rows, cols) with "
                             "tiles >= 1 latent and 0 <= overlap < tile")
        b, f, c, h, w = latents.shape
        s = self.cfg.spatial_factor
        th, tw = min(tile[0], h), min(tile[1], w)
        rows, cols = _tile_starts(h, th, overlap[0]), _tile_starts(w, tw, overlap[1])
        origins = [(i, j) for i in rows for j in cols]
        tiles = jnp.stack([latents[..., i:i + th, j:j + tw] for i, j in origins])
        videos = jax.lax.map(lambda z: self.decode_chunks(z, **kw), tiles)
        out = jnp.zeros(videos.shape[1:4] + (h * s, w * s), jnp.float32)
        norm = jnp.zeros((h * s, w * s), jnp.float32)
        for k, (i, j) in enumerate(origins):
            weight = (_ramp(i, th, h, overlap[0] * s, s)[:, None] * _ramp(j, tw, w, overlap[1] * s, s)[None, :])
            region = (slice(i * s, (i + th) * s), slice(j * s, (j + tw) * s))
            out = out.at[(...,) + region].add(videos[k].astype(jnp.float32) * weight)
            norm = norm.at[region].add(weight)
        return (out / norm).astype(videos.dtype)


def _tile_starts(n: int, size: int, overlap: int) -> list[int]:
    """Tile origins covering [0, n) with tiles of `size` overlapping by at least `overlap`."""
    if size >= n:
        return [0]
    return list(range(0, n - size, size - overlap)) + [n - size]


def _ramp(start: int, size: int, n: int, overlap_px: int, scale: int) -> jax.Array:
    """Pixel weights of one tile along one axis: linear ramps over the overlap on sides with a neighbour."""
    x = jnp.arange(size * scale, dtype=jnp.float32)
    w = jnp.ones_like(x)
    if start > 0:
        w = jnp.minimum(w, (x + 1) / (overlap_px + 1))
    if start + size < n:
        w = jnp.minimum(w, (size * scale - x) / (overlap_px + 1))
    return w
