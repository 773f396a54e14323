"""Trained in-memory models -> a converted checkpoint (`convert/orbax_io.py` layout), the format
`python -m stepvideo_jax.convert` writes and `stepvideo_jax.checkpoints` reads.

Layout: `conversion.json`, and per component (`transformer`, `vae`, `step_llm`, `hunyuan_clip`) a
directory with `manifest.json` (the model config record), the Orbax parameter groups and the files
generation needs besides the weights (the released tokenizers, at their release paths). Written into
a temporary sibling and renamed into place when complete.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import uuid
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepvideo_jax.convert import config_records, orbax_io
from stepvideo_jax.convert.keymap import checkpoint_arrays
from stepvideo_jax.convert.registry import CONVERTED_MARKER
from stepvideo_jax.dtypes import DTYPES
from stepvideo_jax.text.sentencepiece_tokenizer import RELEASED_MODEL
from stepvideo_jax.text.wordpiece_tokenizer import released_tokenizer_dir

# component -> {path in the component directory: packaged source (the released tokenizers)}
TOKENIZER_FILES: Mapping[str, Mapping[str, pathlib.Path]] = {
    "step_llm": {"step1_chat_tokenizer.model": RELEASED_MODEL},
    "hunyuan_clip": {f"tokenizer/{p.name}": p for p in sorted(released_tokenizer_dir().iterdir())},
}


def flat_params(model: nnx.Module, dtype: str) -> dict[str, np.ndarray]:
    """Checkpoint key -> host array in `dtype` (the keys `orbax_io.restore` expects: one per layer
    of a stacked variable)."""
    return {k: np.asarray(jnp.asarray(v, jnp.float32)).astype(DTYPES[dtype])
            for k, v in checkpoint_arrays(nnx.state(model))}


def write_component(root: pathlib.Path, name: str, model: nnx.Module, *, dtype: str, source: str) -> dict:
    dst = root / name
    dst.mkdir(parents=True)
    groups = orbax_io.write_params(dst, flat_params(model, dtype).items())
    files = []
    for rel, src in TOKENIZER_FILES.get(name, {}).items():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst / rel)
        files.append(rel)
    return orbax_io.write_manifest(dst, component=name, dtype=dtype, groups=groups,
                                   config=config_records.config_record(model.cfg if hasattr(model, "cfg") else model.config),
                                   files=files, source=source,
                                   layers=orbax_io.stacked_layers(nnx.state(model)))


def write_checkpoint(out, models: Mapping[str, nnx.Module], *, dtype: str = "bfloat16",
                     source: str = "stepvideo_jax.demo", overwrite: bool = True) -> pathlib.Path:
    """Write `models` ({component: module with a `.cfg`}) to `out` atomically."""
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose from {sorted(DTYPES)}")
    out = pathlib.Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        manifests = {name: write_component(tmp, name, m, dtype=dtype, source=source) for name, m in models.items()}
        summary = {"release": source, "dtype": dtype, "components": {
            name: {"num_params": m["num_params"], "groups": len(m["groups"]), "files": m["files"]}
            for name, m in manifests.items()}}
        (tmp / CONVERTED_MARKER).write_text(json.dumps(summary, indent=1) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
