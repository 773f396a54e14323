"""Export a DiT to the official release layout: `python -m stepvideo_jax.export`.

    python -m stepvideo_jax.export --workdir RUN --out DIR [--ema] [--step N] \
        [--dtype bfloat16|float32] [--max_shard_gb 5] [--release RELEASE]

`--workdir` takes a training run's checkpoint (raw or `--ema`), `--transformer` any other DiT source
(a release or converted `transformer/`, to re-export). With `--release`, DIR becomes a complete
release directory (`DIR/transformer/` is the export, the other components are symlinked), so
`python -m stepvideo_jax.generate --config.checkpoint_dir=DIR` samples from the trained weights.
The weights load through `checkpoints.load_dit`; the layout and its atomic write are
`convert/export_dit.py`.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Sequence

from stepvideo_jax import checkpoints
from stepvideo_jax.convert import dit as dit_convert
from stepvideo_jax.convert.export_dit import export, link_release
from stepvideo_jax.dtypes import DTYPES


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m stepvideo_jax.export", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training run directory (its checkpoints/)")
    src.add_argument("--transformer", help="an official transformer/ directory, release or converted checkpoint "
                     "(re-export)")
    ap.add_argument("--out", required=True, help="output directory (becomes transformer/)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--max_shard_gb", type=float, default=5.0)
    ap.add_argument("--release", default=None,
                    help="official release directory or Hugging Face repo id: make --out a full release "
                         "(other components symlinked)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        model = checkpoints.load_dit(args.workdir or args.transformer, step=args.step, ema=args.ema)
        out = pathlib.Path(args.out)
        if args.release:
            link_release(args.release, out)
            out = out / dit_convert.COMPONENT
        path = export(model, out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30))
    except (ValueError, OSError) as e:   # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
