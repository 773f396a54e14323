"""Hugging Face repo ids as weight sources (`stepvideo_jax/hub.py`), offline: each test builds a hub
cache in the hub's own layout (`models--org--name/{blobs,snapshots/<commit>,refs/main}`, snapshot
files symlinked into `blobs/`) from the release-layout fixture, and resolves repo ids against it."""
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

from stepvideo_jax import checkpoints, hub
from tests.fixtures import PROJECT_ROOT, fixture_dir

REPO = "stepfun-ai/stepvideo-t2v"


def release():
    return fixture_dir("release_layout") / "stepvideo-t2v"


def build_hub_cache(cache: pathlib.Path, repo_id: str, src: pathlib.Path, *, only=None, tag="main") -> str:
    """Put the files of `src` (top-level folders in `only`, default all) into `cache` as the hub
    stores a download of `repo_id`; returns the snapshot's commit hash (refs/<tag> points at it)."""
    files = sorted(p for p in src.rglob("*") if p.is_file()
                   and (only is None or p.relative_to(src).parts[0] in only or len(p.relative_to(src).parts) == 1))
    commit = hashlib.sha1("".join(str(p.relative_to(src)) for p in files).encode()).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for path in files:
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / tag).write_text(commit)
    return commit


@pytest.mark.parametrize("value, expected", [
    (REPO, (REPO, None)),
    (f"{REPO}-turbo@main", (f"{REPO}-turbo", "main")),
    (f"{REPO}@0123456789abcdef0123456789abcdef01234567", (REPO, "0123456789abcdef0123456789abcdef01234567")),
    ("/data/stepvideo-t2v", None),
    ("./stepfun-ai/stepvideo-t2v", None),
    ("gs://bucket/stepvideo-t2v", None),
    ("stepvideo-t2v", None),
    ("a/b/c", None),
])
def test_parse_repo_id(value, expected):
    assert hub.parse_repo_id(value) == expected


def test_an_existing_local_directory_is_not_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stepfun-ai" / "stepvideo-t2v").mkdir(parents=True)
    assert hub.resolve(REPO) == REPO


def test_repo_id_resolves_to_the_cached_snapshot(tmp_path):
    commit = build_hub_cache(tmp_path, REPO, release())
    snapshot = hub.resolve(REPO, cache_dir=tmp_path, local_files_only=True)
    repo = tmp_path / f"models--{REPO.replace('/', '--')}"
    assert snapshot == repo / "snapshots" / commit
    assert checkpoints.check_checkpoint_dir(snapshot) == snapshot       # a complete release
    shard = snapshot / "vae" / "vae_v2.safetensors"
    assert shard.is_symlink() and shard.resolve().parent == (repo / "blobs").resolve()
    assert shard.read_bytes() == (release() / "vae" / "vae_v2.safetensors").read_bytes()
    assert hub.resolve(f"{REPO}@{commit}", cache_dir=tmp_path, local_files_only=True) == snapshot


def test_only_the_needed_components_must_be_there(tmp_path):
    build_hub_cache(tmp_path, REPO, release(), only={"transformer"})
    snapshot = hub.resolve(REPO, ("transformer",), cache_dir=tmp_path, local_files_only=True)
    assert (snapshot / "transformer" / "config.json").is_file()
    with pytest.raises(ValueError, match=r"has no vae/, step_llm/, hunyuan_clip/: .*hf download stepfun-ai/"
                                         r"stepvideo-t2v --include 'vae/\*' --include 'step_llm/\*'"):
        hub.resolve(REPO, cache_dir=tmp_path, local_files_only=True)
    with pytest.raises(ValueError, match=r"unknown release components \['scheduler'\]"):
        hub.resolve(REPO, ("scheduler",), cache_dir=tmp_path, local_files_only=True)


@pytest.mark.parametrize("source", ["stepfun-ai/no-such-repo", f"{REPO}@v9"])
def test_a_repo_or_revision_not_in_the_cache_is_a_clear_error(tmp_path, source):
    build_hub_cache(tmp_path, REPO, release())
    with pytest.raises(ValueError, match=rf"'{source}' is not a local directory, and the Hugging Face repo "
                                         rf"{source} is not in the hub cache .*hf download"):
        hub.resolve(source, cache_dir=tmp_path, local_files_only=True)


def _offline_env(cache):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    return dict(env, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), JAX_PLATFORMS="cpu", PYTHONPATH=str(PROJECT_ROOT))


@pytest.mark.slow
@pytest.mark.e2e
def test_convert_and_generate_take_a_repo_id_through_the_environment(tmp_path):
    """The real CLIs with HF_HUB_OFFLINE=1 and HF_HUB_CACHE set, as a user runs them: `convert
    --release <repo id>` converts from the cache; `generate`'s config accepts the repo id and names a
    missing component."""
    cache = tmp_path / "hub"
    build_hub_cache(cache, REPO, release(), only={"vae"})
    env = _offline_env(cache)
    out = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-m", "stepvideo_jax.convert", "--release", REPO, "--out", str(out),
                           "--components", "vae"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "vae" / "manifest.json").read_text())["component"] == "vae"
    proc = subprocess.run([sys.executable, "-m", "stepvideo_jax.convert", "--release", REPO, "--out",
                           str(tmp_path / "ckpt2"), "--components", "vae,transformer"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "has no transformer/" in proc.stderr and "Traceback" not in proc.stderr

    build_hub_cache(cache, REPO + "-turbo", release())
    probe = ("from stepvideo_jax.sampling import generation\n"
             "from tests.fixtures import load_config\n"
             "for repo in ('%s-turbo', '%s'):\n"
             "    config = load_config('configs/generate/release.py:turbo', prompt='a cat', checkpoint_dir=repo,\n"
             "                         output='%s/x.mp4')\n"
             "    try:\n"
             "        print('resolved', generation.resolve(config).checkpoint_dir)\n"
             "    except ValueError as e:\n"
             "        print('error', e)\n") % (REPO, REPO, tmp_path)
    proc = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resolved, missing = proc.stdout.strip().splitlines()[-2:]
    assert resolved.startswith(f"resolved {cache}/models--stepfun-ai--stepvideo-t2v-turbo/snapshots/")
    assert missing.startswith(f"error {REPO} (snapshot") and "has no transformer/, step_llm/, hunyuan_clip/" in missing

    # a DiT source (training's model.init_from, DPO's policy_from / reference_from) by repo id
    probe = ("import jax, jax.numpy as jnp, numpy as np\n"
             "from flax import nnx\n"
             "from stepvideo_jax import checkpoints\n"
             "from stepvideo_jax.convert import dit as dit_convert\n"
             "src = checkpoints.dit_source('%s-turbo').path\n"
             "cfg = checkpoints.dit_config('%s-turbo')\n"
             "got = nnx.state(checkpoints.load_dit('%s-turbo'))\n"
             "want = nnx.state(dit_convert.load('%s/transformer'))\n"
             "same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))\n"
             "print('dit', src, cfg == dit_convert.read_config('%s/transformer'), same)\n"
             ) % (REPO, REPO, REPO, release(), release())
    proc = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith(f"dit {cache}/models--stepfun-ai--stepvideo-t2v-turbo/snapshots/")
    assert line.endswith("/transformer True True"), line
