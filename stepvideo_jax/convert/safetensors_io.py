"""Streaming safetensors reading (no torch), one tensor at a time, with strict validation.

Format: 8-byte little-endian header length N, N bytes of JSON header
`{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the data.
Only the header is read up front; tensors are read one by one, so peak memory is about one tensor.

The header is validated as the reference `safetensors` library does before any tensor is used:
N <= `MAX_HEADER_BYTES` (100 MB, the library's cap) and within the file, the header a JSON object
starting with '{', integer non-negative shapes and offsets, a known dtype, every tensor's byte length
= product(shape) x dtype size, and the tensors, sorted by offset, tiling the data section exactly
(contiguous from 0, no overlap, no gap, nothing after the last). A header that fails is a
`CheckpointError` naming the file, the tensor and the rule; no weight is read from it.
"""
from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from stepvideo_jax.convert import release_paths
from stepvideo_jax.convert.errors import CheckpointError

__all__ = ["DTYPES", "MAX_HEADER_BYTES", "SafetensorsFile", "TensorSource"]

DTYPES: Mapping[str, np.dtype] = {
    "F32": np.dtype(np.float32),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
}
# Every dtype name the reference format defines, with its size in bits (readable or not: the size is
# what the offsets are checked against).
DTYPE_BITS: Mapping[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
    "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}
MAX_HEADER_BYTES = 100_000_000


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


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
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{self.path}: not a safetensors file or corrupt: the header would be "
                                      f"{n} bytes, the cap is {MAX_HEADER_BYTES}")
            if n > size - 8:
                raise CheckpointError(
                    f"{self.path}: corrupt safetensors header (declares {n} header bytes, file has {size})")
            blob = f.read(n)
        try:
            if not blob.startswith(b"{"):
                raise ValueError("the header does not start with '{'")
            header = json.loads(blob)
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (__metadata__ must map strings "
                                  "to strings)")
        self.metadata = metadata
        self._data_start = 8 + n
        self.entries: dict[str, dict] = {}
        for key, info in header.items():
            self.entries[key] = self._entry(key, info)
        self._check_layout(size - self._data_start)

    def _entry(self, key: str, info) -> dict:
        try:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{self.path}: corrupt header entry for {key!r}: {info!r:.200}") from None
        if dtype not in DTYPE_BITS:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unknown dtype {dtype!r:.40}; the format "
                                  f"defines {sorted(DTYPE_BITS)}")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise CheckpointError(f"{self.path}: tensor {key!r} has shape {shape!r:.200}; expected a list "
                                  "of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets)):
            raise CheckpointError(f"{self.path}: tensor {key!r} has data_offsets {offsets!r:.200}; expected "
                                  "[begin, end], non-negative integers")
        begin, end = offsets
        if end < begin:
            raise CheckpointError(f"{self.path}: tensor {key!r} has data_offsets [{begin}, {end}]: end < begin")
        bits = DTYPE_BITS[dtype] * int(np.prod(shape, dtype=object))
        if bits % 8:
            raise CheckpointError(f"{self.path}: tensor {key!r} ({dtype}, shape {tuple(shape)}) is not a "
                                  "whole number of bytes")
        if bits // 8 != end - begin:
            raise CheckpointError(
                f"{self.path}: tensor {key!r} ({dtype}, shape {tuple(shape)}) should take {bits // 8} bytes, "
                f"header says {end - begin} (data_offsets [{begin}, {end}])")
        return {"dtype": dtype, "shape": tuple(shape), "offsets": (begin, end)}

    def _check_layout(self, data_len: int) -> None:
        """The tensors, sorted by offset, must tile [0, data_len) exactly (the reference rule)."""
        position, previous = 0, None
        for key, info in sorted(self.entries.items(), key=lambda kv: kv[1]["offsets"]):
            begin, end = info["offsets"]
            if begin != position:
                what = (f"overlaps {previous!r}" if begin < position else
                        f"leaves bytes [{position}, {begin}) unused")
                raise CheckpointError(f"{self.path}: tensor {key!r} starts at data offset {begin}, which "
                                      f"{what}; tensors must be contiguous and non-overlapping")
            position, previous = end, key
        if position != data_len:
            raise CheckpointError(
                f"{self.path}: truncated or corrupt file: the tensors cover {position} bytes of the data "
                f"section, which has {data_len}")

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
    def from_index(cls, index_path: str | os.PathLike, root: str | os.PathLike | None = None) -> "TensorSource":
        """Follow a `*.safetensors.index.json` (`weight_map`: key -> file); never guess file names.

        Every file the index names must be a relative path that resolves (after symlinks) inside
        `root` (default: `release_paths.default_root` of the index's folder); otherwise an error
        names the entry before any file is opened.
        """
        index_path = pathlib.Path(index_path)
        root = release_paths.default_root(index_path.parent) if root is None else root
        if not index_path.is_file():
            raise CheckpointError(f"{index_path}: index file not found")
        release_paths.contained(index_path, root, what=str(index_path))
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: broken index ({type(e).__name__}: {e}); "
                                  "expected JSON with a 'weight_map' object key -> file") from None
        bad = sorted({repr(v) for v in weight_map.values() if not isinstance(v, str)})
        if bad:
            raise CheckpointError(f"{index_path}: weight_map values must be file names, got {', '.join(bad[:4])}")
        paths = {name: release_paths.release_file(index_path.parent, name, root,
                                                  what=f"{index_path}: weight_map entry {name!r}")
                 for name in sorted(set(weight_map.values()))}
        files: dict[str, SafetensorsFile] = {}
        for name, path in paths.items():
            if not path.is_file():
                raise CheckpointError(f"{index_path}: names shard {name!r}, which does not exist in "
                                      f"{index_path.parent}")
            files[name] = SafetensorsFile(index_path.parent / name)
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
