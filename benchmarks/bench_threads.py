"""OpenBLAS threads when the cores are shared: the demo's GPTQ step alone and beside a busy process.

    python benchmarks/bench_threads.py [--seconds-busy 1] [--json benchmarks/results/threads.json]

GPTQ's calibration accumulates, for every linear layer, a Hessian H += x^T x over the calibration
activations (float32, through MLX to OpenBLAS). This times that step at SmolLM2-135M's shapes
(1,024 calibration rows of width 576 and 1,536, 30 layers) in a child process per setting: the
OpenBLAS thread count as OpenBLAS picks it (one per core) and 1 thread (what
:func:`pytest_kld.blas.prefer_system_blas` sets in an xdist worker); alone, beside a busy
pure-Python process, and beside a neighbour doing the same OpenBLAS work with the same setting
(another xdist worker), side by side in one run. OpenBLAS's idle threads spin for work; with
more runnable threads than cores they take turns slowly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import repo_paths  # noqa: F401

CHILD = r"""
import json, os, sys, time
from pytest_kld.blas import prefer_system_blas
desc = prefer_system_blas()
import mlx.core as mx
xs = [mx.random.normal((1024, w), key=mx.random.key(i)) for i, w in enumerate((576, 1536))]
mx.eval(xs)
t = time.perf_counter()
for layer in range(30):
    for x in xs:
        h = mx.zeros((x.shape[1], x.shape[1]))
        for b in range(0, 1024, 256):  # batches of calibration rows, as GPTQ accumulates them
            h = h + x[b:b + 256].T @ x[b:b + 256]
        mx.eval(h)
print(json.dumps({"seconds": time.perf_counter() - t, "blas": desc,
                  "threads": os.environ.get("OPENBLAS_NUM_THREADS", "default")}))
"""

BUSY = "import time\nend = time.time() + 3600\nwhile time.time() < end:\n    sum(range(10000))\n"
NEIGHBOUR = "import subprocess, sys\nwhile True:\n    subprocess.run([sys.executable, '-c', sys.argv[1]], capture_output=True)\n"


def env_for(threads: str | None) -> dict:
    env = dict(os.environ)
    env.pop("OPENBLAS_NUM_THREADS", None)
    env.pop("OMP_NUM_THREADS", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    if threads is not None:
        env["OPENBLAS_NUM_THREADS"] = threads
    return env


def run(threads: str | None) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD], env=env_for(threads), capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    settings = {"OpenBLAS default (one per core)": None, "1 thread": "1"}
    # what shares the cores: nothing; a pure-Python busy loop; another process doing the same
    # OpenBLAS work with the same thread setting (a second xdist worker, before and after the pin)
    scenes = ("alone", "beside a busy loop", "beside an OpenBLAS neighbour")
    out: dict = {"cores": cores, **{scene: {} for scene in scenes}}
    for scene in scenes:
        for name, threads in settings.items():
            others = []
            if scene == "beside a busy loop":
                others = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(max(1, cores - 1))]
            elif scene == "beside an OpenBLAS neighbour":
                others = [subprocess.Popen([sys.executable, "-c", NEIGHBOUR, CHILD], env=env_for(threads))
                          for _ in range(max(1, cores - 1))]
            try:
                if others:
                    time.sleep(2)
                out[scene][name] = min(run(threads)["seconds"] for _ in range(2))
            finally:
                for p in others:
                    p.kill()
                    p.wait()
    print(f"GPTQ Hessian step at SmolLM2-135M's shapes on {cores} cores, seconds (best of 2)")
    print(f"  {'':32}" + "".join(f"{scene:>30}" for scene in scenes))
    for name in settings:
        print(f"  {name:32}" + "".join(f"{out[scene][name]:30.2f}" for scene in scenes))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
