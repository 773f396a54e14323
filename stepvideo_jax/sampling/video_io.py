"""Video files: uint8 frames (f, h, w, 3) <-> H.264 mp4, written atomically.

The writer matches the official `save_imageio_video`: libx264, 25 fps, yuv420p, imageio's default
quality 5, and the same `atadenoise` temporal filter (on by default). Unlike imageio's default it
never rescales frames to multiples of 16: the sizes here are already even, as yuv420p needs.
The ffmpeg binary is the one shipped in the imageio-ffmpeg wheel.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import uuid
import warnings

import numpy as np

FPS = 25
DENOISE_FILTER = "atadenoise=0a=0.1:0b=0.1:1a=0.1:1b=0.1"


@contextlib.contextmanager
def _ffmpeg_fork_allowed():
    """JAX warns on any fork; starting ffmpeg is a fork immediately followed by exec, which is safe."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        yield


def check_writable(path) -> pathlib.Path:
    """Raise a clear error now, before any compilation, if `path` cannot be written later."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"output path {path} is a directory; give a file name such as {path / 'video.mp4'}")
    parent = path.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise ValueError(f"output path {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output path {path}: directory {existing} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"output path {path} exists and is not writable")
    return path


def check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (f, h, w, 3), got {frames.dtype} {frames.shape}")
    f, h, w, _ = frames.shape
    if f < 1 or h % 2 or w % 2:
        raise ValueError(f"frames (f={f}, h={h}, w={w}): need f >= 1 and even h, w for yuv420p")
    return frames


def write_mp4(path, frames: np.ndarray, *, fps: int = FPS, denoise: bool = True, quality: float = 5
              ) -> pathlib.Path:
    """Write frames (f, h, w, 3) uint8 to an H.264 mp4 at `path`.

    Encodes to a temporary file in the same directory and renames it into place, so an interrupted
    run never leaves a half-written `path`.
    """
    import imageio_ffmpeg

    frames = check_frames(frames)
    path = check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ffmpeg creates the temporary file itself, so it gets the usual umask permissions
    tmp = str(path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.partial.mp4"))
    try:
        writer = imageio_ffmpeg.write_frames(
            tmp, (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264", quality=quality,
            pix_fmt_out="yuv420p", macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-vf", DENOISE_FILTER] if denoise else None)
        with _ffmpeg_fork_allowed():
            writer.send(None)
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
            writer.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_mp4(path) -> tuple[np.ndarray, float]:
    """Decode an mp4 -> (frames (f, h, w, 3) uint8, fps)."""
    import imageio_ffmpeg

    with _ffmpeg_fork_allowed():
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8), float(meta["fps"])
