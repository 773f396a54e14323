"""Torch-free reading of `torch.save` checkpoints (`pytorch_model.bin`), one tensor at a time.

Format (torch >= 1.6): an uncompressed zip archive `<name>/data.pkl` (the pickled object, protocol
2), `<name>/data/<key>` (the raw bytes of each storage), `<name>/byteorder` ("little"/"big", absent
= little), `<name>/version`. In `data.pkl` every tensor is
`torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks)`,
and every storage a persistent id `("storage", torch.<Dtype>Storage, key, location, numel)`.

`data.pkl` is read with a restricted unpickler that resolves only those rebuild functions, the
storage types and `collections.OrderedDict`; any other global is refused, so loading a file cannot
run code. Tensors become lazy references; `read(key)` copies one storage out of the zip (its CRC is
checked) and views it with the recorded offset, size and stride.

Resource limits (a zip entry can decompress to ~1000x its stored size): checked on the zip directory
before anything is decompressed, and again while reading (never more than the declared bytes).
- each storage entry must decompress to exactly the bytes its storage declares (numel x dtype size);
- `data.pkl` at most `MAX_PICKLE_BYTES` (100 MB; a state dict of 100k tensors takes ~20 MB), other
  small entries (`byteorder`) at most `MAX_SMALL_ENTRY_BYTES`;
- all entries together at most `MAX_EXPANSION` (4) x the archive's size (`torch.save` stores entries
  uncompressed, so a genuine file is at 1x).
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
import pathlib
import pickle
import zipfile
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

from stepvideo_jax.convert.errors import CheckpointError

# torch storage class name -> (numpy dtype, safetensors-style dtype name)
STORAGE_DTYPES: Mapping[str, tuple[np.dtype, str]] = {
    "FloatStorage": (np.dtype(np.float32), "F32"),
    "BFloat16Storage": (np.dtype(ml_dtypes.bfloat16), "BF16"),
    "HalfStorage": (np.dtype(np.float16), "F16"),
    "DoubleStorage": (np.dtype(np.float64), "F64"),
    "LongStorage": (np.dtype(np.int64), "I64"),
    "IntStorage": (np.dtype(np.int32), "I32"),
    "ShortStorage": (np.dtype(np.int16), "I16"),
    "CharStorage": (np.dtype(np.int8), "I8"),
    "ByteStorage": (np.dtype(np.uint8), "U8"),
    "BoolStorage": (np.dtype(np.bool_), "BOOL"),
}

MAX_PICKLE_BYTES = 100_000_000
MAX_SMALL_ENTRY_BYTES = 4096
MAX_EXPANSION = 4

_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pickled legacy magic number


@dataclasses.dataclass(frozen=True)
class StorageType:
    """Stand-in for a `torch.<Dtype>Storage` class named in the pickle."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name][0]


@dataclasses.dataclass(frozen=True)
class StorageRef:
    """A storage of the archive: entry `data/<key>`, `numel` elements of `dtype`."""

    key: str
    dtype: np.dtype
    numel: int


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A tensor not read yet: a strided view (element units) into a storage."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def span(self) -> int:
        """Storage elements the view reaches: offset + 1 + sum((n - 1) * stride), 0 if empty."""
        if any(n == 0 for n in self.shape):
            return 0
        return self.offset + 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, StorageRef):
        raise CheckpointError(f"torch pickle: tensor built on {type(storage).__name__}, not a storage")
    return TensorRef(storage, int(storage_offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_ALLOWED_GLOBALS: Mapping[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED_GLOBALS`; storages become `StorageRef`s."""

    def __init__(self, file, label: str):
        super().__init__(file)
        self.label = label
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS)
            raise CheckpointError(
                f"{self.label}: refusing to load global {module}.{name} from the pickle; a tensor "
                f"checkpoint needs only: {allowed}") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], StorageType)):
            raise CheckpointError(f"{self.label}: unsupported persistent id {pid!r}; expected "
                                  "('storage', torch.<Dtype>Storage, key, location, numel)")
        _, storage_type, key, _location, numel = pid
        ref = StorageRef(str(key), storage_type.dtype, int(numel))
        if self.storages.setdefault(ref.key, ref) != ref:
            raise CheckpointError(f"{self.label}: storage {key!r} is declared twice with different types")
        return ref


class TorchPickleFile:
    """A `torch.save` zip checkpoint: structure validated up front, tensors read lazily.

    `keys()`, `shape(k)`, `dtype(k)` (safetensors-style name, e.g. "F32"), `read(k)` -> numpy array.
    Nested dicts are flattened with '.'; entries that are not tensors are listed in `non_tensors`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: file not found")
        with open(self.path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
        if head == _LEGACY_MAGIC:
            raise CheckpointError(
                f"{self.path}: legacy (torch < 1.6, non-zip) torch.save format; re-save it with a current "
                "torch or convert it to safetensors")
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as e:
            raise CheckpointError(
                f"{self.path}: not a readable torch zip checkpoint ({e}); the file is truncated, corrupt "
                f"or not a torch.save file ({self.path.stat().st_size} bytes)") from None
        names = self._zip.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointError(f"{self.path}: expected exactly one '<name>/data.pkl' in the zip, found "
                                  f"{pkl or 'none'}")
        self._prefix = pkl[0][: -len("data.pkl")]
        self._check_total_size()
        self._byteorder = self._read_byteorder(names)
        try:
            payload = self._read_entry(self._zip.getinfo(pkl[0]), MAX_PICKLE_BYTES, "data.pkl")
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{self.path}: corrupt data.pkl ({e})") from None
        unpickler = _RestrictedUnpickler(io.BytesIO(payload), str(self.path))
        try:
            obj = unpickler.load()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001  (pickle raises many types on corrupt input)
            raise CheckpointError(f"{self.path}: corrupt data.pkl ({type(e).__name__}: {e})") from None
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{self.path}: holds a {type(obj).__name__}, expected a state dict "
                                  "(mapping of name -> tensor)")
        self.tensors: dict[str, TensorRef] = {}
        self.non_tensors: list[str] = []
        self._flatten(obj, "")
        self._check_storages(unpickler.storages)

    def _check_total_size(self) -> None:
        archive = self.path.stat().st_size
        total = sum(i.file_size for i in self._zip.infolist())
        if total > MAX_EXPANSION * archive:
            raise CheckpointError(
                f"{self.path}: the zip entries would decompress to {total} bytes, more than {MAX_EXPANSION} x "
                f"the archive's {archive} bytes (torch.save stores entries uncompressed); refusing a zip bomb")

    def _read_entry(self, info: zipfile.ZipInfo, limit: int, what: str) -> bytes:
        """The bytes of `info`, refusing (before decompressing) more than `limit`, and reading to the
        end so the CRC is checked."""
        if info.file_size > limit:
            raise CheckpointError(f"{self.path}: {what} ({info.filename}) would decompress to {info.file_size} "
                                  f"bytes; at most {limit} are allowed")
        with self._zip.open(info) as f:
            data = f.read(limit)
            if f.read(1):
                raise CheckpointError(f"{self.path}: {what} ({info.filename}) holds more than {limit} bytes")
        return data

    def _read_byteorder(self, names) -> str:
        name = self._prefix + "byteorder"
        if name not in names:
            return "little"
        raw = self._read_entry(self._zip.getinfo(name), MAX_SMALL_ENTRY_BYTES, "byteorder")
        order = raw.decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise CheckpointError(f"{self.path}: byteorder entry says {order!r}; expected 'little' or 'big'")
        return order

    def _flatten(self, obj: Mapping, prefix: str):
        for key, value in obj.items():
            name = f"{prefix}{key}"
            if isinstance(value, TensorRef):
                self.tensors[name] = value
            elif isinstance(value, Mapping):
                self._flatten(value, name + ".")
            else:
                self.non_tensors.append(name)

    def _check_storages(self, storages: Mapping[str, StorageRef]):
        for ref in storages.values():
            info = self._entry(ref.key)
            want = ref.numel * ref.dtype.itemsize
            if info.file_size != want:
                raise CheckpointError(
                    f"{self.path}: storage {ref.key!r} should hold {ref.numel} x {ref.dtype} = {want} bytes, "
                    f"the archive entry has {info.file_size}")
        for name, t in self.tensors.items():
            if len(t.shape) != len(t.stride) or t.offset < 0 or any(s < 0 for s in t.stride):
                raise CheckpointError(f"{self.path}: tensor {name!r} has an invalid view "
                                      f"(shape {t.shape}, stride {t.stride}, offset {t.offset})")
            if t.span > t.storage.numel:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} (shape {t.shape}, stride {t.stride}, offset {t.offset}) "
                    f"reaches past its storage {t.storage.key!r} of {t.storage.numel} elements")

    def _entry(self, key: str) -> zipfile.ZipInfo:
        try:
            return self._zip.getinfo(f"{self._prefix}data/{key}")
        except KeyError:
            raise CheckpointError(f"{self.path}: storage {key!r} is missing from the archive "
                                  f"(no entry {self._prefix}data/{key})") from None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def dtype(self, key: str) -> str:
        return _DTYPE_NAMES[self.tensors[key].storage.dtype]

    def read(self, key: str) -> np.ndarray:
        """The tensor `key` as a fresh contiguous numpy array of its stored dtype."""
        t = self.tensors[key]
        try:
            raw = self._read_entry(self._entry(t.storage.key), t.storage.numel * t.storage.dtype.itemsize,
                                   f"storage of {key!r}")
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{self.path}: corrupt data for {key!r} ({e})") from None
        dtype = t.storage.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
        storage = np.frombuffer(raw, dtype=dtype, count=t.storage.numel)
        if t.span == 0:
            return np.zeros(t.shape, t.storage.dtype)
        view = np.lib.stride_tricks.as_strided(
            storage[t.offset:], shape=t.shape, strides=tuple(s * dtype.itemsize for s in t.stride))
        return np.array(view, dtype=t.storage.dtype, order="C")

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def close(self):
        self._zip.close()


_DTYPE_NAMES = {dtype: name for dtype, name in STORAGE_DTYPES.values()}

