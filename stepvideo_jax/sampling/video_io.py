"""Video files: uint8 frames (f, h, w, 3) <-> H.264 mp4, written atomically.

The writer matches the official `save_imageio_video`: libx264, 25 fps, yuv420p, imageio's default
quality 5, and the same `atadenoise` temporal filter (on by default). Unlike imageio's default it
never rescales frames to multiples of 16: the sizes here are already even, as yuv420p needs.
The ffmpeg binary is the one shipped in the imageio-ffmpeg wheel.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import re
import signal
import subprocess
import tempfile
import uuid
import warnings

import imageio_ffmpeg
import numpy as np

from stepvideo_jax import paths

FPS = 25
PARTIAL_SUFFIX = ".partial.mp4"   # temporary files of `write_mp4`: `.<stem>.<random>.partial.mp4`
DENOISE_FILTER = "atadenoise=0a=0.1:0b=0.1:1a=0.1:1b=0.1"


@contextlib.contextmanager
def _ffmpeg_fork_allowed():
    """JAX warns on any fork; starting ffmpeg is a fork immediately followed by exec, which is safe."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        yield


def check_writable(path):
    """Raise a clear error now, before any compilation, if `path` cannot be written later; returns
    it as a path (`pathlib.Path`, or an `epath.Path` for a URI such as `gs://bucket/v.mp4`, which
    is checked when written).

    The nearest existing directory on the way to `path` gets a probe file created and removed at
    once: permission bits alone say nothing for root, and pseudo filesystems (/proc, /sys) or
    read-only mounts refuse only a real write.
    """
    if paths.is_uri(path):
        return paths.as_path(path)
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"output path {path} is a directory; give a file name such as {path / 'video.mp4'}")
    parent = path.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise ValueError(f"output path {path}: {existing} is not a directory")
    if path.exists() and not path.is_file():
        raise ValueError(f"output path {path} exists and is not a regular file")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".stepvideo-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"output path {path}: cannot create files in {existing} ({e.strerror})") from None
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


class VideoFileError(OSError):
    """An mp4 could not be written completely (encoder failed, disk full) or read back."""


@dataclasses.dataclass(frozen=True)
class Mp4Info:
    """What decoding every frame of an mp4's first video stream found."""

    frames: int
    height: int
    width: int


def ffmpeg_exe() -> str:
    """The ffmpeg binary of the imageio-ffmpeg wheel (or `IMAGEIO_FFMPEG_EXE`)."""
    return imageio_ffmpeg.get_ffmpeg_exe()


def _describe_exit(returncode: int) -> str:
    if returncode >= 0:
        return f"exit status {returncode}"
    name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
    hint = " (file size limit: the disk or quota is full?)" if name == "SIGXFSZ" else ""
    return f"killed by {name}{hint}"


def _tail(stderr: bytes, limit: int = 400) -> str:
    """ffmpeg's messages on one line, without the `[in#0 @ 0x...]` prefixes."""
    lines = [re.sub(r"^\[[^\]]* @ 0x[0-9a-f]+\] ", "", ln.strip()) for ln in stderr.decode("utf-8", "replace").splitlines()]
    text = "; ".join(ln for ln in lines if ln)
    return (text[:limit] + "..." if len(text) > limit else text) or "(no message)"


def inspect_mp4(path) -> Mp4Info:
    """Decode every frame of `path` (nothing kept) -> its frame count and size.

    Raises VideoFileError when ffmpeg cannot open or decode the file (missing index of a truncated
    write, corrupt stream) or it holds no video frame. A URI (`gs://...`) is copied to a local
    temporary file first.
    """
    if paths.is_uri(path):
        with tempfile.TemporaryDirectory(prefix="stepvideo-") as folder:
            local = os.path.join(folder, "video.mp4")
            paths.as_path(path).copy(local)
            return inspect_mp4(local)
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-xerror", "-i", str(path), "-map", "0:v:0",
           "-f", "framecrc", "-"]
    with _ffmpeg_fork_allowed():
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True)
    if proc.returncode != 0:
        raise VideoFileError(f"{path} is not a readable video: ffmpeg {_describe_exit(proc.returncode)}: "
                             f"{_tail(proc.stderr)}")
    lines = proc.stdout.decode("ascii", "replace").splitlines()
    size = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("#dimensions 0:")]
    frames = sum(1 for ln in lines if ln and not ln.startswith("#"))
    if not size or frames == 0:
        raise VideoFileError(f"{path} holds no video frame")
    width, height = (int(v) for v in size[0].split("x"))
    return Mp4Info(frames=frames, height=height, width=width)


def write_mp4(path, frames: np.ndarray, *, fps: int = FPS, denoise: bool = True, quality: float = 5
              ):
    """Write frames (f, h, w, 3) uint8 to an H.264 mp4 at `path` (a URI such as
    `gs://bucket/v.mp4`: encoded to a local temporary file as below, then copied there).

    ffmpeg encodes to a temporary sibling (`.<stem>.<random>.partial.mp4`); only when it exits with
    status 0 and the file decodes back to f frames of h x w is it renamed to `path`. Any failure
    (encoder error, full disk, interrupt) removes the temporary file, leaves an existing `path`
    untouched and raises (VideoFileError for a failed or incomplete encode).
    The command is the one imageio-ffmpeg's `write_frames` builds for these arguments (quality q
    -> `-crf int((1 - q / 10) * 51)`), run here directly because that writer ignores ffmpeg's exit
    status.
    """
    frames = check_frames(frames)
    if not 1 <= quality <= 10:
        raise ValueError(f"quality={quality!r}: choose a number in [1, 10] (imageio's scale)")
    path = check_writable(path)
    if paths.is_uri(path):
        with paths.local_then_move(path, ".mp4") as local:
            write_mp4(local, frames, fps=fps, denoise=denoise, quality=quality)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    f, h, w, _ = frames.shape
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
    cmd = [ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{w}x{h}", "-pix_fmt", "rgb24",
           "-r", str(fps), "-i", "-", "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p",
           "-crf", str(int((1 - quality / 10.0) * 51)), "-v", "error",
           *(["-vf", DENOISE_FILTER] if denoise else []), str(tmp)]
    proc = None
    try:
        with _ffmpeg_fork_allowed():
            # own session: Ctrl-C reaches Python only, which then kills the encoder below
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, start_new_session=True)
        _, stderr = proc.communicate(memoryview(np.ascontiguousarray(frames)).cast("B"))
        if proc.returncode != 0:
            raise VideoFileError(f"writing {path}: ffmpeg {_describe_exit(proc.returncode)}: {_tail(stderr)}; "
                                 "nothing was written")
        try:
            info = inspect_mp4(tmp)
        except VideoFileError as e:
            raise VideoFileError(f"writing {path}: the encoded file does not read back ({e}); nothing was "
                                 "written") from None
        if (info.frames, info.height, info.width) != (f, h, w):
            raise VideoFileError(f"writing {path}: the encoded file holds {info.frames} frames of "
                                 f"{info.height} x {info.width}, expected {f} of {h} x {w} (disk full?); "
                                 "nothing was written")
        os.replace(tmp, path)
    except BaseException:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if tmp.exists():
            tmp.unlink()
        raise
    return path


def read_mp4(path) -> tuple[np.ndarray, float]:
    """Decode an mp4 -> (frames (f, h, w, 3) uint8, fps)."""
    with _ffmpeg_fork_allowed():
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8), float(meta["fps"])
