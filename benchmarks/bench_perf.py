"""Issue 13's table, measured side by side in one run on SmolLM2-135M (float32, this machine's BLAS):

    python benchmarks/bench_perf.py [--demo-dir DIR] [--chunks 6] [--n-ctx 1024] [--json out.json]

1. Throughput of a reference build and of a comparison, each as a ratio to a bare forward pass
   of the same tokens with the same loading and piece size that computes the logits of every
   position (the second half of each chunk scored, llama.cpp's convention). Each step runs in
   its own child process, one after the other; peak RSS from getrusage.
2. Cache bytes per scored position at K=256 for V=49,152 (SmolLM2, measured) and V=248,320
   (the same layout: uint32 ids).
3. Warm open of a 65,536-position cache (a synthetic, valid entry): ReferenceCache.load with
   every check, no model read.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import repo_paths  # noqa: F401  (demo/ and tests/ on sys.path)

CHILD = r"""
import json, resource, sys, time
from pytest_kld.blas import prefer_system_blas
prefer_system_blas()
import numpy as np
what, ref, quant, text, n_ctx, chunks, cache_dir = sys.argv[1:8]
n_ctx, chunks = int(n_ctx), int(chunks)
from pytest_kld.corpus import corpus_spec
spec = corpus_spec("file", dataset=text, n_ctx=n_ctx, n_chunks=chunks)
if what == "bare":
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from pytest_kld.forward import load_model
    from pytest_kld.tokens import tokenize_corpus
    lm = load_model(ref, "float32")
    corpus = tokenize_corpus(spec, lm.tokenizer)
    t = time.perf_counter(); n = 0
    for c in corpus.chunks:
        cache = make_prompt_cache(lm.model); ids = mx.array(np.asarray(c, np.int32))[None]
        for s in range(0, len(c), 512):
            mx.eval(lm.model(ids[:, s:s + 512], cache=cache)); n += min(512, len(c) - s)
    dt = time.perf_counter() - t
elif what == "build":
    from pytest_kld.cache import ensure_reference
    from pytest_kld.reference import Settings
    t = time.perf_counter()
    c = ensure_reference(ref, spec, Settings(top_k=256, chunk_tokens=512, exec="float32"), cache_dir=cache_dir)
    dt = time.perf_counter() - t; n = int(c.score_ranges[:, 1].sum())
else:
    from pytest_kld.cache import ensure_reference
    from pytest_kld.compare import compare
    from pytest_kld.reference import Settings
    c = ensure_reference(ref, spec, Settings(top_k=256, chunk_tokens=512, exec="float32"), cache_dir=cache_dir)
    t = time.perf_counter(); compare(c, quant); dt = time.perf_counter() - t
    n = int(c.score_ranges[:, 1].sum())
print(json.dumps({"seconds": dt, "tokens": n, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def child(*args) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def synthetic_open_seconds(n: int = 65_536, k: int = 256, vocab: int = 248_320) -> float:
    """Time ReferenceCache.load of a valid n-position entry (written once, opened three times)."""
    import numpy as np

    from pytest_kld import reference
    from pytest_kld.fingerprint import sha256_json, tokens_sha256

    rng = np.random.default_rng(0)
    n_ctx, chunks = 2049, n // 1024  # 1,024 scored output positions per chunk: [1024, 2048)
    tokens = rng.integers(0, vocab, size=chunks * n_ctx).astype(np.int32)
    ranges = np.array([[1024, 2048]] * chunks, dtype=np.int32)
    n = int((ranges[:, 1] - ranges[:, 0]).sum())
    raw = rng.normal(size=(n, k + 1)).astype(np.float64) * 3
    lp = raw - np.logaddexp.reduce(raw, axis=1, keepdims=True)
    top = -np.sort(-lp[:, :k], axis=1)
    offsets = np.arange(chunks + 1, dtype=np.int64) * n_ctx
    arrays = {
        "tokens": tokens, "chunk_offsets": offsets, "score_ranges": ranges,
        "chunk_category": np.zeros(chunks, np.int32),
        "topk_ids": rng.integers(0, vocab, size=(n, k)).astype(np.uint32),
        "topk_logprobs": top.astype(np.float32), "tail": lp[:, k].astype(np.float32),
        "target": top[:, 0].astype(np.float32),
    }
    material = {"synthetic": True}
    chunk_list = [tokens[offsets[i]:offsets[i + 1]] for i in range(chunks)]
    manifest = {
        "format_version": reference.FORMAT_VERSION, "key": sha256_json(material), "key_material": material,
        "reference": {"name": "synthetic", "fingerprint": "x"}, "settings": {"top_k": k, "chunk_tokens": 512, "exec": "float32"},
        "corpus": {"chunks": chunks, "tokens": int(tokens.size), "scored": n,
                   "token_sha256": tokens_sha256(chunk_list, [tuple(r) for r in ranges.tolist()]), "mode": "long"},
        "categories": ["x"], "vocab_size": vocab, "tokenizer_size": vocab, "tokenizer_probe": [1], "positions": n,
        "shapes": {name: list(a.shape) for name, a in arrays.items()},
    }
    with tempfile.TemporaryDirectory() as d:
        entry = Path(d) / "long-entry"
        reference._write_entry(entry, arrays, manifest)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            reference.ReferenceCache.load(entry)
            best = min(best, time.perf_counter() - t)
        return best, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo-dir", type=Path, default=None)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import smollm2

    ref = smollm2.ensure_reference(args.demo_dir)
    quant = smollm2.ensure_quants(["8bit-g64"], args.demo_dir)["8bit-g64"]
    from pydoc_data.topics import topics

    out = {}
    with tempfile.TemporaryDirectory() as d:
        text = Path(d) / "corpus.txt"
        text.write_text("\n\n".join(topics[k] for k in sorted(topics)))
        common = (ref, quant, text, args.n_ctx, args.chunks, Path(d) / "cache")
        bare = child("bare", *common)
        build = child("build", *common)
        comp = child("compare", *common)
        manifest = next(Path(d, "cache").rglob("manifest.json"))
        bpp = json.loads(manifest.read_text())["bytes_per_position"]
    rate = {k: v["tokens"] / v["seconds"] for k, v in (("bare", bare), ("build", build), ("compare", comp))}
    open_s, n_open = synthetic_open_seconds()
    out = {
        "tokens_per_second": rate,
        "build_vs_bare": rate["build"] / rate["bare"],
        "compare_vs_bare": rate["compare"] / rate["bare"],
        "peak_rss_mb": {"bare": bare["peak_mb"], "build": build["peak_mb"], "compare": comp["peak_mb"]},
        "bytes_per_position": {"V=49152 (measured)": bpp, "V=248320 (uint32 ids)": 8 * 256 + 8},
        "warm_open_seconds": {"positions": n_open, "seconds": open_s},
    }
    print(f"SmolLM2-135M float32, {args.chunks} chunks x {args.n_ctx} tokens, second halves scored, pieces of 512")
    print(f"  bare forward (all logits)   {rate['bare']:7.0f} tok/s   peak RSS {bare['peak_mb']:6.0f} MB")
    print(f"  reference build             {rate['build']:7.0f} tok/s   {out['build_vs_bare']:.3f} x bare   peak RSS {build['peak_mb']:6.0f} MB")
    print(f"  comparison (8-bit quant)    {rate['compare']:7.0f} tok/s   {out['compare_vs_bare']:.3f} x bare   peak RSS {comp['peak_mb']:6.0f} MB")
    print(f"  cache bytes per position    V=49,152: {bpp}   V=248,320: {8 * 256 + 8}")
    print(f"  warm open, {n_open} positions (every check): {open_s:.3f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
