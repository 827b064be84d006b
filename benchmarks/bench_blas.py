"""Which BLAS MLX's float32 matmuls run on, how fast, and whether results agree.

Each configuration runs in its own process (the BLAS must be chosen before mlx is imported):
    python benchmarks/bench_blas.py [--smollm2] [--tokens 512] [--json benchmarks/results/blas.json]
Configurations: MLX's bundled BLAS, the chooser's own pick (``auto``), and every OpenBLAS
candidate the chooser knows on this machine (wheels, system libraries), each named explicitly;
one that does not fit this CPU is refused by the chooser (the row says so) instead of crashing.
Per configuration: sgemm GFLOPS (1024x1024, MLX float32), tokens/s of a forward pass over
``--tokens`` tokens of the SmolLM2-135M demo reference (``--smollm2``; converted on first use) or
of a tiny llama, and the largest log-prob difference against the bundled BLAS. Rounds alternate
configurations; the median of the rounds is shown, with the ratio to the bundled BLAS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import repo_paths  # noqa: F401  (demo/ and tests/ on sys.path)

CHILD = r"""
import json, sys, time
import numpy as np
from pytest_kld.blas import prefer_system_blas
desc = prefer_system_blas()
import mlx.core as mx
from pytest_kld.forward import chunk_logprobs, load_model
a = mx.random.normal((1024, 1024), key=mx.random.key(0)); b = mx.random.normal((1024, 1024), key=mx.random.key(1))
mx.eval(a @ b)
t = time.perf_counter(); n = 0
while time.perf_counter() - t < 2.0:
    mx.eval(a @ b); n += 1
gflops = 2 * 1024**3 * n / (time.perf_counter() - t) / 1e9
lm = load_model(sys.argv[1], "float32")
ids = np.array(lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 200), dtype=np.int32)
ids = ids[: int(sys.argv[3]) + 1]
t = time.perf_counter()
lp = np.array(chunk_logprobs(lm.model, ids, 0, len(ids) - 1, chunk_tokens=512))
tok_s = (len(ids) - 1) / (time.perf_counter() - t)
np.save(sys.argv[2], lp)
print(json.dumps({"blas": desc, "gflops": gflops, "tok_s": tok_s}))
"""


def configs() -> dict[str, str]:
    from pytest_kld import blas

    out = {"bundled": "bundled", "auto": "auto"}
    for src, path in blas.candidates("auto"):
        out[src.replace(" wheel", "") if src != "system" else f"system:{os.path.basename(os.path.dirname(path))}"] = path
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smollm2", action="store_true", help="time the SmolLM2-135M demo reference (else a tiny llama)")
    ap.add_argument("--model", default=None, help="time this MLX model directory instead")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    if args.model:
        model = args.model
    elif args.smollm2:
        from smollm2 import ensure_reference

        model = ensure_reference()
    else:
        from tiny import build_model

        model = build_model(os.path.join(tmp, "m"), "llama")
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for name, choice in configs().items():
            env = dict(os.environ, PYTEST_KLD_BLAS=choice)
            env.pop("LD_PRELOAD", None)
            npy = os.path.join(tmp, f"{name.replace(':', '_')}.npy")
            r = subprocess.run([sys.executable, "-c", CHILD, str(model), npy, str(args.tokens)], env=env,
                               capture_output=True, text=True)
            if r.returncode:
                print(name, f"failed (exit {r.returncode}):", (r.stderr.strip().splitlines() or [""])[-1])
                continue
            runs.setdefault(name, []).append(json.loads(r.stdout.strip().splitlines()[-1]) | {"npy": npy})
            print(f"  {name}: {runs[name][-1]['gflops']:.1f} GFLOPS, {runs[name][-1]['tok_s']:.1f} tok/s", flush=True)
    import numpy as np

    base = np.load(runs["bundled"][0]["npy"]) if "bundled" in runs else None
    rows = {}
    for name, rs in runs.items():
        rows[name] = {
            "gflops": statistics.median(r["gflops"] for r in rs),
            "tok_s": statistics.median(r["tok_s"] for r in rs),
            "max_abs_dlogp_vs_bundled": float(np.max(np.abs(np.load(rs[0]["npy"]) - base))) if base is not None else None,
            "blas": rs[0]["blas"],
        }
    b = rows.get("bundled")
    print(f"model {model}, {args.tokens} tokens, median of {args.rounds} alternating rounds")
    print(f"{'config':22}  {'GFLOPS':>7}  {'x':>5}  {'tok/s':>7}  {'x':>5}  {'max|dlogp|':>10}  blas")
    for name, r in rows.items():
        gx = r["gflops"] / b["gflops"] if b else float("nan")
        tx = r["tok_s"] / b["tok_s"] if b else float("nan")
        d = r["max_abs_dlogp_vs_bundled"]
        print(f"{name:22}  {r['gflops']:7.1f}  {gx:5.1f}  {r['tok_s']:7.1f}  {tx:5.1f}  "
              f"{d if d is not None else float('nan'):10.2e}  {r['blas']}")
    if args.json:
        from pytest_kld import blas

        doc = {"cpu": blas.doctor()[0], "model": str(model), "tokens": args.tokens, "rounds": args.rounds,
               "rows": rows}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
