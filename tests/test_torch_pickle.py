"""Torch-free `torch.save` reader: the fixture's real `pytorch_model.bin`, files written here in the
same zip format (torch is not installed), strided views, every dtype, and corrupt or hostile files."""
import dataclasses
import pathlib
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.convert.safetensors_io import TensorSource
from stepvideo_jax.convert.torch_pickle import STORAGE_DTYPES, TorchPickleFile
from tests.fixtures import fixture_dir

STORAGE_OF = {dtype: name for name, (dtype, _) in STORAGE_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class View:
    """A tensor entry that views the storage of entry `base` (element offset and strides)."""

    base: str
    offset: int
    shape: tuple
    stride: tuple


def _int(n: int) -> bytes:
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _tuple(items) -> bytes:
    return b"(" + b"".join(_int(i) for i in items) + b"t"


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def state_dict_pickle(entries) -> bytes:
    """Protocol-2 pickle of {key: _rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())},
    opcode for opcode as `torch.save` writes it. `entries`: key -> (storage key, storage class name,
    numel, offset, shape, stride)."""
    out = [b"\x80\x02}("]
    for key, (skey, stype, numel, offset, shape, stride) in entries.items():
        out += [_str(key), _global("torch._utils", "_rebuild_tensor_v2"), b"(",
                b"(", _str("storage"), _global("torch", stype), _str(skey), _str("cpu"), _int(numel), b"tQ",
                _int(offset), _tuple(shape), _tuple(stride), b"\x89",
                _global("collections", "OrderedDict"), b")R", b"tR"]
    out.append(b"u.")
    return b"".join(out)


def write_torch_zip(path, tensors, *, archive: str = "archive", byteorder: str = "little",
                    pickle_bytes: bytes | None = None) -> pathlib.Path:
    """Write `tensors` (key -> np.ndarray with its own storage, or `View` of another entry) as a
    torch.save zip: `<archive>/data.pkl`, `<archive>/data/<i>`, `byteorder`, `version`."""
    path = pathlib.Path(path)
    storages, entries = {}, {}
    for key, value in tensors.items():
        if isinstance(value, View):
            continue
        arr = np.array(value, order="C")
        skey = str(len(storages))
        storages[skey] = arr
        stride = tuple(s // arr.itemsize for s in arr.strides) if arr.ndim else ()
        entries[key] = (skey, STORAGE_OF[arr.dtype], arr.size, 0, arr.shape, stride)
    for key, value in tensors.items():
        if isinstance(value, View):
            skey, stype, numel = entries[value.base][:3]
            entries[key] = (skey, stype, numel, value.offset, value.shape, value.stride)
    entries = {k: entries[k] for k in tensors}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{archive}/data.pkl", state_dict_pickle(entries) if pickle_bytes is None else pickle_bytes)
        z.writestr(f"{archive}/byteorder", byteorder)
        for skey, arr in storages.items():
            order = "<" if byteorder == "little" else ">"
            z.writestr(f"{archive}/data/{skey}", arr.astype(arr.dtype.newbyteorder(order)).tobytes())
        z.writestr(f"{archive}/version", "3\n")
    return path


def test_fixture_pickle_equals_safetensors():
    """The official torch pickle holds exactly the tensors of `weights.safetensors`, bit for bit."""
    d = fixture_dir("hunyuan_clip")
    pkl = TorchPickleFile(d / "clip_text_encoder" / "pytorch_model.bin")
    ref = TensorSource.single(d / "weights.safetensors")
    assert sorted(pkl.keys()) == sorted(ref.keys())
    assert pkl.non_tensors == []
    for key in ref.keys():
        a, b = pkl.read(key), ref.read(key)
        assert pkl.shape(key) == tuple(ref.shape(key)) and pkl.dtype(key) == ref.dtype(key), key
        assert a.dtype == b.dtype and np.array_equal(a, b), key


def test_writer_round_trips_the_fixture(tmp_path):
    """Our writer of the format, checked on the real file: read -> write -> read is the identity."""
    src = TorchPickleFile(fixture_dir("hunyuan_clip") / "clip_text_encoder" / "pytorch_model.bin")
    tensors = {k: src.read(k) for k in src.keys()}
    back = TorchPickleFile(write_torch_zip(tmp_path / "copy.bin", tensors))
    assert back.keys() == list(tensors)
    for k, v in tensors.items():
        assert np.array_equal(back.read(k), v)


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_dtypes_views_and_byteorder(tmp_path, byteorder):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 5)).astype(np.float32)
    tensors = {
        "f32": base,
        "bf16": rng.standard_normal((4,)).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal((2, 2)).astype(np.float16),
        "f64": rng.standard_normal((2,)),
        "i64": np.arange(-3, 3, dtype=np.int64),
        "u8": np.arange(7, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(2.5, np.float32),
        "f32_t": View("f32", 0, (5, 3), (1, 5)),             # a transposed view of the same storage
        "f32_row2_tail": View("f32", 11, (4,), (1,)),        # storage offset
        "f32_every_other": View("f32", 1, (7,), (2,)),
        "empty": View("f32", 0, (0, 3), (3, 1)),
    }
    f = TorchPickleFile(write_torch_zip(tmp_path / "t.bin", tensors, byteorder=byteorder))
    flat = base.reshape(-1)
    expect = {k: v for k, v in tensors.items() if not isinstance(v, View)}
    expect.update({"f32_t": base.T, "f32_row2_tail": flat[11:15], "f32_every_other": flat[1:15:2],
                   "empty": np.zeros((0, 3), np.float32)})
    assert f.keys() == list(tensors)
    for key, want in expect.items():
        got = f.read(key)
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), key
        assert got.flags.c_contiguous and got.dtype.isnative
    assert f.dtype("bf16") == "BF16" and f.dtype("f32_t") == "F32" and f.shape("f32_t") == (5, 3)


def test_nested_dicts_are_flattened(tmp_path):
    inner = state_dict_pickle({"w": ("0", "FloatStorage", 2, 0, (2,), (1,))})
    # {"model": {"w": tensor}, "epoch": 3}
    payload = b"\x80\x02}(" + _str("model") + inner[2:-1] + _str("epoch") + _int(3) + b"u."
    path = write_torch_zip(tmp_path / "n.bin", {"w": np.ones(2, np.float32)}, pickle_bytes=payload)
    f = TorchPickleFile(path)
    assert f.keys() == ["model.w"] and f.non_tensors == ["epoch"]
    assert np.array_equal(f.read("model.w"), np.ones(2, np.float32))


def _good(tmp_path) -> pathlib.Path:
    return write_torch_zip(tmp_path / "good.bin", {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
                                                   "b": np.ones(4, np.float32)})


def test_truncated_and_garbage_files(tmp_path):
    raw = _good(tmp_path).read_bytes()
    for name, data in [("half.bin", raw[: len(raw) // 2]), ("garbage.bin", b"\x00" * 100), ("empty.bin", b"")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match="truncated, corrupt or not a torch.save file"):
            TorchPickleFile(tmp_path / name)
    with pytest.raises(CheckpointError, match="file not found"):
        TorchPickleFile(tmp_path / "missing.bin")


def test_legacy_format_is_named(tmp_path):
    path = tmp_path / "legacy.bin"
    path.write_bytes(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.")
    with pytest.raises(CheckpointError, match="legacy"):
        TorchPickleFile(path)


def test_corrupt_storage_bytes_fail_the_crc(tmp_path):
    path = _good(tmp_path)
    raw = bytearray(path.read_bytes())
    data = np.arange(6, dtype=np.float32).tobytes()
    at = raw.find(data)
    raw[at + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    f = TorchPickleFile(path)
    with pytest.raises(CheckpointError, match="corrupt data for 'a'"):
        f.read("a")
    assert np.array_equal(f.read("b"), np.ones(4, np.float32))


def test_missing_or_short_storage(tmp_path):
    entries = {"a": ("0", "FloatStorage", 6, 0, (2, 3), (3, 1)), "b": ("7", "FloatStorage", 4, 0, (4,), (1,))}
    path = write_torch_zip(tmp_path / "m.bin", {"a": np.zeros(6, np.float32)},
                           pickle_bytes=state_dict_pickle(entries))
    with pytest.raises(CheckpointError, match=r"storage '7' is missing"):
        TorchPickleFile(path)
    entries = {"a": ("0", "FloatStorage", 60, 0, (60,), (1,))}
    path = write_torch_zip(tmp_path / "s.bin", {"a": np.zeros(6, np.float32)},
                           pickle_bytes=state_dict_pickle(entries))
    with pytest.raises(CheckpointError, match="should hold 60"):
        TorchPickleFile(path)
    entries = {"a": ("0", "FloatStorage", 6, 4, (2, 3), (3, 1))}
    path = write_torch_zip(tmp_path / "v.bin", {"a": np.zeros(6, np.float32)},
                           pickle_bytes=state_dict_pickle(entries))
    with pytest.raises(CheckpointError, match="reaches past its storage"):
        TorchPickleFile(path)


def test_corrupt_pickle(tmp_path):
    raw = state_dict_pickle({"a": ("0", "FloatStorage", 6, 0, (6,), (1,))})
    for payload in (raw[: len(raw) // 2], b"not a pickle"):
        path = write_torch_zip(tmp_path / "p.bin", {"a": np.zeros(6, np.float32)}, pickle_bytes=payload)
        with pytest.raises(CheckpointError, match="corrupt data.pkl"):
            TorchPickleFile(path)
    path = write_torch_zip(tmp_path / "l.bin", {}, pickle_bytes=b"\x80\x02]q\x00.")  # a list
    with pytest.raises(CheckpointError, match="expected a state dict"):
        TorchPickleFile(path)


def test_hostile_globals_are_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = b"\x80\x02" + _global("os", "system") + b"(" + _str(f"touch {marker}") + b"tR."
    path = write_torch_zip(tmp_path / "evil.bin", {}, pickle_bytes=payload)
    with pytest.raises(CheckpointError, match=r"refusing to load global os\.system"):
        TorchPickleFile(path)
    assert not marker.exists()
    payload = b"\x80\x02" + _global("builtins", "eval") + b"(" + _str("1") + b"tR."
    with pytest.raises(CheckpointError, match=r"refusing to load global builtins\.eval"):
        TorchPickleFile(write_torch_zip(tmp_path / "evil2.bin", {}, pickle_bytes=payload))
