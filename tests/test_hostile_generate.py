"""Hostile and unlucky input to the generation jobs (issue 21, findings 6, 7, 10 and 11).

Each test replays a probe: a full disk or a failing encoder under `write_mp4`, a truncated video,
another prompt list or seed in an eval folder, stale temporary files, resource bombs (steps, frames,
size), wrong prompt types, a very long prompt, an output nobody can write. Each asserts the clear
error (or the one warning) and that nothing was half-written, adopted or wrongly counted. CI runs as
root, so failures are simulated (RLIMIT_FSIZE, fake encoders, /proc) rather than made with
permission bits.
"""
import json
import logging
import os
import subprocess
import sys

import imageio_ffmpeg
import numpy as np
import pytest

from stepvideo_jax.sampling import eval_set, generation
from stepvideo_jax.sampling import pipeline, video_io
from stepvideo_jax.sampling.flow_matching import MAX_STEPS
from tests.fixtures import PROJECT_ROOT
from tests.test_flow_matching import count_compiles
from tests.test_generate_cli import _cli, eval_setup, load_config  # noqa: F401  (eval_setup: a fixture)
from tests.test_pipeline import toy_pipeline  # noqa: F401  (a fixture)

# ffmpeg is started from this JAX-loaded process (fork + exec), which is safe
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")


def _frames(f=17, h=64, w=112, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (f, h, w, 3), dtype=np.uint8)


def _fake_encoder(tmp_path, body: str):
    script = tmp_path / "fake_ffmpeg"
    script.write_text(f"#!{sys.executable}\nimport subprocess, sys\nREAL = {imageio_ffmpeg.get_ffmpeg_exe()!r}\n"
                      f"args = sys.argv[1:]\n{body}\n")
    script.chmod(0o755)
    return str(script)


# --- 6. silent broken video -----------------------------------------------------------------------


def test_full_disk_write_is_an_error_and_keeps_the_old_file(tmp_path):
    """RLIMIT_FSIZE (a full disk) under the encoder: before, a truncated mp4 was renamed into place
    and reported as written."""
    out = tmp_path / "v.mp4"
    video_io.write_mp4(out, _frames(f=3, h=32, w=48))
    before = out.read_bytes()
    code = ("import resource, sys\nimport numpy as np\nfrom stepvideo_jax.sampling import video_io\n"
            "frames = np.random.default_rng(0).integers(0, 256, (17, 64, 112, 3), dtype=np.uint8)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))\n"
            "try:\n    video_io.write_mp4(sys.argv[1], frames)\n    print('wrote')\n"
            "except video_io.VideoFileError as e:\n    print('refused:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("refused: "), proc.stdout
    assert "ffmpeg killed by SIGXFSZ" in proc.stdout or "ffmpeg exit status" in proc.stdout, proc.stdout
    assert "nothing was written" in proc.stdout
    assert os.listdir(tmp_path) == ["v.mp4"] and out.read_bytes() == before


def test_failing_encoder_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    """An encoder that writes a few bytes and exits 1 (as ffmpeg does on ENOSPC)."""
    monkeypatch.setattr(video_io, "ffmpeg_exe", lambda: _fake_encoder(
        tmp_path, "sys.stdin.buffer.read()\nopen(args[-1], 'wb').write(b'garbage')\n"
                  "sys.stderr.write('No space left on device')\nsys.exit(1)"))
    out_dir = tmp_path / "out"
    with pytest.raises(video_io.VideoFileError, match="ffmpeg exit status 1: No space left on device; "
                                                      "nothing was written"):
        video_io.write_mp4(out_dir / "v.mp4", _frames())
    assert os.listdir(out_dir) == []


def test_encoder_that_writes_too_few_frames_is_refused(tmp_path, monkeypatch):
    """Exit status 0 is not enough: the file must decode back to every frame."""
    monkeypatch.setattr(video_io, "ffmpeg_exe", lambda: _fake_encoder(
        tmp_path, "if 'libx264' in args:\n    args = args[:-1] + ['-frames:v', '2', args[-1]]\n"
                  "sys.exit(subprocess.call([REAL, *args]))"))
    frames = _frames()
    with pytest.raises(video_io.VideoFileError, match=f"holds 2 frames of 64 x 112, expected {len(frames)} of "
                                                      "64 x 112"):
        video_io.write_mp4(tmp_path / "v.mp4", frames)
    assert sorted(os.listdir(tmp_path)) == ["fake_ffmpeg"]


def test_inspect_mp4_counts_frames_and_refuses_a_truncated_file(tmp_path):
    frames = _frames(f=34, h=32, w=48)
    path = video_io.write_mp4(tmp_path / "v.mp4", frames)
    assert video_io.inspect_mp4(path) == video_io.Mp4Info(frames=34, height=32, width=48)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(video_io.VideoFileError, match="is not a readable video"):
        video_io.inspect_mp4(path)


@pytest.mark.slow
def test_generate_cli_reports_an_encoder_failure(tmp_path, monkeypatch):
    """The whole main job with an encoder that fails: exit status 1, one error line, no "wrote"."""
    fake = tmp_path / "fake_ffmpeg"
    fake.write_text("#!/bin/sh\ncat > /dev/null\necho 'No space left on device' >&2\nexit 1\n")
    fake.chmod(0o755)
    out = tmp_path / "out" / "v.mp4"
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(fake))
    proc = _cli("stepvideo_jax.generate", "--config.num_steps=1", f"--config.output={out}", "--config.progress=False")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"error: writing {out}: ffmpeg exit status 1: No space left on device; nothing was written" in proc.stderr
    assert "Traceback" not in proc.stderr and "wrote" not in proc.stdout
    assert os.listdir(out.parent) == []


class _Counting:
    """A pipeline that records the prompts of each call."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, prompts, **kw):
        self.calls.append(list(prompts))
        return self.pipe(prompts, **kw)


def test_eval_regenerates_a_truncated_or_short_video(eval_setup, capsys):
    """Before, a truncated 001.mp4 counted as done ("2 of 2 videos already")."""
    config, pipe, out = eval_setup
    prompts = ["a cat", "a dog", "a bird"]
    eval_set.run_eval(config, prompts, out, pipe=pipe)
    data = (out / "001.mp4").read_bytes()
    (out / "001.mp4").write_bytes(data[:len(data) // 2])
    video_io.write_mp4(out / "002.mp4", np.zeros((3, config.height, config.width, 3), np.uint8))
    untouched = (out / "000.mp4").stat().st_mtime_ns
    counting = _Counting(pipe)
    manifest = eval_set.run_eval(config, prompts, out, pipe=counting)
    assert counting.calls == [["a dog"], ["a bird"]]
    text = capsys.readouterr().out
    assert "001.mp4 is damaged" in text and "is not a readable video" in text
    assert f"002.mp4 is damaged (3 frames of {config.height} x {config.width}, expected {config.num_frames}" in text
    assert "1 of 3 videos already" in text
    assert (out / "000.mp4").stat().st_mtime_ns == untouched
    for name in ("001.mp4", "002.mp4"):
        assert video_io.inspect_mp4(out / name).frames == config.num_frames
        assert manifest["videos"][name]["timings"] is not None


# --- 7. generate_eval mixes runs ------------------------------------------------------------------


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_eval_refuses_another_prompt_list(eval_setup):
    """Before: another --prompts_file into the same folder reported "2 of 2 videos already"."""
    config, pipe, out = eval_setup
    eval_set.run_eval(config, ["a cat", "a dog"], out, pipe=pipe)
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"another job, made with other settings \(changed: prompts \(another "
                                         r"prompt list\)\); use another --output_dir, or --overwrite"):
        eval_set.run_eval(config, ["a car", "a boat"], out, pipe=pipe)
    config.seed += 1
    with pytest.raises(ValueError, match=r"\(changed: seed\)"):
        eval_set.run_eval(config, ["a cat", "a dog"], out, pipe=pipe)
    assert _snapshot(out) == before


def test_eval_does_not_adopt_videos_without_a_manifest(eval_setup):
    """Before: with manifest.json deleted, a run with another seed adopted the old videos."""
    config, pipe, out = eval_setup
    eval_set.run_eval(config, ["a cat", "a dog"], out, pipe=pipe)
    (out / "manifest.json").unlink()
    before = _snapshot(out)
    config.seed += 1
    with pytest.raises(ValueError, match=r"holds 2 video file\(s\) \(000.mp4, 001.mp4\) but no manifest.json: "
                                         r"their prompts and settings are unknown, so they are not reused"):
        eval_set.run_eval(config, ["a cat", "a dog"], out, pipe=pipe)
    assert _snapshot(out) == before


def test_eval_overwrite_starts_over_and_keeps_other_files(eval_setup):
    config, pipe, out = eval_setup
    eval_set.run_eval(config, ["a cat", "a dog"], out, pipe=pipe)
    (out / "notes.txt").write_text("mine")
    counting = _Counting(pipe)
    manifest = eval_set.run_eval(config, ["a car"], out, pipe=counting, overwrite=True)
    assert counting.calls == [["a car"]]
    assert sorted(os.listdir(out)) == ["000.mp4", "manifest.json", "notes.txt"]
    assert manifest["videos"]["000.mp4"]["prompt"] == "a car"
    assert manifest["settings"]["prompts_sha256"] == eval_set.prompts_digest(["a car"])


def test_eval_removes_stale_temporary_files_only(eval_setup, capsys):
    config, pipe, out = eval_setup
    out.mkdir()
    stale = [".000.deadbeef.partial.mp4", ".000.npy.partial", ".manifest.json.partial"]
    kept = [".hidden", "notes.partial.txt", "partial.mp4"]
    for name in stale + kept:
        (out / name).write_bytes(b"x" * 10)
    eval_set.plan_eval(config, ["a cat"], out)
    assert sorted(os.listdir(out)) == sorted(kept + ["manifest.json"])
    assert f"removed 3 temporary file(s) of an interrupted run: {', '.join(sorted(stale))}" in capsys.readouterr().out


def test_eval_cli_refuses_another_prompts_file(tmp_path):
    config = load_config()
    out = tmp_path / "eval"
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("a cat\na dog\n")
    second.write_text("a car\na boat\n")
    eval_set.plan_eval(config, eval_set.read_prompts(first), out)   # binds the folder, builds nothing
    proc = _cli("stepvideo_jax.generate_eval", "--config", str(PROJECT_ROOT / "configs/generate/tiny.py"),
                f"--prompts_file={second}", f"--output_dir={out}", timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error: " in proc.stderr and "changed: prompts (another prompt list)" in proc.stderr
    assert "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(os.listdir(out)) == ["manifest.json"]


# --- 10 / 11. bounds, prompt types, long prompts, unwritable outputs ------------------------------


@pytest.mark.parametrize("override, message", [
    (dict(num_steps=10**9), f"num_steps=1000000000 is above the limit {MAX_STEPS}"),
    (dict(num_frames=17 * 100_000), f"num_frames=1700000 is above the limit {pipeline.MAX_FRAMES}"),
    (dict(height=16 * 100_000), f"height=1600000 is above the limit {pipeline.MAX_SIDE}"),
    (dict(width=16 * 1000), f"width=16000 is above the limit {pipeline.MAX_SIDE}"),
    (dict(num_frames=pipeline.MAX_FRAMES, height=pipeline.MAX_SIDE, width=pipeline.MAX_SIDE),
     f"latent positions .* above the limit {pipeline.MAX_LATENT_POSITIONS:,}"),
])
def test_resource_bombs_are_refused_before_anything_is_allocated(override, message):
    """Before: num_steps=1e9 asked for 7.45 GiB in validation; huge sizes passed validation."""
    config = load_config()
    config.update(override)
    with count_compiles() as n, pytest.raises(ValueError, match=message):
        generation.resolve(config)
    assert n[0] == 0


def test_bounds_leave_room_for_the_release_size():
    release = pipeline.VideoSize(204, 544, 992)
    f, _, h, w = release.latent_shape(1, 1)[1:]
    assert 2 * f * h * w == pipeline.MAX_LATENT_POSITIONS
    pipeline.VideoSize(2 * 204, 544, 992)            # twice the frames: exactly at the limit
    pipeline.VideoSize(204, 992, 544)                 # portrait
    config = load_config()
    config.num_steps = MAX_STEPS
    generation.resolve(config)


@pytest.mark.parametrize("prompts, message", [
    ({"a": 1}, r"prompts must be a string or a list/tuple of strings, got dict \{'a': 1\}"),
    (["a cat", 1], r"prompt 1 is of type int \(1\): every prompt must be a string"),
    (("a cat", None), r"prompt 1 is of type NoneType \(None\): every prompt must be a string"),
    (42, "prompts must be a string or a list/tuple of strings, got int 42"),
])
def test_prompt_types(prompts, message):
    """Before: prompts={"a": 1} silently generated the prompt "a"."""
    with pytest.raises(ValueError, match=message):
        generation.resolve(load_config(), prompts=prompts)


def test_long_prompt_is_cut_with_one_warning_line(caplog):
    """Before: a 10k-character prompt was cut to the Step-LLM's 320 tokens without a word."""
    from stepvideo_jax.text.conditioning import LLM_LENGTH
    from stepvideo_jax.text.sentencepiece_tokenizer import StepLLMTokenizer

    tokenizer = StepLLMTokenizer()
    rows = pipeline.caption_prompts(["a red panda " * 850, "a cat"], pos_magic=pipeline.POS_MAGIC,
                                    neg_magic=pipeline.NEG_MAGIC, cfg=True)
    with caplog.at_level(logging.WARNING):
        batch = tokenizer(rows, max_length=LLM_LENGTH)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    message = warnings[0].getMessage()
    assert f"cut to the first {LLM_LENGTH - 2}" in message and "pos_magic" in message
    assert "text 0 (" in message and "text 1" not in message and "text 2" not in message
    assert batch.attention_mask[0].sum() == LLM_LENGTH
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tokenizer(rows, max_length=LLM_LENGTH)      # the same texts again (the text encoder's call)
        StepLLMTokenizer()(rows[1:], max_length=LLM_LENGTH)
    assert not caplog.records


def test_long_prompt_is_reported_before_any_model_loads(tmp_path, caplog, monkeypatch):
    from stepvideo_jax.sampling import components

    class Loading(Exception):
        pass

    def refuse(self):
        raise Loading

    for name in ("text_encoder", "dit", "vae"):
        monkeypatch.setattr(components.TinyRandomLoader, name, refuse)
    config = load_config()
    config.update(prompt="a red panda " * 850, output=str(tmp_path / "v.mp4"))
    for staged in (True, False):
        config.release_text_encoders = staged
        caplog.clear()
        with caplog.at_level(logging.WARNING), pytest.raises(Loading):
            generation.run(config, generation.resolve(config))
        assert [r.getMessage()[:41] for r in caplog.records] == ["Step-LLM text longer than 318 tokens, cut"]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("output, message", [
    ("/proc/video.mp4", "cannot create files in /proc"),
    ("/proc/self/new/video.mp4", "cannot create files in /proc/self"),
])
def test_unwritable_output_fails_before_anything_is_built(output, message, tmp_path):
    """Before: an output under /proc passed the check (root may write anywhere by the permission
    bits) and failed only after the whole generation."""
    config = load_config()
    config.output = output
    with count_compiles() as n, pytest.raises(ValueError, match=message):
        generation.resolve(config)
    assert n[0] == 0
    with pytest.raises(ValueError, match="cannot create files in /proc"):
        eval_set.plan_eval(load_config(), ["a cat"], "/proc/eval")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        eval_set.plan_eval(load_config(), ["a cat"], blocker / "eval")
    assert blocker.read_text() == "x"


def test_manifest_records_the_job(eval_setup):
    config, pipe, out = eval_setup
    manifest = eval_set.run_eval(config, ["a cat", "a dog"], out, pipe=pipe, limit=1)
    assert sorted(manifest["videos"]) == ["000.mp4"]
    record = json.loads((out / "manifest.json").read_text())["settings"]
    assert record["prompts_sha256"] == eval_set.prompts_digest(["a cat", "a dog"])
    assert record["num_prompts"] == 2 and record["seed"] == config.seed
