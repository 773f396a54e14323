r"""Step-Video-T2V-Eval: the 128-prompt benchmark list -> a folder of mp4 files + a JSON manifest.

    python -m stepvideo_jax.generate_eval --config configs/generate/release.py \
        --config.checkpoint_dir=/path/to/stepvideo-t2v --output_dir=outputs/step_video_t2v_eval
    python -m stepvideo_jax.generate_eval --config configs/generate/ti2v.py \
        --config.checkpoint_dir=stepfun-ai/stepvideo-ti2v --ti2v_eval_dir=/path/to/Step-Video-TI2V-Eval

Prompt i of the list is written to `<output_dir>/<i:03d>.mp4` with seed `config.seed + i`; re-running
resumes, and a folder of another job is refused (`--overwrite` starts over). The folder, manifest
and resume rules: `sampling/eval_set.py`.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from stepvideo_jax import compile_cache, config_files, logs
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.parallel.mesh import initialize_distributed
from stepvideo_jax.sampling import eval_set, generation


def main(argv=None):
    """The `stepvideo-eval` console script: parse, `eval_set.plan_eval` + `eval_set.execute`, report."""
    config_flag = config_flags.DEFINE_config_file("config", str(generation.DEFAULT_CONFIG), "generation config file")
    flags.DEFINE_string("output_dir", "outputs/step_video_t2v_eval", "folder of mp4 files and manifest.json")
    flags.DEFINE_string("prompts_file", str(eval_set.EVAL_PROMPTS), "prompt list, one per line")
    flags.DEFINE_string("ti2v_eval_dir", "", "Step-Video-TI2V-Eval folder (<set>/<category>/<NNN>.png + .txt); "
                        "replaces --prompts_file, needs a TI2V config (configs/generate/ti2v.py)")
    flags.DEFINE_list("ti2v_sets", list(eval_set.TI2V_SETS), f"TI2V-Eval sets to run, of {list(eval_set.TI2V_SETS)}")
    flags.DEFINE_integer("limit", 0, "only the first N prompts (0: all)")
    flags.DEFINE_integer("batch_size", 1, "prompts per pipeline call")
    flags.DEFINE_bool("overwrite", False, "delete this runner's files in --output_dir (NNN.mp4, NNN.npy, "
                      "manifest.json) and start over, e.g. after changing the prompts or settings")

    def _main(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments {args[1:]}")
        logs.quiet_unless_asked()
        initialize_distributed()
        f = flags.FLAGS
        try:
            if f.ti2v_eval_dir:
                if not config_flag.value.ti2v:
                    raise ValueError("--ti2v_eval_dir needs an image-to-video config (configs/generate/ti2v.py)")
                prompts = eval_set.read_ti2v_eval(f.ti2v_eval_dir, f.ti2v_sets)
            else:
                prompts = eval_set.read_prompts(f.prompts_file)
            if f.limit < 0:
                raise ValueError(f"--limit must be >= 0, got {f.limit}")
            plan = eval_set.plan_eval(config_flag.value, prompts, f.output_dir, batch_size=f.batch_size, limit=f.limit,
                             overwrite=f.overwrite)
            compile_cache.setup(config_flag.value)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            manifest = eval_set.execute(config_flag.value, plan)
        except CheckpointError as e:  # weights that do not match their config; other errors keep a traceback
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # e.g. a full disk: the encoder or the manifest write failed; done videos are kept
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{len(manifest['videos'])} videos in {f.output_dir}")
        return 0

    app.run(_main, argv=config_files.resolve_argv(argv))


if __name__ == "__main__":
    main()
