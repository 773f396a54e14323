r"""The main job: prompts in, H.264 mp4 files out.

    python -m stepvideo_jax.generate --config.prompt="a red circle moves to the left"
    python -m stepvideo_jax.generate --config configs/generate/release.py \
        --config.checkpoint_dir=/path/to/stepvideo-t2v --config.prompt="..."
    python -m stepvideo_jax.generate --config configs/generate/ti2v.py \
        --config.checkpoint_dir=stepfun-ai/stepvideo-ti2v --config.image=first.png --config.prompt="..."

Without `--config` the embedded demo model runs (`configs/generate/demo.py`: the tiny Step-Video
model trained by this project on the synthetic captioned-motion set, shipped in the package); tiny
random weights: `--config configs/generate/tiny.py`. Every
config field can be overridden with `--config.<field>=...`. All input is checked before any model is
built or compiled. Prints the resolved config, a progress bar over the denoising steps, and the time
of each phase at the end; `--summary_json` also writes the files and timings. The job itself (checks,
staged loading, writing): `sampling/generation.py`.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from stepvideo_jax import compile_cache, config_files, logs, paths
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.demo import vocabulary
from stepvideo_jax.parallel.mesh import initialize_distributed
from stepvideo_jax.sampling import generation, video_io


def main(argv=None):
    """The `stepvideo-generate` console script: parse, `generation.resolve` + `generation.run`, report."""
    config_flag = config_flags.DEFINE_config_file("config", str(generation.DEFAULT_CONFIG), "generation config file")
    flags.DEFINE_string("summary_json", "", "also write the files and timings of the run to this JSON file")

    def _main(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments {args[1:]}; settings go through --config.<field>=...")
        logs.quiet_unless_asked()
        initialize_distributed()
        try:
            job = generation.resolve(config_flag.value)
            notes = vocabulary.prompt_warnings(config_flag.value.vocabulary, job.prompts)
            compile_cache.setup(config_flag.value)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for note in notes:
            print(f"warning: {note}", file=sys.stderr, flush=True)
        try:
            summary = generation.run(config_flag.value, job)
        except CheckpointError as e:  # weights that do not match their config; other errors keep a traceback
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (video_io.VideoFileError, OSError) as e:  # e.g. a full disk: the encoder or a save failed
            print(f"error: {e}", file=sys.stderr)
            return 1
        if flags.FLAGS.summary_json and paths.writes_shared_files():
            paths.write_text(flags.FLAGS.summary_json, json.dumps(summary, indent=1))
        return 0

    app.run(_main, argv=config_files.resolve_argv(argv))


if __name__ == "__main__":
    main()
