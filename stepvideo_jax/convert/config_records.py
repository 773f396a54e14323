"""Model configs inside checkpoint manifests: data only, read through a closed registry.

A config record is JSON: `{"class": NAME, "values": {field: value}}`. NAME is looked up in
`REGISTRY` (the project's own config dataclasses, by class name), never imported: a manifest is
shared data, and a name such as `"os:system"` must not reach `importlib`. Every value is checked
against the dataclass field's annotation (int, float, bool, str, None, `X | None`, `tuple[X, ...]`,
`tuple[X, Y]`, `Literal[...]`) and converted (JSON lists -> tuples, ints -> floats where a float is
declared); unknown names, unknown fields and wrongly typed values are a `CheckpointError` naming them.
A field absent from the record takes the dataclass default, so manifests written before a field was
added (scanned layers, quantisation, TI2V) keep loading.

Records written before the registry named the class `"module:QualName"` (e.g.
`"stepvideo_jax.models.dit:DiTConfig"`, as in `stepvideo_jax/assets/demo`); those exact strings are
aliases of their registry entries, nothing else of that form is accepted.

Extending: a new config dataclass is one `register(Cls, legacy=...)` call below; a new field of a
registered class needs nothing here unless its annotation is a kind `_check` does not know, in which
case `register` fails at import time (so an unsupported field cannot slip through unchecked).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Mapping

from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.models.dit import DiTConfig
from stepvideo_jax.models.hunyuan_clip import HunyuanClipConfig
from stepvideo_jax.models.quant import WeightQuant
from stepvideo_jax.models.step_llm import StepLLMConfig
from stepvideo_jax.models.vae import VAEConfig

REGISTRY: dict[str, type] = {}
_ALIASES: dict[str, str] = {}
_FIELDS: dict[str, dict[str, tuple[Any, bool]]] = {}  # name -> field -> (annotation, has default)
_RECORD_KEYS = ("class", "values")


def _validate_annotation(tp, where: str) -> None:
    """Raise TypeError if `_check` cannot verify values of annotation `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (int, float, bool, str, type(None)):
        return
    if origin is typing.Literal and all(isinstance(a, (int, float, bool, str)) for a in args):
        return
    if origin in (typing.Union, types.UnionType) or (origin is tuple and args):
        for a in args:
            if a is not Ellipsis:
                _validate_annotation(a, where)
        return
    raise TypeError(f"{where}: annotation {tp!r} is not one the manifest registry can check; "
                    "use int, float, bool, str, None, X | None, tuple[X, ...], tuple[X, Y] or Literal[...]")


def register(cls: type, *, legacy: tuple[str, ...] = ()) -> type:
    """Add the frozen config dataclass `cls` to the registry under its class name; `legacy` are the
    older `"module:QualName"` spellings of it that existing manifests hold."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    name = cls.__name__
    hints = typing.get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        _validate_annotation(hints[f.name], f"{name}.{f.name}")
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        fields[f.name] = (hints[f.name], has_default)
    REGISTRY[name] = cls
    _FIELDS[name] = fields
    for alias in (*legacy, f"{cls.__module__}:{cls.__qualname__}"):
        _ALIASES[alias] = name
    return cls


register(DiTConfig, legacy=("stepvideo_jax.models.dit:DiTConfig",))
register(VAEConfig, legacy=("stepvideo_jax.models.vae:VAEConfig",))
register(StepLLMConfig, legacy=("stepvideo_jax.models.step_llm:StepLLMConfig",))
register(HunyuanClipConfig, legacy=("stepvideo_jax.models.hunyuan_clip:HunyuanClipConfig",))
register(WeightQuant)   # a quantised checkpoint's scheme (manifest `quantization`)


class _Mismatch(Exception):
    pass


def _describe(tp) -> str:
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")


def _check(value, tp):
    """`value` converted to annotation `tp`, or `_Mismatch`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is typing.Literal:
        for a in args:
            if type(a) is type(value) and a == value:
                return value
    elif origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _check(value, a)
            except _Mismatch:
                pass
    elif origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check(v, args[0]) for v in value)
        if len(value) == len(args):
            return tuple(_check(v, a) for v, a in zip(value, args))
    raise _Mismatch


def _name(record_class) -> str:
    if isinstance(record_class, str):
        name = _ALIASES.get(record_class, record_class)
        if name in REGISTRY:
            return name
    raise CheckpointError(f"config class {record_class!r} is not a registered model config; "
                          f"choose from {sorted(REGISTRY)}")


def config_record(cfg) -> dict:
    """The manifest record of the registered config dataclass instance `cfg`."""
    name = type(cfg).__name__
    if REGISTRY.get(name) is not type(cfg):
        raise CheckpointError(f"{type(cfg)!r} is not a registered model config; choose from {sorted(REGISTRY)}")
    values = {f: getattr(cfg, f) for f in _FIELDS[name]}
    record = {"class": name, "values": {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}
    config_from_record(record)  # what is written must read back
    return record


def config_from_record(record: Mapping, *, expect: type | None = None) -> Any:
    """The config dataclass instance a manifest `record` describes (see the module docstring).

    `expect`: the class the caller needs (e.g. `DiTConfig` for a `transformer/` component); a record
    of another class is an error.
    """
    if not isinstance(record, Mapping) or set(record) != set(_RECORD_KEYS):
        keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
        raise CheckpointError(f"config record must be an object with exactly the keys {list(_RECORD_KEYS)}; "
                              f"got {keys}")
    name = _name(record["class"])
    cls = REGISTRY[name]
    if expect is not None and cls is not expect:
        raise CheckpointError(f"config record holds a {name}, this component needs a {expect.__name__}")
    values = record["values"]
    if not isinstance(values, Mapping):
        raise CheckpointError(f"{name}: config values must be an object, got {type(values).__name__}")
    fields = _FIELDS[name]
    unknown = sorted(str(k) for k in values if k not in fields)
    if unknown:
        raise CheckpointError(f"{name}: unknown config fields {unknown}; the fields are {sorted(fields)}")
    missing = sorted(f for f, (_, has_default) in fields.items() if not has_default and f not in values)
    if missing:
        raise CheckpointError(f"{name}: config record lacks the required fields {missing}")
    kwargs = {}
    for key, value in values.items():
        tp = fields[key][0]
        try:
            kwargs[key] = _check(value, tp)
        except _Mismatch:
            raise CheckpointError(f"{name}.{key}: value {value!r:.80} is not of type {_describe(tp)}") from None
        if isinstance(kwargs[key], float) and not math.isfinite(kwargs[key]):
            raise CheckpointError(f"{name}.{key}: value {value!r} is not finite")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: invalid config values ({e})") from None


def config_from_values(cls: type, values: Mapping) -> Any:
    """`cls(**values)` for a registered config class, every value checked and converted as a
    manifest's are (lists -> tuples, ints -> floats where a float is declared): the one way a config
    mapping (an ml_collections block, a JSON file) becomes a model config."""
    return config_from_record({"class": cls.__name__, "values": dict(values)}, expect=cls)
