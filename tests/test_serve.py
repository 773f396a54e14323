"""The web page's server side, in-process: the demo model loaded once, the CLI's checks as messages,
compiled programs reused across requests, one generation at a time, notes, size presets, the
offline settings of the page, and the entry point's start-up error. The page in a real browser:
`tests/test_serve_browser.py`.
"""
import dataclasses
import os
import subprocess
import sys
import threading

import pytest

from stepvideo_jax import serve
from stepvideo_jax.data import synthetic_motion as sm
from stepvideo_jax.sampling import video_io
from stepvideo_jax.sampling.pipeline import VideoSize
from tests.fixtures import PROJECT_ROOT
from tests.test_flow_matching import count_compiles
from tests.test_generate_cli import load_config

pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")


@pytest.fixture(scope="module")
def config():
    return load_config("demo")


@pytest.fixture(scope="module")
def studio(config, tmp_path_factory):
    return serve.Studio(config, tmp_path_factory.mktemp("videos"), printer=lambda *_: None)


def test_size_presets_start_with_the_config_and_are_all_valid(config):
    for name in ("demo", "tiny", "release", "ti2v"):
        c = load_config(name)
        presets = serve.size_presets(c)
        assert next(iter(presets.values())) == (c.num_frames, c.height, c.width), name
        assert len(set(presets.values())) == len(presets) >= 2, (name, presets)
        for size in presets.values():
            VideoSize(*size)


@pytest.mark.slow
def test_a_request_writes_its_video_and_the_next_one_compiles_nothing(studio, config):
    steps = []
    first = studio.generate(studio.default_request(), on_step=lambda i, n: steps.append((i, n)))
    assert steps == [(i + 1, config.num_steps) for i in range(config.num_steps)]
    frames, fps = video_io.read_mp4(first.path)
    assert frames.shape == (config.num_frames, config.height, config.width, 3) and fps == video_io.FPS
    assert {"tokenize+encode", "denoise", "decode", "write"} <= set(first.timings) and not first.notes
    text = serve.format_outcome(first)
    assert "time per phase" in text and "denoise" in text
    request = dataclasses.replace(studio.default_request(), prompt=sm.HELD_OUT[0].caption("zh"), seed=7,
                                  steps=config.num_steps // 2, guidance=2.5)
    with count_compiles() as compiles:
        second = studio.generate(request)
    assert compiles[0] == 0, "a request of the same shape must reuse the compiled programs"
    assert second.path != first.path and video_io.read_mp4(second.path)[0].shape == frames.shape


@pytest.mark.parametrize("field,value,message", [
    ("height", 30, r"height=30 must be a positive multiple of \d+"),
    ("frames", 18, "num_frames=18 must be a positive multiple of 17"),
    ("width", 10_000, "width=10000 is above the limit"),
    ("steps", 5000, "num_steps=5000 is above the limit"),
    ("steps", 0, "steps=0 is outside"),
    ("guidance", float("nan"), "guidance_scale must be a finite number"),
    ("prompt", "   ", "prompt 0 is empty"),
    ("seed", None, "seed must be a whole number"),
    ("seed", -1, "seed=-1 is outside"),
    ("seed", 2.5, "seed must be a whole number"),
])
def test_bad_input_is_a_message_before_anything_runs(studio, field, value, message):
    request = dataclasses.replace(studio.default_request(), **{field: value})
    with count_compiles() as compiles, pytest.raises(ValueError, match=message):
        studio.generate(request)
    assert compiles[0] == 0


@pytest.mark.slow
def test_notes_name_unknown_words_and_long_prompts(studio, config):
    outside = studio.generate(dataclasses.replace(studio.default_request(), prompt="a purple hexagon dances"))
    assert len(outside.notes) == 1 and "unknown words: purple, hexagon, dances" in outside.notes[0]
    long = studio.notes(config, [" ".join(["a red circle moves up"] * 80)], cfg=True)
    assert any("Step-LLM reads the first 318" in note for note in long), long


@pytest.mark.slow
def test_concurrent_requests_never_run_the_models_at_once(studio):
    errors, outcomes = [], []

    def one(seed):
        try:
            outcomes.append(studio.generate(dataclasses.replace(studio.default_request(), seed=seed)))
        except Exception as e:   # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(s,)) for s in (11, 12, 13)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(outcomes) == 3
    assert len({o.path for o in outcomes}) == 3 and studio.max_active == 1


def test_the_page_is_offline_and_queued(studio):
    app = serve.build_app(studio)
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and app.analytics_enabled is False
    import gradio as gr

    theme = serve.theme(gr)
    assert not theme._stylesheets and all(isinstance(f, str) for f in (*theme._font, *theme._font_mono))
    assert app._queue.default_concurrency_limit == 1
    runs = [fn for fn in app.fns.values() if fn.name == "run"]
    assert len(runs) == 1 and runs[0].queue and runs[0].concurrency_limit == 1
    ids = {getattr(block, "elem_id", None) for block in app.blocks.values()}
    assert {"prompt", "negative", "seed", "steps", "guidance", "preset", "frames", "height", "width", "generate",
            "video", "download", "status"} <= ids


@pytest.mark.slow
def test_entry_point_reports_a_bad_config_without_starting():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "stepvideo_jax.serve", "--config.height=30", "--port=1"],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error: invalid video size: height=30" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_ti2v_config_serves_an_uploaded_first_frame(tmp_path):
    """configs/generate/ti2v.py on the TI2V fixture release: the page's image input is shown, a
    request without an image or with a bad motion score is a message, one with an image is a video."""
    from tests.test_ti2v_cli import E2E, _config
    from tests.fixtures import fixture_dir

    config = _config(tmp_path, image="")
    studio = serve.Studio(config, tmp_path / "videos", printer=lambda *_: None)
    image = str(fixture_dir("ti2v") / sorted(E2E["cases"].items())[0][1]["image_png"])
    with pytest.raises(ValueError, match="upload the first frame"):
        studio.generate(studio.default_request())
    with pytest.raises(ValueError, match="motion_score must be a finite number"):
        studio.generate(dataclasses.replace(studio.default_request(), image=image, motion_score=float("inf")))
    outcome = studio.generate(dataclasses.replace(studio.default_request(), image=image))
    assert "image encode" in outcome.timings
    assert video_io.read_mp4(outcome.path)[0].shape == (config.num_frames, config.height, config.width, 3)
    app = serve.build_app(studio)
    shown = {block.elem_id: block.visible for block in app.blocks.values() if getattr(block, "elem_id", None)}
    assert shown["image"] is True and shown["motion"] is True
