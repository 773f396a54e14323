"""Converted checkpoints on disk: streamed, size-bounded Orbax writes and sharded restores.

Layout of one component directory (`<dest>/<component>/`):

    manifest.json        format, version, component, dtype, parameter count, `layers` (version 2:
                         {stacked module: number of layers}), optional `quantization` (a
                         `config_records` record of `models.quant.WeightQuant`: the block linears'
                         kernels are stored int8 / float8_e4m3fn with a float32 `kernel_scale`;
                         `dtype` is then the other parameters' dtype) and `groups`:
                         [{"dir": "params/00000", "params": {checkpoint path: shape}}, ...]
    params/00000/ ...    one Orbax PyTree checkpoint per group: a nested dict of arrays keyed by the
                         state path ('blocks/0/attn1/q/kernel' -> blocks.0.attn1.q.kernel)
    <config files>       copied from the release (see `stepvideo_jax.convert.cli`)

Stacked layers (`models/stack.py`): the model holds its N blocks as one variable per parameter with
a leading layer axis; on disk every layer stays its own tensor (`blocks/<i>/attn1/q/kernel`, the
converter's keys), so the converter writes one layer at a time within its memory budget (one
stacked full-size `ff` kernel would be 29 GB in float32). A restore allocates each stacked array in
its target sharding and writes every layer into it in place (a donated `dynamic_update_slice` per
layer), so device memory peaks at the model plus one group. Version 1 manifests (written before
the layers were stacked) have the same per-layer layout and restore the same way; version 2 adds
`layers`, checked against the model.

Why groups: Orbax writes a pytree in one call and holds the whole of it while writing, so a 30B
model written as one pytree needs its full size in host RAM. Tensors arrive one at a time from
`keymap.convert_tensors`; a group is written as soon as it reaches `group_bytes`, and a tensor at
least that large is written on its own, so peak memory is about one large tensor plus its encoded
copy (Orbax's NumPy handler is used without its defensive deep copy: the group is not touched while
it is written). Restoring reads each group straight into the target shardings; large tensors are
stored in chunks of at most `chunk_bytes` so a device's shard reads only the chunks it overlaps.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Iterable, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import type_handlers

from stepvideo_jax import paths
from stepvideo_jax.convert import config_records, release_paths
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.convert.keymap import unflatten
from stepvideo_jax.dtypes import DTYPES
from stepvideo_jax.models import quant, stack
from stepvideo_jax.parallel.rules import state_shardings

FORMAT = "stepvideo-jax/orbax-groups"
VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
PARAMS = "params"
GROUP_BYTES = 256 * 2**20
CHUNK_BYTES = 64 * 2**20
MANIFEST_DTYPES = ("float32", "bfloat16")


def _nested(flat: Mapping[str, object]) -> dict:
    """'/'-joined paths -> nested dict with string keys (Orbax's tree keys)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flat(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        out.update(_flat(v, path + "/") if isinstance(v, Mapping) else {path: v})
    return out


def _checkpointer() -> ocp.Checkpointer:
    registry = type_handlers.create_type_handler_registry(
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, type_handlers.ArrayHandler()))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))


def _save_args(arr: np.ndarray, chunk_bytes: int) -> ocp.SaveArgs:
    return ocp.SaveArgs(chunk_byte_size=chunk_bytes) if arr.nbytes > chunk_bytes else ocp.SaveArgs()


def write_params(component_dir: str | pathlib.Path, tensors: Iterable[tuple[str, np.ndarray]], *,
                 group_bytes: int = GROUP_BYTES, chunk_bytes: int = CHUNK_BYTES,
                 log=None) -> list[dict]:
    """Write `(state path, array)` pairs as size-bounded Orbax groups under `component_dir/params/`.

    Consumes `tensors` lazily; holds at most one group (< `group_bytes`) plus one tensor.
    Returns the manifest's `groups` list.
    """
    root = pathlib.Path(component_dir)
    (root / PARAMS).mkdir(parents=True, exist_ok=True)
    groups: list[dict] = []
    pending: dict[str, np.ndarray] = {}
    pending_bytes = 0

    with _checkpointer() as ckpt:
        def flush():
            nonlocal pending, pending_bytes
            if not pending:
                return
            rel = f"{PARAMS}/{len(groups):05d}"
            tree = _nested(pending)
            args = _nested({k: _save_args(v, chunk_bytes) for k, v in pending.items()})
            ckpt.save(root / rel, args=ocp.args.PyTreeSave(tree, save_args=args))
            groups.append({"dir": rel, "params": {k: list(v.shape) for k, v in pending.items()}})
            if log:
                log(f"{root.name}: wrote {rel} ({len(pending)} tensors, {pending_bytes / 2**20:.1f} MiB)")
            pending, pending_bytes = {}, 0

        for path, arr in tensors:
            arr = np.asarray(arr)
            if pending and pending_bytes + arr.nbytes > group_bytes:
                flush()
            pending[path] = arr
            pending_bytes += arr.nbytes
            del arr
            if pending_bytes >= group_bytes:
                flush()
        flush()
    return groups


def write_manifest(component_dir: str | pathlib.Path, *, component: str, dtype: str, groups: list[dict],
                   config: dict, files: list[str], source: str, layers: Mapping[str, int],
                   weights: str = "bf16") -> dict:
    """`manifest.json`: `groups` from `write_params`, the model `config` record, copied `files`,
    `layers` ({stacked module: layer count}, see `stacked_layers`), `weights` the quantisation
    scheme (`models.quant.SCHEMES`; recorded only when it quantises). `num_params` counts the
    model's parameters (not the scales)."""
    count = sum(math.prod(s) for g in groups for k, s in g["params"].items()
                if not k.endswith("/" + quant.SCALE_NAME))
    manifest = {"format": FORMAT, "version": VERSION, "component": component, "dtype": dtype,
                "num_params": count, "config": config, "files": files, "source": source,
                "layers": dict(layers), "groups": groups}
    if quant.check_scheme(weights) is not None:
        manifest["quantization"] = config_records.config_record(quant.WeightQuant(weights))
    (pathlib.Path(component_dir) / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(component_dir: str | pathlib.Path) -> dict:
    path = paths.as_path(component_dir) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; {component_dir} is not a converted component directory "
                              "(write one with `python -m stepvideo_jax.convert`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") not in READABLE_VERSIONS:
        got = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else (None, None)
        raise CheckpointError(f"{path}: format {got[0]!r} version {got[1]!r}; "
                              f"this code reads {FORMAT!r} versions {list(READABLE_VERSIONS)} (re-convert the "
                              "release with `python -m stepvideo_jax.convert --release DIR --out OUT`)")
    _check_groups(path, manifest.get("groups"))
    layers = manifest.get("layers", {}) if manifest["version"] >= 2 else {}
    if (not isinstance(layers, dict) or manifest["version"] >= 2 and "layers" not in manifest
            or not all(isinstance(k, str) and type(n) is int and n > 0 for k, n in layers.items())):
        raise CheckpointError(f"{path}: `layers` {str(manifest.get('layers'))!r:.60} should map stacked module "
                              "names to positive layer counts")
    if manifest.get("dtype") not in MANIFEST_DTYPES:
        raise CheckpointError(f"{path}: dtype {manifest.get('dtype')!r:.40}; expected one of {list(MANIFEST_DTYPES)}")
    if "quantization" in manifest:
        try:
            config_records.config_from_record(manifest["quantization"], expect=quant.WeightQuant)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: quantization: {e}") from None
    return manifest


def stored_scheme(manifest: Mapping) -> str:
    """The weight scheme of a manifest from `read_manifest`: "int8" / "fp8", or "bf16" (float
    weights in the manifest's `dtype`)."""
    if "quantization" not in manifest:
        return "bf16"
    return config_records.config_from_record(manifest["quantization"], expect=quant.WeightQuant).scheme


def _check_groups(path: pathlib.Path, groups) -> None:
    """`groups` must be [{"dir": relative folder inside the component, "params": {path: [int, ...]}}]:
    a manifest is shared data, so a group may not point Orbax at a folder outside the checkpoint."""
    if not isinstance(groups, list):
        raise CheckpointError(f"{path}: 'groups' must be a list, got {type(groups).__name__}")
    for i, group in enumerate(groups):
        if not (isinstance(group, dict) and isinstance(group.get("params"), dict)
                and all(isinstance(k, str) and isinstance(v, list)
                        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v)
                        for k, v in group["params"].items())):
            raise CheckpointError(f"{path}: group {i} must be {{'dir': ..., 'params': {{path: [sizes]}}}}")
        what = f"{path}: group {i} dir {group.get('dir')!r}"
        if paths.is_uri(path):   # no symlinks in a bucket: the name alone must stay inside
            release_paths.check_name(group.get("dir"), what=what)
        else:
            release_paths.release_file(path.parent, group.get("dir"), what=what)


def _flat_state(tree) -> dict[str, object]:
    """'/'-joined path -> leaf (Variable or sharding) of an NNX state-like tree."""
    if isinstance(tree, nnx.State):
        return {"/".join(str(p) for p in path): v for path, v in nnx.to_flat_state(tree)}
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore_arrays(component_dir: str | pathlib.Path, targets: Mapping[str, jax.ShapeDtypeStruct]
                   ) -> Iterator[tuple[str, jax.Array]]:
    """Yield `(state path, array)` for every stored tensor, read into `targets[path]`'s dtype and
    sharding (a `jax.ShapeDtypeStruct` with `sharding`), one group at a time.

    Raises if the stored tensors and `targets` differ in keys or shapes.
    """
    root = paths.absolute(component_dir)  # Orbax needs absolute paths; a gs:// URI stays one
    manifest = read_manifest(root)
    stored = {k: tuple(s) for g in manifest["groups"] for k, s in g["params"].items()}
    missing, unexpected = sorted(set(targets) - set(stored)), sorted(set(stored) - set(targets))
    wrong = sorted(f"{k}: stored {stored[k]}, model {tuple(targets[k].shape)}"
                   for k in set(stored) & set(targets) if stored[k] != tuple(targets[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{root}: checkpoint does not match the model: missing {_preview(missing)}; "
            f"unexpected {_preview(unexpected)}; wrong shapes {_preview(wrong)}")
    with ocp.StandardCheckpointer() as ckpt:
        for group in manifest["groups"]:
            target = _nested({k: targets[k] for k in group["params"]})
            yield from _flat(ckpt.restore(root / group["dir"], target)).items()


def _preview(items: list[str], n: int = 6) -> str:
    if not items:
        return "none"
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")


def stacked_layers(abstract_state) -> dict[str, int]:
    """{stacked module (top-level name): number of layers} of a model state (`models/stack.py`)."""
    out = {}
    for path, v in _flat_state(abstract_state).items():
        if isinstance(v, nnx.Variable) and stack.is_stacked(v.get_metadata().get("axes")):
            out[path.partition("/")[0]] = int(v.get_value().shape[0])
    return out


def restore(component_dir: str | pathlib.Path, abstract_model, *, shardings=None, mesh=None):
    """The model of `abstract_model` (from `nnx.eval_shape`) with the weights of `component_dir`.

    Each array lands directly in its target sharding: `shardings` (a tree shaped like
    `nnx.state(abstract_model)` with `jax.sharding.Sharding` leaves), or, given `mesh`, the logical
    axis rules' `parallel.rules.state_shardings(nnx.state(abstract_model), mesh)`; with neither, on
    the default device. Arrays are cast to the abstract model's dtypes. Stacked layer variables are
    assembled in place from their per-layer tensors (module docstring).

    Quantisation (`models.quant`): a quantised model restores a checkpoint stored with its scheme
    as is; from a float checkpoint, each block kernel is read in the stored dtype into its target
    sharding and quantised there (`quant.quantize_kernel`, one tensor at a time: quantise-on-load),
    giving the kernel and its `kernel_scale`. A quantised checkpoint into a model of another scheme
    is an error.
    """
    graphdef, state = nnx.split(abstract_model)
    if shardings is None and mesh is not None:
        shardings = state_shardings(state, mesh)
    variables = _flat_state(state)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        placement = {k: device for k in variables}
    else:
        placement = _flat_state(shardings)
        if set(placement) != set(variables):
            raise ValueError(f"shardings do not match the model state: missing "
                             f"{_preview(sorted(set(variables) - set(placement)))}, unexpected "
                             f"{_preview(sorted(set(placement) - set(variables)))}")
    manifest = read_manifest(component_dir)
    layers = stacked_layers(state)
    if manifest["version"] >= 2 and manifest.get("layers", {}) != layers:
        raise CheckpointError(f"{component_dir}: stacked layers {manifest.get('layers')} on disk, the model has "
                              f"{layers}")
    want, stored = quant.model_scheme(abstract_model), stored_scheme(manifest)
    if stored != "bf16" and stored != want:
        raise CheckpointError(f"{component_dir}: the checkpoint stores {stored} weights, the model expects {want}; "
                              f"load it with weights={stored} (or convert the release again without --quantize)")
    assembler = stack.Assembler(variables, placement)
    targets, requant = dict(assembler.targets), {}
    if want != stored:
        float_dtype = DTYPES[manifest["dtype"]]
        for key in [k for k in targets if k.endswith("/" + quant.SCALE_NAME)]:
            kernel = key[: -len(quant.SCALE_NAME)] + "kernel"
            q, s = targets[kernel], targets.pop(key)
            requant[kernel] = (key, quant.sharded_quantizer(want, q.sharding, s.sharding))
            targets[kernel] = jax.ShapeDtypeStruct(q.shape, float_dtype, sharding=q.sharding)
    for key, arr in restore_arrays(component_dir, targets):
        if key in requant:
            scale_key, fn = requant[key]
            arr, scale = fn(arr)
            assembler.put(scale_key, scale)
        assembler.put(key, arr)
    nnx.replace_by_pure_dict(state, unflatten(assembler.arrays))
    return nnx.merge(graphdef, state)
