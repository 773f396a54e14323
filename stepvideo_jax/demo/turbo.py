r"""The reflow-distilled demo (Turbo) measured against its teacher: prompt following, reflow loss,
trajectory straightness.

    python -m stepvideo_jax.demo.turbo --student /tmp/demo_student --pairs /tmp/reflow_pairs \
        --seeds 1000,1001,1002 --out turbo_table.json

Every row of the table generates the held-out scenes (`synthetic_motion.HELD_OUT`) x EN/ZH captions
x `--seeds` with one DiT (the teacher: the shipped demo; the student: any DiT source of
`checkpoints.load_dit`) and one sampler setting, and scores each video with the held-out checker
(`eval/motion_checker.py`): colour and motion right, motion right, and colour, shape and motion
right. Per row and seed: the three accuracies (48 videos per seed, one video = 2.1 points), and the
PSNR of its videos against the first row's (the teacher's 20 steps) of the same prompts and seeds:
agreement with the teacher, which the checker's coarse reading does not see. Besides:
- reflow loss: `train_step.heldout_loss` on the first `--loss_pairs` pairs of `--pairs` with
  fixed t ~ U(0, 1) (the training loop's held-out set, `training.reflow.make_reflow_heldout`);
- straightness: along a sample (the guided velocities an Euler sampler follows), the mean cosine
  between consecutive velocity predictions, over the held-out prompts of the first seed; 1 for a
  straight trajectory. Measured on one 20-step grid (shift 1) for both DiTs, each at its own
  guidance (the teacher CFG 4, the student without), and on each row's own schedule.
"""
from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from stepvideo_jax import checkpoints, logs, paths
from stepvideo_jax.data import reflow as reflow_data
from stepvideo_jax.data import synthetic_motion as sm
from stepvideo_jax.demo import evaluate
from stepvideo_jax.demo.build import DEFAULT_EXPORT
from stepvideo_jax.demo.export import write_checkpoint
from stepvideo_jax.eval import motion_checker
from stepvideo_jax.sampling import components
from stepvideo_jax.sampling.flow_matching import SamplerSettings
from stepvideo_jax.sampling.pipeline import TextToVideo, VideoSize, initial_noise
from stepvideo_jax.training.reflow import make_reflow_heldout
from stepvideo_jax.training.train_step import heldout_loss

DEMO_VIDEO = (17, 32, 32)   # frames, height, width: the demo's training size
# (name, DiT, steps, CFG, shift, cfg schedule): the teacher's own setting first
# (the best shifts of the few-step teacher and the student's settings were chosen on seed 2000,
# outside the evaluation seeds: docs/turbo.md)
DEFAULT_ROWS = (("teacher", "teacher", 20, 4.0, 3.0, "constant"),
                ("teacher", "teacher", 4, 4.0, 3.0, "constant"),
                ("teacher, best shift", "teacher", 4, 4.0, 1.0, "constant"),
                ("teacher", "teacher", 2, 4.0, 3.0, "constant"),
                ("teacher, best shift", "teacher", 2, 4.0, 0.5, "constant"),
                ("student", "student", 4, 1.0, 1.0, "constant"),
                ("student", "student", 2, 1.0, 1.0, "constant"),
                ("student", "student", 1, 1.0, 1.0, "constant"),
                ("teacher, no CFG", "teacher", 4, 1.0, 1.0, "constant"),
                ("teacher, no CFG", "teacher", 2, 1.0, 1.0, "constant"))


def demo_size(pipe: TextToVideo) -> VideoSize:
    return VideoSize(*DEMO_VIDEO, spatial_factor=pipe.spatial_factor)


def pipeline(models, dit) -> TextToVideo:
    return components.text_to_video(models.text, dit, models.vae, stream_frames=32)


def psnr(videos: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """PSNR (dB) of uint8 `videos` against `reference`, over all their pixels."""
    a = np.stack(videos).astype(np.float64)
    b = np.stack(reference).astype(np.float64)
    return float(10 * np.log10(255.0 ** 2 / np.mean((a - b) ** 2)))


def score_row(pipe: TextToVideo, settings: SamplerSettings, seeds: Sequence[int], *, batch: int = 48,
              reference: dict | None = None) -> tuple[dict, dict]:
    """Per seed: {"seed", "accuracy" (colour and motion), "motion_accuracy", "accuracy_with_shape"
    (colour, shape and motion)} over the held-out scenes x EN/ZH, and with `reference` (seed -> the
    videos of another row, e.g. the teacher's 20 steps) "psnr_to_reference" (agreement with it). Returns (the row, seed -> its videos)."""
    out, videos = [], {}
    for seed in seeds:
        result = evaluate.evaluate(pipe, sm.HELD_OUT, size=demo_size(pipe), settings=settings, seeds=(seed,), batch=batch)
        motion = [r["motion"] == sm.parse_caption(r["caption"]).motion for r in result["results"]]
        videos[seed] = result["videos"]
        out.append({"seed": seed, "accuracy": result["accuracy"], "motion_accuracy": float(np.mean(motion)),
                    "accuracy_with_shape": result["accuracy_with_shape"], "videos": len(result["results"])})
        if reference is not None:
            out[-1]["psnr_to_reference"] = psnr(result["videos"], reference[seed])
    row = {"per_seed": out, **{k: float(np.mean([r[k] for r in out])) for k in out[0] if k not in ("seed", "videos")}}
    return row, videos


def straightness(pipe: TextToVideo, settings: SamplerSettings, prompts: Sequence[str], seed: int) -> float:
    """Mean cosine between consecutive guided velocities along the samples of `prompts` (one seed
    each: `seed + i`). An Euler step moves the latents by velocity x dt with dt > 0, so consecutive
    latent differences have the velocities' cosines."""
    seeds = [seed + i for i in range(len(prompts))]
    shape = demo_size(pipe).latent_shape(len(prompts), pipe.latent_channels)
    states = [np.asarray(initial_noise(seeds, shape))]
    pipe(list(prompts), size=demo_size(pipe), settings=settings, seeds=seeds, pos_magic="", neg_magic="", crop=False,
         on_step=lambda i, x: states.append(np.array(x)))
    deltas = np.diff(np.stack(states), axis=0).reshape(len(states) - 1, len(prompts), -1)
    a, b = deltas[:-1], deltas[1:]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(cos.mean())


def straightness_on_grid(pipes: dict, rows, prompts: Sequence[str], seed: int, steps: int = 20) -> dict:
    """`straightness` of each DiT of `pipes` on one fine grid (`steps` Euler steps, shift 1), each
    at the CFG scale and schedule of its first row in `rows` (the teacher guided, the student as it
    samples)."""
    out = {}
    for _, which, _, cfg, _, schedule in rows:
        if which in pipes and which not in out:
            out[which] = straightness(pipes[which], SamplerSettings(steps, cfg, 1.0, schedule), prompts, seed)
    return out


def reflow_loss(dit: nnx.Module, pairs: reflow_data.ReflowDataset, size: int, seed: int = 1) -> float:
    """`heldout_loss` on the first `size` pairs with t ~ U(0, 1) from `seed` (`make_reflow_heldout`)."""
    held = make_reflow_heldout(pairs, size, seed)
    graphdef, params = nnx.split(dit)
    return float(jax.jit(lambda p, h: heldout_loss(graphdef, p, h, backend="xla"))(params, held))


def recorded_path(path) -> str:
    """`path` as a record names it: relative to the checkout for the package's own assets (the
    shipped demo, the shipped student), so a record does not carry the building machine's folders."""
    resolved = pathlib.Path(path).resolve()
    root = pathlib.Path(__file__).resolve().parents[2]
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root / "stepvideo_jax") else str(path)


def table(teacher_dir, student, *, seeds: Sequence[int], pairs=None, loss_pairs: int = 64,
          rows=DEFAULT_ROWS, measure_straightness: bool = True, printer=print) -> dict:
    """The measurements of the module docstring as a JSON-able dict."""
    models = checkpoints.loader(teacher_dir, dit_dtype=jnp.float32, vae_dtype=jnp.float32, llm_dtype=jnp.float32,
                                clip_dtype=jnp.float32).models()
    dits = {"teacher": models.dit,
            "student": checkpoints.load_dit(student, dtype=jnp.float32, param_dtype=jnp.float32)}
    if dits["student"].cfg != models.dit.cfg:
        raise ValueError(f"the student {student} is not the teacher's architecture")
    pipes = {k: pipeline(models, d) for k, d in dits.items()}
    out = {"teacher": recorded_path(teacher_dir), "student": recorded_path(student), "seeds": list(seeds), "rows": [],
           "chance": motion_checker.CHANCE}
    prompts = [s.caption(lang) for s in sm.HELD_OUT for lang in evaluate.LANGUAGES]
    if pairs is not None:
        ds = reflow_data.ReflowDataset(pairs)
        out["reflow_loss"] = {k: reflow_loss(d, ds, loss_pairs) for k, d in dits.items()}
        out["reflow_loss_pairs"] = min(loss_pairs, len(ds))
        printer(f"reflow loss (first {out['reflow_loss_pairs']} pairs, t ~ U(0, 1)): {out['reflow_loss']}")
    if measure_straightness:
        out["straightness_20_steps"] = straightness_on_grid(pipes, rows, prompts, seeds[0])
        printer(f"straightness, 20 steps at shift 1, each DiT at its first row's CFG: {out['straightness_20_steps']}")
    reference = None
    for name, which, steps, cfg, shift, schedule in rows:
        settings = SamplerSettings(steps, cfg, shift, schedule)
        start = time.perf_counter()
        scores, videos = score_row(pipes[which], settings, seeds, reference=reference)
        reference = reference or videos    # the first row's videos: the reference of the others
        row = {"name": name, "dit": which, "steps": steps, "guidance_scale": cfg, "time_shift": shift,
               "cfg_schedule": schedule, **scores}
        if measure_straightness and steps > 2:
            row["straightness"] = straightness(pipes[which], settings, prompts, seeds[0])
        row["seconds"] = time.perf_counter() - start
        out["rows"].append(row)
        printer(f"{name} {steps} steps CFG {cfg} ({schedule}) shift {shift}: colour+motion "
                f"{100 * row['accuracy']:.1f} %, motion {100 * row['motion_accuracy']:.1f} % "
                f"with shape {100 * row['accuracy_with_shape']:.1f} % "
                f"PSNR to row 1 {row.get('psnr_to_reference', float('inf')):.2f} dB "
                f"(per seed {[round(100 * r['accuracy'], 1) for r in row['per_seed']]}) in {row['seconds']:.0f} s")
    return out


def export_student(source, out, *, dtype: str = "bfloat16") -> pathlib.Path:
    """The student DiT of `source` (a training workdir, ...) as a converted checkpoint of its
    transformer alone (`configs/generate/demo_turbo.py` loads it with `dit_from`)."""
    dit = checkpoints.load_dit(source, dtype=jnp.float32, param_dtype=jnp.float32)
    return write_checkpoint(pathlib.Path(out).absolute(), {"transformer": dit}, dtype=dtype,
                            source="stepvideo_jax.demo.turbo")


def parse_rows(text: str):
    """"dit:steps:cfg:shift[:schedule],..." -> rows (name = dit)."""
    rows = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) not in (4, 5) or parts[0] not in ("teacher", "student"):
            raise ValueError(f"row {item!r}: expected teacher|student:steps:cfg:shift[:constant|decaying]")
        rows.append((parts[0], parts[0], int(parts[1]), float(parts[2]), float(parts[3]),
                     parts[4] if len(parts) == 5 else "constant"))
    return tuple(rows)


def main(argv=None):
    flags.DEFINE_string("teacher", str(DEFAULT_EXPORT), "the teacher's converted checkpoint (all four components)")
    flags.DEFINE_string("student", None, "the student DiT: a training workdir, converted checkpoint, ...")
    flags.DEFINE_string("pairs", None, "reflow pairs for the reflow loss (optional)")
    flags.DEFINE_integer("loss_pairs", 64, "pairs of the reflow loss")
    flags.DEFINE_string("seeds", "1000,1001,1002", "evaluation seeds")
    flags.DEFINE_string("rows", "", "dit:steps:cfg:shift[:schedule],... (default: the issue's table)")
    flags.DEFINE_bool("straightness", True, "measure trajectory straightness")
    flags.DEFINE_string("export_to", "", "first write the student as a converted transformer checkpoint here "
                        "(bf16) and measure that")
    flags.DEFINE_string("out", None, "JSON output")
    flags.mark_flags_as_required(["student", "out"])

    def _main(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments {args[1:]}")
        f = flags.FLAGS
        logs.quiet_unless_asked()
        try:
            rows = parse_rows(f.rows) if f.rows else DEFAULT_ROWS
            seeds = [int(s) for s in f.seeds.split(",")]
            student = f.student
            if f.export_to:
                student = str(export_student(f.student, f.export_to))
                print(f"student exported to {student}")
            result = table(f.teacher, student, seeds=seeds, pairs=f.pairs, loss_pairs=f.loss_pairs, rows=rows,
                           measure_straightness=f.straightness)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        path = paths.write_text(f.out, json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
        return 0

    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
