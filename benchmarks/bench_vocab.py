"""Cost of the vocabulary-wide work per scored position, numpy against MLX (issue 13).

    python benchmarks/bench_vocab.py [--rows 128] [--json benchmarks/results/vocab.json]

For a tiny ``qwen3_5`` model with Qwen 3.5/3.6's real vocabulary (248,320 tokens) and one with
SmolLM2's (49,152): a piece of ``--rows`` scored positions runs through the model once, then each
backend of :mod:`pytest_kld.vocab` does the build's work (log-softmax, top-256, tail) and the
comparison's (log-softmax, gathers at the top-256 ids, tail) on those logits, each timed as the
best of 3. Prints milliseconds per position and writes JSON. On a CPU numpy wins; on Apple
silicon MLX's runs on the GPU (not measured here: no such machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import repo_paths  # noqa: F401  (tests/ on sys.path: the tiny models)


def best_of(fn, n: int = 3) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(vocab: int, rows: int, work: Path) -> dict:
    import mlx.core as mx
    import numpy as np
    from tiny import build_model

    from pytest_kld.forward import load_model, scored_logits
    from pytest_kld.vocab import position_stats, sparse_rows

    path = build_model(work / f"qwen3_5-{vocab}", "qwen3_5", vocab_size=vocab)
    lm = load_model(path, "float32")
    from mlx_lm.models.cache import make_prompt_cache

    ids = mx.array(np.random.default_rng(0).integers(0, 259, (1, rows)).astype(np.int32))
    lg = scored_logits(lm.model)(ids, make_prompt_cache(lm.model), 0, rows).astype(mx.float32)
    quant = lg + mx.random.normal(lg.shape) * 0.3
    mx.eval(lg, quant)
    targets = np.asarray(ids[0]).astype(np.int64)
    out = {"vocab": vocab, "rows": rows}
    for backend in ("numpy", "mlx"):
        ref = sparse_rows(lg, targets, 256, backend)
        build = best_of(lambda b=backend: sparse_rows(lg, targets, 256, b))
        comp = best_of(lambda r=ref, b=backend: position_stats(r, quant, b))
        out[backend] = {"build_ms_per_position": 1e3 * build / rows, "compare_ms_per_position": 1e3 * comp / rows}
    lm.release()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from pytest_kld.blas import prefer_system_blas

    blas = prefer_system_blas()
    import mlx.core as mx

    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(v, args.rows, Path(tmp)) for v in (49_152, 248_320)]
    print(f"device {mx.default_device()}, BLAS {blas}; ms per scored position (best of 3, {args.rows}-row piece)")
    print(f"{'vocab':>8}  {'build numpy':>11}  {'build mlx':>9}  {'compare numpy':>13}  {'compare mlx':>11}")
    for r in results:
        print(f"{r['vocab']:>8,}  {r['numpy']['build_ms_per_position']:>11.3f}  {r['mlx']['build_ms_per_position']:>9.3f}"
              f"  {r['numpy']['compare_ms_per_position']:>13.3f}  {r['mlx']['compare_ms_per_position']:>11.3f}")
    if args.json:
        args.json.write_text(json.dumps({"device": str(mx.default_device()), "blas": blas, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
