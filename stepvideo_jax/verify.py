"""Check a dataset or a training checkpoint completely, without training:

    python -m stepvideo_jax.verify --dataset /data/latents        # stepvideo-latents-v1 or -preferences-v1
    python -m stepvideo_jax.verify --checkpoint /runs/tiny        # a training workdir: every step
    python -m stepvideo_jax.verify --checkpoint /runs/tiny --step 400

Dataset: meta.json and every index.jsonl line parse; every sample file and negative.npz open, every
array is read in full (zip CRCs) with the shape the index and meta.json give, float16/float32
(y_mask int32) and finite values; with a `pairs.jsonl`, every pair names two samples of one
prompt and one bucket. Training starts with the cheap part of this (files present, headers agree).

Checkpoint: each step restores in full on the host (no mesh needed: one step at a time, so the
host needs the memory of one training state), its step counter equals its directory name, every
array is finite, the EMA has the params' structure, and params of a full fine-tune have the shapes
of the DiT in `dit_config.json` (LoRA checkpoints hold adapters only: their count is reported).

Prints one line per checked item; exit status 0 when everything holds, 1 otherwise.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from stepvideo_jax import checkpoints, paths
from stepvideo_jax.data import preferences
from stepvideo_jax.data.format import Dataset, DatasetError
from stepvideo_jax.models.dit import StepVideoDiT
from stepvideo_jax.training.checkpoint import short_reason


def verify_dataset(root) -> list[str]:
    """Problems of the dataset at `root` (empty: complete and consistent)."""
    root = paths.as_path(root)
    try:
        ds = Dataset(root)
        ds.check(arrays=True, limit=20)
        if (root / preferences.PAIRS_FILE).exists():
            pairs = preferences.PairDataset(root)
            for i in range(len(pairs)):
                pairs.load(i)
    except DatasetError as e:
        return [str(e)]
    return []


def _leaves_with_paths(tree) -> list[tuple[str, np.ndarray]]:
    return [(jax.tree_util.keystr(p), np.asarray(v)) for p, v in jax.tree_util.tree_leaves_with_path(tree)]


def _dit_shapes(workdir: epath.Path) -> Optional[dict[str, tuple]]:
    """Param shapes of the DiT of `dit_config.json`, keyed like a raw restore of `params`."""
    if not (workdir / checkpoints.WORKDIR_DIT_CONFIG).is_file():
        return None
    cfg = checkpoints.dit_config(checkpoints.DiTSource("workdir", workdir))
    abstract = nnx.eval_shape(lambda: StepVideoDiT(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    pure = nnx.state(abstract, nnx.Param).to_pure_dict()
    return {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(pure)}


def _strip_value(key: str) -> str:
    """A leaf path of a raw restore (`['blocks']['0']['k']['value']`) as a model's (`['blocks'][0]['k']`)."""
    key = re.sub(r"\['(\d+)'\]", r"[\1]", key)
    return key[: -len("['value']")] if key.endswith("['value']") else key


def verify_checkpoint_step(directory: epath.Path, step: int, dit_shapes: Optional[dict]) -> tuple[list[str], str]:
    """(problems, one-line summary) of checkpoint `step` under `directory` (`<workdir>/checkpoints`)."""
    mngr = ocp.CheckpointManager(directory)
    try:
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                         data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001  (whatever the corrupt files make Orbax raise)
        return [f"step {step}: does not restore ({short_reason(e)})"], ""
    finally:
        mngr.close()
    state, problems = out.state, []
    if int(np.asarray(state.get("step", -1))) != step:
        problems.append(f"step {step}: its step counter is {state.get('step')!r}")
    leaves = _leaves_with_paths(state)
    bad = [k for k, v in leaves if v.dtype.kind == "f" and not np.isfinite(v).all()]
    if bad:
        problems.append(f"step {step}: {len(bad)} array(s) hold NaN or inf, e.g. {bad[:3]}")
    params = {_strip_value(k): v.shape for k, v in _leaves_with_paths(state.get("params"))}
    if state.get("ema") is not None:
        ema = {_strip_value(k): v.shape for k, v in _leaves_with_paths(state["ema"])}
        if ema != params:
            problems.append(f"step {step}: the EMA's arrays differ from the params' in structure or shape")
    kind = "params"
    if dit_shapes is not None and set(params) == set(dit_shapes):
        wrong = [k for k in params if tuple(params[k]) != dit_shapes[k]]
        if wrong:
            problems.append(f"step {step}: params {wrong[:3]} do not have the shapes of dit_config.json's DiT")
        kind = "DiT params"
    elif dit_shapes is not None:
        kind = "adapter params (not the DiT's full set)"
    summary = (f"step {step}: ok ({len(leaves)} arrays, {len(params)} {kind}, EMA "
               f"{'yes' if state.get('ema') is not None else 'no'}, data position {dict(out.data or {})})")
    return problems, summary


def verify_checkpoint(path, step: Optional[int] = None, printer=print) -> list[str]:
    """Problems of a training workdir's checkpoints (every step, or only `step`)."""
    path = paths.absolute(path)
    workdir = path.parent if path.name == "checkpoints" else path
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return [f"{directory} not found: --checkpoint takes a training workdir (with checkpoints/)"]
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())
    if step is not None:
        if step not in steps:
            return [f"{directory}: no step {step}; complete steps: {steps}"]
        steps = [step]
    if not steps:
        return [f"{directory} holds no complete checkpoint step"]
    dit_shapes = _dit_shapes(workdir)
    problems = []
    for s in steps:
        p, summary = verify_checkpoint_step(directory, s, dit_shapes)
        problems += p
        if printer:
            printer("\n".join(p) if p else summary)
    return problems


def main(argv: Optional[Iterable[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--dataset", help="a stepvideo-latents-v1 / stepvideo-preferences-v1 directory")
    what.add_argument("--checkpoint", help="a training workdir (its checkpoints/ directory is checked)")
    ap.add_argument("--step", type=int, default=None, help="with --checkpoint: only this step")
    a = ap.parse_args(None if argv is None else list(argv))
    if a.dataset:
        problems = verify_dataset(a.dataset)
        if not problems:
            print(f"{a.dataset}: ok (every file read in full; shapes, dtypes and values agree)")
    else:
        problems = verify_checkpoint(a.checkpoint, a.step)
    for p in problems:
        print(f"verify: error: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
