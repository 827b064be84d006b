"""This checkout against an earlier revision, side by side: reference build and comparison time on
SmolLM2-135M's short corpus, and whether both give the same figures.

    python benchmarks/bench_ab.py --against a999f14 [--prompts 20] [--rounds 2] [--demo-dir DIR]

The revision is checked out into a temporary git worktree and put first on PYTHONPATH of its
child processes; this checkout's children import this tree. Rounds alternate (old, new), so a
busy spell on the machine hits both. Each child builds a fresh reference cache (timed), then
compares the 4-bit g64 quant against it (timed); printed per round, with the sum of the cache's
top-1 log-probs and the mean KLD, which must agree between the two versions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import repo_paths

CHILD = r"""
import json, sys, tempfile, time
from pathlib import Path
from pytest_kld.blas import prefer_system_blas
prefer_system_blas()
import mlx_lm.utils  # imports before the timers
import pytest_kld
from pytest_kld.cache import ensure_reference
from pytest_kld.compare import compare
from pytest_kld.corpus import corpus_spec
from pytest_kld.reference import Settings
ref, quant, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = corpus_spec("short", n_chunks=prompts)
t = time.perf_counter()
c = ensure_reference(ref, spec, Settings(top_k=256, exec="float32"), cache_dir=Path(tempfile.mkdtemp()))
build = time.perf_counter() - t
t = time.perf_counter()
r = compare(c, quant)
print(json.dumps({"code": pytest_kld.__file__, "build_s": build, "compare_s": time.perf_counter() - t,
                  "top1_sum": float(c.topk_logprobs[:, 0].astype("float64").sum()), "mean": r.summary["mean"],
                  "positions": c.n_positions}))
"""


def child(tree: Path | None, ref: Path, quant: Path, prompts: int) -> dict:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    p = subprocess.run([sys.executable, "-c", CHILD, str(ref), str(quant), str(prompts)], env=env,
                       capture_output=True, text=True, cwd=tempfile.gettempdir())
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", required=True, help="the earlier revision (a commit, tag or branch)")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--demo-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import smollm2

    ref = smollm2.ensure_reference(args.demo_dir).resolve()  # the children run in a temp dir
    quant = smollm2.ensure_quants(["4bit-g64"], args.demo_dir)["4bit-g64"].resolve()
    root = repo_paths.ROOT
    with tempfile.TemporaryDirectory() as d:
        old = Path(d) / "old"
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", "-q", str(old), args.against], check=True)
        try:
            runs = {"old": [], "new": []}
            for _ in range(args.rounds):
                runs["old"].append(child(old, ref, quant, args.prompts))
                runs["new"].append(child(root, ref, quant, args.prompts))
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(old)], check=False)
    for name, rs in runs.items():
        assert all(str(old if name == "old" else root) in r["code"] for r in rs), (name, rs[0]["code"])
    same = all(r["top1_sum"] == runs["old"][0]["top1_sum"] and r["mean"] == runs["old"][0]["mean"]
               for r in runs["old"] + runs["new"])
    print(f"SmolLM2-135M float32, short corpus, {args.prompts} prompts ({runs['new'][0]['positions']} positions); "
          f"{args.against} (old) against this checkout (new), {args.rounds} alternating rounds")
    for name in ("build_s", "compare_s"):
        print(f"  {name[:-2]:8} old " + " ".join(f"{r[name]:6.2f}" for r in runs["old"]) + " s   new "
              + " ".join(f"{r[name]:6.2f}" for r in runs["new"]) + " s")
    print(f"  same figures (top-1 log-prob sum, mean KLD of 4bit-g64): {'yes' if same else 'NO'}"
          f"  mean {runs['new'][0]['mean']:.6f}")
    if args.json:
        args.json.write_text(json.dumps({"against": args.against, "prompts": args.prompts, "runs": runs,
                                         "same": same}, indent=2))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
