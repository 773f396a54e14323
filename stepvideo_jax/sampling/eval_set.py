"""An eval set into a folder of mp4 files + a JSON manifest, resumable: Step-Video-T2V-Eval (the
128-prompt benchmark list) or Step-Video-TI2V-Eval. The command line is
`python -m stepvideo_jax.generate_eval`; each batch is one `sampling/generation.py` job.

Prompt i (0-based line of the list, shipped in the package) is written to `<output_dir>/<i:03d>.mp4`
with seed `config.seed + i`, so a video does not depend on batching or on where a run resumed.
`manifest.json` binds the folder to its job (the settings that change the videos, and the sha256 of
the prompt list) and records, per video, the prompt, seed, file and time per phase. Re-running
skips the videos already written, each checked first (it decodes to the expected frames; a damaged
one is regenerated); an interrupted run leaves no half-written mp4 (each is encoded to a temporary
name and renamed; stale temporary files are removed on start) and the manifest is replaced
atomically after each batch. A folder of another job (other prompts, seed or settings), or videos
without a manifest (unknown provenance), are refused rather than mixed or adopted: use another
`--output_dir`, or `--overwrite` to delete this runner's files there and start over.

Step-Video-TI2V-Eval (`--ti2v_eval_dir`, with a TI2V config such as configs/generate/ti2v.py): the
benchmark folder `<set>/<category>/<NNN>.png` + `<NNN>.txt` (sets `ti2v_eval_ani`, `ti2v_eval_real`;
`--ti2v_sets` picks them); item i of the sorted (set, category, NNN) list is the prompt of the .txt with
the .png as first frame, written to `<i:03d>.mp4`; the manifest names its `source` (`set/category/NNN`)
and binds the folder to the images' sha256 as well as the prompts'.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
import time

import ml_collections
from etils import epath

from stepvideo_jax import paths
from stepvideo_jax.sampling import generation, video_io
from stepvideo_jax.sampling.pipeline import TextToVideo, frame_shape

EVAL_PROMPTS = pathlib.Path(__file__).resolve().parents[1] / "assets" / "step_video_t2v_eval_prompts.txt"
MANIFEST = "manifest.json"
OUTPUT_NAME = re.compile(r"\d{3,}\.(mp4|npy)")   # the videos (and latents) this runner writes
PARTIAL_NAME = re.compile(r"\..+\.partial(\.mp4)?")   # temporary files of its atomic writes
# config fields that change the videos: a folder is only resumed with the same values
SETTINGS_FIELDS = ("seed", "num_frames", "height", "width", "num_steps", "guidance_scale", "time_shift",
                   "pos_magic", "neg_magic", "checkpoint_dir", "dtypes", "tiny", "bf16_mask_sum",
                   "crop_540p", "denoise_filter", "motion_score")
TI2V_SETS = ("ti2v_eval_ani", "ti2v_eval_real")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclasses.dataclass(frozen=True)
class EvalItems:
    """A benchmark as lists aligned by index: prompts, first-frame image files (None: T2V), sources."""

    prompts: list[str]
    images: list[pathlib.Path] | None = None
    sources: list[str] | None = None


def read_ti2v_eval(root, sets=TI2V_SETS) -> EvalItems:
    """Step-Video-TI2V-Eval: `<root>/<set>/<category>/<NNN>.<png|jpg...>` + `<NNN>.txt` (the prompt), in
    sorted (set, category, NNN) order; ValueError for an unknown set, an empty set, an image without
    its prompt file, a prompt file without its image, or an empty prompt."""
    root = pathlib.Path(root)
    unknown = sorted(set(sets) - set(TI2V_SETS))
    if unknown or not sets:
        raise ValueError(f"unknown TI2V-Eval sets {unknown or list(sets)}; choose from {list(TI2V_SETS)}")
    if not root.is_dir():
        raise ValueError(f"TI2V-Eval folder {root} not found (expected {', '.join(s + '/' for s in TI2V_SETS)})")
    items = EvalItems([], [], [])
    for name in sets:
        folder = root / name
        if not folder.is_dir():
            raise ValueError(f"TI2V-Eval folder {root} has no {name}/ (expected <set>/<category>/<NNN>.png + .txt)")
        found = 0
        for category in sorted(p for p in folder.iterdir() if p.is_dir()):
            stems = {}
            for f in category.iterdir():
                if f.is_file() and (f.suffix.lower() in IMAGE_SUFFIXES or f.suffix == ".txt"):
                    stems.setdefault(f.stem, {})["txt" if f.suffix == ".txt" else "image"] = f
            for stem in sorted(stems):
                pair = stems[stem]
                if set(pair) != {"txt", "image"}:
                    have = next(iter(pair.values()))
                    raise ValueError(f"{have}: no matching {'image' if 'txt' in pair else '.txt prompt'} "
                                     f"{category / stem}.* (each item is an image and a .txt of the same name)")
                prompt = pair["txt"].read_text(encoding="utf-8").strip()
                if not prompt:
                    raise ValueError(f"{pair['txt']}: empty prompt")
                items.prompts.append(prompt)
                items.images.append(pair["image"])
                items.sources.append(f"{name}/{category.name}/{stem}")
                found += 1
        if not found:
            raise ValueError(f"{folder} holds no <category>/<NNN>.png + <NNN>.txt items")
    return items


def read_prompts(path=EVAL_PROMPTS) -> list[str]:
    """One prompt per non-empty line."""
    path = paths.as_path(path)
    if not path.is_file():
        raise ValueError(f"prompt list {path} not found")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt list {path} has no prompts")
    return prompts


def prompts_digest(prompts: list[str]) -> str:
    """sha256 of the prompt list (as read: stripped, non-empty lines, in order)."""
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest()


def settings_record(config: ml_collections.ConfigDict, prompts: list[str], images=None) -> dict:
    """The job of a folder: the config fields that shape the videos, as they read back from JSON
    (tuples become lists), and the prompt list's digest and length (+ TI2V: the images' digest). An
    unset field (None: `tiny` of a checkpoint config, `motion_score` of a text-to-video one) is left
    out, so the record reads as before the field existed; so is `weights` when "bf16" (unquantised),
    `cfg_schedule` when "constant" and `dit_from` when ""."""
    record = {k: (config[k].to_dict() if isinstance(config[k], ml_collections.ConfigDict) else config[k])
              for k in SETTINGS_FIELDS if config[k] is not None}
    for k, default in (("weights", "bf16"), ("cfg_schedule", "constant"), ("dit_from", "")):
        if config[k] != default:
            record[k] = config[k]
    record.update(prompts_sha256=prompts_digest(prompts), num_prompts=len(prompts))
    if images is not None:
        record["images_sha256"] = hashlib.sha256(b"".join(
            hashlib.sha256(pathlib.Path(p).read_bytes()).digest() for p in images)).hexdigest()
    return json.loads(json.dumps(record))


def remove_stale_partials(output_dir) -> list[str]:
    """Delete the temporary files an interrupted run left (`.<name>.partial[.mp4]`); returns their
    names (process 0 only: the others return [])."""
    if not paths.writes_shared_files():
        return []
    stale = sorted(p.name for p in output_dir.iterdir() if PARTIAL_NAME.fullmatch(p.name) and p.is_file())
    for name in stale:
        (output_dir / name).unlink()
    return stale


def _way_out(output_dir: pathlib.Path) -> str:
    return (f"use another --output_dir, or --overwrite to delete this runner's files in {output_dir} "
            f"(NNN.mp4, NNN.npy, {MANIFEST}) and start over")


def load_manifest(output_dir, settings: dict, *, overwrite: bool = False) -> dict:
    """The folder's manifest, checked to be of this job (`settings`); a new one for an empty folder.

    `overwrite`: delete this runner's files (NNN.mp4, NNN.npy, the manifest) first; other files stay.
    """
    path = output_dir / MANIFEST
    outputs = sorted(p.name for p in output_dir.iterdir() if OUTPUT_NAME.fullmatch(p.name) and p.is_file())
    if overwrite:
        for name in outputs + ([MANIFEST] if path.is_file() else []):
            if paths.writes_shared_files():
                (output_dir / name).unlink()
        return {"settings": settings, "videos": {}}
    if not path.is_file():
        if outputs:
            shown = ", ".join(outputs[:3]) + (", ..." if len(outputs) > 3 else "")
            raise ValueError(f"{output_dir} holds {len(outputs)} video file(s) ({shown}) but no {MANIFEST}: their "
                             f"prompts and settings are unknown, so they are not reused; {_way_out(output_dir)}")
        return {"settings": settings, "videos": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("videos"), dict):
            raise ValueError("not a manifest of this runner")
    except ValueError as e:
        raise ValueError(f"{path} is unreadable ({e}); {_way_out(output_dir)}") from None
    old = manifest.get("settings") or {}
    if settings != old:
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        names = ["prompts (another prompt list)" if k == "prompts_sha256" else k for k in changed]
        raise ValueError(f"{output_dir} holds videos of another job, made with other settings (changed: "
                         f"{', '.join(names)}); {_way_out(output_dir)}")
    return manifest


def write_manifest(output_dir, manifest: dict) -> None:
    """Atomically replace the manifest (process 0 only; a failed write leaves the old one)."""
    if paths.writes_shared_files():
        paths.write_text(output_dir / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


def pending(job: generation.Job, indices: range, output_dir, manifest: dict,
            expected: tuple[int, int, int], sources: list[str] | None = None) -> list[int]:
    """Indices of `indices` still to generation. An existing mp4 counts as done only if it decodes to
    `expected` (frames, height, width): a damaged one is regenerated (its record dropped), a
    complete one missing from the manifest (a run stopped between the rename and the manifest
    write) is recorded now."""
    todo = []
    for i in indices:
        name = f"{i:03d}.mp4"
        path = output_dir / name
        problem = "missing"
        if path.is_file():
            try:
                info = video_io.inspect_mp4(path)
                found = (info.frames, info.height, info.width)
                problem = None if found == expected else (
                    f"{found[0]} frames of {found[1]} x {found[2]}, expected {expected[0]} of "
                    f"{expected[1]} x {expected[2]}")
            except video_io.VideoFileError as e:
                problem = str(e)
        if problem is None:
            manifest["videos"].setdefault(name, {"index": i, "prompt": job.prompts[i], "seed": job.seeds[i],
                                                 "file": name, "timings": None,
                                                 **({"source": sources[i]} if sources else {})})
            continue
        if path.is_file():
            print(f"{name} is damaged ({problem}): regenerating it", flush=True)
        manifest["videos"].pop(name, None)
        todo.append(i)
    return todo


@dataclasses.dataclass
class EvalPlan:
    """A checked eval run: the job over all prompts, the manifest so far, the indices still to do."""

    job: generation.Job
    output_dir: epath.Path
    manifest: dict
    todo: list[int]
    batch_size: int
    scope: int   # prompts 0 .. scope-1 are this run's (all, or the first `limit`)
    sources: list[str] | None = None   # TI2V-Eval: `set/category/NNN` per index


def plan_eval(config: ml_collections.ConfigDict, prompts: list[str] | EvalItems, output_dir, *, batch_size: int = 1,
              limit: int = 0, overwrite: bool = False) -> EvalPlan:
    """Check everything (config, prompts, folder, job of earlier runs, the videos already there)
    without building a model. The job is the whole prompt list; `limit` > 0 only generates its
    first `limit` prompts (a later run of the same list continues). `overwrite`: see `load_manifest`.
    `prompts`: a list, or `EvalItems` (TI2V: with their first-frame images, read and checked here)."""
    items = prompts if isinstance(prompts, EvalItems) else EvalItems(list(prompts))
    prompts = items.prompts
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit < 0:
        raise ValueError(f"limit must be >= 0 (0: all prompts), got {limit}")
    output_dir = paths.as_path(output_dir)
    job = generation.resolve(config, prompts=prompts,
                           outputs=[output_dir / f"{i:03d}.mp4" for i in range(len(prompts))], images=items.images)
    output_dir.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_partials(output_dir)
    if stale:
        print(f"removed {len(stale)} temporary file(s) of an interrupted run: {', '.join(stale)}", flush=True)
    image_files = items.images or ([config.image] * len(prompts) if config.image else None)
    manifest = load_manifest(output_dir, settings_record(config, job.prompts, image_files), overwrite=overwrite)
    scope = range(min(limit, len(job.prompts)) if limit else len(job.prompts))
    todo = pending(job, scope, output_dir, manifest, frame_shape(job.size, config.crop_540p), items.sources)
    write_manifest(output_dir, manifest)
    return EvalPlan(job, output_dir, manifest, todo, batch_size, len(scope), items.sources)


def execute(config: ml_collections.ConfigDict, plan: EvalPlan, pipe: TextToVideo | None = None) -> dict:
    """Generate the missing videos of `plan`; returns the manifest. `pipe`: an already built
    pipeline (else one is built from `config`, only if there is work).

    With `config.release_text_encoders` every pending prompt is encoded first, then the text
    encoders are released (when built here: a given `pipe` keeps its own) and the DiT and VAE
    loaded; each video's "tokenize+encode" is the time its batch took in that first stage.
    """
    job, manifest = plan.job, plan.manifest
    print(f"{plan.scope - len(plan.todo)} of {plan.scope} videos already in {plan.output_dir}", flush=True)
    batches = [plan.todo[s:s + plan.batch_size] for s in range(0, len(plan.todo), plan.batch_size)]
    conds, encode_seconds = [None] * len(batches), [None] * len(batches)
    if batches and pipe is None:
        generation.report_long_prompts(config, job.models, [job.prompts[i] for i in plan.todo], job.settings)
    if batches and config.release_text_encoders:
        texts = [[job.prompts[i] for i in idx] for idx in batches]
        if pipe is None:
            memory = {}
            conds, encode_seconds, _ = generation.encode_stage(config, job.models, texts, job.settings, memory)
            pipe = generation.build_pipeline(config, job, text_encoder=False)
            generation.note_memory(memory, "dit+vae loaded")
        elif pipe.encode_text is None:
            raise ValueError("the given pipeline holds no text encoder: the eval runner encodes the prompts "
                             "with the pipeline's encode_text")
        else:
            conds, encode_seconds = generation.encode_batches(config, pipe.encode_text, texts, job.settings,
                                                            pipe.mesh)
    elif batches and pipe is None:
        pipe = generation.build_pipeline(config, job)
    for n, (idx, cond, seconds) in enumerate(zip(batches, conds, encode_seconds)):
        batch = dataclasses.replace(job, prompts=[job.prompts[i] for i in idx], seeds=[job.seeds[i] for i in idx],
                                    outputs=[job.outputs[i] for i in idx],
                                    images=None if job.images is None else [job.images[i] for i in idx])
        done = min((n + 1) * plan.batch_size, len(plan.todo))
        print(f"[{done}/{len(plan.todo)}] " + " | ".join(batch.prompts), flush=True)
        summary = generation.generate(config, batch, pipe, cond=cond)
        timings = summary["timings"] if cond is None else {"tokenize+encode": seconds, **summary["timings"]}
        for i, prompt, seed, path in zip(idx, batch.prompts, batch.seeds, batch.outputs):
            manifest["videos"][path.name] = {
                "index": i, "prompt": prompt, "seed": seed, "file": path.name, "batch": len(idx),
                "timings": timings, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **({"source": plan.sources[i]} if plan.sources else {})}
        write_manifest(plan.output_dir, manifest)
    return manifest


def run_eval(config: ml_collections.ConfigDict, prompts: list[str] | EvalItems, output_dir, *, batch_size: int = 1,
             pipe: TextToVideo | None = None, limit: int = 0, overwrite: bool = False) -> dict:
    """`plan_eval` then `execute`: every missing video of `prompts` (or of its first `limit`) into
    `output_dir`."""
    plan = plan_eval(config, prompts, output_dir, batch_size=batch_size, limit=limit, overwrite=overwrite)
    return execute(config, plan, pipe)
