"""Where the time goes in pytest-kld's pipeline on SmolLM2-135M (V=49152), on this machine.

    python benchmarks/bench_pipeline.py [--demo-dir ~/.cache/pytest-kld/demo] [--n-chunks 6]

1. One 512-token chunk: the forward pass, then the vocabulary-wide work after it (log-softmax,
   top-256 + tail for the reference, gathers + tail for a quant), timed side by side in numpy
   (what pytest-kld runs) and in MLX (what it ran before), on the same arrays.
2. The whole pipeline: building a short-mode reference cache and comparing two quants, with
   tokens/s and the process's resident memory after each step (one model in memory at a time).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import repo_paths  # noqa: F401  (demo/ and tests/ on sys.path)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def best(f, reps=3):
    f()
    t = float("inf")
    for _ in range(reps):
        s = time.perf_counter()
        f()
        t = min(t, time.perf_counter() - s)
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo-dir", type=Path, default=None)
    ap.add_argument("--n-chunks", type=int, default=6)
    args = ap.parse_args()
    from pytest_kld.blas import prefer_system_blas

    blas = prefer_system_blas()
    import mlx.core as mx
    import numpy as np
    import smollm2

    from pytest_kld.cache import ensure_reference
    from pytest_kld.compare import compare
    from pytest_kld.corpus import corpus_spec
    from pytest_kld.divergence import compare_rows, log_softmax, sparsify
    from pytest_kld.forward import load_model
    from pytest_kld.reference import Settings

    ref = smollm2.ensure_reference(args.demo_dir)
    quants = smollm2.ensure_quants(["8bit-g64", "4bit-g64"], args.demo_dir)
    print(f"BLAS: {blas}")

    # 1. one chunk
    lm = load_model(ref, "float32")
    ids = np.array(lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 60)[:512], dtype=np.int32)
    x = mx.array(ids)[None]
    t_fwd = best(lambda: mx.eval(lm.model(x)))
    logits = lm.model(x)[0].astype(mx.float32)
    mx.eval(logits)
    lg_np = np.array(logits)
    k = 256
    targets = np.roll(ids, -1).astype(np.int64)

    def np_ref():
        rows = sparsify(log_softmax(lg_np.copy()), targets, k)
        return rows

    rows = np_ref()
    lq_np = log_softmax(lg_np.copy())

    def np_cmp():
        compare_rows(rows, log_softmax(lg_np.copy()))

    def mlx_ref():
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        idx = mx.argpartition(-lp, kth=k - 1, axis=-1)[:, :k]
        order = mx.argsort(-mx.take_along_axis(lp, idx, axis=-1), axis=-1)
        idx = mx.take_along_axis(idx, order, axis=-1)
        rest = mx.put_along_axis(lp, idx, mx.array(-mx.inf), axis=-1)
        mx.eval(idx, mx.take_along_axis(lp, idx, axis=-1), mx.logsumexp(rest, axis=-1))

    ids_mx = mx.array(rows.ids.astype(np.int32))

    def mlx_cmp():
        lq = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        rest = mx.put_along_axis(lq, ids_mx, mx.array(-mx.inf), axis=-1)
        mx.eval(mx.take_along_axis(lq, ids_mx, axis=-1), mx.logsumexp(rest, axis=-1),
                mx.argmax(lq, axis=-1), mx.all(mx.isfinite(lq), axis=-1))

    t = {name: best(f) for name, f in [("np_ref", np_ref), ("mlx_ref", mlx_ref), ("np_cmp", np_cmp), ("mlx_cmp", mlx_cmp)]}
    n = len(ids)
    print(f"\n1. one chunk of {n} tokens (best of 3)")
    print(f"   forward pass (float32)               {t_fwd:6.2f} s   {n / t_fwd:6.0f} tok/s")
    print(f"   reference post-processing  numpy {t['np_ref']:6.2f} s   MLX {t['mlx_ref']:6.2f} s   ratio {t['mlx_ref'] / t['np_ref']:4.1f}x")
    print(f"   comparison post-processing numpy {t['np_cmp']:6.2f} s   MLX {t['mlx_cmp']:6.2f} s   ratio {t['mlx_cmp'] / t['np_cmp']:4.1f}x")
    del lq_np
    lm.release()

    # 2. the pipeline
    print(f"\n2. pipeline: short mode, first {args.n_chunks} prompts, K=256, exec float32")
    print(f"   resident memory at start (reference released)   {rss_mb():7.0f} MB")
    with tempfile.TemporaryDirectory() as d:
        spec = corpus_spec("short", n_chunks=args.n_chunks)
        s = time.perf_counter()
        cache = ensure_reference(ref, spec, Settings(top_k=256), cache_dir=d)
        dt = time.perf_counter() - s
        toks = int(cache.score_ranges[:, 1].sum())
        size = (cache.path / "arrays.safetensors").stat().st_size
        print(f"   reference cache: {toks} tokens run, {cache.n_positions} scored, {dt:6.1f} s ({toks / dt:5.0f} tok/s), "
              f"{size / 1e6:.1f} MB on disk ({cache.manifest['bytes_per_position']} B/position; dense float32 "
              f"logits would be {4 * cache.manifest['vocab_size']} B)")
        print(f"   resident memory after the build                 {rss_mb():7.0f} MB")
        for name, path in quants.items():
            s = time.perf_counter()
            r = compare(cache, path)
            dt = time.perf_counter() - s
            print(f"   compare {name:<9} mean {r.summary['mean']:.5f}  {dt:6.1f} s ({toks / dt:5.0f} tok/s)  "
                  f"resident after: {rss_mb():7.0f} MB")


if __name__ == "__main__":
    main()
