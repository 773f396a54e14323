"""Per-seed checker scores of the shipped demo model and the VAE's ceiling (no training).

    python -m bench.demo_scores [--seeds 1000 1001 1002 1003] [--render_seeds 10000 20000 30000]
        [--weights bf16 int8] [--no_baselines] [--json out.json]

Held-out prompts (every `synthetic_motion.HELD_OUT` scene, English and Chinese) generated at each
seed with the demo's sampling settings (`configs/demo/train.py`), by the shipped DiT and by a random
DiT with the same VAE and text encoders; every video read by `eval/motion_checker.py` (colour,
shape, motion). The VAE ceiling: the same checker on the shipped VAE's reconstructions (posterior
mean, decoded) of ground-truth renders of the held-out scenes and every other training scene, once
per render seed. Prints one markdown row per (model, seed) and the per-field accuracies.
`--weights`: the shipped DiT once per block-linear scheme (`models/quant.py`; "bf16" = the float
weights as shipped, float32 compute), same seeds; `--no_baselines` skips the random DiT and the VAE.
"""
from __future__ import annotations

import argparse
import collections
import json

from flax import nnx

from configs.demo import train as demo_train_config
from stepvideo_jax.data import synthetic_motion as sm
from stepvideo_jax.demo import build, evaluate
from stepvideo_jax.models import quant
from stepvideo_jax.models.dit import StepVideoDiT


def _row(name: str, seed, summary: dict) -> str:
    f = summary["by_field"]
    return (f"| {name} | {seed} | {100 * summary['accuracy_with_shape']:.1f} % | {100 * summary['accuracy']:.1f} % "
            f"| {100 * f['colour']:.1f} % | {100 * f['shape']:.1f} % | {100 * f['motion']:.1f} % |")


def _confusions(results) -> dict:
    """{field: {"want -> got": count}} over the rows that miss."""
    out = {}
    for field in ("colour", "shape", "motion"):
        counts = collections.Counter(f"{getattr(sm.parse_caption(r['caption']), field)} -> {r[field]}"
                                     for r in results if r[field] != getattr(sm.parse_caption(r["caption"]), field))
        out[field] = dict(counts.most_common())
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001, 1002, 1003])
    parser.add_argument("--render_seeds", type=int, nargs="+", default=[10_000, 20_000, 30_000])
    parser.add_argument("--weights", nargs="+", default=["bf16"], choices=list(quant.SCHEMES))
    parser.add_argument("--no_baselines", action="store_true", help="skip the random DiT and the VAE ceiling")
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    config = demo_train_config.get_config()
    size, settings = build.sampling_settings(config)
    record = {}
    print("| model | seed | colour+shape+motion | colour+motion | colour | shape | motion |")
    print("|---|---|---|---|---|---|---|")
    runs = [(f"demo DiT{'' if w == 'bf16' else f' ({w} weights)'}", w, False) for w in args.weights]
    if not args.no_baselines:
        runs.append(("random DiT", "bf16", True))
    for name, weights, is_random in runs:
        models = build.demo_models(build.DEFAULT_EXPORT, weights=weights)
        dit = StepVideoDiT(models.dit.cfg, rngs=nnx.Rngs(config.eval.random_dit_seed)) if is_random else None
        pipe = build.pipeline_of(models, dit)
        result = evaluate.evaluate(pipe, sm.HELD_OUT, size=size, settings=settings, seeds=tuple(args.seeds),
                                   batch=config.eval.batch)
        result.pop("videos")
        for seed in args.seeds:
            print(_row(name, seed, evaluate.summarise([r for r in result["results"] if r["seed"] == seed])), flush=True)
        print(_row(name, "all", result), flush=True)
        record[name] = {**result, "confusions": _confusions(result["results"])}
    if args.no_baselines:
        _finish(record, args.json)
        return
    v = config.video
    ceiling = build.vae_ceiling(models.vae, frames=v.frames, height=v.height, width=v.width,
                                render_seeds=tuple(args.render_seeds))
    for seed, summary in ceiling["per_seed"].items():
        print(_row("VAE reconstructions", seed, summary))
    print(_row("VAE reconstructions", "all", ceiling))
    record["vae_ceiling"] = {**ceiling, "confusions": _confusions(ceiling["results"])}
    _finish(record, args.json)


def _finish(record: dict, json_path: str) -> None:
    for name in record:
        print(f"{name} misses: {json.dumps(record[name]['confusions'], ensure_ascii=False)}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(record, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
