r"""Step-Video-T2V-Eval: the 128-prompt benchmark list -> a folder of mp4 files + a JSON manifest.

    python -m stepvideo_jax.generate_eval --config configs/generate/base.py \
        --config.checkpoint_dir=/path/to/stepvideo-t2v --output_dir=outputs/step_video_t2v_eval

Prompt i (0-based line of the list, shipped in the package) is written to `<output_dir>/<i:03d>.mp4`
with seed `config.seed + i`, so a video does not depend on batching or on where a run resumed.
`manifest.json` records the settings and, per video, the prompt, seed, file and time per phase.
Re-running skips the videos already written; an interrupted run leaves no half-written mp4 (each
is encoded to a temporary name and renamed) and the manifest is replaced atomically after each
batch. A folder made with other settings is refused rather than mixed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time

import ml_collections

from stepvideo_jax import config_files, generate
from stepvideo_jax.convert.safetensors_io import CheckpointError
from stepvideo_jax.sampling.pipeline import TextToVideo

EVAL_PROMPTS = pathlib.Path(__file__).resolve().parent / "assets" / "step_video_t2v_eval_prompts.txt"
MANIFEST = "manifest.json"
# config fields that change the videos: a folder is only resumed with the same values
SETTINGS_FIELDS = ("seed", "num_frames", "height", "width", "num_steps", "guidance_scale", "time_shift",
                   "pos_magic", "neg_magic", "checkpoint_dir", "dtypes", "tiny", "bf16_mask_sum",
                   "crop_540p", "denoise_filter")


def read_prompts(path=EVAL_PROMPTS) -> list[str]:
    """One prompt per non-empty line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"prompt list {path} not found")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt list {path} has no prompts")
    return prompts


def settings_record(config: ml_collections.ConfigDict) -> dict:
    """The config fields that shape the videos, as they read back from JSON (tuples become lists)."""
    record = {k: (config[k].to_dict() if isinstance(config[k], ml_collections.ConfigDict) else config[k])
              for k in SETTINGS_FIELDS if k in config}
    return json.loads(json.dumps(record))


def load_manifest(output_dir: pathlib.Path, settings: dict) -> dict:
    path = output_dir / MANIFEST
    if not path.is_file():
        return {"settings": settings, "videos": {}}
    manifest = json.loads(path.read_text())
    if settings != manifest.get("settings"):
        old = manifest.get("settings", {})
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise ValueError(f"{output_dir} holds videos made with other settings (changed: {', '.join(changed)}); "
                         "use another --output_dir, or delete the folder to start over")
    return manifest


def write_manifest(output_dir: pathlib.Path, manifest: dict) -> None:
    tmp = output_dir / f".{MANIFEST}.partial"
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, output_dir / MANIFEST)


def pending(prompts: list[str], output_dir: pathlib.Path, manifest: dict) -> list[int]:
    """Indices still to generate; finished mp4 files missing from the manifest are recorded now."""
    todo = []
    for i, prompt in enumerate(prompts):
        name = f"{i:03d}.mp4"
        if (output_dir / name).is_file():
            manifest["videos"].setdefault(name, {"index": i, "prompt": prompt, "timings": None})
        else:
            todo.append(i)
    return todo


@dataclasses.dataclass
class EvalPlan:
    """A checked eval run: the job over all prompts, the manifest so far, the indices still to do."""

    job: generate.Job
    output_dir: pathlib.Path
    manifest: dict
    todo: list[int]
    batch_size: int


def plan_eval(config: ml_collections.ConfigDict, prompts: list[str], output_dir, *, batch_size: int = 1
              ) -> EvalPlan:
    """Check everything (config, prompts, folder, settings of earlier runs) without building a model."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    output_dir = pathlib.Path(output_dir)
    job = generate.resolve(config, prompts=prompts,
                           outputs=[output_dir / f"{i:03d}.mp4" for i in range(len(prompts))])
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(output_dir, settings_record(config))
    todo = pending(job.prompts, output_dir, manifest)
    write_manifest(output_dir, manifest)
    return EvalPlan(job, output_dir, manifest, todo, batch_size)


def execute(config: ml_collections.ConfigDict, plan: EvalPlan, pipe: TextToVideo | None = None) -> dict:
    """Generate the missing videos of `plan`; returns the manifest. `pipe`: an already built
    pipeline (else one is built from `config`, only if there is work).

    With `config.release_text_encoders` every pending prompt is encoded first, then the text
    encoders are released (when built here: a given `pipe` keeps its own) and the DiT and VAE
    loaded; each video's "tokenize+encode" is the time its batch took in that first stage.
    """
    job, manifest = plan.job, plan.manifest
    print(f"{len(job.prompts) - len(plan.todo)} of {len(job.prompts)} videos already in {plan.output_dir}",
          flush=True)
    batches = [plan.todo[s:s + plan.batch_size] for s in range(0, len(plan.todo), plan.batch_size)]
    conds, encode_seconds = [None] * len(batches), [None] * len(batches)
    if batches and config.release_text_encoders:
        texts = [[job.prompts[i] for i in idx] for idx in batches]
        if pipe is None:
            memory = {}
            loader = generate.build_loader(config, job, generate.job_mesh(job))
            conds, encode_seconds, _ = generate.encode_stage(config, loader, texts, job.settings, memory)
            pipe = generate.build_pipeline(config, job, loader=loader, text_encoder=False)
            generate.note_memory(memory, "dit+vae loaded")
        elif pipe.encode_text is None:
            raise ValueError("the given pipeline holds no text encoder: the eval runner encodes the prompts "
                             "with the pipeline's encode_text")
        else:
            conds, encode_seconds = generate.encode_batches(config, pipe.encode_text, texts, job.settings,
                                                            pipe.mesh)
    elif batches and pipe is None:
        pipe = generate.build_pipeline(config, job)
    for n, (idx, cond, seconds) in enumerate(zip(batches, conds, encode_seconds)):
        batch = dataclasses.replace(job, prompts=[job.prompts[i] for i in idx], seeds=[job.seeds[i] for i in idx],
                                    outputs=[job.outputs[i] for i in idx])
        done = min((n + 1) * plan.batch_size, len(plan.todo))
        print(f"[{done}/{len(plan.todo)}] " + " | ".join(batch.prompts), flush=True)
        summary = generate.generate(config, batch, pipe, cond=cond)
        timings = summary["timings"] if cond is None else {"tokenize+encode": seconds, **summary["timings"]}
        for i, prompt, seed, path in zip(idx, batch.prompts, batch.seeds, batch.outputs):
            manifest["videos"][path.name] = {
                "index": i, "prompt": prompt, "seed": seed, "file": path.name, "batch": len(idx),
                "timings": timings, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_manifest(plan.output_dir, manifest)
    return manifest


def run_eval(config: ml_collections.ConfigDict, prompts: list[str], output_dir, *, batch_size: int = 1,
             pipe: TextToVideo | None = None) -> dict:
    """`plan_eval` then `execute`: every missing video of `prompts` into `output_dir`."""
    return execute(config, plan_eval(config, prompts, output_dir, batch_size=batch_size), pipe)


def main(argv=None):
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", str(generate.DEFAULT_CONFIG), "generation config file")
    flags.DEFINE_string("output_dir", "outputs/step_video_t2v_eval", "folder of mp4 files and manifest.json")
    flags.DEFINE_string("prompts_file", str(EVAL_PROMPTS), "prompt list, one per line")
    flags.DEFINE_integer("limit", 0, "only the first N prompts (0: all)")
    flags.DEFINE_integer("batch_size", 1, "prompts per pipeline call")

    def _main(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments {args[1:]}")
        f = flags.FLAGS
        try:
            prompts = read_prompts(f.prompts_file)
            if f.limit < 0:
                raise ValueError(f"--limit must be >= 0, got {f.limit}")
            plan = plan_eval(config_flag.value, prompts[:f.limit] if f.limit else prompts, f.output_dir,
                             batch_size=f.batch_size)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            manifest = execute(config_flag.value, plan)
        except CheckpointError as e:  # weights that do not match their config; other errors keep a traceback
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{len(manifest['videos'])} videos in {f.output_dir}")
        return 0

    app.run(_main, argv=config_files.resolve_argv(argv))


if __name__ == "__main__":
    main()
