"""CPU wall time of the JAX Video-VAE at the fixture's shapes, next to the official PyTorch timings.

    python -m bench.vae_cpu_time [--repeats 5] [--fixtures ../shared/fixtures]

Loads the `vae` fixture's weights through the converter (float32), and for every case of the
fixture's `report.json` (`cpu_seconds_float32`: enc_a, enc_b, dec_a, dec_b and the single-chunk
intermediates runs) jits the same call the official code timed (`encode` incl. the posterior sample,
`decode` incl. the blending, one-chunk `encoder` / `decoder`), then prints the compile time and the
median of `--repeats` steady-state runs: wall seconds and the CPU seconds this process used (on a
shared machine wall time mostly measures the neighbours; CPU seconds / threads is what an idle
machine would show). The official figures are wall seconds of a 2-thread CPU run.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from stepvideo_jax.convert import vae as vae_convert  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixtures", default=os.environ.get("STEPVIDEO_FIXTURES", ROOT.parent / "shared" / "fixtures"))
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    fixture = pathlib.Path(args.fixtures) / "vae"
    report = json.loads((fixture / "report.json").read_text())
    with np.load(fixture / "cases.npz") as f:
        cases = {k: f[k] for k in f.files}
    with np.load(fixture / "intermediates.npz") as f:
        inter = {"int.x": f["int.x"], "int.z": f["int.z"]}
    model = vae_convert.load(fixture / "weights.safetensors")
    graphdef, state = nnx.split(model)
    key = jax.random.key(0)

    def run(method):
        return jax.jit(lambda s, *a: getattr(nnx.merge(graphdef, s), method)(*a))

    channel_last = lambda x: x.transpose(0, 1, 3, 4, 2)  # noqa: E731
    jobs = {
        "enc_a": (run("encode"), (cases["enc_a.x"], key)),
        "enc_b": (run("encode"), (cases["enc_b.x"], key)),
        "dec_a": (run("decode"), (cases["dec_a.z"],)),
        "dec_b": (run("decode"), (cases["dec_b.z"],)),
        "int_enc_naive_encode": (run("encoder"), (channel_last(inter["int.x"]),)),
        "int_dec_decode_naive": (run("decoder"), (channel_last(inter["int.z"]),)),
    }
    official = report["cpu_seconds_float32"]
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; float32")
    print(f"{'case':24s} {'input shape':22s} {'compile s':>9s} {'wall s':>8s} {'CPU s':>8s} {'official s':>10s}")
    for name, (fn, inputs) in jobs.items():
        t0 = time.perf_counter()
        compiled = fn.lower(state, *inputs).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(state, *inputs))
        wall, cpu = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(compiled(state, *inputs))
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        print(f"{name:24s} {str(tuple(inputs[0].shape)):22s} {compile_s:9.2f} {statistics.median(wall):8.3f} "
              f"{statistics.median(cpu):8.3f} {official.get(name, float('nan')):10.3f}")


if __name__ == "__main__":
    main()
