r"""The teacher job that writes reflow pairs (`data/reflow.py`, "stepvideo-reflow-v1").

    python -m stepvideo_jax.data.reflow_job --config configs/generate/demo.py \
        --prompts_file prompts.txt --seeds_per_prompt 16 --seed 100000 --out /data/reflow

The teacher is any generation config (`configs/generate/*.py`: checkpoint, steps, CFG, shift, CFG
schedule, magic prompts, dtypes, weights, mesh; its models come from `sampling.generation.build_loader`,
as the main job's); it runs as the main job does: the text encoders encode every
needed prompt (with pos_magic) and neg_magic and are released, then the DiT loads (on `config.mesh`
when set, a converted checkpoint restored straight into its rule shardings, as `generate_eval`) and
denoises `batch_size` pairs at a time from the seeds' initial noises (the last batch padded: one
compiled shape). Each pair file is written to a temporary name and renamed, so an interrupted job
resumes at the first missing pair; `index.jsonl` and `meta.json` are written when every pair
exists. `teacher.json` binds the folder to its job: rerunning with other settings is refused before
any model loads. On several hosts every process runs the same command; process 0 writes the files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import pathlib
import sys
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from stepvideo_jax import checkpoints, compile_cache, config_files, logs, paths
from stepvideo_jax.data.format import COND_KEYS, DatasetError
from stepvideo_jax.parallel.mesh import initialize_distributed
from stepvideo_jax.sampling import generation
from stepvideo_jax.sampling.flow_matching import FlowMatchSampler, SamplerSettings
from stepvideo_jax.sampling.pipeline import (VideoSize, caption_prompts, check_prompts, dit_velocity_fn,
                                             initial_noise)
from stepvideo_jax.data.reflow import FORMAT, MAX_SEED, NOISE, PAIR_KEYS, TEACHER, ReflowDataset, check_pair, pair_name

# generation config fields that shape the teacher's latents (teacher.json)
TEACHER_FIELDS = ("checkpoint_dir", "dit_from", "num_frames", "height", "width", "num_steps", "guidance_scale",
                  "time_shift", "cfg_schedule", "pos_magic", "neg_magic", "dtypes", "weights", "bf16_mask_sum", "tiny")
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}   # of the stored text conditioning


def _writes() -> bool:
    return paths.writes_shared_files()


def _atomic_savez(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_text(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def job_record(config, prompts: Sequence[str], *, seeds_per_prompt: int, seed: int, dtype: str) -> dict:
    """The job of a folder, as it reads back from JSON (what `teacher.json` holds)."""
    teacher = {}
    for k in TEACHER_FIELDS:
        v = config[k]
        if v is not None:
            teacher[k] = v.to_dict() if hasattr(v, "to_dict") else v
    digest = hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode("utf-8")).hexdigest()
    return json.loads(json.dumps({"format": FORMAT, "teacher": teacher, "prompts_sha256": digest,
                                  "num_prompts": len(prompts), "seeds_per_prompt": seeds_per_prompt,
                                  "seed": seed, "dtype": dtype}))


def plan(out, record: dict, num_pairs: int) -> list[int]:
    """Bind `out` to the job `record` (refusing another job's folder) and return the missing pairs."""
    out = pathlib.Path(out)
    path = out / TEACHER
    if path.is_file():
        old = json.loads(path.read_text())
        if old != record:
            changed = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
            if "teacher" in changed:
                ot, nt = old.get("teacher", {}), record["teacher"]
                changed += [f"teacher.{k}" for k in sorted(set(ot) | set(nt)) if ot.get(k) != nt.get(k)]
            raise ValueError(f"{out} holds reflow pairs of another job (changed: {', '.join(changed)}); use "
                             "another --out, or delete that folder to start over")
    elif (out / "pairs").is_dir() and any((out / "pairs").iterdir()):
        raise ValueError(f"{out}/pairs holds files but {out} has no {TEACHER}: their teacher is unknown; "
                         "use another --out")
    if _writes():
        (out / "pairs").mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            _atomic_text(path, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        for stale in (out / "pairs").glob(".*.partial"):
            stale.unlink()
    return [i for i in range(num_pairs) if not (out / pair_name(i)).is_file()]


def finish(out, prompts: Sequence[str], *, seeds_per_prompt: int, seed: int) -> ReflowDataset:
    """Write index.jsonl and meta.json once every pair exists (each pair checked); returns the dataset."""
    out = pathlib.Path(out)
    n = len(prompts) * seeds_per_prompt
    missing = [i for i in range(n) if not (out / pair_name(i)).is_file()]
    if missing:
        raise DatasetError(f"{out}: {len(missing)} of {n} pairs missing (first {pair_name(missing[0])}); rerun the job")
    with np.load(out / "negative.npz") as z:
        neg = {k: z[k] for k in COND_KEYS}
    with np.load(out / pair_name(0)) as z:
        c = int(z["z1"].shape[1])
    meta = {"format": FORMAT, "latent_channels": c,
            "caption_channels": [int(neg["y"].shape[-1]), int(neg["clip"].shape[-1])],
            "text_length": int(neg["y"].shape[0]), "clip_length": int(neg["clip"].shape[0]),
            "num_samples": n, "noise": NOISE}
    lines = []
    for i in range(n):
        with np.load(out / pair_name(i)) as z:
            pair = {k: z[k] for k in PAIR_KEYS}
        try:
            check_pair(pair, meta)
        except DatasetError as e:
            raise DatasetError(f"{out / pair_name(i)}: {e}; delete it and rerun the job") from None
        if int(pair["seed"]) != seed + i:
            raise DatasetError(f"{pair_name(i)} holds seed {int(pair['seed'])}, the job says {seed + i}")
        f, _, h, w = pair["z1"].shape
        lines.append(json.dumps({"file": pair_name(i), "frames": f, "height": h, "width": w,
                                 "caption": prompts[i // seeds_per_prompt], "seed": seed + i},
                                ensure_ascii=False))
    if _writes():
        _atomic_text(out / "index.jsonl", "\n".join(lines) + "\n")
        _atomic_text(out / "meta.json", json.dumps(meta, indent=1) + "\n")
    return ReflowDataset(out)


@dataclasses.dataclass(frozen=True)
class TeacherJob:
    """A checked teacher job: everything checkable before a weight loads. `models` has read the
    teacher's model configs (no weights), so `size` is checked in its VAE's spatial factor."""

    prompts: list[str]
    size: VideoSize
    settings: SamplerSettings
    dtypes: dict
    models: checkpoints.Loader


def check_job(config, prompts: Sequence[str], *, seeds_per_prompt: int, seed: int, batch_size: int,
              dtype: str) -> TeacherJob:
    """The job of `run_job` checked; every problem raises a ValueError naming the value and the
    valid choices."""
    prompts = check_prompts(list(prompts))
    if seeds_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"seeds_per_prompt ({seeds_per_prompt}) and batch_size ({batch_size}) must be >= 1")
    n = len(prompts) * seeds_per_prompt
    if seed < 0 or seed + n - 1 > MAX_SEED:
        raise ValueError(f"seeds {seed} .. {seed + n - 1} must lie in [0, {MAX_SEED}] (they travel as int32)")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(STORAGE_DTYPES)}")
    if config.ti2v:
        raise ValueError("reflow pairs are made by a text-to-video teacher; this config is TI2V (ti2v=True)")
    settings, dtypes, _, models = generation.check_models(config)
    size = VideoSize(config.num_frames, config.height, config.width, models.vae_cfg.spatial_factor)
    return TeacherJob(prompts=prompts, size=size, settings=settings, dtypes=dtypes, models=models)


def run_job(config, prompts: Sequence[str], out, *, seeds_per_prompt: int = 1, seed: int = 0, batch_size: int = 8,
            dtype: str = "float32", printer=print) -> ReflowDataset:
    """Write (or finish) the reflow pairs of `prompts` x `seeds_per_prompt` with the teacher of the
    generation `config` into `out` (see the module docstring); returns the dataset."""
    job = check_job(config, prompts, seeds_per_prompt=seeds_per_prompt, seed=seed, batch_size=batch_size,
                    dtype=dtype)
    prompts, settings, loader = job.prompts, job.settings, job.models
    n = len(prompts) * seeds_per_prompt
    record = job_record(config, prompts, seeds_per_prompt=seeds_per_prompt, seed=seed, dtype=dtype)
    out = pathlib.Path(out)
    todo = plan(out, record, n)
    printer(f"{n - len(todo)} of {n} reflow pairs already in {out}")
    if todo:
        mesh = loader.mesh
        in_mesh = (lambda: jax.set_mesh(mesh)) if mesh is not None else contextlib.nullcontext
        needed = sorted({i // seeds_per_prompt for i in todo})
        start = time.perf_counter()
        text = loader.text_encoder()
        rows = caption_prompts([prompts[p] for p in needed], pos_magic=config.pos_magic, neg_magic="", cfg=False)
        cast = STORAGE_DTYPES[dtype]
        with in_mesh():
            enc = {k: np.array(v) for k, v in text(rows + [config.neg_magic]).items()}
        by_prompt = {p: {k: enc[k][j] for k in COND_KEYS} for j, p in enumerate(needed)}
        negative = {k: enc[k][-1] for k in COND_KEYS}
        if _writes():
            _atomic_savez(out / "negative.npz", {k: v.astype(np.int32 if k == "y_mask" else cast)
                                                 for k, v in negative.items()})
        del text
        gc.collect()
        printer(f"encoded {len(needed)} prompts in {time.perf_counter() - start:.1f} s")
        dit = loader.dit()
        graphdef, state = nnx.split(dit)
        sampler = FlowMatchSampler(dit_velocity_fn(graphdef, backend=config.attention_backend or None),
                                   model_dtype=job.dtypes["dit"])
        row_shape = job.size.latent_shape(1, dit.cfg.in_channels)[1:]
        for s in range(0, len(todo), batch_size):
            part = todo[s:s + batch_size]
            idx = part + [part[-1]] * (batch_size - len(part))
            cond = {k: np.stack([by_prompt[i // seeds_per_prompt][k] for i in idx]) for k in COND_KEYS}
            if settings.cfg:
                cond = {k: np.concatenate([v, np.repeat(negative[k][None], len(idx), 0)]) for k, v in cond.items()}
            start = time.perf_counter()
            with in_mesh():
                noise = initial_noise([seed + i for i in idx], (len(idx), *row_shape))
                z1 = sampler.sample(state, noise, {k: jnp.asarray(v) for k, v in cond.items()}, settings)
                z1 = np.asarray(jax.device_get(z1))
            if _writes():
                for j, i in enumerate(part):
                    pair = {"z1": z1[j].astype(np.float32), "seed": np.int64(seed + i),
                            **{k: by_prompt[i // seeds_per_prompt][k].astype(np.int32 if k == "y_mask" else cast)
                               for k in COND_KEYS}}
                    _atomic_savez(out / pair_name(i), pair)
            printer(f"[{min(s + batch_size, len(todo))}/{len(todo)}] pairs {part[0]}..{part[-1]} "
                    f"({time.perf_counter() - start:.2f} s)")
    return finish(out, prompts, seeds_per_prompt=seeds_per_prompt, seed=seed)


def main(argv=None):
    config_flag = config_flags.DEFINE_config_file("config", str(config_files.path("generate/demo.py")),
                                                  "the teacher's generation config (configs/generate/*.py)")
    flags.DEFINE_string("prompts_file", None, "prompts, one per line")
    flags.DEFINE_string("out", None, "output folder (resumed when it holds pairs of the same job)")
    flags.DEFINE_integer("seeds_per_prompt", 1, "pairs per prompt (seeds seed + i for pair i)")
    flags.DEFINE_integer("seed", 0, "seed of pair 0")
    flags.DEFINE_integer("batch_size", 8, "pairs denoised at once")
    flags.DEFINE_string("dtype", "float32", "storage dtype of the text conditioning: float32 or float16")
    flags.mark_flags_as_required(["prompts_file", "out"])

    def _main(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments {args[1:]}")
        f = flags.FLAGS
        logs.quiet_unless_asked()
        initialize_distributed()
        compile_cache.setup(config_flag.value)
        try:
            path = pathlib.Path(f.prompts_file)
            if not path.is_file():
                raise ValueError(f"prompt list {path} not found")
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            ds = run_job(config_flag.value, prompts, f.out, seeds_per_prompt=f.seeds_per_prompt, seed=f.seed,
                         batch_size=f.batch_size, dtype=f.dtype)
        except (ValueError, DatasetError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{len(ds)} reflow pairs in {f.out}")
        return 0

    app.run(_main, argv=config_files.resolve_argv(argv))


if __name__ == "__main__":
    main()
