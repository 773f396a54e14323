"""Streaming safetensors reading (no torch), one tensor at a time, with strict validation.

Format: 8-byte little-endian header length N, N bytes of JSON header
`{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data.
Tensors are memory-mapped and copied out one by one, so peak memory is about one tensor.
"""
from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES: Mapping[str, np.dtype] = {
    "F32": np.dtype(np.float32),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
}


class CheckpointError(ValueError):
    """A source checkpoint is missing, corrupt, or does not match the model."""


class SafetensorsFile:
    """One `.safetensors` file: header parsed and validated up front, tensors read lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: file not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(
                    f"{self.path}: corrupt safetensors header (declares {n} header bytes, file has {size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + n
        data_len = size - self._data_start
        self.entries: dict[str, dict] = {}
        for key, info in header.items():
            try:
                dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupt header entry for {key!r}: {info}") from None
            if end > data_len or begin > end:
                raise CheckpointError(
                    f"{self.path}: truncated or corrupt file: tensor {key!r} needs bytes [{begin}, {end}) "
                    f"of the data section, which has {data_len}")
            if dtype in DTYPES:
                want = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
                if want != end - begin:
                    raise CheckpointError(
                        f"{self.path}: tensor {key!r} ({dtype}, shape {shape}) should take {want} bytes, "
                        f"header says {end - begin}")
            self.entries[key] = {"dtype": dtype, "shape": shape, "offsets": (begin, end)}

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, key: str) -> np.ndarray:
        """The tensor `key` as a fresh numpy array in its stored dtype (F32, BF16 or F16)."""
        info = self.entries[key]
        if info["dtype"] not in DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}; "
                f"supported: {sorted(DTYPES)}")
        begin, _ = info["offsets"]
        dtype = DTYPES[info["dtype"]]
        count = int(np.prod(info["shape"], dtype=np.int64))
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            buf = f.read(count * dtype.itemsize)
        if len(buf) != count * dtype.itemsize:
            raise CheckpointError(f"{self.path}: truncated file while reading {key!r}")
        return np.frombuffer(buf, dtype=dtype).reshape(info["shape"]).copy()


class TensorSource:
    """A set of tensors spread over one or more safetensors files: `keys()`, `shape(k)`, `read(k)`."""

    def __init__(self, files: Mapping[str, SafetensorsFile], where: Mapping[str, str]):
        self.files = dict(files)
        self.where = dict(where)

    @classmethod
    def single(cls, path: str | os.PathLike) -> "TensorSource":
        f = SafetensorsFile(path)
        return cls({str(f.path): f}, {k: str(f.path) for k in f.keys()})

    @classmethod
    def from_index(cls, index_path: str | os.PathLike) -> "TensorSource":
        """Follow a `*.safetensors.index.json` (`weight_map`: key -> file); never guess file names."""
        index_path = pathlib.Path(index_path)
        if not index_path.is_file():
            raise CheckpointError(f"{index_path}: index file not found")
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: broken index ({type(e).__name__}: {e}); "
                                  "expected JSON with a 'weight_map' object key -> file") from None
        files: dict[str, SafetensorsFile] = {}
        for name in sorted(set(weight_map.values())):
            path = index_path.parent / name
            if not path.is_file():
                raise CheckpointError(f"{index_path}: names shard {name!r}, which does not exist in "
                                      f"{index_path.parent}")
            files[name] = SafetensorsFile(path)
        for key, name in weight_map.items():
            if key not in files[name].entries:
                raise CheckpointError(f"{index_path}: maps {key!r} to {name!r}, which does not contain it")
        for name, f in files.items():
            for key in f.keys():
                if weight_map.get(key) != name:
                    raise CheckpointError(f"{index_path}: shard {name!r} holds {key!r}, which the index "
                                          f"maps to {weight_map.get(key)!r}")
        return cls(files, weight_map)

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.files[self.where[key]].entries[key]["shape"]

    def dtype(self, key: str) -> str:
        return self.files[self.where[key]].entries[key]["dtype"]

    def read(self, key: str) -> np.ndarray:
        return self.files[self.where[key]].read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)
