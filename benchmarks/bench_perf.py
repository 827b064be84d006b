"""Issue 13's table, measured side by side in one run on SmolLM2-135M (float32, this machine's BLAS):

    python benchmarks/bench_perf.py [--demo-dir DIR] [--chunks 6] [--n-ctx 1024] [--json out.json]

1. Throughput of a reference build and of a comparison, each as a ratio to a bare forward pass
   of the same tokens with the same loading and piece size that computes the logits of every
   position (the second half of each chunk scored, llama.cpp's convention). Each step runs in
   its own child process with the heavy imports done before its timer, which covers loading the
   model, tokenising and the pass (a build also fingerprints and writes its cache); the rounds
   are interleaved, each step's ratio to the bare pass taken within its round, and the median
   of those reported (these machines are noisy: the same step varies by ~5% between rounds). Memory: the peak RSS of the pass (reset after
   loading, /proc/self/clear_refs) minus the RSS after the imports, against the model's bytes
   as executed plus one piece of logits (512 rows x V x float32); and MLX's own peak over the pass
   (mx.get_peak_memory: the model, logits, KV cache and activations), against the same.
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
import mlx.core as mx
import mlx_lm.utils  # the heavy imports happen before any timer, in every step alike
from mlx.utils import tree_flatten
import pytest_kld.forward as forward
what, ref, quant, text, n_ctx, chunks, cache_dir = sys.argv[1:8]
n_ctx, chunks = int(n_ctx), int(chunks)
from pytest_kld.corpus import corpus_spec
spec = corpus_spec("file", dataset=text, n_ctx=n_ctx, n_chunks=chunks)

def rss_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

mem = {"after_imports_mb": rss_mb("VmRSS")}
real_load = forward.load_model

def load_model(*a, **kw):  # the same loading in every step; the pass's peak is measured from here
    lm = real_load(*a, **kw)
    mem["model_mb"] = sum(v.nbytes for _, v in tree_flatten(lm.model.parameters())) / 2**20
    mem["peak_load_mb"] = rss_mb("VmHWM")
    mem["after_load_mb"] = rss_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    mx.reset_peak_memory()
    return lm

forward.load_model = load_model
if what == "bare":
    from mlx_lm.models.cache import make_prompt_cache
    from pytest_kld.tokens import tokenize_corpus
    t = time.perf_counter()
    lm = forward.load_model(ref, "float32")
    corpus = tokenize_corpus(spec, lm.tokenizer)
    n = 0
    for c in corpus.chunks:
        cache = make_prompt_cache(lm.model); ids = mx.array(np.asarray(c, np.int32))[None]
        for s in range(0, len(c), 512):
            mx.eval(lm.model(ids[:, s:s + 512], cache=cache)); n += min(512, len(c) - s)
    dt = time.perf_counter() - t
    vocab = forward.logits_width(lm.model)
elif what == "build":
    from pytest_kld.cache import ensure_reference
    from pytest_kld.reference import Settings
    t = time.perf_counter()
    c = ensure_reference(ref, spec, Settings(top_k=256, chunk_tokens=512, exec="float32"), cache_dir=cache_dir)
    dt = time.perf_counter() - t; n = int(c.score_ranges[:, 1].sum()); vocab = int(c.manifest["vocab_size"])
else:
    from pytest_kld.cache import ensure_reference
    from pytest_kld.compare import compare
    from pytest_kld.reference import Settings
    t = time.perf_counter()  # a warm rerun: key (reference fingerprint: headers + a sample) and open, no model load
    c = ensure_reference(ref, spec, Settings(top_k=256, chunk_tokens=512, exec="float32"), cache_dir=cache_dir)
    mem["warm_ensure_seconds"] = time.perf_counter() - t
    t = time.perf_counter(); compare(c, quant); dt = time.perf_counter() - t
    n = int(c.score_ranges[:, 1].sum()); vocab = int(c.manifest["vocab_size"])
mem["peak_pass_mb"] = rss_mb("VmHWM")
mem["mlx_peak_pass_mb"] = mx.get_peak_memory() / 2**20  # MLX's arrays: model, logits, KV cache, activations
mem["piece_logits_mb"] = 512 * vocab * 4 / 2**20
print(json.dumps({"seconds": dt, "tokens": n, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  **mem}))
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
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds of (bare, build, compare); ratios within each round, their median reported")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import smollm2

    ref = smollm2.ensure_reference(args.demo_dir)
    quant = smollm2.ensure_quants(["8bit-g64"], args.demo_dir)["8bit-g64"]
    from pydoc_data.topics import topics

    runs: dict = {"bare": [], "build": [], "compare": []}
    with tempfile.TemporaryDirectory() as d:
        text = Path(d) / "corpus.txt"
        text.write_text("\n\n".join(topics[k] for k in sorted(topics)))
        for r in range(args.repeat):  # interleaved, so a busy spell hits every step alike
            common = (ref, quant, text, args.n_ctx, args.chunks, Path(d) / f"cache{r}")
            for step in runs:
                runs[step].append(child(step, *common))
        manifest = next(Path(d, "cache0").rglob("manifest.json"))
        bpp = json.loads(manifest.read_text())["bytes_per_position"]
    best = {k: min(v, key=lambda x: x["seconds"]) for k, v in runs.items()}
    rate = {k: v["tokens"] / v["seconds"] for k, v in best.items()}

    def ratio(step):  # per round, against that round's bare pass (a busy spell hits both), then the median
        per = sorted((x["tokens"] / x["seconds"]) / (b["tokens"] / b["seconds"]) for x, b in zip(runs[step], runs["bare"]))
        return per[len(per) // 2] if len(per) % 2 else (per[len(per) // 2 - 1] + per[len(per) // 2]) / 2, per
    open_s, n_open = synthetic_open_seconds()

    def budget(m):  # model bytes as executed + one piece of logits
        return m["model_mb"] + m["piece_logits_mb"]

    def used(m):  # what the pass added to the process after its imports, at its peak
        return m["peak_pass_mb"] - m["after_imports_mb"]

    out = {
        "tokens_per_second": rate,
        "all_seconds": {k: [round(x["seconds"], 3) for x in v] for k, v in runs.items()},
        "build_vs_bare": ratio("build")[0],
        "compare_vs_bare": ratio("compare")[0],
        "ratios_per_round": {"build": ratio("build")[1], "compare": ratio("compare")[1]},
        "peak_rss_mb": {k: v["peak_mb"] for k, v in best.items()},
        "memory_mb": {k: {f: round(v[f], 1) for f in ("after_imports_mb", "model_mb", "piece_logits_mb", "peak_load_mb",
                                                      "after_load_mb", "peak_pass_mb", "mlx_peak_pass_mb")} for k, v in best.items()},
        "pass_memory_vs_budget": {k: used(v) / budget(v) for k, v in best.items()},
        "mlx_pass_memory_vs_budget": {k: v["mlx_peak_pass_mb"] / budget(v) for k, v in best.items()},
        "bytes_per_position": {"V=49152 (measured)": bpp, "V=248320 (uint32 ids)": 8 * 256 + 8},
        "warm_open_seconds": {"positions": n_open, "seconds": open_s},
        "warm_ensure_reference_seconds": min(x["warm_ensure_seconds"] for x in runs["compare"]),
    }
    print(f"SmolLM2-135M float32, {args.chunks} chunks x {args.n_ctx} tokens, second halves scored, pieces of 512,"
          f" {args.repeat} interleaved rounds; each timer covers loading, tokenising and the pass;"
          " tok/s: the fastest round; x bare: the median of the rounds' ratios")
    names = {"bare": "bare forward (all logits)", "build": "reference build", "compare": "comparison (8-bit quant)"}
    for k, m in best.items():
        x = "         " if k == "bare" else f"{ratio(k)[0]:.3f} x bare"
        print(f"  {names[k]:27} {rate[k]:6.0f} tok/s  {x}   peak RSS {m['peak_mb']:5.0f} MB;"
              f" pass peak - imports {used(m):4.0f} MB = {used(m) / budget(m):.2f} x budget;"
              f" MLX arrays' peak {m['mlx_peak_pass_mb']:4.0f} MB = {m['mlx_peak_pass_mb'] / budget(m):.2f} x budget")
    m = best["compare"]
    print(f"  budget = model bytes as executed {m['model_mb']:.0f} MB + one piece of logits {m['piece_logits_mb']:.0f} MB")
    print(f"  cache bytes per position    V=49,152: {bpp}   V=248,320: {8 * 256 + 8}")
    print(f"  warm open, {n_open} positions (every check): {open_s:.3f} s;  warm ensure_reference of the"
          f" SmolLM2 cache (fingerprint + open, no model load): {out['warm_ensure_reference_seconds']:.3f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
