"""Issue 15's measurement on SmolLM2-135M-Instruct: generation drift of the demo quants.

    python demo/drift.py [--n-chunks N] [--drift-tokens N] [--quants NAME ...] [--work DIR]

Builds (once) the reference's greedy continuations of the short corpus's prompts (drift mode),
then runs ``pytest-kld compare REF QUANTS... --mode drift`` and prints the leaderboard with its
generation-drift section, and how long the drift mode took beside a prefill (short mode)
comparison of the same quants.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from smollm2 import demo_parser, demo_workspace

    ap = demo_parser("python demo/drift.py", __doc__)
    ap.add_argument("--drift-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    ap.add_argument("--quants", nargs="*", default=["8bit-g64", "6bit-g64", "4bit-g64", "3bit-g64"])
    args = ap.parse_args(argv)
    from pytest_kld.blas import prefer_system_blas

    prefer_system_blas()
    from pytest_kld.cli import main as cli

    work, ref, quants, common = demo_workspace(args, args.quants, "kld-drift-demo-")
    seconds = {}
    for mode in ("short", "drift"):
        extra = ["--drift-tokens", str(args.drift_tokens)] if mode == "drift" else []
        argv = ["compare", str(ref), *map(str, quants.values()), "--mode", mode, *extra, *common,
                "--json", str(work / f"{mode}.json")]
        print(f"\n$ pytest-kld {' '.join(argv[1:])}", flush=True)
        t0 = time.time()
        code = cli(argv)
        seconds[mode] = time.time() - t0
        if code:
            return code
    print(f"\nwall time, reference cache built in the run included: short (prefill) {seconds['short']:.0f} s, "
          f"drift {seconds['drift']:.0f} s, for {len(quants)} quants")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
