"""Precompute job: a folder of mp4 videos + JSONL captions -> the pre-encoded training format.

`python -m stepvideo_jax.data.precompute --videos DIR --captions captions.jsonl --release RELEASE
--out OUT [--buckets 544x992,992x544,768x768] [--num_frames 204] [--negative ""] [--dtype float16]`

captions.jsonl: one `{"video": "<file name under --videos>", "caption": "..."}` per line.
Per video: frames are read (imageio/ffmpeg), the (height, width) bucket with the nearest aspect
ratio is chosen, the frames are resized to cover it (bilinear, antialiased) and centre-cropped,
the frame count is cut to the largest count the VAE encodes (<= --num_frames), pixels go to [-1, 1]
(b f c h w), and the project's Video-VAE gives the posterior moments; the project's Step-LLM and
Hunyuan-CLIP encode the caption exactly as the official caption server does (`TextConditioner`).
The caption is encoded as written (the sampler's positive magic string is an inference-time
addition). The negative prompt (default empty) is encoded once for conditioning dropout.
Buckets: latent (frames, height, width) is the batch bucket of the training pipeline.
"""
from __future__ import annotations

import argparse
import math
import pathlib
from typing import Callable, Mapping, Sequence

import imageio.v2 as imageio
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from stepvideo_jax import checkpoints, hub
from stepvideo_jax.data.format import DatasetError, Writer, check_new_output, read_jsonl
from stepvideo_jax.models import vae as vae_model

# encode_video(video (1, f, 3, h, w) float32 in [-1, 1]) -> (mean, logvar), each (f', c, h', w')
VideoEncoder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
# encode_text(prompts) -> {"y": (n, l_text, d_llm), "y_mask": (n, l_clip + l_text), "clip": (n, l_clip, d_clip)}
TextEncoder = Callable[[Sequence[str]], Mapping[str, np.ndarray]]


def parse_buckets(text: str) -> tuple[tuple[int, int], ...]:
    """"544x992,992x544" -> ((544, 992), (992, 544)) (height x width, pixels)."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            h, w = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"bucket {item!r} is not HEIGHTxWIDTH (e.g. 544x992)") from None
        out.append((h, w))
    if not out:
        raise ValueError("no buckets given; e.g. --buckets 544x992,992x544")
    return tuple(out)


def choose_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log ratio) to the video's; ties: the first."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio))


def resize_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(f, H, W, 3) uint8 -> (f, height, width, 3) float32 in [0, 255]: scale to cover, centre crop."""
    f, h, w, c = frames.shape
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    resized = np.asarray(jax.image.resize(jnp.asarray(frames, jnp.float32), (f, rh, rw, c), "linear",
                                          antialias=True))
    top, left = (rh - height) // 2, (rw - width) // 2
    return np.clip(resized[:, top:top + height, left:left + width], 0.0, 255.0)


def usable_frames(available: int, limit: int, valid: Callable[[int], bool]) -> int:
    """Largest n <= min(available, limit) with valid(n); ValueError if none."""
    for n in range(min(available, limit), 0, -1):
        if valid(n):
            return n
    raise ValueError(f"no usable frame count <= {min(available, limit)}")


def read_frames(path: pathlib.Path, limit: int) -> np.ndarray:
    """Up to `limit` RGB frames (f, h, w, 3) uint8 of a video file."""
    frames = []
    with imageio.get_reader(str(path), format="ffmpeg") as reader:
        for frame in reader:
            frames.append(np.asarray(frame)[..., :3])
            if len(frames) == limit:
                break
    if not frames:
        raise ValueError(f"{path}: no frames could be read")
    return np.stack(frames)


def to_model_video(frames: np.ndarray) -> np.ndarray:
    """(f, h, w, 3) in [0, 255] -> (1, f, 3, h, w) float32 in [-1, 1]."""
    return (np.asarray(frames, np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)[None]


def read_captions(videos: str | pathlib.Path, captions: str | pathlib.Path) -> list[dict]:
    """The (video, caption) entries of a captions JSONL, every video file checked to exist: a
    `DatasetError` naming the file and line of the first bad entry, before any work starts."""
    videos, captions = pathlib.Path(videos), pathlib.Path(captions)
    if not videos.is_dir():
        raise DatasetError(f"--videos {videos} is not a directory")
    if not captions.is_file():
        raise DatasetError(f"--captions {captions} not found")
    entries = []
    for line_no, e in read_jsonl(captions):
        if not (isinstance(e, dict) and isinstance(e.get("video"), str) and isinstance(e.get("caption"), str)):
            raise DatasetError(f"{captions}:{line_no}: expected {{\"video\": name, \"caption\": text}} (strings), "
                               f"got {e!r}")
        if not (videos / e["video"]).is_file():
            raise DatasetError(f"{captions}:{line_no}: video {videos / e['video']} not found")
        entries.append(e)
    if not entries:
        raise DatasetError(f"{captions} holds no entries")
    return entries


def precompute(videos: str | pathlib.Path, captions: str | pathlib.Path, out: str | pathlib.Path, *,
               encode_video: VideoEncoder, encode_text: TextEncoder, valid_frames: Callable[[int], bool],
               latent_channels: int, buckets: Sequence[tuple[int, int]], num_frames: int,
               negative_prompt: str = "", dtype=np.float16, progress: bool = True) -> int:
    """Encode every (video, caption) line of `captions`; returns the number of samples written.
    Inputs are checked first (`read_captions`, `format.check_new_output`); the dataset appears at
    `out` only when complete (`format.Writer`), a failure leaves nothing behind."""
    videos = pathlib.Path(videos)
    entries = read_captions(videos, captions)
    check_new_output(out)
    negative = {k: np.asarray(v)[0] for k, v in encode_text([negative_prompt]).items()}
    with Writer(out, latent_channels=latent_channels,
                caption_channels=(negative["y"].shape[-1], negative["clip"].shape[-1]),
                text_length=negative["y"].shape[0], clip_length=negative["clip"].shape[0], dtype=dtype) as writer:
        writer.set_negative(negative)
        for e in tqdm.tqdm(entries, desc="precompute", unit="video", disable=not progress):
            path = videos / e["video"]
            try:
                frames = read_frames(path, num_frames)
                n = usable_frames(len(frames), num_frames, valid_frames)
            except (OSError, ValueError) as err:
                raise DatasetError(f"{path}: {err}") from None
            height, width = choose_bucket(frames.shape[1], frames.shape[2], buckets)
            video = to_model_video(resize_crop(frames[:n], height, width))
            mean, logvar = encode_video(video)
            text = {k: np.asarray(v)[0] for k, v in encode_text([e["caption"]]).items()}
            writer.add({"mean": np.asarray(mean), "logvar": np.asarray(logvar), **text}, e["caption"])
        writer.close()
    return len(entries)


def release_encoders(release_dir: str | pathlib.Path, *, vae_dtype="float32", llm_dtype="bfloat16"):
    """(encode_video, encode_text, valid_frames, latent_channels) from the VAE and text encoders of a
    release directory or converted checkpoint (`checkpoints.load_component`, `checkpoints.text_encoder`)."""
    release_dir = pathlib.Path(hub.resolve(release_dir, ("vae", "step_llm", "hunyuan_clip")))
    vae = checkpoints.load_component(release_dir, "vae", dtype=jnp.dtype(vae_dtype))
    text = checkpoints.text_encoder(release_dir, llm_dtype=jnp.dtype(llm_dtype))
    encode = jax.jit(lambda v: vae.posterior(vae.encode_moments(v)))

    def encode_video(video):
        post = encode(jnp.asarray(video))
        return (np.asarray(post.mean[0], np.float32), np.asarray(post.logvar[0], np.float32))

    def encode_text(prompts):
        return {k: np.asarray(jnp.asarray(v, jnp.float32) if k != "y_mask" else v) for k, v in text(prompts).items()}

    def valid_frames(n):
        try:
            vae_model.latent_frames(vae.cfg, n)
            return True
        except ValueError:
            return False

    return encode_video, encode_text, valid_frames, vae.cfg.z_channels


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", required=True, help="folder of video files")
    ap.add_argument("--captions", required=True, help='JSONL: {"video": name, "caption": text} per line')
    ap.add_argument("--release", required=True, help="Step-Video-T2V release directory (vae/, step_llm/, hunyuan_clip/) or Hugging Face repo id")
    ap.add_argument("--out", required=True, help="output dataset directory (must not hold a dataset)")
    ap.add_argument("--buckets", default="544x992,992x544,768x768", help="HEIGHTxWIDTH pixel buckets")
    ap.add_argument("--num_frames", type=int, default=204)
    ap.add_argument("--negative", default="", help="negative prompt encoded for conditioning dropout")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    args = ap.parse_args(argv)
    try:   # every input checked before the release loads
        buckets = parse_buckets(args.buckets)
        if args.num_frames < 1:
            raise DatasetError(f"--num_frames {args.num_frames} must be >= 1")
        read_captions(args.videos, args.captions)
        check_new_output(args.out)
    except (DatasetError, ValueError) as e:
        ap.error(str(e))
    encode_video, encode_text, valid, channels = release_encoders(args.release)
    try:
        n = precompute(args.videos, args.captions, args.out, encode_video=encode_video, encode_text=encode_text,
                       valid_frames=valid, latent_channels=channels, buckets=buckets, num_frames=args.num_frames,
                       negative_prompt=args.negative, dtype=np.dtype(args.dtype))
    except DatasetError as e:
        ap.exit(1, f"precompute: error: {e} (nothing was written to {args.out})\n")
    print(f"wrote {n} samples to {args.out}")


if __name__ == "__main__":
    main()
