"""Which prompts a model was trained to follow, by name (`config.vocabulary` of the generation
configs): prompts outside it still generate, with one warning line each.

"" (the default): any prompt; "synthetic_motion": the captions of `data/synthetic_motion.py`, the
demo model's whole training set (`configs/generate/demo.py`). The entry points (the command line, the
web page) show the lines; the job itself never refuses a prompt for its words.
"""
from __future__ import annotations

from typing import Callable, Sequence

from stepvideo_jax.data import synthetic_motion

VOCABULARIES: dict[str, Callable[[str], str | None] | None] = {
    "": None,
    "synthetic_motion": synthetic_motion.vocabulary_warning,
}


def prompt_warnings(vocabulary: str, prompts: Sequence[str]) -> list[str]:
    """One warning line per prompt outside `vocabulary` (none for ""); a ValueError naming the
    choices for an unknown vocabulary."""
    if vocabulary not in VOCABULARIES:
        raise ValueError(f"vocabulary={vocabulary!r} is not known; choose from {sorted(VOCABULARIES)}")
    check = VOCABULARIES[vocabulary]
    if check is None:
        return []
    return [line for line in map(check, prompts) if line is not None]
