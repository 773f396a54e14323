"""Every bad input gives a clear error naming the key/file, and no destination is left behind.

Bad releases are built in tmp_path from the fixture's `release_layout` transformer (float32 and the
bfloat16 copy) by editing safetensors headers/data, the index or the config.
"""
import json
import pathlib
import shutil
import struct

import pytest

from stepvideo_jax.convert import cli, orbax_io
from tests.fixtures import fixture_dir

INDEX = "diffusion_pytorch_model.safetensors.index.json"


def copy_release(tmp_path: pathlib.Path, variant: str) -> pathlib.Path:
    """A writable copy of `<variant>/transformer` as `tmp_path/release/transformer`."""
    src = fixture_dir("release_layout") / variant / "transformer"
    dst = tmp_path / "release" / "transformer"
    dst.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copyfile(f, dst / f.name)
    return dst


def at_least_two_shards(folder: pathlib.Path) -> list[str]:
    """The shard names of the copy at `folder`, re-split in two (index rewritten) if it has one."""
    index = read_index(folder)
    names = sorted(set(index["weight_map"].values()))
    if len(names) > 1:
        return names
    meta, tensors = read_shard(folder / names[0])
    (folder / names[0]).unlink()
    keys = list(tensors)
    names = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    for name, part in zip(names, (keys[:len(keys) // 2], keys[len(keys) // 2:])):
        write_shard(folder / name, meta, {k: tensors[k] for k in part})
        index["weight_map"].update({k: name for k in part})
    write_index(folder, index)
    return names


def truncate(shard: pathlib.Path) -> None:
    """Cut the end of the shard's data section (at most 1000 bytes, never into the header)."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    shard.write_bytes(raw[:-min(1000, len(raw) - 8 - n)])


def read_index(folder: pathlib.Path) -> dict:
    return json.loads((folder / INDEX).read_text())


def write_index(folder: pathlib.Path, index: dict) -> None:
    (folder / INDEX).write_text(json.dumps(index))


def read_shard(path: pathlib.Path) -> tuple[dict, dict[str, tuple[str, list, bytes]]]:
    """(metadata, {key: (dtype, shape, raw bytes)}) in file order."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    return meta, {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
                  for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])}


def write_shard(path: pathlib.Path, meta: dict, tensors: dict[str, tuple[str, list, bytes]]) -> None:
    header, offset = {"__metadata__": meta}, 0
    for k, (dtype, shape, b) in tensors.items():
        header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(b for *_, b in tensors.values()))


def shard_of(folder: pathlib.Path, key: str) -> pathlib.Path:
    return folder / read_index(folder)["weight_map"][key]


def last_block_key(folder: pathlib.Path, suffix: str) -> str:
    keys = [k for k in read_index(folder)["weight_map"] if k.endswith(suffix) and k.startswith("transformer_blocks.")]
    return max(keys, key=lambda k: int(k.split(".")[1]))


def convert_fails(tmp_path, capsys, *, extra=(), release=None, components="transformer") -> str:
    """Run the CLI, expect failure, check nothing is left next to the destination; return stderr."""
    out = tmp_path / "dest" / "out"
    argv = ["--release", str(release or tmp_path / "release"), "--out", str(out), "--group-mb", "1", *extra]
    if components:
        argv += ["--components", components]
    assert cli.main(argv) == 1
    assert not out.exists(), "a destination was written despite the error"
    assert not (tmp_path / "dest").exists() or list((tmp_path / "dest").iterdir()) == [], "temporary files left"
    return capsys.readouterr().err


VARIANTS = ["stepvideo-t2v", "stepvideo-t2v-bf16"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_missing_key(tmp_path, capsys, variant):
    folder = copy_release(tmp_path, variant)
    key = last_block_key(folder, ".scale_shift_table")
    shard = shard_of(folder, key)
    meta, tensors = read_shard(shard)
    del tensors[key]
    write_shard(shard, meta, tensors)
    index = read_index(folder)
    del index["weight_map"][key]
    write_index(folder, index)
    err = convert_fails(tmp_path, capsys)
    assert "missing keys (1)" in err and key in err


@pytest.mark.parametrize("variant", VARIANTS)
def test_unexpected_key(tmp_path, capsys, variant):
    folder = copy_release(tmp_path, variant)
    key = "pos_embed.proj.bias"
    shard = shard_of(folder, key)
    meta, tensors = read_shard(shard)
    tensors["pos_embed.extra_table"] = tensors[key]
    write_shard(shard, meta, tensors)
    index = read_index(folder)
    index["weight_map"]["pos_embed.extra_table"] = shard.name
    write_index(folder, index)
    err = convert_fails(tmp_path, capsys)
    assert "unexpected keys (1): pos_embed.extra_table" in err


@pytest.mark.parametrize("variant", VARIANTS)
def test_wrong_shape(tmp_path, capsys, variant):
    """A late tensor (last block's FFN output) transposed in the header: found mid-stream, after
    groups were written to the temporary directory, which is then removed."""
    folder = copy_release(tmp_path, variant)
    key = last_block_key(folder, ".ff.net.2.weight")
    shard = shard_of(folder, key)
    meta, tensors = read_shard(shard)
    dtype, shape, b = tensors[key]
    tensors[key] = (dtype, shape[::-1], b)
    write_shard(shard, meta, tensors)
    err = convert_fails(tmp_path, capsys)
    assert key in err and f"shape {tuple(shape[::-1])}" in err and "the model expects" in err


@pytest.mark.parametrize("variant", VARIANTS)
def test_unsupported_dtype(tmp_path, capsys, variant):
    folder = copy_release(tmp_path, variant)
    key = last_block_key(folder, ".norm2.weight")
    shard = shard_of(folder, key)
    meta, tensors = read_shard(shard)
    dtype, shape, b = tensors[key]
    tensors[key] = ({"F32": "I32", "BF16": "I16"}[dtype], shape, b)
    write_shard(shard, meta, tensors)
    err = convert_fails(tmp_path, capsys)
    assert "unsupported tensor dtypes" in err and key in err and "BF16" in err and "F32" in err


@pytest.mark.parametrize("variant", VARIANTS)
def test_truncated_shard(tmp_path, capsys, variant):
    folder = copy_release(tmp_path, variant)
    shard = sorted(folder.glob("*.safetensors"))[-1]
    truncate(shard)
    err = convert_fails(tmp_path, capsys)
    assert shard.name in err and "truncated" in err


@pytest.mark.parametrize("variant", VARIANTS)
def test_corrupt_header(tmp_path, capsys, variant):
    folder = copy_release(tmp_path, variant)
    shard = sorted(folder.glob("*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[8:24] = b"\xff" * 16
    shard.write_bytes(bytes(raw))
    err = convert_fails(tmp_path, capsys)
    assert shard.name in err and "corrupt safetensors header" in err


def test_header_larger_than_file(tmp_path, capsys):
    folder = copy_release(tmp_path, "stepvideo-t2v")
    shard = sorted(folder.glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    err = convert_fails(tmp_path, capsys)
    assert shard.name in err and "corrupt safetensors header" in err


@pytest.mark.parametrize("breakage", ["not_json", "no_weight_map", "missing_shard", "wrong_shard", "unlisted_key",
                                      "no_index"])
def test_broken_index(tmp_path, capsys, breakage):
    folder = copy_release(tmp_path, "stepvideo-t2v-bf16")
    names = at_least_two_shards(folder)
    index = read_index(folder)
    key = next(iter(index["weight_map"]))
    expect = {"not_json": "broken index", "no_weight_map": "broken index", "missing_shard": "does not exist",
              "wrong_shard": "which does not contain it", "unlisted_key": "which the index maps to None",
              "no_index": "index file not found"}[breakage]
    if breakage == "not_json":
        (folder / INDEX).write_text(json.dumps(index)[:-10])
    elif breakage == "no_weight_map":
        write_index(folder, {"metadata": index["metadata"]})
    elif breakage == "missing_shard":
        index["weight_map"][key] = f"diffusion_pytorch_model-{len(names) + 1:05d}-of-{len(names) + 1:05d}.safetensors"
        write_index(folder, index)
    elif breakage == "wrong_shard":
        index["weight_map"][key] = next(n for n in names if n != index["weight_map"][key])
        write_index(folder, index)
    elif breakage == "unlisted_key":
        del index["weight_map"][key]
        write_index(folder, index)
    else:
        (folder / INDEX).unlink()
    err = convert_fails(tmp_path, capsys)
    assert INDEX in err and expect in err
    if breakage in ("wrong_shard", "unlisted_key"):
        assert key in err


def test_config_missing_required_key(tmp_path, capsys, caplog):
    folder = copy_release(tmp_path, "stepvideo-t2v")
    config = json.loads((folder / "config.json").read_text())
    del config["num_layers"]
    config["some_new_option"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    err = convert_fails(tmp_path, capsys)
    assert "config.json" in err and "missing required keys ['num_layers']" in err


def test_config_unknown_key_warns(tmp_path, caplog):
    folder = copy_release(tmp_path, "stepvideo-t2v")
    config = json.loads((folder / "config.json").read_text())
    config["some_new_option"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    assert cli.main(["--release", str(tmp_path / "release"), "--out", str(tmp_path / "out")]) == 0
    assert "some_new_option" in caplog.text
    assert orbax_io.read_manifest(tmp_path / "out" / "transformer")["num_params"] > 0


def test_unknown_component_and_missing_folder(tmp_path, capsys):
    copy_release(tmp_path, "stepvideo-t2v")
    err = convert_fails(tmp_path, capsys, components="transformer,text_encoder")
    assert "text_encoder" in err and "transformer" in err and "vae" in err
    err = convert_fails(tmp_path, capsys, components="transformer,vae")
    assert "no vae/ folder" in err
    err = convert_fails(tmp_path, capsys, release=tmp_path / "nowhere")
    assert "not found" in err
    err = convert_fails(tmp_path, capsys, components=",")
    assert "no components selected" in err


def test_failed_overwrite_keeps_the_old_destination(tmp_path, capsys):
    folder = copy_release(tmp_path, "stepvideo-t2v")
    out = tmp_path / "dest" / "out"
    assert cli.main(["--release", str(tmp_path / "release"), "--out", str(out)]) == 0
    before = (out / "transformer" / orbax_io.MANIFEST).read_bytes()
    shard = sorted(folder.glob("*.safetensors"))[-1]
    truncate(shard)
    assert cli.main(["--release", str(tmp_path / "release"), "--out", str(out), "--overwrite"]) == 1
    assert "truncated" in capsys.readouterr().err
    assert (out / "transformer" / orbax_io.MANIFEST).read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["out"], "temporary files left"
