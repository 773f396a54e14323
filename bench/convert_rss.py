"""Peak host RAM of the converter on a synthetic full-width DiT release (prints figures; not a test).

Writes `transformer/` with the official key names and full-size shapes (d = 6144, 48 heads x 128,
caption 6144, CLIP 1024, 64 channels) for `--blocks` transformer blocks: bfloat16 shards of at most
`--shard-gb` plus `diffusion_pytorch_model.safetensors.index.json`, streamed to disk (one bounded
buffer, never a whole tensor). Then runs `python -m stepvideo_jax.convert` on it in a subprocess and
prints the child's peak RSS (`getrusage(RUSAGE_CHILDREN).ru_maxrss`) against the issue's budget:
2 x the largest tensor in float32 (`adaln_single.linear.weight`, 36864 x 6144 = 906 MB) + 1 GB.
Everything is deleted afterwards unless `--keep`.

    python bench/convert_rss.py --blocks 4 --dtype float32 [--workdir /tmp] [--keep]
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

D, HEAD_DIM, CAPTION, CLIP, CHANNELS, PATCH, TIMESTEP_DIM = 6144, 128, 6144, 1024, 64, 1, 256
FULL_LAYERS, FULL_PARAMS = 48, 29_342_478_400


def official_shapes(num_layers: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the released `StepVideoModel` state dict (torch layouts), `num_layers` blocks."""
    d = D
    lin = lambda name, dout, din: {f"{name}.weight": (dout, din), f"{name}.bias": (dout,)}
    top = {
        "pos_embed.proj.weight": (d, CHANNELS, PATCH, PATCH), "pos_embed.proj.bias": (d,),
        **lin("adaln_single.emb.timestep_embedder.linear_1", d, TIMESTEP_DIM),
        **lin("adaln_single.emb.timestep_embedder.linear_2", d, d),
        **lin("adaln_single.linear", 6 * d, d),
        **lin("caption_projection.linear_1", d, CAPTION),
        **lin("caption_projection.linear_2", d, d),
        **lin("clip_projection", d, CLIP),
        "scale_shift_table": (2, d),
        **lin("proj_out", PATCH * PATCH * CHANNELS, d),
    }
    block = {
        "norm1.weight": (d,), "norm1.bias": (d,),
        "attn1.wqkv.weight": (3 * d, d), "attn1.q_norm.weight": (HEAD_DIM,), "attn1.k_norm.weight": (HEAD_DIM,),
        "attn1.wo.weight": (d, d),
        "norm2.weight": (d,), "norm2.bias": (d,),
        "attn2.wq.weight": (d, d), "attn2.wkv.weight": (2 * d, d),
        "attn2.q_norm.weight": (HEAD_DIM,), "attn2.k_norm.weight": (HEAD_DIM,), "attn2.wo.weight": (d, d),
        "ff.net.0.proj.weight": (4 * d, d), "ff.net.2.weight": (d, 4 * d),
        "scale_shift_table": (6, d),
    }
    blocks = {f"transformer_blocks.{i}.{k}": s for i in range(num_layers) for k, s in block.items()}
    return {**top, **blocks}


def config(num_layers: int) -> dict:
    return {"_class_name": "StepVideoModel", "_diffusers_version": "0.31.0", "attention_head_dim": HEAD_DIM,
            "attention_type": "parallel", "caption_channels": [CAPTION, CLIP], "dropout": 0.0,
            "in_channels": CHANNELS, "norm_elementwise_affine": False, "norm_eps": 1e-6,
            "norm_type": "ada_norm_single", "num_attention_heads": D // HEAD_DIM, "num_layers": num_layers,
            "out_channels": CHANNELS, "patch_size": PATCH, "use_additional_conditions": False}


def write_release(folder: pathlib.Path, num_layers: int, shard_bytes: int) -> int:
    """Stream a bf16 release into `folder`; returns the bytes of tensor data written."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config(num_layers), indent=2))
    shapes = official_shapes(num_layers)
    shards: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    # A 16 MB pattern of N(0, 0.02) bf16 values, cycled with an odd period: realistic entropy,
    # no tensor ever materialised.
    pattern = (np.random.default_rng(0).standard_normal(8 * 2**20 + 3, dtype=np.float32) * 0.02
               ).astype(ml_dtypes.bfloat16).view(np.uint16)
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total, cursor = {}, 0, 0
    for name, keys in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for k in keys:
            n = 2 * math.prod(shapes[k])
            header[k] = {"dtype": "BF16", "shape": list(shapes[k]), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[k] = name
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            left = offset // 2
            while left:
                take = min(left, pattern.size - cursor)
                f.write(pattern[cursor:cursor + take].tobytes())
                cursor = (cursor + take) % pattern.size
                left -= take
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=4, help="transformer blocks (48 in the release)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="converted dtype")
    p.add_argument("--shard-gb", type=float, default=2.0, help="max size of one synthetic shard")
    p.add_argument("--group-mb", type=int, default=None, help="passed to the converter (default: its own)")
    p.add_argument("--workdir", default=None, help="where to put the synthetic release and the output")
    p.add_argument("--keep", action="store_true", help="keep the files")
    args = p.parse_args()

    full = official_shapes(FULL_LAYERS)
    count = sum(math.prod(s) for s in full.values())
    if count != FULL_PARAMS:
        raise SystemExit(f"key table gives {count:,} parameters at 48 layers, the release has {FULL_PARAMS:,}")
    largest_key, largest = max(((k, 4 * math.prod(s)) for k, s in full.items()), key=lambda kv: kv[1])
    budget = 2 * largest + 2**30

    work = pathlib.Path(tempfile.mkdtemp(prefix="convert_rss_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        written = write_release(work / "release" / "transformer", args.blocks, int(args.shard_gb * 2**30))
        t1 = time.perf_counter()
        shards = len(list((work / "release" / "transformer").glob("*.safetensors")))
        print(f"synthetic release: {args.blocks} blocks, {len(official_shapes(args.blocks))} tensors, "
              f"{written / 1e9:.2f} GB bf16 in {shards} shards, written in {t1 - t0:.0f} s")
        cmd = [sys.executable, "-m", "stepvideo_jax.convert", "--release", str(work / "release"),
               "--out", str(work / "out"), "--components", "transformer", "--dtype", args.dtype]
        if args.group_mb:
            cmd += ["--group-mb", str(args.group_mb)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t2 = time.perf_counter()
        if proc.returncode:
            print(proc.stdout[-4000:])
            raise SystemExit(f"conversion failed with exit code {proc.returncode}")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        out_bytes = sum(f.stat().st_size for f in (work / "out").rglob("*") if f.is_file())
        manifest = json.loads((work / "out" / "transformer" / "manifest.json").read_text())
        print(f"converted to {args.dtype}: {manifest['num_params']:,} parameters in {len(manifest['groups'])} "
              f"Orbax groups, {out_bytes / 1e9:.2f} GB on disk, {t2 - t1:.0f} s")
        print(f"largest tensor: {largest_key} {full[largest_key]} = {largest / 1e6:.0f} MB in float32")
        print(f"peak RSS of the converter: {peak / 1e9:.2f} GB; budget 2 x {largest / 1e9:.2f} GB + 1 GiB = "
              f"{budget / 1e9:.2f} GB -> {'within' if peak <= budget else 'OVER'} budget")
        return 0 if peak <= budget else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
