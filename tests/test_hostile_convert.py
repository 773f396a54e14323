"""Hostile converter inputs and checkpoint files (issue #21, converter part): each test reproduces
one probe and asserts both the clear error and that nothing was executed, read, deleted or
half-written.

Inputs are built in tmp_path from the shipped demo checkpoint (`stepvideo_jax/assets/demo`) and the
`release_layout` fixture; every size and name is read from those files.
"""
import json
import pathlib
import shutil
import sys

import pytest

from stepvideo_jax.convert import cli, config_records, orbax_io
from stepvideo_jax.convert.safetensors_io import CheckpointError

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
        cli.load_converted(root, "transformer")
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
        cli.load_converted(root, "transformer")
    assert not flag.exists() and "hostile_payload_module" not in sys.modules


@pytest.mark.parametrize("component", ["transformer", "vae", "step_llm", "hunyuan_clip"])
def test_shipped_demo_manifests_still_load_and_round_trip(component):
    """Backward compatibility: the demo's records name classes as "module:QualName"."""
    record = orbax_io.read_manifest(DEMO / component)["config"]
    cfg = cli.config_from_record(record, component)
    assert type(cfg) is config_records.REGISTRY[cli.COMPONENTS[component].config]
    assert cfg.__dataclass_fields__.keys() >= record["values"].keys()
    new = config_records.config_record(cfg)
    assert new["class"] == type(cfg).__name__
    assert config_records.config_from_record(new) == cfg
    assert json.loads(json.dumps(new)) == new


def test_shipped_demo_transformer_restores(tmp_path):
    model = cli.load_converted(DEMO, "transformer")
    record = orbax_io.read_manifest(DEMO / "transformer")["config"]["values"]
    assert model.cfg.num_layers == record["num_layers"]


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
        cli.config_from_record({"class": "DiTConfig", "values": values}, "vae")


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
