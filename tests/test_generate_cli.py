"""The main job's CLIs: README's default command end to end, bad input, the eval runner.

`test_default_command_follows_its_prompt` runs README's command in a subprocess (the shipped demo
model, no download, no ../shared) and scores the mp4 with the synthetic set's checker; the rest run in-process, the eval runner on the toy pipeline of
`test_pipeline` so that its bookkeeping (manifest, resume, atomic files) is tested in seconds.
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from stepvideo_jax import checkpoints
from stepvideo_jax.sampling import eval_set, generation
from stepvideo_jax.sampling import video_io
from tests.fixtures import PROJECT_ROOT, fixture_dir, load_npz
from tests.test_flow_matching import count_compiles
from tests.test_pipeline import SIZE as TOY_SIZE
from tests.test_pipeline import toy_pipeline  # noqa: F401  (a fixture)


def load_config(name="tiny"):
    """`get_config()` of `configs/generate/<name>.py`; `name` may carry the variant (`release:turbo`)."""
    name, sep, arg = name.partition(":")
    path = PROJECT_ROOT / "configs" / "generate" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if sep else module.get_config()


# the test process has JAX loaded; forking it to exec a fresh interpreter is safe
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")


def _cli(*args, timeout=600, env=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2") if env is None else env
    env.pop("XLA_FLAGS", None)  # the CLI runs as a user runs it: one device
    return subprocess.run([sys.executable, "-m", *args], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.e2e
def test_default_command_follows_its_prompt(tmp_path):
    """README's main-job command: the default config is the demo model, whose video shows the
    prompt's colour and motion (read from the written mp4 by `eval/motion_checker.py`). Run in the
    user's environment (no TF_CPP_MIN_LOG_LEVEL), it prints at most 40 lines (stdout + stderr;
    carriage returns of the progress bar count as line breaks), among them the short config, the
    phase times and the output path, and no library INFO records."""
    from stepvideo_jax.eval import motion_checker

    assert generation.DEFAULT_CONFIG.name == "demo.py"
    prompt = "a blue square moves up"
    out, summary = tmp_path / "video.mp4", tmp_path / "summary.json"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = _cli("stepvideo_jax.generate", f"--config.prompt={prompt}",
                f"--config.output={out}", "--config.save_latents=True", f"--summary_json={summary}", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = load_config("demo")
    frames, fps = video_io.read_mp4(out)
    assert frames.shape == (config.num_frames, config.height, config.width, 3) and fps == 25
    reading = motion_checker.read_video(frames)
    assert (reading.colour, reading.shape, reading.motion) == ("blue", "square", "up"), reading
    latents = np.load(out.with_suffix(".npy"))
    factor = checkpoints.loader(config.checkpoint_dir).vae_cfg.spatial_factor
    assert latents.shape[:2] == (1, config.num_frames // 17 * 3) and latents.shape[3:] == (
        config.height // factor, config.width // factor)
    record = json.loads(summary.read_text())
    assert set(record["timings"]) == {"load text encoders", "tokenize+encode", "release", "load dit+vae", "denoise",
                                      "decode", "write"}
    memory = record["live_bytes"]
    assert memory["text encoders released"] < memory["text encoders loaded"] / 10, memory
    assert "live device arrays after text encoders released" in proc.stdout
    assert "resolved config" in proc.stdout and f"prompt: {prompt}" in proc.stdout
    assert "time per phase:" in proc.stdout and all(f"  {phase} " in proc.stdout for phase in record["timings"])
    assert f"wrote {out}\n" in proc.stdout and f"wrote {out.with_suffix('.npy')}\n" in proc.stdout
    assert "denoise" in proc.stderr and f"{config.num_steps}/{config.num_steps}" in proc.stderr
    lines = (proc.stdout + proc.stderr).replace("\r", "\n").splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    assert "warning: " not in proc.stderr, proc.stderr   # a caption of the demo's set: no vocabulary warning
    noise = [line for line in lines if line.startswith(("I0", "I1", "W0", "E0", "WARNING: All log"))
             or "cuda" in line.lower() or "oneDNN" in line]
    assert not noise, noise


@pytest.mark.e2e
@pytest.mark.slow
def test_out_of_vocabulary_prompt_generates_after_one_warning(tmp_path):
    """A prompt the demo was never trained on still gives a video, after exactly one warning line
    that names its unknown words and every word the demo knows."""
    from stepvideo_jax.data import synthetic_motion as sm

    out = tmp_path / "video.mp4"
    proc = _cli("stepvideo_jax.generate", "--config.prompt=a purple hexagon dances", f"--config.output={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, warnings
    assert "unknown words: purple, hexagon, dances" in warnings[0]
    known = [*sm.COLOURS, *sm.SHAPES, *(en for en, _ in sm.MOTIONS.values()),
             *(zh for _, zh in sm.COLOURS.values()), *sm.SHAPES.values(), *(zh for _, zh in sm.MOTIONS.values())]
    assert all(word in warnings[0] for word in known), warnings[0]
    frames, _ = video_io.read_mp4(out)
    assert frames.shape[0] == load_config("demo").num_frames


@pytest.mark.e2e
@pytest.mark.slow
def test_tiny_random_config_writes_a_valid_mp4(tmp_path):
    """Random weights stay available as an explicit option (`--config configs/generate/tiny.py`)."""
    out = tmp_path / "video.mp4"
    proc = _cli("stepvideo_jax.generate", "--config", str(PROJECT_ROOT / "configs/generate/tiny.py"),
                "--config.prompt=A red panda climbs a snowy pine tree.", f"--config.output={out}",
                "--config.num_steps=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = load_config()
    frames, _ = video_io.read_mp4(out)
    assert frames.shape == (config.num_frames, config.height, config.width, 3)
    assert frames.std() > 1, "the decoded video is flat"


def test_bad_input_exits_with_a_message_before_loading_anything():
    proc = _cli("stepvideo_jax.generate", "--config.prompt=   ", "--config.num_frames=30", timeout=120)
    assert proc.returncode == 2
    assert "error: prompt 0 is empty" in proc.stderr
    assert "Traceback" not in proc.stderr


def _fake_release_without(tmp_path, missing):
    root = tmp_path / "release"
    src = fixture_dir("release_layout") / "stepvideo-t2v"
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        if path.is_file() and not str(rel).startswith(missing):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).symlink_to(path)
    return root


@pytest.mark.parametrize("override, message", [
    (dict(prompt=""), "prompt 0 is empty"),
    (dict(prompts=("a cat", " ")), "prompt 1 is empty"),
    (dict(num_frames=30), "num_frames=30 must be a positive multiple of 17.*nearest valid: 17 or 34"),
    (dict(height=70, width=100), "height=70 .*nearest valid: 64 or 80.*width=100 .*nearest valid: 96 or 112"),
    (dict(num_steps=0), "num_steps must be a positive integer"),
    (dict(time_shift=-1.0), "time shift must be a positive"),
    (dict(output="/dev/null/video.mp4"), "/dev/null is not a directory"),
    (dict(output="video.avi"), "must end in .mp4"),
    (dict(checkpoint_dir="/nonexistent/stepvideo"), "is not a directory"),
    (dict(mesh="fsdp=3"), "use 3 devices but 8 are available"),
    (dict(mesh="pipeline=2"), "is not <axis>=<size> with axis in"),
])
def test_bad_inputs_are_rejected_before_any_compilation(override, message):
    config = load_config()
    config.update(override)
    with count_compiles() as n, pytest.raises(ValueError, match=message):
        generation.resolve(config)
    assert n[0] == 0


def test_bad_dtype_names_the_choices():
    config = load_config()
    config.dtypes.dit = "float16"
    with pytest.raises(ValueError, match=r"dtypes.dit='float16': choose one of \['bfloat16', 'float32'\]"):
        generation.resolve(config)


def test_mesh_takes_a_release_directory():
    """A release directory restores straight into the mesh (tests/test_release_mesh.py): no
    converted copy is required any more."""
    config = load_config()
    config.checkpoint_dir = str(fixture_dir("release_layout") / "stepvideo-t2v")
    config.mesh = "fsdp=-1"
    job = generation.resolve(config)
    assert job.models.mesh is not None and str(job.checkpoint_dir) == config.checkpoint_dir


@pytest.mark.parametrize("missing", ["vae", "step_llm/step1_chat_tokenizer.model", "hunyuan_clip/tokenizer"])
def test_checkpoint_missing_a_component(tmp_path, missing):
    config = load_config()
    config.checkpoint_dir = str(_fake_release_without(tmp_path, missing))
    with pytest.raises(ValueError, match=f"is missing component files: .*{missing.split('/')[0]}: "):
        generation.resolve(config)


@pytest.mark.parametrize("name, steps, guidance, shift", [("release:base", 50, 9.0, 13.0),
                                                         ("release:turbo", 15, 5.0, 17.0), ("release", 50, 9.0, 13.0)])
def test_presets(name, steps, guidance, shift):
    config = load_config(name)
    assert (config.num_steps, config.guidance_scale, config.time_shift) == (steps, guidance, shift)
    assert (config.num_frames, config.height, config.width) == (204, 544, 992)
    config.prompt = "a cat"
    with pytest.raises(ValueError, match="set --config.checkpoint_dir"):
        generation.resolve(config)
    config.checkpoint_dir = str(fixture_dir("release_layout") / "stepvideo-t2v")
    config.output = "/tmp/stepvideo_preset_probe.mp4"
    job = generation.resolve(config)
    assert job.size.latent_shape(1, 64) == (1, 36, 64, 34, 62)


def test_release_variants_are_named():
    with pytest.raises(ValueError, match=r"unknown release variant 'turob'; choose one of \['base', 'turbo'\]"):
        load_config("release:turob")


def test_run_prints_a_short_config_and_all_fields_on_request():
    config = load_config("demo")
    config.prompt = "a red circle grows"
    job = generation.resolve(config)
    short = generation.describe(config, job)
    assert short.splitlines()[0] == "resolved config (every field: --verbosity=1):" and len(short.splitlines()) <= 8
    assert f"prompt: {config.prompt}" in short and f"{config.num_steps} steps" in short
    full = generation.describe(config, job, full=True)
    assert full == "resolved config:\n" + str(config)


def test_batch_outputs_and_seeds():
    config = load_config()
    config.prompts = ("a", "b", "c")
    config.output = "/tmp/x/clip.mp4"
    job = generation.resolve(config)
    assert [p.name for p in job.outputs] == ["clip_0.mp4", "clip_1.mp4", "clip_2.mp4"]
    assert job.seeds == [config.seed, config.seed + 1, config.seed + 2]


# --- the eval runner ------------------------------------------------------------------------------


def test_eval_prompt_list_is_shipped():
    prompts = eval_set.read_prompts()
    assert len(prompts) == 128 and all(prompts)
    e2e = load_npz("release_layout", "e2e_cases.npz")
    case_prompts = {str(v) for k, v in e2e.items() if k.endswith(".prompt")}
    assert case_prompts and case_prompts & set(prompts), "no end-to-end case prompt is in the eval list"


@pytest.fixture()
def eval_setup(tmp_path, toy_pipeline):
    config = load_config()
    config.update(dict(num_frames=TOY_SIZE.num_frames, height=TOY_SIZE.height, width=TOY_SIZE.width,
                       num_steps=2, progress=False))
    return config, toy_pipeline, tmp_path / "eval"


@pytest.mark.e2e
def test_eval_writes_videos_and_manifest_then_resumes(eval_setup):
    config, pipe, out = eval_setup
    prompts = ["a cat", "a dog", "a bird"]
    manifest = eval_set.run_eval(config, prompts, out, pipe=pipe, limit=2)
    assert sorted(os.listdir(out)) == ["000.mp4", "001.mp4", "manifest.json"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["videos"]["001.mp4"]["prompt"] == "a dog"
    assert manifest["videos"]["001.mp4"]["seed"] == config.seed + 1
    assert set(manifest["videos"]["000.mp4"]["timings"]) == {"tokenize+encode", "denoise", "decode", "write"}
    before = (out / "000.mp4").stat().st_mtime_ns
    calls = []
    original = pipe.__call__

    class Counting:
        def __getattr__(self, name):
            return getattr(pipe, name)

        def __call__(self, prompts, **kw):
            calls.append(list(prompts))
            return original(prompts, **kw)

    manifest = eval_set.run_eval(config, prompts, out, pipe=Counting())
    assert calls == [["a bird"]]
    assert (out / "000.mp4").stat().st_mtime_ns == before
    assert sorted(manifest["videos"]) == ["000.mp4", "001.mp4", "002.mp4"]


def test_eval_refuses_a_folder_made_with_other_settings(eval_setup):
    config, pipe, out = eval_setup
    eval_set.run_eval(config, ["a cat"], out, pipe=pipe)
    config.num_steps = 3
    with pytest.raises(ValueError, match="other settings \\(changed: num_steps\\)"):
        eval_set.run_eval(config, ["a cat"], out, pipe=pipe)


@pytest.mark.e2e
def test_eval_interrupted_leaves_no_partial_file(eval_setup, monkeypatch):
    config, pipe, out = eval_setup

    def interrupt(path, frames, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(video_io, "write_mp4", interrupt)
    with pytest.raises(KeyboardInterrupt):
        eval_set.run_eval(config, ["a cat"], out, pipe=pipe)
    assert sorted(os.listdir(out)) == ["manifest.json"]
    assert json.loads((out / "manifest.json").read_text())["videos"] == {}
