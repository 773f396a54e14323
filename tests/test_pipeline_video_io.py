"""mp4 writing: H.264 at 25 fps, exact frame count and size, atomic, clear errors."""
import os
import pathlib
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest

from stepvideo_jax.sampling import video_io


# the probe below forks this JAX-loaded process to exec ffmpeg, which is safe
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")


def _smooth_frames(f=17, h=48, w=80):
    t, y, x = np.meshgrid(np.arange(f), np.arange(h), np.arange(w), indexing="ij")
    rgb = np.stack([(x * 3 + t * 5) % 256, (y * 4) % 256, np.full_like(x, 128)], axis=-1)
    return rgb.astype(np.uint8)


@pytest.mark.parametrize("denoise", [True, False])
def test_write_then_read(tmp_path, denoise):
    frames = _smooth_frames()
    path = video_io.write_mp4(tmp_path / "sub" / "v.mp4", frames, denoise=denoise)
    assert path.is_file() and sorted(os.listdir(path.parent)) == ["v.mp4"]
    back, fps = video_io.read_mp4(path)
    assert back.shape == frames.shape and fps == video_io.FPS
    assert np.abs(back.astype(int) - frames).mean() < 8  # lossy, but the same picture
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                           capture_output=True, text=True).stderr
    assert "Video: h264" in probe and "25 fps" in probe


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C while ffmpeg is encoding: the encoder is killed, its temporary file removed."""
    encoders = []

    def interrupted(self, data):
        encoders.append(self)
        self.stdin.write(bytes(data[:len(data) // 2]))
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess.Popen, "communicate", interrupted)
    target = tmp_path / "v.mp4"
    with pytest.raises(KeyboardInterrupt):
        video_io.write_mp4(target, _smooth_frames())
    assert os.listdir(tmp_path) == []
    assert len(encoders) == 1 and encoders[0].returncode is not None, "the encoder was left running"


def test_interrupted_before_the_rename_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "v.mp4"
    video_io.write_mp4(target, _smooth_frames(f=3))
    before = target.read_bytes()

    def interrupt(path):
        assert pathlib.Path(path).name.endswith(video_io.PARTIAL_SUFFIX) and pathlib.Path(path).is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(video_io, "inspect_mp4", interrupt)
    with pytest.raises(KeyboardInterrupt):
        video_io.write_mp4(target, _smooth_frames(f=5))
    assert os.listdir(tmp_path) == ["v.mp4"] and target.read_bytes() == before


def test_existing_file_replaced_only_when_complete(tmp_path):
    target = tmp_path / "v.mp4"
    video_io.write_mp4(target, _smooth_frames(f=3))
    video_io.write_mp4(target, _smooth_frames(f=5))
    assert video_io.read_mp4(target)[0].shape[0] == 5


@pytest.mark.parametrize("frames, message", [
    (np.zeros((2, 4, 4, 3), np.float32), "frames must be uint8"),
    (np.zeros((2, 4, 4), np.uint8), "frames must be uint8 \\(f, h, w, 3\\)"),
    (np.zeros((2, 5, 4, 3), np.uint8), "even h, w"),
    (np.zeros((0, 4, 4, 3), np.uint8), "f >= 1"),
])
def test_bad_frames(tmp_path, frames, message):
    with pytest.raises(ValueError, match=message):
        video_io.write_mp4(tmp_path / "v.mp4", frames)


def test_unwritable_paths(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        video_io.check_writable(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        video_io.check_writable(blocker / "v.mp4")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: then the check must agree
            video_io.check_writable(locked / "v.mp4")
        else:
            with pytest.raises(ValueError, match="is not writable"):
                video_io.check_writable(locked / "v.mp4")
    finally:
        locked.chmod(0o700)
    assert video_io.check_writable(tmp_path / "new" / "deeper" / "v.mp4")
