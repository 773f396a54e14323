"""On-disk format and the grain pipeline: bucketing, determinism, host sharding, iterator state."""
import json

import numpy as np
import pytest

from stepvideo_jax.data import format as data_format
from stepvideo_jax.data import pipeline, synthetic

KW = dict(channels=4, text_length=6, clip_length=3, caption_channels=(8, 5))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    synthetic.write(root, num_samples=23, buckets=((1, 2, 3), (2, 2, 2), (3, 1, 2)), seed=1, **KW)
    return data_format.Dataset(root)


def _ids(batch):  # samples are identified by their first latent values
    return [tuple(np.round(m.ravel()[:4], 5)) for m in batch["mean"]]


def test_format_roundtrip_and_errors(dataset, tmp_path):
    meta = json.loads((dataset.root / "meta.json").read_text())
    assert meta["format"] == data_format.FORMAT and meta["num_samples"] == 23 == len(dataset)
    s = dataset.load(4)
    assert s["mean"].shape == (2, 4, 2, 2) == s["logvar"].shape and s["y"].shape == (6, 8)
    assert s["y_mask"].shape == (9,) and s["y_mask"].dtype == np.int32 and s["clip"].shape == (3, 5)
    assert dataset.negative()["y"].shape == (1, 6, 8)
    w = data_format.Writer(tmp_path / "bad", latent_channels=4, caption_channels=(8, 5), text_length=6, clip_length=3)
    bad = dict(s, y=np.zeros((7, 8)))
    with pytest.raises(data_format.DatasetError, match="y has shape"):
        w.add(bad)
    with pytest.raises(data_format.DatasetError, match="meta.json"):
        data_format.Dataset(tmp_path / "nothing")


def test_batches_are_bucketed_deterministic_and_cover_each_epoch(dataset):
    plan = pipeline.BatchPlan([dataset.bucket(i) for i in range(len(dataset))], 3, seed=0)
    buckets = [sum(1 for i in range(23) if dataset.bucket(i) == b) for b in set(map(dataset.bucket, range(23)))]
    assert plan.per_epoch == sum(n // 3 for n in buckets)
    epoch0 = [plan[i] for i in range(plan.per_epoch)]
    flat = [i for b in epoch0 for i in b]
    assert len(flat) == len(set(flat))  # no sample twice in an epoch
    assert all(len({dataset.bucket(i) for i in b}) == 1 for b in epoch0)  # one shape per batch
    epoch1 = [plan[plan.per_epoch + i] for i in range(plan.per_epoch)]
    assert epoch1 != epoch0  # reshuffled per epoch
    again = pipeline.BatchPlan([dataset.bucket(i) for i in range(len(dataset))], 3, seed=0)
    assert [again[i] for i in range(2 * plan.per_epoch)] == epoch0 + epoch1
    it = pipeline.batches(dataset, 3, seed=0, num_threads=2)
    for idx in epoch0[:3]:
        b = next(it)
        assert _ids(b) == _ids({"mean": np.stack([dataset.load(i)["mean"] for i in idx])})


def test_hosts_split_every_global_batch(dataset):
    whole = pipeline.batches(dataset, 4, seed=3, num_threads=1)
    hosts = [pipeline.batches(dataset, 4, seed=3, process_index=p, process_count=2, num_threads=1) for p in range(2)]
    for _ in range(5):
        full = next(whole)
        parts = [next(h) for h in hosts]
        assert _ids(full) == _ids(parts[0]) + _ids(parts[1])
        assert parts[0]["mean"].shape[0] == 2


def test_iterator_state_restores_the_position(dataset):
    it = pipeline.batches(dataset, 2, seed=5, num_threads=2)
    for _ in range(7):
        next(it)
    state = it.get_state()
    json.dumps(state)  # stored as JSON in the checkpoint
    expected = [_ids(next(it)) for _ in range(6)]
    fresh = pipeline.batches(dataset, 2, seed=5, num_threads=2)
    fresh.set_state(state)
    assert [_ids(next(fresh)) for _ in range(6)] == expected
