"""Analytic training FLOPs, MFU peak table, JSONL and TensorBoard metrics."""
import dataclasses

import numpy as np

from stepvideo_jax.models import flops
from stepvideo_jax.models.dit import DiTConfig
from stepvideo_jax.training import metrics


def test_flops_match_the_hand_count_at_full_size():
    cfg = DiTConfig.full()
    shape = dict(frames=36, height=34, width=62, text_length=320, clip_length=77)
    s, l, d = 36 * 34 * 62, 397, cfg.dim
    per_block = 28 * s * d * d + 4 * s * s * d + 4 * l * d * d + 4 * s * l * d
    fwd = flops.forward_flops(cfg, **shape)
    assert abs(per_block / 222.5e12 - 1) < 1e-3          # docs/full_size_plan.md's 222.5 TFLOP per block
    blocks = cfg.num_layers * per_block
    assert 0 < fwd - blocks < 1e-3 * fwd                   # embeddings and projections are small
    assert metrics.train_flops(cfg, **shape) == 3 * fwd
    parts = flops.forward_parts(cfg, **shape)
    assert parts["blocks"] == blocks and sum(parts.values()) == fwd
    assert sum(flops.block_flops(cfg, s, l).values()) == per_block
    half = dataclasses.replace(cfg, num_layers=24)
    np.testing.assert_allclose(flops.forward_flops(half, **shape) - fwd / 2,
                               (fwd - blocks) / 2, rtol=1e-9)


def test_peak_table():
    assert metrics.peak_flops_per_device("TPU v5p") == 459e12
    assert metrics.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.peak_flops_per_device("cpu") is None
    assert metrics.peak_flops_per_device("cpu", override=1e12) == 1e12


def test_jsonl_and_tensorboard(tmp_path):
    lines = []
    w = metrics.MetricsWriter(tmp_path, tensorboard=True, printer=lines.append)
    w.write(10, {"loss": 0.5, "grad_norm": 1.25})
    w.write(20, {"loss": 0.25, "grad_norm": 1.0})
    w.close()
    assert metrics.read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 10, "loss": 0.5, "grad_norm": 1.25}, {"step": 20, "loss": 0.25, "grad_norm": 1.0}]
    assert lines[0].startswith("step 10: loss 0.5")
    import tensorflow as tf

    events = list((tmp_path / "tensorboard").iterdir())
    assert len(events) == 1
    seen = {}
    for e in tf.compat.v1.train.summary_iterator(str(events[0])):
        for v in e.summary.value:
            seen[(e.step, v.tag)] = v.simple_value
    assert seen == {(10, "loss"): 0.5, (10, "grad_norm"): 1.25, (20, "loss"): 0.25, (20, "grad_norm"): 1.0}
