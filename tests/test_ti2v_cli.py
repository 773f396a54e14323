"""The TI2V command line: configs/generate/ti2v.py on a TI2V release folder (fixture `ti2v` transformer
+ `release_layout` text encoders and VAE), its defaults, and the input checks that run before any
model loads."""
import numpy as np
import pytest
from PIL import Image

from stepvideo_jax.sampling import eval_set, generation
from stepvideo_jax.sampling import video_io
from tests.fixtures import fixture_dir, load_config, load_json
from tests.test_ti2v_e2e import ti2v_release

E2E = load_json("ti2v", "e2e_cases.json")


def test_defaults_are_the_official_cli_defaults():
    c = load_config("configs/generate/ti2v.py")
    want = E2E["cli_defaults_ti2v"]
    assert (c.num_frames, c.height, c.width, c.num_steps) == (want["num_frames"], want["height"], want["width"],
                                                               want["infer_steps"])
    assert (c.guidance_scale, c.time_shift, c.motion_score, c.seed) == (want["cfg_scale"], want["time_shift"],
                                                                       want["motion_score"], want["seed"])
    assert (c.pos_magic, c.neg_magic) == (want["pos_magic"], want["neg_magic"])


def _config(tmp_path, **overrides):
    name, case = sorted(E2E["cases"].items())[0]
    kw = dict(checkpoint_dir=str(ti2v_release(tmp_path)), image=str(fixture_dir("ti2v") / case["image_png"]),
              prompt=case["prompt"], num_frames=case["num_frames"], height=case["height"], width=case["width"],
              num_steps=2, motion_score=case["motion_score"], output=str(tmp_path / "out.mp4"), progress=False,
              denoise_filter=False, **{"dtypes.dit": "float32", "dtypes.vae": "float32",
                                       "dtypes.step_llm": "float32"})
    kw.update(overrides)
    return load_config("configs/generate/ti2v.py", **kw)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("guidance", [9.0, 1.0])
def test_generate_writes_the_video(tmp_path, guidance):
    """With and without CFG (guidance <= 1: no uncond branch)."""
    config = _config(tmp_path, guidance_scale=guidance, save_latents=True)
    job = generation.resolve(config)
    summary = generation.run(config, job)
    frames, _ = video_io.read_mp4(tmp_path / "out.mp4")
    assert frames.shape == (config.num_frames, config.height, config.width, 3)
    assert np.isfinite(np.load(tmp_path / "out.npy")).all()
    assert "image encode" in summary["timings"]


def test_bad_input_is_named_before_loading(tmp_path):
    with pytest.raises(ValueError, match="set --config.image"):
        generation.resolve(_config(tmp_path, image=""))
    with pytest.raises(ValueError, match="not found"):
        generation.resolve(_config(tmp_path / "b", image=str(tmp_path / "nope.png")))
    (tmp_path / "junk.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="cannot be read"):
        generation.resolve(_config(tmp_path / "c", image=str(tmp_path / "junk.png")))
    Image.fromarray(np.zeros((4, 400, 3), np.uint8)).save(tmp_path / "strip.png")
    with pytest.raises(ValueError, match="too unlike"):
        generation.resolve(_config(tmp_path / "d", image=str(tmp_path / "strip.png")))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="motion_score"):
            generation.resolve(_config(tmp_path / f"e{bad}", motion_score=bad))


def test_small_images_are_accepted(tmp_path):
    Image.fromarray(np.full((3, 5, 3), 200, np.uint8)).save(tmp_path / "tiny.png")
    job = generation.resolve(_config(tmp_path, image=str(tmp_path / "tiny.png")))
    assert job.images[0].shape == (3, 5, 3) and job.motion_score == float(_config(tmp_path / "x").motion_score)


def make_ti2v_eval(root, per_set=2):
    """A Step-Video-TI2V-Eval-shaped folder: <set>/<category>/<NNN>.png + <NNN>.txt."""
    rng = np.random.default_rng(0)
    for s, name in enumerate(eval_set.TI2V_SETS):
        for k in range(per_set):
            folder = root / name / "HA"[k % 2]
            folder.mkdir(parents=True, exist_ok=True)
            stem = f"{k + 1:03d}"
            Image.fromarray(rng.integers(0, 256, (30 + 7 * k, 50 - 5 * s, 3), dtype=np.uint8)).save(folder / f"{stem}.png")
            (folder / f"{stem}.txt").write_text(f"prompt {s}-{k}: a cat jumps\n", encoding="utf-8")
    return root


def test_ti2v_eval_layout(tmp_path):
    root = make_ti2v_eval(tmp_path / "bench")
    items = eval_set.read_ti2v_eval(root)
    assert items.sources == sorted(items.sources) and len(items.prompts) == 2 * len(eval_set.TI2V_SETS)
    assert items.prompts == [(root / f"{s}.txt").read_text(encoding="utf-8").strip() for s in items.sources]
    assert all(p.with_suffix(".txt").is_file() for p in items.images)
    one = eval_set.read_ti2v_eval(root, ["ti2v_eval_real"])
    assert all(s.startswith("ti2v_eval_real/") for s in one.sources)
    with pytest.raises(ValueError, match="unknown TI2V-Eval sets"):
        eval_set.read_ti2v_eval(root, ["ti2v_eval_cartoon"])
    next(root.glob("ti2v_eval_ani/*/*.txt")).unlink()
    with pytest.raises(ValueError, match="no matching .txt prompt"):
        eval_set.read_ti2v_eval(root)


@pytest.mark.e2e
@pytest.mark.slow
def test_ti2v_eval_resumes_with_manifest(tmp_path):
    items = eval_set.read_ti2v_eval(make_ti2v_eval(tmp_path / "bench"), ["ti2v_eval_real"])
    config = _config(tmp_path, num_steps=1, image="")
    out = tmp_path / "eval"
    job = generation.resolve(config, prompts=items.prompts, outputs=[out / "x.mp4"] * len(items.prompts),
                           images=items.images)
    pipe = generation.build_pipeline(config, job)
    manifest = eval_set.run_eval(config, items, out, pipe=pipe, limit=1)
    assert sorted(manifest["videos"]) == ["000.mp4"]
    assert manifest["videos"]["000.mp4"]["source"] == items.sources[0]
    assert "images_sha256" in manifest["settings"] and manifest["settings"]["motion_score"] == config.motion_score
    first = (out / "000.mp4").stat().st_mtime_ns
    manifest = eval_set.run_eval(config, items, out, pipe=pipe)
    assert sorted(manifest["videos"]) == ["000.mp4", "001.mp4"]
    assert (out / "000.mp4").stat().st_mtime_ns == first          # resumed, not regenerated
    assert [v["source"] for _, v in sorted(manifest["videos"].items())] == items.sources
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(items.images[0])   # another image: another job
    with pytest.raises(ValueError, match="images_sha256"):
        eval_set.plan_eval(config, items, out)


def _no_weights(monkeypatch):
    """Any weight load fails the test: the checks below must fire on the configs alone."""
    from stepvideo_jax import checkpoints

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the task mismatch was named")
    monkeypatch.setattr(checkpoints, "load_component", refuse)
    monkeypatch.setattr(checkpoints, "load_converted", refuse)


def test_t2v_checkpoint_with_ti2v_config_is_named_before_loading(tmp_path, monkeypatch):
    """The T2V release (fixture `release_layout`) under the TI2V config: one ValueError naming the
    mismatch and the way out, from `resolve`, before any weight loads."""
    _no_weights(monkeypatch)
    t2v = fixture_dir("release_layout") / "stepvideo-t2v"
    with pytest.raises(ValueError, match=r"is text to video, but this config is image to video.*Step-Video-TI2V "
                                         r"checkpoint.*without --config.image"):
        generation.resolve(_config(tmp_path, checkpoint_dir=str(t2v)))


def test_ti2v_checkpoint_with_t2v_config_is_named_before_loading(tmp_path, monkeypatch):
    """The TI2V release (fixture `ti2v`) under a text-to-video config (no ti2v, no image): the
    reverse mismatch, named the same way; also through `dit_from` (a DiT from elsewhere)."""
    _no_weights(monkeypatch)
    release = ti2v_release(tmp_path)
    with pytest.raises(ValueError, match=r"is Step-Video-TI2V \(image to video\), but this config is text to "
                                         r"video.*configs/generate/ti2v.py.*--config.image"):
        generation.resolve(_config(tmp_path / "a", checkpoint_dir=str(release), ti2v=False, image=""))
    t2v = fixture_dir("release_layout") / "stepvideo-t2v"
    with pytest.raises(ValueError, match=rf"DiT of {release}.*is Step-Video-TI2V"):
        generation.resolve(_config(tmp_path / "b", checkpoint_dir=str(t2v), dit_from=str(release),
                                   ti2v=False, image=""))



@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_cli_names_the_mismatch_without_a_traceback(tmp_path):
    """The command line: the shipped T2V demo with the TI2V switch, an image and a motion score
    (`--config.motion_score` overrides on any config) exits with the one-line mismatch error."""
    from tests.test_generate_cli import _cli

    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "first.png")
    proc = _cli("stepvideo_jax.generate", "--config.ti2v=True", f"--config.image={tmp_path / 'first.png'}",
                "--config.motion_score=5", f"--config.output={tmp_path / 'out.mp4'}", timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "is text to video, but this config is image to video" in proc.stderr
    assert "Traceback" not in proc.stderr
