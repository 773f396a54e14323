"""`python -m stepvideo_jax.convert`: the official release directory -> Orbax checkpoints.

    python -m stepvideo_jax.convert --release stepvideo-t2v/ --out ckpt/ \
        [--components transformer,vae,step_llm,hunyuan_clip] [--dtype bfloat16|float32] [--overwrite] \
        [--allowed-root DIR] [--quantize int8|fp8]

`--release` may also be a Hugging Face repo id (only `--components` are downloaded). The conversion
itself (its checks, output layout, quantisation and atomic replace): `convert/conversion.py`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from stepvideo_jax import hub
from stepvideo_jax.convert import orbax_io
from stepvideo_jax.convert.conversion import convert_release
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.convert.registry import COMPONENTS, OUTPUT_DTYPES
from stepvideo_jax.models import quant


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stepvideo_jax.convert", description=__doc__.split("\n")[0])
    p.add_argument("--release", required=True,
                   help="the official release directory (e.g. stepvideo-t2v/) or its Hugging Face repo id "
                        "(stepfun-ai/stepvideo-t2v[@revision]: only --components are downloaded)")
    p.add_argument("--out", required=True, help="destination directory (must not exist unless --overwrite)")
    p.add_argument("--components", default=None,
                   help=f"comma-separated subset of {','.join(COMPONENTS)} (default: all the release has)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(OUTPUT_DTYPES),
                   help="stored parameter dtype (default bfloat16: the released shards' dtype, so nothing is lost)")
    p.add_argument("--quantize", default="bf16", choices=list(quant.SCHEMES),
                   help="store the DiT's and Step-LLM's block linears int8 or fp8 (e4m3) with per-output-channel "
                        "scales (default bf16: not quantised; docs/quantization.md)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is complete")
    p.add_argument("--allowed-root", default=None,
                   help="folder every release file must resolve into (default: each component folder, or the "
                        "hub cache's models--org--name/); for releases whose files link into another store")
    p.add_argument("--group-mb", type=_positive_int, default=orbax_io.GROUP_BYTES // 2**20,
                   help="size of one Orbax parameter group in MiB (bounds host memory while writing)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("stepvideo_jax").setLevel(logging.INFO)
    components = None if args.components is None else [c.strip() for c in args.components.split(",") if c.strip()]
    try:
        release = hub.resolve(args.release, components or hub.RELEASE_COMPONENTS)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        out = convert_release(release, args.out, components=components, dtype=args.dtype,
                              overwrite=args.overwrite, group_bytes=args.group_mb * 2**20,
                              allowed_root=args.allowed_root, quantize=args.quantize)
    except (CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0
