"""Wall time of a reference cache built over N ranks of MLX's distributed engine (ring backend,
all ranks on this machine) against the same cache built by one process.

    python benchmarks/bench_distributed.py [--demo-dir DIR] [--n-chunks 8] [--reps 2]

Two references:
- a tiny qwen3_5 (tests/tiny.py: 4 hybrid layers, hidden 64), pipeline parallel over 2 ranks:
  almost all of its time is the launch (interpreters, imports, sharded load), not the passes;
- SmolLM2-135M-Instruct (demo/smollm2.py), which mlx-lm 0.32 shards tensor-parallel only (llama
  has no pipeline support): its 9 attention heads and 3 KV heads do not divide over 2 ranks, so
  3 ranks.
Each build goes to a fresh cache directory (nothing reused); the N-rank cache is compared with the
one-process cache (rows of top-K ids identical, largest log-prob difference). The one process runs
OpenBLAS at its default threads, each local rank at cores/ranks threads: OpenBLAS's arithmetic
depends on its thread count, so even pipeline (the same operations) differs at float32
rounding, and near-tied low-probability entries of a K=256 row can swap places. With
OPENBLAS_NUM_THREADS=1 for both, the pipeline cache is bit-identical. Times: the best of ``--reps``
runs; the ratio: the median over back-to-back pairs (the machine is shared; the load average is printed).
On one machine, ranks only add work (launch, communication, the output layer on every rank);
the engine is for references that do not fit one machine, where the alternative is no build.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import repo_paths  # noqa: F401  (demo/ and tests/ on sys.path)


def timed_build(model, spec, settings, launch):
    from pytest_kld.cache import ensure_reference

    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        cache = ensure_reference(model, spec, settings, cache_dir=root, launch=launch)
        wall = time.perf_counter() - t
        arrays = (cache.topk_ids.copy(), cache.topk_logprobs.copy())
        return wall, cache.manifest, arrays


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo-dir", type=Path, default=None)
    ap.add_argument("--n-chunks", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    from pytest_kld.blas import prefer_system_blas

    blas = prefer_system_blas()
    import numpy as np
    import smollm2
    from tiny import build_model

    from pytest_kld.corpus import corpus_spec
    from pytest_kld.distributed import Launch
    from pytest_kld.reference import Settings

    tmp = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    cases = [("tiny qwen3_5", build_model(tmp / "qwen3_5", "qwen3_5"), 2),
             ("SmolLM2-135M", smollm2.ensure_reference(args.demo_dir), 3)]
    spec = corpus_spec("short", n_chunks=args.n_chunks)
    settings = Settings(top_k=256, exec="float32")
    print(f"BLAS: {blas}; corpus: short, first {args.n_chunks} prompts; K=256; exec float32; best of {args.reps}")
    print(f"load average before: {load()}")
    print("| reference | ranks | strategy | positions | one process s | N ranks s | of which rank 0's load + passes s "
          "| ratio (median of pairs) | rows with identical ids | max abs Δ log-prob |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, model, ranks in cases:
        pairs = []  # one process, then N ranks, back to back: a busy machine's drift hits both
        for _ in range(args.reps):
            pairs.append((timed_build(model, spec, settings, None), timed_build(model, spec, settings, Launch(ranks=ranks))))
        one = min((p[0] for p in pairs), key=lambda r: r[0])
        many = min((p[1] for p in pairs), key=lambda r: r[0])
        ratio = float(np.median([b[0] / a[0] for a, b in pairs]))
        same = float(np.mean(np.all(one[2][0] == many[2][0], axis=1)))
        diff = float(np.abs(one[2][1] - many[2][1]).max())
        prov = many[1]["distributed"]
        print(f"| {label} | {ranks} | {prov['strategy']} | {one[1]['positions']} | {one[0]:.1f} | {many[0]:.1f} | "
              f"{many[1]['build_seconds']:.1f} | {ratio:.2f} | {same:.2%} | {diff:.1e} |")
    print(f"load average after: {load()}")


def load() -> str:
    import os

    return " ".join(f"{x:.1f}" for x in os.getloadavg())

if __name__ == "__main__":
    main()
