"""Hostile converter inputs and checkpoint files (issue #21, converter part): each test reproduces
one probe and asserts both the clear error and that nothing was executed, read, deleted or
half-written.

Inputs are built in tmp_path from the shipped demo checkpoint (`stepvideo_jax/assets/demo`) and the
`release_layout` fixture; every size and name is read from those files.
"""
import json
import pathlib
import shutil
import struct
import sys

import numpy as np
import pytest

from stepvideo_jax import checkpoints
from stepvideo_jax.convert import cli, config_records, conversion, orbax_io, registry
from stepvideo_jax.convert.errors import CheckpointError

DEMO = pathlib.Path(cli.__file__).resolve().parents[1] / "assets" / "demo"


def demo_component(tmp_path: pathlib.Path, component: str) -> pathlib.Path:
    """A copy of the shipped demo's `component/` under `tmp_path/ckpt/` (the converted root)."""
    shutil.copytree(DEMO / component, tmp_path / "ckpt" / component)
    return tmp_path / "ckpt"


def set_config(root: pathlib.Path, component: str, record) -> None:
    path = root / component / orbax_io.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["config"] = record
    path.write_text(json.dumps(manifest))


# --- 1. manifests are data: a closed registry of config classes ---------------------------------

def test_manifest_naming_a_callable_is_refused_and_nothing_runs(tmp_path):
    root = demo_component(tmp_path, "transformer")
    flag = tmp_path / "executed"
    set_config(root, "transformer", {"class": "os:system", "values": {"command": f"touch {flag}"}})
    with pytest.raises(CheckpointError, match=r"'os:system' is not a registered model config.*DiTConfig"):
        checkpoints.load_converted(root, "transformer")
    assert not flag.exists(), "the manifest's command ran"


def test_manifest_naming_a_module_never_imports_it(tmp_path, monkeypatch):
    payload = tmp_path / "payload"
    payload.mkdir()
    flag = tmp_path / "imported"
    (payload / "hostile_payload_module.py").write_text(
        f"import pathlib\npathlib.Path({str(flag)!r}).touch()\nclass Config:\n    def __init__(self, **kw): pass\n")
    monkeypatch.syspath_prepend(str(payload))
    root = demo_component(tmp_path, "transformer")
    set_config(root, "transformer", {"class": "hostile_payload_module:Config", "values": {}})
    with pytest.raises(CheckpointError, match="hostile_payload_module:Config"):
        checkpoints.load_converted(root, "transformer")
    assert not flag.exists() and "hostile_payload_module" not in sys.modules


@pytest.mark.parametrize("component", ["transformer", "vae", "step_llm", "hunyuan_clip"])
def test_shipped_demo_manifests_still_load_and_round_trip(component):
    """Backward compatibility: the demo's records name classes as "module:QualName"."""
    record = orbax_io.read_manifest(DEMO / component)["config"]
    cfg = registry.config_from_record(record, component)
    assert type(cfg) is config_records.REGISTRY[registry.COMPONENTS[component].config]
    assert cfg.__dataclass_fields__.keys() >= record["values"].keys()
    new = config_records.config_record(cfg)
    assert new["class"] == type(cfg).__name__
    assert config_records.config_from_record(new) == cfg
    assert json.loads(json.dumps(new)) == new


def test_shipped_demo_transformer_restores(tmp_path):
    model = checkpoints.load_converted(DEMO, "transformer")
    record = orbax_io.read_manifest(DEMO / "transformer")["config"]["values"]
    assert model.cfg.num_layers == record["num_layers"]


@pytest.mark.parametrize("edit, match", [
    (lambda m, out: m["groups"][0].update(dir=str(out)), "group 0 dir"),
    (lambda m, out: m["groups"][0].update(dir="../../outside"), "group 0 dir '../../outside'"),
    (lambda m, out: m["groups"][0]["params"].update({"x": ["1"]}), "group 0 must be"),
    (lambda m, out: m.update(groups={"dir": "params"}), "'groups' must be a list"),
    (lambda m, out: m.update(dtype="int4"), "dtype 'int4'"),
])
def test_manifest_groups_stay_inside_the_checkpoint(tmp_path, monkeypatch, edit, match):
    """A manifest's group folders are read by Orbax: one outside the checkpoint is refused unread."""
    root = demo_component(tmp_path, "transformer")
    outside = tmp_path / "outside"
    shutil.copytree(root / "transformer" / "params", outside)
    path = root / "transformer" / orbax_io.MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest, outside)
    path.write_text(json.dumps(manifest))
    restored = []
    monkeypatch.setattr(orbax_io.ocp.StandardCheckpointer, "restore", lambda self, *a, **k: restored.append(a))
    with pytest.raises(CheckpointError, match=match):
        checkpoints.load_converted(root, "transformer")
    assert restored == []


def _demo_values(component):
    return dict(orbax_io.read_manifest(DEMO / component)["config"]["values"])


@pytest.mark.parametrize("edit, match", [
    (lambda v: v.update(exec_hook="x"), r"unknown config fields \['exec_hook'\]"),
    (lambda v: v.update(num_layers="4"), r"DiTConfig.num_layers: value '4' is not of type int"),
    (lambda v: v.update(num_layers=True), r"DiTConfig.num_layers: value True is not of type int"),
    (lambda v: v.update(num_layers=2.5), r"DiTConfig.num_layers: value 2.5 is not of type int"),
    (lambda v: v.update(rope_splits=v["rope_splits"][:-1]), r"DiTConfig.rope_splits"),
    (lambda v: v.update(caption_channels={"a": 1}), r"DiTConfig.caption_channels"),
    (lambda v: v.update(mask_sum_in_compute_dtype=1), r"mask_sum_in_compute_dtype: value 1 is not of type bool"),
    (lambda v: v.update(norm_eps=float("nan")), r"DiTConfig.norm_eps: value nan is not finite"),
])
def test_manifest_values_are_type_checked(edit, match):
    values = _demo_values("transformer")
    edit(values)
    with pytest.raises(CheckpointError, match=match):
        config_records.config_from_record({"class": "DiTConfig", "values": values})


def test_manifest_record_shape_and_component_class_are_checked():
    values = _demo_values("transformer")
    with pytest.raises(CheckpointError, match="exactly the keys"):
        config_records.config_from_record({"class": "DiTConfig", "values": values, "factory": "os:system"})
    with pytest.raises(CheckpointError, match="exactly the keys"):
        config_records.config_from_record(["DiTConfig", values])
    with pytest.raises(CheckpointError, match="values must be an object"):
        config_records.config_from_record({"class": "DiTConfig", "values": [1, 2]})
    with pytest.raises(CheckpointError, match="holds a DiTConfig, this component needs a VAEConfig"):
        registry.config_from_record({"class": "DiTConfig", "values": values}, "vae")


def test_manifest_record_without_a_newer_field_takes_its_default():
    """Manifests written before a field existed keep loading (the field's default)."""
    values = _demo_values("transformer")
    dropped = sorted(values)[-1]
    del values[dropped]
    cfg = config_records.config_from_record({"class": "DiTConfig", "values": values})
    assert getattr(cfg, dropped) == config_records.REGISTRY["DiTConfig"].__dataclass_fields__[dropped].default


def test_registry_refuses_a_field_it_cannot_check():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Odd:
        table: dict = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError, match="Odd.table"):
        config_records.register(Odd)
    assert "Odd" not in config_records.REGISTRY


# --- shared helpers for the release probes -------------------------------------------------------

from tests.fixtures import fixture_dir  # noqa: E402
from tests.test_convert_errors import (  # noqa: E402
    INDEX, convert_fails, copy_release, read_index, read_shard, shard_of, write_index, write_shard)

RELEASE = fixture_dir("release_layout") / "stepvideo-t2v"


def tree_bytes(root: pathlib.Path) -> dict[str, bytes]:
    """Every regular file under `root` (links not followed) -> its bytes: 'nothing changed' checks."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


@pytest.fixture
def opened(monkeypatch):
    """Resolved paths of every safetensors file the readers open."""
    from stepvideo_jax.convert import safetensors_io

    paths, original = [], safetensors_io.SafetensorsFile.__init__

    def spy(self, path):
        paths.append(pathlib.Path(path).resolve())
        original(self, path)

    monkeypatch.setattr(safetensors_io.SafetensorsFile, "__init__", spy)
    return paths


# --- 2. every file a release names resolves inside it --------------------------------------------

@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_index_entry_outside_the_release_is_refused_unread(tmp_path, capsys, opened, how):
    """A weight_map entry naming a real shard outside the release (absolute, `..`, or a symlink in
    the folder): an error naming the entry, the outside file never opened, no destination."""
    folder = copy_release(tmp_path, "stepvideo-t2v")
    index = read_index(folder)
    name = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "outside" / "x.safetensors"
    outside.parent.mkdir()
    (folder / name).rename(outside)
    entry = {"absolute": str(outside), "dotdot": "../../outside/x.safetensors", "symlink": name}[how]
    if how == "symlink":
        (folder / name).symlink_to(outside)
    else:
        index["weight_map"] = {k: entry if v == name else v for k, v in index["weight_map"].items()}
        write_index(folder, index)
    err = convert_fails(tmp_path, capsys)
    assert f"weight_map entry {entry!r}" in err
    assert ("outside the allowed root" if how == "symlink" else "not a relative path inside the release") in err
    assert outside.resolve() not in opened


def test_outside_file_contents_never_reach_the_message(tmp_path, capsys):
    """The probe read a private file's first 8 bytes into the error; now it is refused by name."""
    folder = copy_release(tmp_path, "stepvideo-t2v")
    secret = tmp_path / "outside" / "secret"
    secret.parent.mkdir()
    secret.write_bytes(b"TOPSECRET-password\n" * 4)
    index = read_index(folder)
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../../outside/secret"
    write_index(folder, index)
    err = convert_fails(tmp_path, capsys)
    leaked = str(struct.unpack("<Q", secret.read_bytes()[:8])[0])
    assert "'../../outside/secret'" in err and "TOPSECRET" not in err and leaked not in err


@pytest.mark.parametrize("target", ["file", "folder", "config"])
def test_symlink_out_of_the_release_is_not_copied(tmp_path, capsys, target):
    """A tokenizer file, the tokenizer folder or the encoder config linked to a private file outside:
    refused before anything is converted or copied."""
    shutil.copytree(RELEASE / "hunyuan_clip", tmp_path / "release" / "hunyuan_clip")
    comp = tmp_path / "release" / "hunyuan_clip"
    private = tmp_path / "private"
    shutil.copytree(comp / "tokenizer", private)
    for f in private.iterdir():
        f.chmod(0o640)
    vocab = sorted(private.iterdir())[0]
    if target == "file":
        link = comp / "tokenizer" / vocab.name
        link.unlink()
        link.symlink_to(vocab)
    elif target == "folder":
        link = comp / "tokenizer"
        shutil.rmtree(link)
        link.symlink_to(private, target_is_directory=True)
    else:
        link = comp / "clip_text_encoder" / "config.json"
        shutil.copyfile(link, private / "config.json")
        link.unlink()
        link.symlink_to(private / "config.json")
    err = convert_fails(tmp_path, capsys, components="hunyuan_clip")
    assert str(link) in err and "outside the allowed root" in err


def test_copied_release_files_get_mode_0644(tmp_path):
    shutil.copytree(RELEASE / "hunyuan_clip", tmp_path / "release" / "hunyuan_clip")
    files = sorted((tmp_path / "release" / "hunyuan_clip" / "tokenizer").iterdir())
    for f, mode in zip(files, [0o600, 0o640, 0o444] * len(files)):
        f.chmod(mode)
    out = tmp_path / "out"
    assert cli.main(["--release", str(tmp_path / "release"), "--out", str(out), "--components", "hunyuan_clip"]) == 0
    copied = sorted((out / "hunyuan_clip" / "tokenizer").iterdir())
    assert [p.name for p in copied] == [f.name for f in files]
    assert {oct(p.stat().st_mode & 0o777) for p in copied} == {oct(0o644)}


def hub_snapshot(tmp_path: pathlib.Path) -> pathlib.Path:
    """The fixture's transformer laid out as a Hugging Face hub cache: snapshot files are relative
    symlinks into the repo's blobs/."""
    repo = tmp_path / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    (snapshot / "transformer").mkdir(parents=True)
    for i, f in enumerate(sorted((RELEASE / "transformer").iterdir())):
        shutil.copyfile(f, repo / "blobs" / f"blob{i}")
        (snapshot / "transformer" / f.name).symlink_to(f"../../../blobs/blob{i}")
    return snapshot


def test_hub_cache_snapshot_links_into_its_blobs_are_allowed(tmp_path):
    snapshot = hub_snapshot(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["--release", str(snapshot), "--out", str(out), "--components", "transformer"]) == 0
    assert orbax_io.read_manifest(out / "transformer")["num_params"] > 0


def test_hub_cache_link_leaving_the_repo_is_refused(tmp_path, capsys):
    snapshot = hub_snapshot(tmp_path)
    folder = snapshot / "transformer"
    name = sorted(set(read_index(folder)["weight_map"].values()))[0]
    other = tmp_path / "hub" / "models--other--repo" / "blobs"
    other.mkdir(parents=True)
    shutil.copyfile(folder / name, other / "stolen")
    (folder / name).unlink()
    (folder / name).symlink_to(other / "stolen")
    err = convert_fails(tmp_path, capsys, release=snapshot)
    assert f"weight_map entry {name!r}" in err and "models--org--name" in err


def test_explicit_allowed_root(tmp_path, capsys):
    """A layout whose shards live in a shared store: refused by default, converted when the caller
    names the store's parent as the allowed root."""
    folder = copy_release(tmp_path, "stepvideo-t2v")
    store = tmp_path / "store"
    store.mkdir()
    for name in sorted(set(read_index(folder)["weight_map"].values())):
        (folder / name).rename(store / name)
        (folder / name).symlink_to(store / name)
    assert "convert --allowed-root" in convert_fails(tmp_path, capsys)
    out = tmp_path / "dest" / "out"
    assert cli.main(["--release", str(tmp_path / "release"), "--out", str(out), "--components", "transformer",
                     "--allowed-root", str(tmp_path)]) == 0
    assert (out / registry.CONVERTED_MARKER).is_file()


# --- 3. safetensors headers validated as the reference library does -----------------------------

def busiest_shard(folder: pathlib.Path) -> pathlib.Path:
    """The shard holding the most tensors (the header edits need two)."""
    names = list(read_index(folder)["weight_map"].values())
    return folder / max(sorted(set(names)), key=names.count)


def _edit_header(shard: pathlib.Path, edit) -> None:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def _sorted_keys(header):
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _overlap(h):
    """The second tensor moved back by one element: it overlaps the first (sizes unchanged)."""
    a, b = _sorted_keys(h)[:2]
    step = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
    step //= max(1, int(np.prod(h[b]["shape"])))
    h[b]["data_offsets"] = [o - step for o in h[b]["data_offsets"]]


def _negative(h):
    k = _sorted_keys(h)[0]
    begin, end = h[k]["data_offsets"]
    h[k]["data_offsets"] = [begin - 8, end - 8]


def _float_offsets(h):
    k = _sorted_keys(h)[0]
    h[k]["data_offsets"] = [float(o) for o in h[k]["data_offsets"]]


def _bad_shape(h):
    k = _sorted_keys(h)[0]
    h[k]["shape"] = [-1] + h[k]["shape"][1:]


def _unknown_dtype(h):
    h[_sorted_keys(h)[0]]["dtype"] = "F33"


def _size_mismatch(h):
    k = _sorted_keys(h)[-1]
    h[k]["shape"] = list(h[k]["shape"]) + [2]


def _metadata_not_strings(h):
    h["__metadata__"] = {"format": 1}


HEADER_EDITS = {
    "overlap": (_overlap, "overlaps"),
    "negative": (_negative, "non-negative integers"),
    "float_offsets": (_float_offsets, "non-negative integers"),
    "bad_shape": (_bad_shape, "list of non-negative integers"),
    "unknown_dtype": (_unknown_dtype, "unknown dtype 'F33'"),
    "size_mismatch": (_size_mismatch, "should take"),
    "metadata": (_metadata_not_strings, "__metadata__ must map strings to strings"),
}


@pytest.mark.parametrize("edit", sorted(HEADER_EDITS))
def test_bad_safetensors_header_is_refused_before_any_read(tmp_path, capsys, monkeypatch, edit):
    from stepvideo_jax.convert import safetensors_io

    reads = []
    monkeypatch.setattr(safetensors_io.SafetensorsFile, "read", lambda self, key: reads.append(key))
    folder = copy_release(tmp_path, "stepvideo-t2v")
    shard = busiest_shard(folder)
    change, expect = HEADER_EDITS[edit]
    _edit_header(shard, change)
    err = convert_fails(tmp_path, capsys)
    assert shard.name in err and expect in err
    assert reads == []


def test_gap_and_trailing_bytes_are_refused(tmp_path, capsys):
    folder = copy_release(tmp_path, "stepvideo-t2v")
    shard = folder / sorted(set(read_index(folder)["weight_map"].values()))[0]
    original = shard.read_bytes()
    shard.write_bytes(original + b"\0" * 8)
    err = convert_fails(tmp_path, capsys)
    assert shard.name in err and "cover" in err
    meta, tensors = read_shard(shard)
    header, offset = {"__metadata__": meta}, 8  # every tensor moved 8 bytes on: [0, 8) is a gap
    for k, (dtype, shape, data) in tensors.items():
        header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    blob = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 8 + b"".join(d for *_, d in tensors.values()))
    err = convert_fails(tmp_path, capsys)
    assert shard.name in err and "leaves bytes [0, 8) unused" in err


def test_header_size_cap(tmp_path):
    from stepvideo_jax.convert import safetensors_io

    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", safetensors_io.MAX_HEADER_BYTES + 1))
        f.truncate(safetensors_io.MAX_HEADER_BYTES + 16)  # sparse: the cap, not the file size, refuses it
    with pytest.raises(CheckpointError, match=f"the cap is {safetensors_io.MAX_HEADER_BYTES}"):
        safetensors_io.SafetensorsFile(path)


# --- 4. torch pickle limits: zip bombs fail fast, nothing decompressed --------------------------

def bomb(src: pathlib.Path, dst: pathlib.Path, target: str, size: int, *, keep_head: bool = False) -> None:
    """A copy of the torch zip `src` whose entry `target` is replaced by a deflated entry of `size`
    bytes (zeros, after the original bytes when `keep_head`), compressed in a stream."""
    import zipfile

    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as w:
        for info in z.infolist():
            if info.filename != target:
                w.writestr(info, z.read(info.filename))
                continue
            entry = zipfile.ZipInfo(info.filename)
            entry.compress_type = zipfile.ZIP_DEFLATED
            head = z.read(info.filename) if keep_head else b""
            with w.open(entry, "w", force_zip64=True) as f:
                f.write(head)
                chunk, left = bytes(2**22), size - len(head)
                while left > 0:
                    f.write(chunk[:min(left, len(chunk))])
                    left -= len(chunk)


CLIP_BIN = fixture_dir("hunyuan_clip") / "clip_text_encoder" / "pytorch_model.bin"


def _storage_entries():
    import zipfile

    with zipfile.ZipFile(CLIP_BIN) as z:
        return {i.filename: i.file_size for i in z.infolist() if "/data/" in i.filename}


def _traced_peak(fn) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_zip_bomb_storage_entry_fails_fast_without_decompressing(tmp_path):
    """The probe: a storage entry of a few hundred KB that inflates to hundreds of MB (the issue's was
    2.3 MB -> 3.37 GB peak). Refused from the zip directory, before any byte is inflated."""
    from stepvideo_jax.convert import torch_pickle

    entries = _storage_entries()
    target = max(entries, key=entries.get)
    size = max(64 * 2**20, 8 * CLIP_BIN.stat().st_size)
    path = tmp_path / "bomb.bin"
    bomb(CLIP_BIN, path, target, size)
    assert size > torch_pickle.MAX_EXPANSION * path.stat().st_size
    errors = []

    def load():
        try:
            torch_pickle.TorchPickleFile(path)
        except CheckpointError as e:
            errors.append(str(e))

    import zipfile

    with zipfile.ZipFile(path) as z:
        declared = sum(i.file_size for i in z.infolist())
    peak = _traced_peak(load)
    assert errors and "refusing a zip bomb" in errors[0] and f"decompress to {declared} bytes" in errors[0]
    assert peak < size // 64, f"traced peak {peak} bytes while refusing a {size}-byte entry"


def test_storage_entry_larger_than_its_storage_is_refused(tmp_path):
    """Within the total cap, but inflating past the storage the pickle declares: refused at open."""
    from stepvideo_jax.convert import torch_pickle

    entries = _storage_entries()
    target = max(entries, key=entries.get)
    path = tmp_path / "long.bin"
    bomb(CLIP_BIN, path, target, entries[target] + 4096, keep_head=True)
    with pytest.raises(CheckpointError, match=r"should hold .* bytes, the archive entry has " + str(entries[target] + 4096)):
        torch_pickle.TorchPickleFile(path)


def test_oversized_pickle_entry_is_refused(tmp_path, monkeypatch):
    """data.pkl is capped (MAX_PICKLE_BYTES) from its declared size, before it is inflated."""
    import zipfile

    from stepvideo_jax.convert import torch_pickle

    with zipfile.ZipFile(CLIP_BIN) as z:
        pkl = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
    monkeypatch.setattr(torch_pickle, "MAX_PICKLE_BYTES", pkl.file_size - 1)
    with pytest.raises(CheckpointError, match=rf"data.pkl .* would decompress to {pkl.file_size} bytes; at most"):
        torch_pickle.TorchPickleFile(CLIP_BIN)


def test_zip_bomb_in_a_release_stops_the_conversion(tmp_path, capsys):
    shutil.copytree(RELEASE / "hunyuan_clip", tmp_path / "release" / "hunyuan_clip")
    weights = tmp_path / "release" / "hunyuan_clip" / "clip_text_encoder" / "pytorch_model.bin"
    import zipfile

    with zipfile.ZipFile(weights) as z:
        sizes = {i.filename: i.file_size for i in z.infolist() if "/data/" in i.filename}
    bomb(RELEASE / "hunyuan_clip" / "clip_text_encoder" / "pytorch_model.bin", weights,
         max(sizes, key=sizes.get), 64 * 2**20)
    err = convert_fails(tmp_path, capsys, components="hunyuan_clip")
    assert "pytorch_model.bin" in err and "zip bomb" in err


# --- 5. --overwrite replaces only a previous conversion, never the release ----------------------

def _release_copy(tmp_path) -> pathlib.Path:
    copy_release(tmp_path, "stepvideo-t2v")
    return tmp_path / "release"


@pytest.mark.parametrize("where", ["release", "parent", "inside", "component", "symlink"])
def test_out_overlapping_the_release_is_refused(tmp_path, capsys, where):
    release = _release_copy(tmp_path)
    before = tree_bytes(tmp_path)
    out = {"release": release, "parent": tmp_path, "inside": release / "converted",
           "component": release / "transformer", "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        out.symlink_to(release, target_is_directory=True)
        before = tree_bytes(tmp_path)
    rc = cli.main(["--release", str(release), "--out", str(out), "--overwrite", "--components", "transformer"])
    err = capsys.readouterr().err
    assert rc == 1 and "overlaps the release" in err and str(out) in err
    assert tree_bytes(tmp_path) == before, "the release or its surroundings changed"


def test_overwrite_refuses_a_directory_this_converter_did_not_write(tmp_path, capsys):
    release = _release_copy(tmp_path)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("years of work\n")
    (out / registry.CONVERTED_MARKER).write_text("not ours\n")
    rc = cli.main(["--release", str(release), "--out", str(out), "--overwrite", "--components", "transformer"])
    err = capsys.readouterr().err
    assert rc == 1 and "is not a conversion this converter wrote" in err
    assert (out / "thesis.txt").read_text() == "years of work\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious", "release"], "temporary files left"


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_group_mb_must_be_positive(tmp_path, capsys, value):
    release = _release_copy(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--release", str(release), "--out", str(tmp_path / "out"), "--group-mb", value])
    assert exit_.value.code == 2 and "--group-mb: must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="positive number of bytes"):
        conversion.convert_release(release, tmp_path / "out", group_bytes=0)


# --- 6. export_dit is atomic; exported files are 0644 ---------------------------------------------

def _transformer_model():
    from stepvideo_jax.convert import dit as dit_convert

    return dit_convert.load(RELEASE / "transformer")


def _shard_bytes(model) -> int:
    """A shard size that splits the model's export into several shards (from its parameter sizes)."""
    from flax import nnx

    sizes = [v.get_value().size * 4 for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    return max(max(sizes), sum(sizes) // 4)


def test_failed_export_leaves_the_previous_export_intact(tmp_path, monkeypatch):
    import safetensors.numpy
    from flax import nnx

    from stepvideo_jax.convert import dit as dit_convert
    from stepvideo_jax.convert import export_dit

    model = _transformer_model()
    limit = _shard_bytes(model)
    out = export_dit.export(model, tmp_path / "transformer", dtype="float32", max_shard_bytes=limit)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o644)}
    before = tree_bytes(out)
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        v.set_value(v.get_value() + 1)
    calls, original = [], safetensors.numpy.save_file

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_dit.export(model, out, dtype="float32", max_shard_bytes=limit)
    assert len(calls) == 2 and not pathlib.Path(calls[0]).exists()
    assert tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transformer"], "temporary files left"
    monkeypatch.setattr(safetensors.numpy, "save_file", original)
    export_dit.export(model, out, dtype="float32", max_shard_bytes=limit)
    reloaded = dit_convert.load(out)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(reloaded, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(model, nnx.Param))):
        assert np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), path


@pytest.mark.parametrize("existing", ["release", "other"])
def test_export_never_replaces_what_it_did_not_write(tmp_path, existing):
    from stepvideo_jax.convert import export_dit

    out = tmp_path / "transformer"
    if existing == "release":
        shutil.copytree(RELEASE / "transformer", out)
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
    before = tree_bytes(out)
    with pytest.raises(CheckpointError, match="is not an export this tool wrote"):
        export_dit.export(_transformer_model(), out, dtype="float32")
    assert tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transformer"]
