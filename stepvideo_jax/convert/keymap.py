"""Key maps as data: official tensor name -> our NNX state path, with a transform per entry.

A component's map is a list of `Rule`s. Patterns may contain `{i}` (a layer index), expanded with
`expand(rules, num_layers=...)`. `convert_tensors` applies a map to a `TensorSource` strictly: every
official key must be consumed (or explicitly ignored), every target must be produced, shapes must
match the model's abstract state; it yields one converted tensor at a time so memory stays at about
one tensor.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.models import stack

Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    """torch `nn.Linear.weight` (out, in) -> our kernel (in, out)."""
    return np.ascontiguousarray(x.T)


@dataclasses.dataclass(frozen=True)
class Rule:
    """`src` (official key) -> `dst` (our state path, '/'-separated) through `transform`."""

    src: str
    dst: str
    transform: Transform = identity


def expand(rules: Iterable[Rule], num_layers: int | Mapping[str, int] = 0) -> list[Rule]:
    """Expand `{i}` in patterns over `range(num_layers)`; other rules pass through unchanged."""
    out = []
    for r in rules:
        if "{i}" in r.src:
            n = num_layers if isinstance(num_layers, int) else num_layers[r.src.split("{i}")[0]]
            out.extend(Rule(r.src.replace("{i}", str(i)), r.dst.replace("{i}", str(i)), r.transform)
                       for i in range(n))
        else:
            out.append(r)
    return out


def convert_tensors(source, rules: Iterable[Rule], target_shapes: Mapping[str, tuple[int, ...]],
                    *, dtype=None, ignore: Iterable[str] = (), label: str = "checkpoint"
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(dst_path, array)` for every rule, after strict key and shape accounting.

    `source` has `keys()`, `shape(k)`, `read(k)` (see `safetensors_io.TensorSource`).
    `target_shapes`: our state path -> expected shape (from `nnx.eval_shape` of the model).
    `ignore`: regexes of official keys that are dropped on purpose.
    `dtype`: cast every output (e.g. float32 or bfloat16); None keeps the source dtype.
    All key errors are raised before any tensor is read.
    """
    rules = list(rules)
    ignore_res = [re.compile(p) for p in ignore]
    have = set(source.keys())
    wanted = {r.src for r in rules}
    missing = sorted(wanted - have)
    unexpected = sorted(k for k in have - wanted if not any(p.fullmatch(k) for p in ignore_res))
    produced = {r.dst for r in rules}
    unmapped = sorted(set(target_shapes) - produced)
    extra = sorted(produced - set(target_shapes))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
    if unmapped or extra:
        problems.append(f"key map does not cover the model: unmapped params {_preview(unmapped)}, "
                        f"targets not in the model {_preview(extra)}")
    if problems:
        raise CheckpointError(f"{label}: " + "; ".join(problems))
    last_src, raw = None, None
    for n, r in enumerate(rules):  # consecutive rules sharing a source (fused tensors) read it once
        if r.src != last_src:
            last_src, raw = r.src, source.read(r.src)
        arr = r.transform(raw)
        want = tuple(target_shapes[r.dst])
        if tuple(arr.shape) != want:
            raise CheckpointError(
                f"{label}: {r.src!r} has shape {tuple(source.shape(r.src))}, which maps to {tuple(arr.shape)}"
                f" for {r.dst!r}; the model expects {want}")
        if dtype is not None:
            arr = arr.astype(dtype, copy=False)
        if n + 1 == len(rules) or rules[n + 1].src != r.src:  # peak memory: one source + one output
            last_src, raw = None, None
        yield r.dst, arr
        del arr


def _preview(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def flat_variables(abstract_state) -> dict[str, object]:
    """'/'-joined path -> variable (or array) of an (abstract) NNX state, in the state's layout."""
    flat = nnx.to_flat_state(abstract_state) if hasattr(nnx, "to_flat_state") else abstract_state.flat_state()
    return {"/".join(str(p) for p in path): v for path, v in flat}


def _axes(v):
    return v.get_metadata().get("axes") if hasattr(v, "get_metadata") else None


def flat_shapes(abstract_state) -> dict[str, tuple[int, ...]]:
    """'/'-joined path -> shape for every variable of an (abstract) NNX state, in the checkpoint
    layout: a stacked layer variable (`models/stack.py`) appears once per layer, `blocks/<i>/...`,
    with its per-layer shape, the keys the converter tables and the checkpoints on disk use."""
    variables = flat_variables(abstract_state)
    shapes = {k: tuple((v.get_value() if hasattr(v, "get_value") else v).shape) for k, v in variables.items()}
    return stack.per_layer_shapes(shapes, {k: _axes(v) for k, v in variables.items()})


def stacked_flat(abstract_state, flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Checkpoint-layout arrays (`flat_shapes` keys) -> the state's layout: each stacked variable
    assembled from its per-layer arrays (host memory; small models, tests)."""
    out = {}
    for path, v in flat_variables(abstract_state).items():
        if stack.is_stacked(_axes(v)):
            n = (v.get_value() if hasattr(v, "get_value") else v).shape[0]
            out[path] = np.stack([np.asarray(flat[stack.layer_key(path, i)]) for i in range(n)])
        else:
            out[path] = flat[path]
    return out


def checkpoint_arrays(state) -> Iterator[tuple[str, object]]:
    """(checkpoint key, array) of every variable of `state` in the `flat_shapes` layout: a stacked
    variable yields one slice per layer (sliced lazily, one at a time)."""
    for path, v in flat_variables(state).items():
        value = v.get_value() if hasattr(v, "get_value") else v
        if stack.is_stacked(_axes(v)):
            for i in range(value.shape[0]):
                yield stack.layer_key(path, i), value[i]
        else:
            yield path, value


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    """'/'-joined paths -> nested dict (integer-looking keys become ints, as NNX lists use)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        parts = [int(p) if p.isdigit() else p for p in path.split("/")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return tree


def fill_model(abstract_model, flat: Mapping[str, np.ndarray]):
    """Fill an abstract (`nnx.eval_shape`) model with arrays keyed by '/'-joined checkpoint paths
    (`flat_shapes`: one key per layer of a stacked variable)."""
    graphdef, state = nnx.split(abstract_model)
    flat = stacked_flat(state, flat)
    nnx.replace_by_pure_dict(state, unflatten({k: jnp.asarray(v) for k, v in flat.items()}))
    return nnx.merge(graphdef, state)


def convert_model(abstract_model, source, rules: Iterable[Rule], *, dtype=None, ignore: Iterable[str] = (),
                  label: str = "checkpoint"):
    """In-memory conversion: strict `convert_tensors` into a concrete copy of `abstract_model`."""
    flat = dict(convert_tensors(source, rules, flat_shapes(nnx.state(abstract_model)), dtype=dtype,
                                ignore=ignore, label=label))
    return fill_model(abstract_model, flat)
