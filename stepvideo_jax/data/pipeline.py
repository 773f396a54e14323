"""The grain pipeline: bucketed, shuffled, per-host-sharded batches of pre-encoded samples.

Batches are planned globally and deterministically from (seed, epoch): within each bucket (latent
frames, height, width) the samples are shuffled and cut into global batches (the incomplete
remainder is dropped for that epoch), then the batches of all buckets are shuffled together. Every
batch therefore has one latent shape (a compiled step per bucket). Host `p` of `n` loads rows
`[p * b / n, (p + 1) * b / n)` of every global batch, so hosts stay in lockstep without talking.

The plan is a grain `MapDataset` indexed by the global batch number, so the iterator's state (a
small JSON dict, saved with every checkpoint) pins the exact position: a resumed run sees the
same batches in the same order.
"""
from __future__ import annotations

import collections
import functools
from typing import Optional

import grain
import numpy as np

from stepvideo_jax.data.format import Dataset, DatasetError


class BatchPlan:
    """Sequence of host-local sample-index lists; item `i` is global batch `i` across epochs."""

    def __init__(self, buckets: list[tuple[int, int, int]], global_batch: int, *, seed: int,
                 num_epochs: Optional[int] = None, process_index: int = 0, process_count: int = 1):
        if global_batch % process_count:
            raise DatasetError(f"global batch {global_batch} must be a multiple of the host count {process_count}")
        self.global_batch, self.seed = global_batch, seed
        self.local = global_batch // process_count
        self.offset = process_index * self.local
        self.by_bucket: dict = collections.defaultdict(list)
        for i, key in enumerate(buckets):
            self.by_bucket[key].append(i)
        self.per_epoch = sum(len(v) // global_batch for v in self.by_bucket.values())
        if self.per_epoch == 0:
            sizes = {k: len(v) for k, v in self.by_bucket.items()}
            raise DatasetError(f"no bucket holds a full global batch of {global_batch} samples (bucket sizes "
                               f"{sizes}); lower the batch size or add samples")
        self.num_epochs = num_epochs

    def __len__(self) -> int:
        epochs = self.num_epochs if self.num_epochs is not None else 1_000_000
        return self.per_epoch * epochs

    @functools.lru_cache(maxsize=2)
    def epoch(self, e: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, e])
        batches = []
        for key in sorted(self.by_bucket):
            idx = np.asarray(self.by_bucket[key])[rng.permutation(len(self.by_bucket[key]))]
            n = len(idx) // self.global_batch
            batches.extend(idx[: n * self.global_batch].reshape(n, self.global_batch).tolist())
        return [batches[j] for j in rng.permutation(len(batches))]

    def __getitem__(self, i: int) -> list[int]:
        batch = self.epoch(i // self.per_epoch)[i % self.per_epoch]
        return batch[self.offset: self.offset + self.local]


def _stack(dataset: Dataset, indices: list[int]) -> dict[str, np.ndarray]:
    samples = [dataset.load(i) for i in indices]
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


def batches(dataset: Dataset, global_batch: int, *, seed: int, num_epochs: Optional[int] = None,
            process_index: int = 0, process_count: int = 1, num_threads: int = 4,
            prefetch: int = 4) -> grain.DatasetIterator:
    """A checkpointable iterator of host-local batches (dicts of numpy arrays, leading axis b/n).

    `get_state()` / `set_state()` of the returned iterator save and restore its position.
    """
    plan = BatchPlan([dataset.bucket(i) for i in range(len(dataset))], global_batch, seed=seed,
                     num_epochs=num_epochs, process_index=process_index, process_count=process_count)
    ds = grain.MapDataset.source(plan).map(functools.partial(_stack, dataset))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))

