"""The installable package: pyproject.toml agrees with the source tree and requirements.txt, shipped
configs resolve from any directory, and `pip install .` of a clean copy runs README's demo command
from an empty directory."""
import ast
import os
import pathlib
import re
import shutil
import site
import subprocess
import sys
import tomllib

import pytest

from stepvideo_jax import config_files
from tests import source_trees
from tests.fixtures import PROJECT_ROOT
from tests.test_generate_cli import load_config

TEST_TOOLS = {"pytest", "pytest-xdist", "setuptools", "selenium"}
UI = {"gradio"}   # the [ui] extra


def _pyproject():
    return tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())


def _pins(lines):
    return {re.split(r"[=<>\[]", line)[0].lower().replace("_", "-"): line.replace("_", "-").lower()
            for line in (raw.strip() for raw in lines) if line and not line.startswith("#")}


def test_packages_cover_the_source_tree():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(PROJECT_ROOT).parts)
               for p in (PROJECT_ROOT / "stepvideo_jax").rglob("__init__.py")}
    assert listed == on_disk | {"stepvideo_jax.configs"}, "pyproject.toml's package list is out of date"
    assert _pyproject()["tool"]["setuptools"]["package-dir"] == {"stepvideo_jax.configs": "configs"}


def test_dependencies_are_requirements_without_test_tools():
    project = _pyproject()["project"]
    runtime = _pins(project["dependencies"])
    pinned = _pins((PROJECT_ROOT / "requirements.txt").read_text().splitlines())
    assert runtime == {k: v for k, v in pinned.items() if k not in TEST_TOOLS | UI}
    assert not (TEST_TOOLS | UI) & set(runtime) and "sentencepiece" not in runtime
    jax_pin = runtime["jax"].split("==")[1]
    extras = project["optional-dependencies"]
    assert extras["tpu"] == [f"jax[tpu]=={jax_pin}"] and extras["cuda12"] == [f"jax[cuda12]=={jax_pin}"]
    assert extras["cuda13"] == [f"jax[cuda13]=={jax_pin}"] and extras["test"] == [pinned["pytest"], pinned["pytest-xdist"]]
    assert extras["ui"] == [pinned[name] for name in sorted(UI)]


def test_console_scripts_point_at_functions():
    """Read from the source, not imported (a console script module may do work at import)."""
    scripts = {}
    for name, target in _pyproject()["project"]["scripts"].items():
        module, _, attr = target.partition(":")
        scripts[name] = (PROJECT_ROOT / (module.replace(".", "/") + ".py"), attr)
    trees = source_trees.parse(path for path, _ in scripts.values())
    for name, (path, attr) in scripts.items():
        tree = trees[path]
        assert attr in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, name


def test_shipped_configs_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = config_files.root() / "generate" / "release.py"
    assert config_files.resolve("configs/generate/release.py") == str(base)
    assert config_files.resolve("generate/release.py") == str(base)
    assert config_files.resolve("configs/generate/release.py:turbo") == f"{base}:turbo"
    assert config_files.resolve("configs/train/pod_544x992.py:v5p-256") == (
        f"{config_files.root() / 'train' / 'pod_544x992.py'}:v5p-256")
    own = tmp_path / "configs" / "generate" / "release.py"     # a file of the user's own wins
    own.parent.mkdir(parents=True)
    own.write_text("")
    assert config_files.resolve("configs/generate/release.py") == "configs/generate/release.py"
    assert config_files.resolve_argv(["prog", "--config", "generate/tiny.py", "--config.seed=3"]) == [
        "prog", "--config", str(config_files.root() / "generate" / "tiny.py"), "--config.seed=3"]
    with pytest.raises(FileNotFoundError, match=r"'configs/generate/relaese.py' not found.*configs/generate/release.py"):
        config_files.resolve("configs/generate/relaese.py")
    assert not [n for n in config_files.available() if n.endswith("/common.py")]   # a family's fields, no config


def _clean_copy(dest: pathlib.Path) -> pathlib.Path:
    """The project's files as a clone would have them (tracked + untracked-but-not-ignored)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=PROJECT_ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for rel in files:
        src = PROJECT_ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.mark.slow
@pytest.mark.e2e
def test_pip_install_then_the_demo_command_from_an_empty_directory(tmp_path):
    """`pip install --no-deps .` of a clean copy into a fresh venv that sees this interpreter's
    packages (no download), then README's demo command, as the console script, from an empty
    directory: the installed package alone (no source tree on the path) writes the mp4."""
    src = _clean_copy(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    pathlib.Path(purelib, "shared_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                              "--no-index", "-q", str(src)], env=env, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    installed = pathlib.Path(purelib) / "stepvideo_jax"
    assert (installed / "configs" / "generate" / "demo.py").is_file()
    assert (installed / "assets" / "demo" / "transformer" / "manifest.json").is_file()

    work = tmp_path / "empty"
    work.mkdir()
    proc = subprocess.run([str(venv / "bin" / "stepvideo-generate"), "--config.prompt=a blue square moves up"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert str(installed) in proc.stdout, "the run did not use the installed package's demo model"
    config = load_config("demo")
    from stepvideo_jax.sampling import video_io

    frames, _ = video_io.read_mp4(work / config.output)
    assert frames.shape == (config.num_frames, config.height, config.width, 3)
