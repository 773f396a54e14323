"""The official release directory -> a converted checkpoint (Orbax), atomically: `convert_release`.

Output (`<out>/`): `conversion.json` (what was converted, from where, in which dtype) and one
directory per component, `<out>/<component>/`, laid out as `orbax_io` describes (manifest, Orbax
parameter groups) plus the release files generation needs besides the weights (config JSON,
tokenizer files), at the same relative paths as in the release.

`quantize="int8"|"fp8"` stores the DiT's and the Step-LLM's block linears quantised
(`models/quant.py`: values plus a float32 per-output-channel `kernel_scale`), each tensor quantised
as it streams past, so the memory budget is unchanged; the manifest records the scheme. The VAE and
CLIP are written as without it.

Every component is checked (config, index, shard headers, key accounting, source dtypes) before
any tensor is converted. Everything is written into a temporary sibling of `<out>` and renamed into
place only when all components are complete; on any error the temporary directory is removed, so
`<out>` either does not exist or is the previous, untouched conversion. An existing `<out>` is
replaced only with `overwrite`, and only after the new one is complete. The command line:
`python -m stepvideo_jax.convert` (`convert/cli.py`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import uuid
from typing import Any, Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from stepvideo_jax.convert import config_records, orbax_io, release_paths
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.convert.keymap import convert_tensors, flat_shapes
from stepvideo_jax.convert.registry import (COMPONENTS, CONVERTED_MARKER, OUTPUT_DTYPES, abstract_model,
                                            component_weights, converter)
from stepvideo_jax.convert.safetensors_io import DTYPES, TensorSource
from stepvideo_jax.models import quant
from stepvideo_jax.models.stack import STACKED_MODULES

log = logging.getLogger(__name__)


class _AccountingPassed(Exception):
    """Raised by `_KeysOnly.read`: `convert_tensors` reads only after its key checks succeed."""


class _KeysOnly:
    """A tensor source that answers names and shapes but refuses to read data."""

    def __init__(self, source):
        self._source = source

    def keys(self):
        return self._source.keys()

    def shape(self, key):
        return self._source.shape(key)

    def read(self, key):
        raise _AccountingPassed


@dataclasses.dataclass
class _Plan:
    name: str
    folder: pathlib.Path
    module: Any
    config: Any
    source: Any
    rules: list
    targets: dict
    copies: dict  # release-relative path -> release_paths.contained_files(...)
    layers: dict


def _plan(release: pathlib.Path, name: str, dtype, allowed_root=None) -> _Plan:
    """Everything about one component that can be checked without converting a tensor (including
    that every file it reads or copies lies inside its allowed root, see `release_paths`)."""
    module = converter(name)
    folder = release / name
    if not folder.is_dir():
        raise CheckpointError(f"{release}: has no {name}/ folder (component {name!r})")
    root = release_paths.default_root(folder) if allowed_root is None else pathlib.Path(allowed_root)
    cfg = module.read_config(folder, root)
    source = module.tensor_source(folder, root)
    rules = module.rules(cfg)
    abstract_state = nnx.state(abstract_model(module, cfg, dtype))
    targets = flat_shapes(abstract_state)
    try:
        for _ in convert_tensors(_KeysOnly(source), rules, targets, ignore=module.IGNORE, label=str(folder)):
            break
    except _AccountingPassed:
        pass
    if isinstance(source, TensorSource):
        bad = sorted(f"{k} ({source.dtype(k)})" for k in {r.src for r in rules} if source.dtype(k) not in DTYPES)
        if bad:
            raise CheckpointError(f"{folder}: unsupported tensor dtypes: {', '.join(bad[:8])}; "
                                  f"supported: {sorted(DTYPES)}")
    copies = {}
    for rel in COMPONENTS[name].files:
        release_paths.check_name(rel, what=f"{folder}: file {rel!r}")
        if os.path.lexists(folder / rel):
            copies[rel] = release_paths.contained_files(folder / rel, root)
    return _Plan(name, folder, module, cfg, source, rules, targets, copies,
                 orbax_io.stacked_layers(abstract_state))


def quantize_tensors(tensors: Iterable[tuple[str, np.ndarray]], kernels: set[str], scheme: str
                     ) -> Iterator[tuple[str, np.ndarray]]:
    """The converter's `(checkpoint key, array)` stream with every kernel of `kernels` (stacked state
    paths, `quant.kernel_paths`) replaced by its quantised values and followed by its
    `kernel_scale`, one tensor at a time (`quant.quantize_kernel`)."""
    for key, arr in tensors:
        if stack_path(key) in kernels:
            q, scale = _quantize(arr, scheme=scheme)
            del arr
            yield key, np.asarray(q)
            yield quant.scale_path(key), np.asarray(scale)
        else:
            yield key, arr


_quantize = jax.jit(quant.quantize_kernel, static_argnames="scheme")


def stack_path(key: str) -> str:
    """The stacked state path of a per-layer checkpoint key (`blocks/3/ff/fc1/kernel` ->
    `blocks/ff/fc1/kernel`); other keys unchanged."""
    head, _, rest = key.partition("/")
    index, _, tail = rest.partition("/")
    return f"{head}/{tail}" if head in STACKED_MODULES and index.isdigit() and tail else key


def _convert_component(plan: _Plan, out: pathlib.Path, dtype_name: str, group_bytes: int,
                       weights: str = "bf16") -> dict:
    dst = out / plan.name
    dst.mkdir(parents=True)
    tensors = convert_tensors(plan.source, plan.rules, plan.targets, dtype=OUTPUT_DTYPES[dtype_name],
                              ignore=plan.module.IGNORE, label=str(plan.folder))
    weights = component_weights(plan.name, weights)
    if weights != "bf16":
        kernels = quant.kernel_paths(abstract_model(plan.module, plan.config, OUTPUT_DTYPES[dtype_name]))
        tensors = quantize_tensors(tensors, kernels, weights)
    groups = orbax_io.write_params(dst, tensors, group_bytes=group_bytes, log=log.info)
    copied = []
    for rel, files in plan.copies.items():
        release_paths.copy_files(files, dst / rel)
        copied.append(rel)
    manifest = orbax_io.write_manifest(dst, component=plan.name, dtype=dtype_name, groups=groups,
                                       config=config_records.config_record(plan.config), files=copied,
                                       source=str(plan.folder.resolve()), layers=plan.layers, weights=weights)
    log.info("%s: %d tensors, %d parameters in %d groups", plan.name, len(plan.targets),
             manifest["num_params"], len(groups))
    return manifest


def convert_release(release: str | os.PathLike, out: str | os.PathLike, *,
                    components: Sequence[str] | None = None, dtype: str = "float32",
                    overwrite: bool = False, group_bytes: int = orbax_io.GROUP_BYTES,
                    allowed_root: str | os.PathLike | None = None, quantize: str = "bf16") -> pathlib.Path:
    """Convert `components` of the release directory `release` into `out` (atomically).

    `quantize`: "int8" / "fp8" store the DiT's and Step-LLM's block linears quantised (module docstring).
    `components=None` converts every registered component whose folder the release has.
    `allowed_root`: where the files of every component must resolve (default: per component, see
    `release_paths.default_root`; an installer passes e.g. a hub cache's repo folder).
    `out` must not overlap the release (equal, inside it, or one of its parents); an existing `out`
    is replaced only with `overwrite` and only if this converter wrote it (`conversion.json`).
    """
    release, out = pathlib.Path(release), pathlib.Path(out)
    if isinstance(group_bytes, bool) or not isinstance(group_bytes, int) or group_bytes <= 0:
        raise CheckpointError(f"group size must be a positive number of bytes (--group-mb >= 1), "
                              f"got {group_bytes!r}")
    if dtype not in OUTPUT_DTYPES:
        raise CheckpointError(f"unsupported output dtype {dtype!r}; choose from {sorted(OUTPUT_DTYPES)}")
    try:
        quant.check_scheme(quantize)
    except ValueError as e:
        raise CheckpointError(f"--quantize: {e}") from None
    if not release.is_dir():
        raise CheckpointError(f"release directory {release} not found")
    if components is None:
        components = [c for c in COMPONENTS if (release / c).is_dir()]
        if not components:
            raise CheckpointError(f"{release}: holds none of the component folders {sorted(COMPONENTS)}")
    components = list(dict.fromkeys(components))
    if not components:
        raise CheckpointError(f"no components selected; choose from {sorted(COMPONENTS)}")
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise CheckpointError(f"unknown components {unknown}; choose from {sorted(COMPONENTS)}")
    _check_destination(release, [release / c for c in components], out, overwrite)

    plans = [_plan(release, c, OUTPUT_DTYPES[dtype], allowed_root) for c in components]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        manifests = {p.name: _convert_component(p, tmp, dtype, group_bytes, quantize) for p in plans}
        summary = {"release": str(release.resolve()), "dtype": dtype, "weights": quantize, "components": {
            name: {"num_params": m["num_params"], "groups": len(m["groups"]), "files": m["files"]}
            for name, m in manifests.items()}}
        (tmp / CONVERTED_MARKER).write_text(json.dumps(summary, indent=1) + "\n")
        _replace(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _overlap(a: pathlib.Path, b: pathlib.Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _check_destination(release: pathlib.Path, folders: Sequence[pathlib.Path], out: pathlib.Path,
                       overwrite: bool) -> None:
    """Refuse an `out` that overlaps the release or a component folder (after symlinks), or an
    existing `out` that is not a previous conversion (or is without `overwrite`)."""
    target = out.resolve()
    for src in (release, *folders):
        if _overlap(target, src.resolve()):
            raise FileExistsError(f"--out {out} overlaps the release's {src} (the same folder, inside it or "
                                  "one of its parents); choose a destination outside the release")
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    _check_replaceable(out)


def _check_replaceable(out: pathlib.Path) -> None:
    """`out` is replaced only if it is a real directory holding this converter's `conversion.json`."""
    if out.is_symlink() or not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory (or is a symlink); it is never replaced")
    try:
        summary = json.loads((out / CONVERTED_MARKER).read_text())
        ok = isinstance(summary, dict) and "components" in summary
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise FileExistsError(f"{out} exists but is not a conversion this converter wrote (no valid {CONVERTED_MARKER}); "
                              "it is never replaced: remove it yourself or choose another --out")


def _replace(tmp: pathlib.Path, out: pathlib.Path, overwrite: bool) -> None:
    """Rename the complete `tmp` to `out`; an existing `out` (checked again: a previous conversion)
    is moved aside first, then deleted."""
    if not os.path.lexists(out):
        tmp.rename(out)
        return
    if not overwrite:
        raise FileExistsError(f"{out} appeared during the conversion; pass --overwrite to replace it")
    _check_replaceable(out)
    old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old)
