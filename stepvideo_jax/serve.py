r"""The web page: a local Gradio app over one checkpoint, loaded once.

    python -m stepvideo_jax.serve                      # the demo model, http://127.0.0.1:7860
    python -m stepvideo_jax.serve --config configs/generate/release.py \
        --config.checkpoint_dir=/path/to/stepvideo-t2v [--port 8000] [--host 127.0.0.1]
    stepvideo-serve ...                                # the same, as a console script

The checkpoint and everything else in the generation config (`configs/generate/*`, `--config.x=...`,
the same as `python -m stepvideo_jax.generate`) are fixed at start-up: the models load once and stay
loaded (text encoders included), and the compiled programs are reused by every request of the same
shape. The page sets, per request: prompt, negative prompt (the unconditional rows' text, the
config's `neg_magic` by default), seed, steps, guidance, the video size (presets, or frames / height /
width), and for a TI2V config the first-frame image and motion score. Every request is checked by the
job's own `resolve` (the CLI's checks and bounds: steps, frames, size, image) and its problems shown in
the page as a message, never a traceback; notes (a prompt outside the model's vocabulary, a prompt the
text encoder will cut) are shown with the video. Requests wait in Gradio's queue, one generation at a
time (and a lock: two requests never run the models at once); the denoising loop feeds the progress
bar. Offline: analytics and the version check off, system fonts only, no server-side rendering, so the
page loads nothing from outside the machine. Binds 127.0.0.1 unless `--host` says otherwise.

Needs the `[ui]` extra (`pip install "stepvideo-jax[ui]"`: Gradio).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import pathlib
import sys
import tempfile
import threading
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import app as absl_app
from absl import flags
from ml_collections import config_flags

from stepvideo_jax import compile_cache, config_files, logs
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.demo import vocabulary
from stepvideo_jax.sampling import generation, video_io
from stepvideo_jax.sampling.pipeline import VideoSize, caption_prompts
from stepvideo_jax.text.conditioning import LLM_LENGTH

MAX_SEED = 2**31 - 1
DEMO_DIR = pathlib.Path(__file__).resolve().parent / "assets" / "demo"


@dataclasses.dataclass(frozen=True)
class Request:
    """One page submission, as the page's fields give it (numbers may be None when left empty)."""

    prompt: str
    negative_prompt: str
    seed: float | None
    steps: float | None
    guidance: float | None
    frames: float | None
    height: float | None
    width: float | None
    image: str | None = None           # TI2V: path of the uploaded first frame
    motion_score: float | None = None  # TI2V


@dataclasses.dataclass(frozen=True)
class Outcome:
    path: pathlib.Path
    timings: dict[str, float]
    notes: list[str]


def _whole(value, name: str, low: int, high: int) -> int:
    """A page number field as an int in [low, high]; ValueError naming the field otherwise."""
    if value is None or isinstance(value, bool) or not np.isfinite(float(value)) or float(value) != int(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name}={int(value)} is outside [{low}, {high}]")
    return int(value)


def size_presets(config: ml_collections.ConfigDict) -> dict[str, tuple[int, int, int]]:
    """{label: (frames, height, width)}: the config's size first, then the same at 17 frames and
    at twice the frames, and at half or one and a half times the sides (multiples of 16); only
    sizes `VideoSize` accepts."""
    f, h, w = int(config.num_frames), int(config.height), int(config.width)
    side = lambda x, k: max(16, int(round(x * k / 16)) * 16)
    candidates = [(f, h, w), (17, h, w), (2 * f, h, w), (f, side(h, 0.5), side(w, 0.5)),
                  (f, side(h, 1.5), side(w, 1.5))]
    presets = {}
    for i, (frames, height, width) in enumerate(candidates):
        try:
            VideoSize(frames, height, width)
        except ValueError:
            continue
        label = f"{frames} frames, {height} x {width}" + (" (config)" if i == 0 else "")
        if (frames, height, width) not in presets.values():
            presets[label] = (frames, height, width)
    return presets


def describe_weights(checkpoint_dir: str) -> str:
    """The page's one-line name of the weights (markdown)."""
    if not checkpoint_dir:
        return "tiny random models (`config.tiny`)"
    if pathlib.Path(checkpoint_dir).resolve() == DEMO_DIR:
        return ("the demo model shipped in the package (`stepvideo_jax/assets/demo`); prompts "
                "`a <colour> <shape> <motion>` in English or Chinese, e.g. `a red circle moves to the left`")
    return f"`{checkpoint_dir}`"


class Studio:
    """The models of one generation config, loaded once; `generate` runs one request at a time.

    The pipeline is built from the config's checkpoint with its text encoders kept (a server encodes
    every request's prompt); a TI2V config (`config.ti2v`) serves one uploaded first frame per
    request. `output_dir` receives every request's mp4 (`<n>_seed<seed>.mp4`).
    """

    def __init__(self, config: ml_collections.ConfigDict, output_dir: str | os.PathLike, printer=print):
        self.config = ml_collections.ConfigDict(config.to_dict())
        self.ti2v = bool(config.ti2v)
        self.output_dir = pathlib.Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.presets = size_presets(self.config)
        vocabulary.prompt_warnings(self.config.vocabulary, [])   # an unknown vocabulary fails now
        probe = self._request_config(self.default_request())
        probe.image = ""   # requests bring their own first frames
        job = generation.resolve(probe, image_per_request=True)
        start = time.perf_counter()
        self.pipe = generation.build_pipeline(self.config, dataclasses.replace(job, images=[] if self.ti2v else None))
        self.tokenizer = job.models.llm_tokenizer()
        self.load_seconds = time.perf_counter() - start
        self.weights = describe_weights(self.config.checkpoint_dir)
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        self.active = 0
        self.max_active = 0
        printer(f"loaded {job.checkpoint_dir or 'tiny random models (config.tiny)'} in {self.load_seconds:.1f} s")

    def default_request(self) -> Request:
        c = self.config
        return Request(prompt=c.prompt, negative_prompt=c.neg_magic, seed=c.seed, steps=c.num_steps,
                       guidance=c.guidance_scale, frames=c.num_frames, height=c.height, width=c.width,
                       image=None, motion_score=c.motion_score)

    def _request_config(self, request: Request) -> ml_collections.ConfigDict:
        """The server's config with the request's fields; ValueError for a field that is not a number
        where one is needed (the rest is checked by `generation.resolve`)."""
        c = ml_collections.ConfigDict(self.config.to_dict())
        if not isinstance(request.prompt, str) or not isinstance(request.negative_prompt, str):
            raise ValueError("prompt and negative prompt must be text")
        c.prompt, c.prompts, c.neg_magic = request.prompt, (), request.negative_prompt
        c.seed = _whole(request.seed, "seed", 0, MAX_SEED)
        c.num_steps = _whole(request.steps, "steps", 1, 10**6)
        if request.guidance is None:
            raise ValueError("guidance must be a number, got nothing")
        c.guidance_scale = float(request.guidance)
        c.num_frames = _whole(request.frames, "frames", 1, 10**6)
        c.height = _whole(request.height, "height", 1, 10**6)
        c.width = _whole(request.width, "width", 1, 10**6)
        if self.ti2v:
            c.motion_score = request.motion_score
        c.progress = False
        return c

    def notes(self, config: ml_collections.ConfigDict, prompts: list[str], cfg: bool) -> list[str]:
        """The request's warnings: outside the model's vocabulary, or longer than the text encoder
        reads (the CLI's tokenizer warning, as a line)."""
        notes = vocabulary.prompt_warnings(config.vocabulary, prompts)
        if self.tokenizer is not None:
            rows = caption_prompts(prompts, pos_magic=config.pos_magic, neg_magic=config.neg_magic, cfg=cfg)
            for name, row in zip(("prompt", "negative prompt"), (rows[0], rows[-1] if cfg else None)):
                if row is None:
                    continue
                n = len(self.tokenizer.encode([row])[0])
                if n > LLM_LENGTH - 2:
                    notes.append(f"the {name} (with the config's magic suffix) is {n} tokens: Step-LLM reads "
                                 f"the first {LLM_LENGTH - 2}, the rest is ignored")
        return notes

    def check(self, request: Request) -> tuple[ml_collections.ConfigDict, generation.Job]:
        """The request's config and job, checked as the CLI checks them (ValueError otherwise)."""
        config = self._request_config(request)
        if self.ti2v and not request.image:
            raise ValueError("this is an image-to-video model: upload the first frame")
        config.output = str(self.output_dir / f"{next(self._numbers):04d}_seed{config.seed}.mp4")
        job = generation.resolve(config, images=[request.image] if self.ti2v else None)
        return config, job

    def generate(self, request: Request, on_step: Callable[[int, int], None] | None = None) -> Outcome:
        """Check, generate (holding the lock), write the mp4. `on_step(done, total)` after each
        denoising step. ValueError for bad input (before anything runs)."""
        config, job = self.check(request)
        notes = self.notes(config, job.prompts, job.settings.cfg)
        total = job.settings.num_steps

        def step(i, latents):
            latents.block_until_ready()
            if on_step is not None:
                on_step(i + 1, total)

        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            try:
                result = self.pipe(job.prompts, size=job.size, settings=job.settings, seeds=job.seeds,
                                   pos_magic=config.pos_magic, neg_magic=config.neg_magic, crop=config.crop_540p,
                                   on_step=step, images=job.images, motion_score=job.motion_score)
            finally:
                self.active -= 1
        start = time.perf_counter()
        path = pathlib.Path(str(job.outputs[0]))
        video_io.write_mp4(path, result.frames[0], denoise=config.denoise_filter)
        timings = dict(result.timings, write=time.perf_counter() - start)
        return Outcome(path=path, timings=timings, notes=notes)


def format_outcome(outcome: Outcome) -> str:
    """The page's status text: notes, then the time of each phase."""
    lines = [f"**note:** {note}" for note in outcome.notes]
    lines.append("time per phase: " + ", ".join(f"{k} {v:.2f} s" for k, v in outcome.timings.items())
                 + f"; total {sum(outcome.timings.values()):.2f} s")
    return "\n\n".join(lines)


def _gradio():
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"   # read when gradio is imported and at launch
    try:
        import gradio as gr
    except ImportError:
        raise SystemExit("the web page needs Gradio: pip install 'stepvideo-jax[ui]'") from None
    return gr


def theme(gr):
    """Gradio's default look with system fonts: the default theme would load Google Fonts."""
    system = ("ui-sans-serif", "system-ui", "sans-serif")
    mono = ("ui-monospace", "monospace")
    return gr.themes.Default(font=system, font_mono=mono)


def build_app(studio: Studio):
    """The page (a `gr.Blocks`, queued one generation at a time)."""
    gr = _gradio()
    d = studio.default_request()
    presets = studio.presets
    with gr.Blocks(title="Step-Video (JAX)", analytics_enabled=False) as app:
        gr.Markdown(f"## Step-Video (JAX)\nweights: {studio.weights}")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="prompt", value=d.prompt, lines=2, elem_id="prompt")
                negative = gr.Textbox(label="negative prompt", value=d.negative_prompt, lines=1, elem_id="negative")
                image = gr.Image(label="first frame (image to video)", type="filepath", visible=studio.ti2v,
                                 sources=["upload"], elem_id="image")
                motion = gr.Number(label="motion score", value=d.motion_score, visible=studio.ti2v, elem_id="motion")
                with gr.Row():
                    seed = gr.Number(label="seed", value=d.seed, precision=0, elem_id="seed")
                    steps = gr.Number(label="steps", value=d.steps, precision=0, elem_id="steps")
                    guidance = gr.Number(label="guidance", value=d.guidance, elem_id="guidance")
                preset = gr.Dropdown(label="size", choices=list(presets), value=next(iter(presets)), elem_id="preset")
                with gr.Row():
                    frames = gr.Number(label="frames", value=d.frames, precision=0, elem_id="frames")
                    height = gr.Number(label="height", value=d.height, precision=0, elem_id="height")
                    width = gr.Number(label="width", value=d.width, precision=0, elem_id="width")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                video = gr.Video(label="video", format=None, autoplay=True, loop=True, elem_id="video", height=360,
                                 interactive=False)
                download = gr.File(label="download (mp4)", elem_id="download", interactive=False)
                status = gr.Markdown(elem_id="status")

        preset.change(lambda label: presets.get(label, (d.frames, d.height, d.width)), preset,
                      [frames, height, width], queue=False)

        def run(prompt, negative, seed, steps, guidance, frames, height, width, image, motion,
                progress=gr.Progress()):
            request = Request(prompt, negative, seed, steps, guidance, frames, height, width, image, motion)
            try:
                outcome = studio.generate(request, on_step=lambda i, n: progress((i, n), desc="denoise",
                                                                                 unit="steps"))
            except ValueError as e:
                return None, None, f"**error:** {e}"
            except (CheckpointError, video_io.VideoFileError, OSError) as e:
                return None, None, f"**error:** {e}"
            return str(outcome.path), str(outcome.path), format_outcome(outcome)

        button.click(run, [prompt, negative, seed, steps, guidance, frames, height, width, image, motion],
                     [video, download, status], concurrency_limit=1, concurrency_id="models")
    app.queue(default_concurrency_limit=1)
    return app


def main(argv=None):
    config_flag = config_flags.DEFINE_config_file("config", str(generation.DEFAULT_CONFIG), "generation config file")
    flags.DEFINE_string("host", "127.0.0.1", "address to bind (127.0.0.1: this machine only)")
    flags.DEFINE_integer("port", 7860, "port to listen on")
    flags.DEFINE_string("output_dir", "", "where the videos are written (default: a new temporary directory)")

    def _main(args):
        if len(args) > 1:
            raise absl_app.UsageError(f"unexpected arguments {args[1:]}; settings go through --config.<field>=...")
        logs.quiet_unless_asked()
        gr = _gradio()
        config = config_flag.value
        output_dir = flags.FLAGS.output_dir or tempfile.mkdtemp(prefix="stepvideo_serve_")
        try:
            compile_cache.setup(config)
            studio = Studio(config, output_dir)
        except (ValueError, CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        page = build_app(studio)
        print(f"devices: {jax.devices()}; videos are written to {output_dir}", flush=True)
        page.launch(server_name=flags.FLAGS.host, server_port=flags.FLAGS.port, share=False, ssr_mode=False,
                    allowed_paths=[output_dir], theme=theme(gr), footer_links=[], pwa=False, mcp_server=False)
        return 0

    absl_app.run(_main, argv=config_files.resolve_argv(argv))


if __name__ == "__main__":
    main()
