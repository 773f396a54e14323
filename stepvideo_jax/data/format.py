"""On-disk format of pre-encoded training samples ("stepvideo-latents-v1").

A dataset is a directory:
```
meta.json       {"format": "stepvideo-latents-v1", "latent_channels": c, "caption_channels": [d_llm, d_clip],
                 "text_length": l_text, "clip_length": l_clip, "num_samples": n}
index.jsonl     one line per sample: {"file": "samples/000000.npz", "frames": f, "height": h, "width": w,
                 "caption": "..."}   (f, h, w are latent sizes: the bucket of the sample)
samples/*.npz   one sample each:
                  mean, logvar  (f, c, h, w)  VAE posterior moments (logvar already clamped)
                  y             (l_text, d_llm)  Step-LLM states, every position
                  y_mask        (l_clip + l_text,) int32, CLIP positions (all ones) first
                  clip          (l_clip, d_clip)  CLIP last hidden states, every position
negative.npz    the encoded negative/empty prompt: y, y_mask, clip as above (conditioning dropout)
```
Floating arrays are float32 or float16 (float16 halves the size; moments and text states fit its
range). Every step draws a fresh latent `mean + exp(logvar / 2) * eps` from the moments.
`Dataset` reads a local directory or a URI (`gs://...`, through etils.epath); `Writer` writes locally.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import shutil
import threading
import zipfile
from typing import Iterable, Iterator, Mapping, Optional

import numpy as np
from etils import epath

from stepvideo_jax import paths

FORMAT = "stepvideo-latents-v1"
SAMPLE_KEYS = ("mean", "logvar", "y", "y_mask", "clip")
COND_KEYS = ("y", "y_mask", "clip")


class DatasetError(ValueError):
    pass


def _check_sample(sample: Mapping[str, np.ndarray], meta: Mapping) -> None:
    missing = [k for k in SAMPLE_KEYS if k not in sample]
    if missing:
        raise DatasetError(f"sample lacks arrays {missing}; a sample holds {SAMPLE_KEYS}")
    m, lv = sample["mean"], sample["logvar"]
    if m.ndim != 4 or m.shape != lv.shape or m.shape[1] != meta["latent_channels"]:
        raise DatasetError(f"mean {m.shape} / logvar {lv.shape} should both be (f, {meta['latent_channels']}, h, w)")
    _check_cond(sample, meta)


def _check_cond(cond: Mapping[str, np.ndarray], meta: Mapping) -> None:
    lt, lc = meta["text_length"], meta["clip_length"]
    dl, dc = meta["caption_channels"]
    want = {"y": (lt, dl), "y_mask": (lc + lt,), "clip": (lc, dc)}
    for k, shape in want.items():
        if tuple(cond[k].shape) != shape:
            raise DatasetError(f"{k} has shape {tuple(cond[k].shape)}, the dataset's meta.json says {shape}")


def check_new_output(root: str | os.PathLike) -> pathlib.Path:
    """`root` as a place for a new dataset: absent or an empty directory, its parent a directory
    (or creatable). Jobs call it before any heavy work."""
    root = pathlib.Path(root).absolute()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(f"{root} already exists and is not an empty directory; choose a new output directory")
    parent = next((p for p in root.parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise DatasetError(f"{root}: its parent {parent} is not a directory")
    return root


class Writer:
    """Writes a dataset directory sample by sample, atomically: everything goes to a staging
    directory `.<name>.partial` beside `root`, and `close()` writes meta.json last and renames the
    staging directory to `root`. Used as a context manager, an error removes the staging directory,
    so a failed job leaves no half-written dataset. `staging`: where extra files of the set go."""

    def __init__(self, root: str | os.PathLike, *, latent_channels: int, caption_channels: tuple[int, int],
                 text_length: int, clip_length: int, dtype=np.float32):
        self.root = check_new_output(root)
        self.root.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.root.with_name(f".{self.root.name}.partial")
        shutil.rmtree(self.staging, ignore_errors=True)   # left by a killed job
        (self.staging / "samples").mkdir(parents=True)
        self.meta = {"format": FORMAT, "latent_channels": int(latent_channels),
                     "caption_channels": [int(c) for c in caption_channels],
                     "text_length": int(text_length), "clip_length": int(clip_length), "num_samples": 0}
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float16):
            raise DatasetError(f"dtype {self.dtype} not supported; choose float32 or float16")
        self._index = open(self.staging / "index.jsonl", "w")

    def _floats(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, np.int32) if k == "y_mask" else np.asarray(v, self.dtype)
                for k, v in arrays.items()}

    def add(self, sample: Mapping[str, np.ndarray], caption: str = "") -> None:
        sample = self._floats({k: sample[k] for k in SAMPLE_KEYS if k in sample})
        _check_sample(sample, self.meta)
        name = f"samples/{self.meta['num_samples']:06d}.npz"
        np.savez(self.staging / name, **sample)
        f, _, h, w = sample["mean"].shape
        self._index.write(json.dumps({"file": name, "frames": f, "height": h, "width": w,
                                      "caption": caption}, ensure_ascii=False) + "\n")
        self.meta["num_samples"] += 1

    def set_negative(self, cond: Mapping[str, np.ndarray]) -> None:
        cond = self._floats({k: cond[k] for k in COND_KEYS})
        _check_cond(cond, self.meta)
        np.savez(self.staging / "negative.npz", **cond)

    def close(self) -> None:
        self._index.close()
        if not (self.staging / "negative.npz").exists():
            raise DatasetError(f"{self.root}: set_negative() was never called; the dataset needs the "
                               "encoded negative prompt")
        (self.staging / "meta.json").write_text(json.dumps(self.meta, indent=1))
        check_new_output(self.root)
        os.replace(self.staging, self.root)

    def abort(self) -> None:
        self._index.close()
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self.abort()


class Dataset:
    """Read side: `meta`, `records` (index lines), `load(i)` -> sample dict, `negative()`.

    A subclass reads another record format of the same directory layout (meta.json, index.jsonl,
    one .npz per record, negative.npz) by its class attributes and the `_record_shapes` /
    `_finish` / `_record_problems` hooks (`data.reflow.ReflowDataset`)."""

    FORMAT = FORMAT
    KEYS = SAMPLE_KEYS
    WRITTEN_BY = "stepvideo_jax.data.precompute"

    def __init__(self, root: str | os.PathLike):
        self.root = paths.as_path(root)     # local or a URI (gs://...): files are read through epath
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise DatasetError(f"{meta_path} not found: not a complete {self.FORMAT} dataset (write one with "
                               f"{self.WRITTEN_BY})")
        try:
            self.meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{meta_path}: not JSON ({e})") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != self.FORMAT:
            got = self.meta.get("format") if isinstance(self.meta, dict) else self.meta
            raise DatasetError(f"{meta_path}: format {got!r}, expected {self.FORMAT!r}" + self._format_hint(got))
        missing = [k for k in META_KEYS if k not in self.meta]
        if missing:
            raise DatasetError(f"{meta_path}: missing fields {missing}")
        self.records = read_index(self.root / "index.jsonl")
        if len(self.records) != self.meta["num_samples"]:
            raise DatasetError(f"{self.root}: index.jsonl has {len(self.records)} lines, meta.json says "
                               f"{self.meta['num_samples']} records")

    def _format_hint(self, got) -> str:
        """Appended to the wrong-format error: where a folder of format `got` belongs."""
        return ""

    def _record_shapes(self, frames: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """The latent arrays of one record (beside its conditioning) and their shapes."""
        c = self.meta["latent_channels"]
        return {"mean": (frames, c, height, width), "logvar": (frames, c, height, width)}

    def _finish(self, record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The arrays of one record as `load` returns them."""
        return record

    def _record_problems(self, path) -> list[str]:
        """What else is wrong with one record file whose arrays have the expected shapes."""
        return []

    def __len__(self) -> int:
        return len(self.records)

    def bucket(self, i: int) -> tuple[int, int, int]:
        r = self.records[i]
        return r["frames"], r["height"], r["width"]

    def load(self, i: int) -> dict[str, np.ndarray]:
        path = self.root / self.records[i]["file"]
        try:
            with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
                record = {k: z[k] for k in self.KEYS}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
            raise DatasetError(f"{path} (index.jsonl line {self.records[i]['line']}): cannot be read "
                               f"({type(e).__name__}: {e})") from None
        return self._finish(record)

    def negative(self) -> dict[str, np.ndarray]:
        """The negative prompt's conditioning with a leading batch axis of 1."""
        path = self.root / "negative.npz"
        try:
            with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
                return {k: z[k][None] for k in COND_KEYS}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
            raise DatasetError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None

    def expected_shapes(self, i: Optional[int] = None) -> dict[str, tuple[int, ...]]:
        """Shapes of sample `i`'s arrays from the index and meta.json (`i=None`: negative.npz)."""
        m = self.meta
        lt, lc, (dl, dc) = m["text_length"], m["clip_length"], m["caption_channels"]
        out = {"y": (lt, dl), "y_mask": (lc + lt,), "clip": (lc, dc)}
        if i is not None:
            out = {**self._record_shapes(*self.bucket(i)), **out}
        return out

    def check(self, *, headers: bool = True, arrays: bool = False, limit: int = 5) -> None:
        """Raises `DatasetError` unless every indexed sample file and negative.npz exist and, with
        `headers` (cheap: a few hundred bytes per file), hold the arrays with the shapes the index
        and meta.json give and float16/float32 (y_mask int32) dtypes; `arrays`: also reads every
        array in full (zip CRCs) and requires finite values (`python -m stepvideo_jax.verify`).
        The message names the first `limit` problems and how many there are."""
        jobs = [(self.root / r["file"], i, f"index.jsonl line {r['line']}") for i, r in enumerate(self.records)]

        def problems_of(job) -> list[str]:
            path, i, where = job
            if not path.is_file():
                return [f"{path} ({where}) is missing"]
            if headers or arrays:
                found = _file_problems(path, self.expected_shapes(i), arrays=arrays)
                if i is not None and not found:
                    found = self._record_problems(path)
                return [f"{path} ({where}): {p}" for p in found]
            return []

        # threads: on network filesystems each file costs a round trip
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            problems = [p for found in pool.map(problems_of, [(self.root / "negative.npz", None, "negative prompt")]
                                                + jobs) for p in found]
        if problems:
            more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
            raise DatasetError(f"{self.root}: {len(problems)} problem(s): " + "; ".join(problems[:limit]) + more)


def write_dataset(root, samples: Iterable[tuple[Mapping[str, np.ndarray], str]], negative, **writer_kw) -> None:
    """Convenience: write (sample, caption) pairs and the negative conditioning in one call."""
    with Writer(root, **writer_kw) as w:
        for sample, caption in samples:
            w.add(sample, caption)
        w.set_negative(negative)
        w.close()


META_KEYS = ("latent_channels", "caption_channels", "text_length", "clip_length", "num_samples")
INDEX_FIELDS = {"file": str, "frames": int, "height": int, "width": int}


def read_jsonl(path) -> Iterator[tuple[int, object]]:
    """(1-based line number, parsed value) of every non-blank line of a JSON-lines file; a malformed
    line is a `DatasetError` naming the file and line."""
    with epath.Path(path).open("r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{line_no}: not JSON ({e.msg} at column {e.colno})") from None


def read_index(path: epath.Path) -> list[dict]:
    """The records of index.jsonl, each with its 1-based line number as `line`. A malformed line is
    a `DatasetError` naming the file and line; `file` must be a relative path inside the dataset."""
    if not path.is_file():
        raise DatasetError(f"{path} not found: a {FORMAT} dataset needs its index")
    records = []
    for line_no, rec in read_jsonl(path):
        where = f"{path}:{line_no}"
        if not isinstance(rec, dict):
            raise DatasetError(f"{where}: expected an object with fields {sorted(INDEX_FIELDS)}")
        bad = [k for k, t in INDEX_FIELDS.items() if not isinstance(rec.get(k), t) or isinstance(rec.get(k), bool)]
        if bad:
            raise DatasetError(f"{where}: missing or mistyped fields {bad} (file: str; frames, height, width: int)")
        if any(rec[k] < 1 for k in ("frames", "height", "width")):
            raise DatasetError(f"{where}: frames, height, width must be >= 1")
        file = pathlib.PurePosixPath(rec["file"])
        if file.is_absolute() or ".." in file.parts:
            raise DatasetError(f"{where}: file {rec['file']!r} must be a relative path inside the dataset")
        records.append({**rec, "line": line_no})
    return records


# numpy parses .npy headers with ast.literal_eval, and CPython 3.11's AST constructor is not
# thread-safe ("SystemError: AST constructor recursion depth mismatch" under the check's threads).
_NPY_HEADER_LOCK = threading.Lock()


def _file_problems(path: epath.Path, shapes: Mapping[str, tuple[int, ...]], *, arrays: bool) -> list[str]:
    """What is wrong with one .npz against the expected `shapes`: missing arrays, other shapes or
    dtypes; with `arrays`, unreadable or non-finite data. Reads only the .npy headers otherwise."""
    problems = []
    try:
        with path.open("rb") as fh, zipfile.ZipFile(fh) as z:
            names = set(z.namelist())
            for key, shape in shapes.items():
                if f"{key}.npy" not in names:
                    problems.append(f"lacks array {key!r}")
                    continue
                with z.open(f"{key}.npy") as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    with _NPY_HEADER_LOCK:
                        got_shape, _, dtype = read_header(f)
                want_dtypes = ("int32",) if key == "y_mask" else ("float16", "float32")
                if tuple(got_shape) != tuple(shape):
                    problems.append(f"{key} has shape {tuple(got_shape)}, the index/meta.json say {tuple(shape)}")
                if dtype.name not in want_dtypes:
                    problems.append(f"{key} has dtype {dtype}, expected {' or '.join(want_dtypes)}")
            if arrays and not problems:
                bad = z.testzip()
                if bad is not None:
                    problems.append(f"member {bad} fails its CRC check")
                for key in shapes:
                    with z.open(f"{key}.npy") as f, _NPY_HEADER_LOCK:
                        if key != "y_mask" and not np.isfinite(np.lib.format.read_array(f, allow_pickle=False)).all():
                            problems.append(f"{key} holds NaN or inf")
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        problems.append(f"cannot be read ({type(e).__name__}: {e})")
    return problems
