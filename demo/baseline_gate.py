"""Issue 17's demonstration on SmolLM2-135M-Instruct: a release gated against the last release.

    python demo/baseline_gate.py [--n-chunks N] [--work DIR] [--cache-dir DIR]

With the ``pytest-kld`` command (the same run path as the plugin), on the short corpus:

1. record the 4-bit g32 quant as the baseline of the slot "release";
2. a new build in that slot, made with group size 64, is checked against it: flagged worse;
3. the same g64 quant against a baseline of itself: the same, difference exactly 0;
4. two close recipes, ``4bit-g32`` and ``mixed_4_6``, in one leaderboard: the paired difference
   of their mean KLD with its interval (told apart or not).

Prints each step's command and output. Exit 0 when every step said what it should.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from smollm2 import demo_parser, demo_workspace

    args = demo_parser("python demo/baseline_gate.py", __doc__).parse_args(argv)
    from pytest_kld.blas import prefer_system_blas

    prefer_system_blas()
    from pytest_kld.cli import main as cli

    work, ref, q, common = demo_workspace(args, ["4bit-g32", "mixed_4_6", "4bit-g64"], "kld-baseline-demo-")

    def step(title: str, *argv: str) -> int:
        print(f"\n### {title}\n$ pytest-kld compare {' '.join(argv)}", flush=True)
        code = cli(["compare", str(ref), *argv, *common])
        print(f"(exit {code})", flush=True)
        return code

    ok = True
    ok &= step("1. record 4bit-g32 as the release baseline", str(q["4bit-g32"]), "--name", "release",
               "--baselines", str(work / "b"), "--update-baselines") == 0
    ok &= step("2. a new build (4bit-g64) in the same slot", str(q["4bit-g64"]), "--name", "release",
               "--baselines", str(work / "b"), "--json", str(work / "g64.json")) == 1
    ok &= _verdict(work / "g64.json") == "worse"
    step("3a. record 4bit-g64 as its own baseline", str(q["4bit-g64"]), "--name", "g64", "--baselines",
         str(work / "b"), "--update-baselines")
    ok &= step("3b. the same quant again", str(q["4bit-g64"]), "--name", "g64", "--baselines", str(work / "b"),
               "--json", str(work / "same.json")) == 0
    ok &= _verdict(work / "same.json") == "same"
    step("4. two close recipes side by side", str(q["4bit-g32"]), str(q["mixed_4_6"]), "--json",
         str(work / "close.json"))
    print(f"\nbaselines, caches and results: {work}")
    print("demo " + ("said what it should" if ok else "did NOT say what it should"))
    return 0 if ok else 1


def _verdict(path: Path) -> str | None:
    (row,) = json.loads(path.read_text())["results"]
    return (row.get("baseline") or {}).get("verdict")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
