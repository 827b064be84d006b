"""Peak memory of a reference build, by forward piece size, side by side in one run.

    python benchmarks/bench_memory.py [--demo-dir DIR] [--n-ctx 2048]

Each configuration runs in its own process (peak RSS from getrusage). The corpus is a file of
English text in long-mode chunks of --n-ctx tokens, second half scored. With --kld-chunk-tokens
0 the whole chunk's logits and log-probs are held at once; with 256 only one piece's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import repo_paths  # noqa: F401  (demo/ and tests/ on sys.path)

CHILD = r"""
import json, resource, sys, time
from pytest_kld.blas import prefer_system_blas
prefer_system_blas()
from pytest_kld.corpus import corpus_spec
from pytest_kld.cache import ensure_reference
from pytest_kld.reference import Settings
ref, text, n_ctx, ct, cache = sys.argv[1:6]
spec = corpus_spec("file", dataset=text, n_ctx=int(n_ctx), score_offset=int(n_ctx) // 2)
t = time.time()
c = ensure_reference(ref, spec, Settings(top_k=256, chunk_tokens=int(ct)), cache_dir=cache)
print(json.dumps({"seconds": time.time() - t, "positions": c.n_positions,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo-dir", type=Path, default=None)
    ap.add_argument("--n-ctx", type=int, default=2048)
    args = ap.parse_args()
    import smollm2

    ref = smollm2.ensure_reference(args.demo_dir)
    from pydoc_data.topics import topics

    with tempfile.TemporaryDirectory() as d:
        text = Path(d) / "corpus.txt"
        text.write_text("\n\n".join(topics[k] for k in sorted(topics))[:60000])
        print(f"SmolLM2-135M (V=49152), n_ctx {args.n_ctx}, second half scored, K=256")
        for ct in (0, 512, 256):
            out = subprocess.run([sys.executable, "-c", CHILD, str(ref), str(text), str(args.n_ctx), str(ct),
                                  str(Path(d) / f"cache{ct}")], capture_output=True, text=True)
            if out.returncode:
                print(ct, "failed:", out.stderr.strip().splitlines()[-1])
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"chunk_tokens {ct or 'whole chunk':>11}: peak RSS {r['peak_mb']:7.0f} MB, "
                  f"{r['positions']} positions, {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
