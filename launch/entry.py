"""Multi-host entry point: start `jax.distributed` when launched as one of several processes, then
run a module as `__main__`.

    python launch/entry.py -m stepvideo_jax.generate --config configs/generate/<name>.py ...

Every process (TPU VM worker, SLURM task) runs the same command. `jax.distributed.initialize()` is
called before anything else touches JAX, and only when the environment shows a multi-process launch
(SLURM with more than one task, mpirun, JAX_COORDINATOR_ADDRESS, a TPU pod whose worker list is
exported) or `STEPVIDEO_DISTRIBUTED=1` asks for it (the TPU pod launcher sets it: TPU VMs export no
variable, `initialize()` reads the pod layout from the metadata server). A single process just runs
the module. The entry points call the same `initialize_distributed` themselves; the second call
does nothing (JAX is initialised once).
"""
from __future__ import annotations

import pathlib
import runpy
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from stepvideo_jax.parallel.mesh import initialize_distributed  # noqa: E402


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] != "-m":
        raise SystemExit("usage: python launch/entry.py -m <module> [module arguments...]")
    module, args = argv[1], argv[2:]
    if initialize_distributed():
        import jax

        print(f"[launch] process {jax.process_index()} of {jax.process_count()}: "
              f"{jax.local_device_count()} local / {jax.device_count()} global devices", flush=True)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
