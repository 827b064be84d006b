"""The exact weights fingerprint (issue 23) against the sampled one it replaced, side by side.

    python benchmarks/bench_fingerprint.py [MODEL_DIR] [--rounds 3]

Times, on one model directory (default: the demo's SmolLM2-135M reference): the first
fingerprint of a local model (every byte read and hashed, then remembered), a later one (the
remembered hashes: a stat per file), ``full=True`` (every byte again), and the sampled
fingerprint of the previous releases (headers + 1,024 blocks of 4 KiB per file; reimplemented
here, as it was). Each figure is the best of ``--rounds`` rounds, interleaved; the page cache is
warm after the first read, so the full reads measure hashing, not the disk.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import tempfile
import time
from pathlib import Path

import repo_paths  # noqa: F401

from pytest_kld.fingerprint import weights_fingerprint
from pytest_kld.models import _read_header_bytes, weight_files


def sampled(path: Path) -> str:
    """The previous releases' sampled fingerprint (pytest-kld weights v2 sample)."""
    h = hashlib.sha256(b"pytest-kld weights v2 sample\n")
    for f in weight_files(path):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        header = _read_header_bytes(f)
        h.update(struct.pack("<Q", len(header)) + header)
        with open(f, "rb") as fh:
            start, span = 8 + len(header), size - 8 - len(header)
            stride = (span - 4096) / 1023
            for i in range(1024):
                fh.seek(start + int(i * stride))
                h.update(fh.read(4096))
    return h.hexdigest()


def main() -> None:
    demo = Path(os.environ.get("PYTEST_KLD_DEMO_DIR", ".")) / "smollm2-135m-instruct-v1" / "reference"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(demo))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    model = Path(args.model)
    size = sum(f.stat().st_size for f in weight_files(model))
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            memo = Path(tmp) / f"memo-{r}.json"
            for name, fn in (("first (read all, remember)", lambda m=memo: weights_fingerprint(model, memo=m)),
                             ("later (remembered)", lambda m=memo: weights_fingerprint(model, memo=m)),
                             ("full=True (read all again)", lambda: weights_fingerprint(model, full=True)),
                             ("old sampled (4 MiB per file)", lambda: sampled(model))):
                t0 = time.perf_counter()
                fn()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    print(f"{model}: {size / 1e6:.0f} MB of weights, best of {args.rounds} rounds")
    for name, s in best.items():
        print(f"  {name:30s} {s * 1000:9.1f} ms")


if __name__ == "__main__":
    main()
