"""Hugging Face repo ids as weight sources: `stepfun-ai/stepvideo-t2v[@revision]` -> a local release
directory, downloading only the components a job needs.

The download goes through `huggingface_hub.snapshot_download` into the standard hub cache
(`HF_HUB_CACHE`, default `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE=1` uses the cache only), with
its progress bars. The returned directory is the cache's snapshot folder, laid out like the release
(`transformer/`, `vae/`, `step_llm/`, `hunyuan_clip/`); its files are symlinks into the same repo
folder's `blobs/`. A value that names an existing local path, or a URI (`gs://...`), is not a repo id
and is returned unchanged.
"""
from __future__ import annotations

import os
import pathlib
import re
from typing import Sequence

RELEASE_COMPONENTS = ("transformer", "vae", "step_llm", "hunyuan_clip")
KNOWN_REPOS = ("stepfun-ai/stepvideo-t2v", "stepfun-ai/stepvideo-t2v-turbo", "stepfun-ai/stepvideo-ti2v")
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")


def parse_repo_id(value: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) if `value` reads as a hub repo id and is not a local path or URI."""
    value = str(value)
    if "://" in value or value.startswith(("/", ".", "~")) or os.path.exists(value):
        return None
    m = _REPO_ID.match(value)
    return (m["repo"], m["revision"]) if m else None


def is_repo_id(value) -> bool:
    return parse_repo_id(str(value)) is not None


def resolve(source, components: Sequence[str] = RELEASE_COMPONENTS, *, cache_dir=None,
            local_files_only: bool | None = None):
    """A release directory for `source`: unchanged unless it is a repo id, else the hub cache's
    snapshot holding (at least) `components`, downloaded if missing.

    Raises ValueError naming the repo, the revision and what is missing: an unknown repo or revision,
    a repo not in the cache while offline, or a snapshot without a requested component.
    """
    parsed = parse_repo_id(str(source))
    if parsed is None:
        return source
    repo_id, revision = parsed
    unknown = sorted(set(components) - set(RELEASE_COMPONENTS))
    if unknown:
        raise ValueError(f"unknown release components {unknown}; choose from {list(RELEASE_COMPONENTS)}")
    # only a repo id needs the hub client (it reads its HF_* environment when imported)
    import huggingface_hub
    from huggingface_hub import errors

    where = f"{repo_id}@{revision}" if revision else repo_id
    kw = {} if local_files_only is None else {"local_files_only": local_files_only}
    try:
        snapshot = huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                                     allow_patterns=[f"{c}/*" for c in components], **kw)
    except errors.RevisionNotFoundError:
        raise ValueError(f"{where}: the repo has no revision {revision!r}") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
        raise ValueError(f"{source!r} is neither a local directory nor a Hugging Face repo this machine can read "
                         f"({type(e).__name__}); the Step-Video releases are {', '.join(KNOWN_REPOS)}") from None
    except errors.LocalEntryNotFoundError:
        raise ValueError(f"{source!r} is not a local directory, and the Hugging Face repo {where} is not in the hub "
                         f"cache ({cache_dir or _cache_root()}) while downloads are off (HF_HUB_OFFLINE) or the hub "
                         f"is unreachable; download it first (hf download {repo_id}) or pass a local release "
                         "directory") from None
    snapshot = pathlib.Path(snapshot)
    missing = [c for c in components if not (snapshot / c).is_dir()]
    if missing:
        raise ValueError(f"{where} (snapshot {snapshot}) has no {', '.join(c + '/' for c in missing)}: a "
                         f"Step-Video-T2V release holds {', '.join(c + '/' for c in RELEASE_COMPONENTS)}; "
                         f"complete it with: hf download {repo_id} " + " ".join(f"--include '{c}/*'" for c in missing))
    return snapshot


def _cache_root() -> str:
    from huggingface_hub import constants   # as above: the cache root is read from the environment

    return constants.HF_HUB_CACHE


def dit_source(value: str) -> str:
    """A DiT weight source (training's `model.init_from`, DPO's `policy_from` / `reference_from`)
    with a repo id replaced by its snapshot's `transformer/` folder (only that component is
    downloaded); any other value unchanged."""
    if not value or not is_repo_id(value):
        return value
    return str(resolve(value, ("transformer",)) / "transformer")
