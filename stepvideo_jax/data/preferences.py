r"""Preference data for Video-DPO: the on-disk format, the pair dataset, and the pair-building tool.

Format ("stepvideo-preferences-v1"): a `stepvideo-latents-v1` directory (`data/format.py`: one
sample per VIDEO, its VAE posterior moments and its prompt's conditioning, as the precompute job
writes them) plus `pairs.jsonl`, one human choice per line:
```
{"chosen": 3, "rejected": 7, "prompt": "a red circle moves to the left"}
```
`chosen` / `rejected` are sample indices (lines of `index.jsonl`); both videos of a pair have the
same prompt (identical `y`, `y_mask`, `clip`) and the same latent shape (bucket). A video may appear
in several pairs; it is stored once.

`PairDataset` reads it with the interface of `format.Dataset` (`len`, `bucket`, `load`, `meta`,
`negative`), so `data/pipeline.py` batches pairs exactly as it batches samples; `load(i)` returns
`mean_w`, `logvar_w`, `mean_l`, `logvar_l`, `y`, `y_mask`, `clip` (`training/dpo_step.py`).

Building a set from generated videos and a JSONL of human choices:
```
python -m stepvideo_jax.data.preferences --choices choices.jsonl --models CKPT_DIR --out prefs/
```
`choices.jsonl` holds `{"prompt": "...", "chosen": "a.mp4", "rejected": "b.mp4"}` per line (paths
relative to the JSONL file; `"tie": true` lines are skipped), e.g. videos made by
`python -m stepvideo_jax.generate` with several seeds per prompt and rated by people. Every video is
encoded once by the checkpoint's Video-VAE, every prompt once by its text encoders.

`write_synthetic` makes a tiny set from the captioned-motion renders (`data/synthetic_motion.py`):
the preferred video shows the caption, the rejected one the same shape with a wrong colour or motion.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import zlib
from typing import Callable, Iterable, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from stepvideo_jax import checkpoints, hub
from stepvideo_jax.data import synthetic_motion
from stepvideo_jax.data.format import COND_KEYS, Dataset, DatasetError, Writer, check_new_output, read_jsonl
from stepvideo_jax.sampling.video_io import read_mp4

FORMAT = "stepvideo-preferences-v1"
PAIRS_FILE = "pairs.jsonl"

EncodeVideo = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]   # uint8 (f, h, w, 3) -> moments
EncodePrompt = Callable[[str], Mapping[str, np.ndarray]]               # prompt -> y, y_mask, clip


class PairDataset:
    """Preference pairs over a `stepvideo-latents-v1` dataset with a `pairs.jsonl` (see module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.videos = Dataset(root)
        self.root, self.meta = self.videos.root, self.videos.meta
        path = self.root / PAIRS_FILE
        if not path.is_file():
            raise DatasetError(f"{path} not found: a {FORMAT} set is a latents dataset plus {PAIRS_FILE} "
                               "(build one with python -m stepvideo_jax.data.preferences)")
        n = len(self.videos)
        self.pairs: list[tuple[int, int]] = []
        for line_no, rec in read_jsonl(path):
            if not isinstance(rec, dict):
                raise DatasetError(f"{path}:{line_no}: expected an object with chosen, rejected")
            w, l = rec.get("chosen"), rec.get("rejected")
            if not (isinstance(w, int) and isinstance(l, int) and 0 <= w < n and 0 <= l < n and w != l):
                raise DatasetError(f"{path}:{line_no}: chosen/rejected must be two different sample "
                                   f"indices in [0, {n}), got {w!r}, {l!r}")
            if self.videos.bucket(w) != self.videos.bucket(l):
                raise DatasetError(f"{path}:{line_no}: samples {w} and {l} have different latent shapes "
                                   f"{self.videos.bucket(w)} vs {self.videos.bucket(l)}")
            self.pairs.append((w, l))
        if not self.pairs:
            raise DatasetError(f"{path} holds no pairs")

    def __len__(self) -> int:
        return len(self.pairs)

    def bucket(self, i: int) -> tuple[int, int, int]:
        return self.videos.bucket(self.pairs[i][0])

    def check(self, **kw) -> None:
        """The videos' `format.Dataset.check` (the pairs were checked on opening)."""
        self.videos.check(**kw)

    def load(self, i: int) -> dict[str, np.ndarray]:
        w, l = self.pairs[i]
        a, b = self.videos.load(w), self.videos.load(l)
        for k in COND_KEYS:
            if not np.array_equal(a[k], b[k]):
                raise DatasetError(f"pair {i} (samples {w}, {l}): the two videos have different {k}; both "
                                   "videos of a pair must come from one prompt")
        return {"mean_w": a["mean"], "logvar_w": a["logvar"], "mean_l": b["mean"], "logvar_l": b["logvar"],
                **{k: a[k] for k in COND_KEYS}}

    def negative(self) -> dict[str, np.ndarray]:
        return self.videos.negative()


@dataclasses.dataclass(frozen=True)
class Choice:
    prompt: str
    chosen: str      # video key: a path, or a name known to `load_video`
    rejected: str


def read_choices(path: str | os.PathLike) -> list[Choice]:
    """Human choices from a JSONL file; video paths are resolved relative to the file; ties skipped."""
    path = pathlib.Path(path)
    out = []
    for line_no, rec in read_jsonl(path):
        rec = rec if isinstance(rec, dict) else {}
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(rec.get(k), str)]
        if missing:
            raise DatasetError(f"{path}:{line_no}: needs string fields prompt, chosen, rejected; "
                               f"missing or not strings: {missing}")
        if rec.get("tie"):
            continue
        resolve = lambda p: str(p if pathlib.Path(p).is_absolute() else path.parent / p)  # noqa: E731
        out.append(Choice(rec["prompt"], resolve(rec["chosen"]), resolve(rec["rejected"])))
    if not out:
        raise DatasetError(f"{path}: no (non-tie) choices")
    return out


def build(root: str | os.PathLike, choices: Sequence[Choice], *, load_video: Callable[[str], np.ndarray],
          encode_video: EncodeVideo, encode_prompt: EncodePrompt, negative_prompt: str = "",
          dtype=np.float32) -> PairDataset:
    """Encodes every distinct video and prompt of `choices` once and writes a preference set to `root`.

    load_video(key) -> uint8 (f, h, w, 3); encode_video(video) -> (mean, logvar), each (f', c, h', w');
    encode_prompt(prompt) -> {"y": (l_text, d_llm), "y_mask": (l_clip + l_text,), "clip": (l_clip, d_clip)}.
    """
    root = check_new_output(root)
    if not choices:
        raise DatasetError("no choices given")
    for c in choices:
        if c.chosen == c.rejected:
            raise DatasetError(f"choice for {c.prompt!r} names the same video {c.chosen} twice")
    writer: Optional[Writer] = None
    index: dict[tuple[str, str], int] = {}
    shapes: dict[int, tuple] = {}
    prompts: dict[str, dict] = {}
    pairs = []
    try:
        for c in choices:
            cond = prompts.get(c.prompt)
            if cond is None:
                cond = prompts[c.prompt] = {k: np.asarray(v) for k, v in encode_prompt(c.prompt).items()}
            ids = []
            for key in (c.chosen, c.rejected):
                if (c.prompt, key) not in index:
                    mean, logvar = (np.asarray(a) for a in encode_video(load_video(key)))
                    if writer is None:
                        writer = Writer(root, latent_channels=mean.shape[1],
                                        caption_channels=(cond["y"].shape[-1], cond["clip"].shape[-1]),
                                        text_length=cond["y"].shape[0], clip_length=cond["clip"].shape[0],
                                        dtype=dtype)
                    index[(c.prompt, key)] = writer.meta["num_samples"]
                    shapes[writer.meta["num_samples"]] = mean.shape
                    writer.add({"mean": mean, "logvar": logvar, **cond}, caption=c.prompt)
                ids.append(index[(c.prompt, key)])
            if shapes[ids[0]] != shapes[ids[1]]:
                raise DatasetError(f"choice for {c.prompt!r}: {c.chosen} and {c.rejected} have different latent "
                                   f"shapes {shapes[ids[0]]} vs {shapes[ids[1]]}")
            pairs.append({"chosen": ids[0], "rejected": ids[1], "prompt": c.prompt})
        writer.set_negative(encode_prompt(negative_prompt))
        with open(writer.staging / PAIRS_FILE, "w") as f:
            for p in pairs:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return PairDataset(root)


# -- the synthetic preference set -------------------------------------------------------------

def pool_encoder(*, channels: int, time_factor: int, space_factor: int, seed: int = 0,
                 log_std: float = np.log(0.05)) -> EncodeVideo:
    """A fixed stand-in for the VAE: average-pool (f, h, w) by the factors (frame 0 alone, then
    groups of `time_factor`, the causal layout of the real VAE) and project RGB to `channels` with a
    seeded matrix; constant log-variance. Deterministic, no training."""
    proj = np.random.default_rng(seed).normal(size=(3, channels)) / np.sqrt(3.0)

    def encode(video: np.ndarray):
        x = synthetic_motion.to_model_range(video)                          # (f, 3, h, w)
        f, _, h, w = x.shape
        if (f - 1) % time_factor or h % space_factor or w % space_factor:
            raise ValueError(f"video {video.shape}: need (f - 1) % {time_factor} == 0 and h, w multiples of "
                             f"{space_factor}")
        s = space_factor
        x = x.reshape(f, 3, h // s, s, w // s, s).mean(axis=(3, 5))
        x = np.concatenate([x[:1], x[1:].reshape((f - 1) // time_factor, time_factor, *x.shape[1:]).mean(1)])
        mean = np.einsum("fchw,cd->fdhw", x, proj).astype(np.float32)
        return mean, np.full(mean.shape, 2 * log_std, np.float32)

    return encode


def hashed_prompt_encoder(*, text_length: int, clip_length: int, caption_channels: tuple[int, int]) -> EncodePrompt:
    """A fixed stand-in for the text encoders: word j of the prompt -> a vector seeded by the word's
    CRC32 at position j (Step-LLM states), the mean word vector on every CLIP position."""

    def vec(word: str, dim: int) -> np.ndarray:
        return np.random.default_rng(zlib.crc32(word.encode())).normal(size=dim)

    def encode(prompt: str):
        words = prompt.split()[:text_length]
        y = np.zeros((text_length, caption_channels[0]), np.float32)
        for j, word in enumerate(words):
            y[j] = vec(word, caption_channels[0])
        pooled = np.mean([vec(w, caption_channels[1]) for w in words], axis=0) if words else \
            np.zeros(caption_channels[1])
        mask = np.concatenate([np.ones(clip_length), np.arange(text_length) < max(len(words), 1)])
        return {"y": y, "y_mask": mask.astype(np.int32),
                "clip": np.broadcast_to(pooled, (clip_length, caption_channels[1])).astype(np.float32)}

    return encode


def synthetic_choices(num_pairs: int, *, seed: int = 0) -> list[tuple[Choice, synthetic_motion.Scene,
                                                                         synthetic_motion.Scene, int]]:
    """(choice, preferred scene, rejected scene, render seed): the rejected scene differs from the
    caption's in colour or in motion (alternately); both are rendered from one seed (same start)."""
    rng = np.random.default_rng(seed)
    scenes = synthetic_motion.TRAIN_SCENES
    out = []
    for i in range(num_pairs):
        good = scenes[rng.integers(len(scenes))]
        if i % 2 == 0:
            others = [c for c in synthetic_motion.COLOURS if c != good.colour]
            bad = dataclasses.replace(good, colour=others[rng.integers(len(others))])
        else:
            others = [m for m in synthetic_motion.MOTIONS if m != good.motion]
            bad = dataclasses.replace(good, motion=others[rng.integers(len(others))])
        render_seed = int(rng.integers(2**31))
        out.append((Choice(good.caption("en"), f"{i}/chosen", f"{i}/rejected"), good, bad, render_seed))
    return out


def write_synthetic(root: str | os.PathLike, *, num_pairs: int, frames: int, height: int, width: int,
                    channels: int, time_factor: int, space_factor: int, text_length: int, clip_length: int,
                    caption_channels: tuple[int, int], seed: int = 0) -> PairDataset:
    """The synthetic preference set (module docstring), encoded by `pool_encoder` and
    `hashed_prompt_encoder`: latents (1 + (frames - 1) / time_factor, channels, h / s, w / s)."""
    plan = synthetic_choices(num_pairs, seed=seed)
    videos = {}
    for choice, good, bad, render_seed in plan:
        kw = dict(frames=frames, height=height, width=width, seed=render_seed)
        videos[choice.chosen] = synthetic_motion.render(good, **kw)
        videos[choice.rejected] = synthetic_motion.render(bad, **kw)
    return build(root, [c for c, *_ in plan], load_video=videos.__getitem__,
                 encode_video=pool_encoder(channels=channels, time_factor=time_factor, space_factor=space_factor,
                                           seed=seed),
                 encode_prompt=hashed_prompt_encoder(text_length=text_length, clip_length=clip_length,
                                                     caption_channels=tuple(caption_channels)))


# -- the tool -----------------------------------------------------------------------------------

def checkpoint_encoders(models_dir: str | os.PathLike, **dtypes) -> tuple[EncodeVideo, EncodePrompt]:
    """Video-VAE and text encoders of a converted checkpoint or release directory (`checkpoints.loader`;
    the DiT is not loaded), at the official dtypes unless `dtypes` (e.g. `vae_dtype=jnp.float32`)
    says otherwise."""
    models = checkpoints.loader(hub.resolve(models_dir), **dtypes)
    vae, text = models.vae(), models.text_encoder()

    def encode_video(video: np.ndarray):
        x = jnp.asarray(synthetic_motion.to_model_range(video))[None]
        post = vae.posterior(vae.encode_moments(x))
        return np.asarray(post.mean[0], np.float32), np.asarray(post.logvar[0], np.float32)

    def encode_prompt(prompt: str):
        return {k: np.asarray(v[0], np.float32 if k != "y_mask" else np.int32)
                for k, v in text(prompt).items()}

    return encode_video, encode_prompt


def main(argv: Optional[Iterable[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Build a Video-DPO preference set from generated videos and a "
                                            "JSONL of human choices.")
    p.add_argument("--choices", required=True, help='JSONL: {"prompt", "chosen", "rejected"} per line')
    p.add_argument("--models", required=True, help="converted checkpoint, release directory or Hugging Face repo id (VAE, text)")
    p.add_argument("--out", required=True, help="new directory for the preference set")
    p.add_argument("--negative_prompt", default="", help="encoded as the set's negative prompt")
    p.add_argument("--float16", action="store_true", help="store floating arrays as float16")
    a = p.parse_args(None if argv is None else list(argv))
    try:   # every input checked before the models load
        choices = read_choices(a.choices)
        check_new_output(a.out)
        missing = sorted({v for c in choices for v in (c.chosen, c.rejected) if not pathlib.Path(v).is_file()})
        if missing:
            raise DatasetError(f"{a.choices}: {len(missing)} video(s) not found, e.g. {missing[:3]}")
        same = [c for c in choices if c.chosen == c.rejected]
        if same:
            raise DatasetError(f"{a.choices}: the choice for {same[0].prompt!r} names {same[0].chosen} twice")
    except DatasetError as e:
        p.error(str(e))
    encode_video, encode_prompt = checkpoint_encoders(a.models)
    try:
        ds = build(a.out, choices, load_video=lambda path: read_mp4(path)[0], encode_video=encode_video,
                   encode_prompt=encode_prompt, negative_prompt=a.negative_prompt,
                   dtype=np.float16 if a.float16 else np.float32)
    except DatasetError as e:
        p.exit(1, f"preferences: error: {e} (nothing was written to {a.out})\n")
    print(f"{a.out}: {len(ds)} pairs over {len(ds.videos)} videos")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
