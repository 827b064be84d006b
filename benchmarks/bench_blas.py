"""Which BLAS MLX's float32 matmuls run on, how fast, and whether results agree.

Each configuration runs in its own process (the BLAS must be loaded before mlx is imported):
    python benchmarks/bench_blas.py
prints sgemm GFLOPS (1024x1024) and a tiny model's forward log-probs difference against MLX's
bundled BLAS, side by side in one run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import repo_paths  # noqa: F401  (demo/ and tests/ on sys.path)

CHILD = r"""
import json, os, sys, time
import numpy as np
from pytest_kld.blas import prefer_system_blas
desc = prefer_system_blas()
import mlx.core as mx
from pytest_kld.forward import chunk_logprobs, load_model
a = mx.random.normal((1024, 1024), key=mx.random.key(0)); b = mx.random.normal((1024, 1024), key=mx.random.key(1))
mx.eval(a @ b)
t = time.perf_counter(); n = 10
for _ in range(n):
    mx.eval(a @ b)
gflops = 2 * 1024**3 * n / (time.perf_counter() - t) / 1e9
lm = load_model(sys.argv[1], "float32")
ids = np.array(lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 20), dtype=np.int32)
lp = np.array(chunk_logprobs(lm.model, ids, 0, len(ids) - 1, chunk_tokens=128))
np.save(sys.argv[2], lp)
print(json.dumps({"blas": desc, "gflops": gflops}))
"""


def main() -> None:
    from tiny import build_model

    tmp = tempfile.mkdtemp()
    model = build_model(os.path.join(tmp, "m"), "llama")
    configs = {"bundled": "bundled", "auto": "auto"}
    for extra in ("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",):
        if os.path.exists(extra):
            configs["debian"] = extra
    out = {}
    for name, choice in configs.items():
        env = dict(os.environ, PYTEST_KLD_BLAS=choice)
        env.pop("LD_PRELOAD", None)
        npy = os.path.join(tmp, f"{name}.npy")
        r = subprocess.run([sys.executable, "-c", CHILD, str(model), npy], env=env, capture_output=True, text=True)
        if r.returncode:
            print(name, "failed:", r.stderr.strip().splitlines()[-1])
            continue
        out[name] = json.loads(r.stdout.strip().splitlines()[-1]) | {"npy": npy}
    import numpy as np

    base = np.load(out["bundled"]["npy"]) if "bundled" in out else None
    print(f"{'config':8}  {'GFLOPS':>7}  {'ratio':>6}  {'max |Δ log p| vs bundled':>24}  blas")
    for name, r in out.items():
        diff = float(np.max(np.abs(np.load(r["npy"]) - base))) if base is not None else float("nan")
        ratio = r["gflops"] / out["bundled"]["gflops"] if "bundled" in out else float("nan")
        print(f"{name:8}  {r['gflops']:7.1f}  {ratio:6.1f}  {diff:24.2e}  {r['blas']}")


if __name__ == "__main__":
    main()
