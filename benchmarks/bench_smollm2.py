"""Benchmark the SmolLM2-135M-Instruct demo: GGUF conversion, quant builds, forward speed.

    python benchmarks/bench_smollm2.py [--quants NAME ...] [--skip-builds] [--tokens 512]

Builds into a fresh temporary cache (the user's demo cache is not touched), then times one
forward pass of ``--tokens`` tokens (best of ``--repeat``) for
  fp16      the reference as mlx-lm loads it,
  float32   the reference with its floating parameters upcast,
  4bit-deq  the 4bit-g64 quant dequantised exactly to float32 (scales upcast first),
  4bit-q32  (with --quantized-kernel) the 4bit-g64 quant, float32 scales, quantised matmul.
Which BLAS MLX uses is the caller's choice: run it with and without
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 (printed below).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import repo_paths  # noqa: F401  (demo/ and tests/ on sys.path)
import smollm2


def _blas() -> str:
    pre = os.environ.get("LD_PRELOAD", "")
    return f"LD_PRELOAD={pre}" if "blas" in pre else "MLX's bundled BLAS (no LD_PRELOAD)"


def _forward_tok_s(model, ids, repeat: int) -> float:
    import mlx.core as mx

    mx.eval(model(ids[:, :16]))  # warm-up: first-call allocation and kernel setup
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        mx.eval(model(ids))
        best = min(best, time.perf_counter() - start)
    return ids.shape[1] / best


def _load(path: Path, how: str):
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    model, tokenizer = load(str(path))
    if how in ("float32", "dequantised"):
        model.set_dtype(mx.float32)  # scales and biases too: exact float32 dequantisation
    if how == "dequantised":
        model = dequantize_model(model)
    mx.eval(model.parameters())
    return model, tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quants", nargs="*", default=None, help="quants to build (default all)")
    ap.add_argument("--skip-builds", action="store_true",
                    help="use the demo cache instead of timing fresh builds")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--quantized-kernel", action="store_true",
                    help="also time the 4-bit quant on MLX's quantised matmul (float32 scales)")
    args = ap.parse_args()
    print(f"BLAS: {_blas()}")

    with tempfile.TemporaryDirectory(prefix="bench-smollm2-") as tmp:
        cache = None if args.skip_builds else Path(tmp)
        start = time.perf_counter()
        reference = smollm2.ensure_reference(cache)
        print(f"reference      {time.perf_counter() - start:7.1f} s  {reference}")
        names = args.quants if args.quants is not None else list(smollm2.DEMO_QUANTS)
        if "4bit-g64" not in names:
            names.append("4bit-g64")
        quants = {}
        for name in names:
            start = time.perf_counter()
            quants[name] = smollm2.ensure_quants([name], cache)[name]
            seconds = time.perf_counter() - start
            manifest = smollm2.read_manifest(quants[name]) or {}
            print(f"{name:<14} {seconds:7.1f} s  {manifest.get('bits_per_weight', 0):6.3f} bpw  "
                  f"{manifest.get('description', '')}")


        model, tokenizer = _load(reference, "native")
        ids = smollm2.calibration_tokens(tokenizer, args.tokens, args.tokens)  # shape (1, tokens)
        cases = [("fp16", reference, "native"), ("float32", reference, "float32"),
                 ("4bit-deq", quants["4bit-g64"], "dequantised")]
        if args.quantized_kernel:
            cases.append(("4bit-q32", quants["4bit-g64"], "float32"))
        del model
        for label, path, how in cases:
            model, _ = _load(path, how)
            print(f"forward {label:<9} {_forward_tok_s(model, ids, args.repeat):8.1f} tok/s "
                  f"({args.tokens} tokens, one chunk)")
            del model


if __name__ == "__main__":
    main()
