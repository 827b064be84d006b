"""Sensitivity on SmolLM2-135M-Instruct (issue 27): the ranking of the demo quants, its time on
this machine, and recipes against mlx-lm's mixed ones, built and measured on the whole corpus.

    python benchmarks/bench_sensitivity.py [--cache-dir DEMO_DIR] [--kld-cache-dir DIR] [--budget N]
        [--fine-roles K] [--group-sizes 32] [--rank 3bit-g64 mixed_3_6] [--recipes 3bit-g64:mixed_3_6 4bit-g64:mixed_4_6] [--out DIR]

1. Ranks each ``--rank`` quant (``pytest_kld.sensitivity.measure``: groups put back at 8 bits, on
   ``--budget`` positions of the short corpus) and prints the top groups, whether the
   embedding/output group is first with its 95% interval excluding 0, and the time the ranking
   took (measured; a ranking already stored beside the cache is reused and its stored time shown).
2. For each ``QUANT:RIVAL``: a recipe from QUANT's ranking with ``--target-bpw`` = RIVAL's bits per
   weight, built with mlx-lm in ``--out`` and compared on the whole short corpus with QUANT
   (predicted against measured saving) and with RIVAL (paired: does the recipe beat it?).
   ``--group-sizes 32``: QUANT's groups also measured at a finer group (the command's option), steps
   the recipe may take.
Heavy: run it with ``nice`` on a shared machine. Exit 1 when a claim does not hold.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import repo_paths  # noqa: F401  (demo/ and tests/ on sys.path)
import smollm2

from pytest_kld.blas import prefer_system_blas
from pytest_kld.options import SENSITIVITY_BUDGET


def _cache(reference: Path, kld_cache_dir):
    from pytest_kld.cache import ensure_reference
    from pytest_kld.corpus import corpus_spec
    from pytest_kld.progress import Progress
    from pytest_kld.reference import Settings

    return ensure_reference(reference, corpus_spec("short"), Settings(exec="float32"), cache_dir=kld_cache_dir,
                            progress=Progress("reference cache"))


def rank(cache, reference, quant: Path, args) -> bool:
    from pytest_kld.progress import Progress
    from pytest_kld.sensitivity import lines, measure, ranking

    t0 = time.time()
    doc = measure(cache, reference, quant, bits=8, budget=args.budget, fine_roles=args.fine_roles,
                  progress=Progress(f"sensitivity of {quant.name}"))
    took = time.time() - t0
    for line in lines(doc, 8):
        print(line)
    fine = ranking(doc, coarse=False)  # the issue's groups: per layer and role, embedding/output head
    first = fine[0]
    ok = first["role"] == "embed_tokens" and first["low"] > 0
    unmeasured = sorted({g["role"] for g in doc["groups"] if g["name"] not in {r["group"] for r in fine}})
    print(f"{quant.name}: first of the {len(fine)} per-layer-and-role groups measured (of {len(doc['groups'])}; "
          f"layers not measured: {', '.join(unmeasured) or 'none'}): {first['group']} {first['diff']:+.5f} "
          f"[{first['low']:+.5f}, {first['high']:+.5f}] -> embedding/output first, interval excluding 0: "
          f"{'yes' if ok else 'NO'}")
    print(f"{quant.name}: {len(ranking(doc))} groups on {doc['positions']} positions ({len(doc['chunks'])} chunks), "
          f"this run {took:.0f} s, every measurement in the store {doc['seconds']:.0f} s, on {os.cpu_count()} cores "
          f"(load average now {os.getloadavg()[0]:.1f})\n")
    return ok


def recipe_against(cache, reference, quant: Path, rival: Path, args) -> bool:
    from pytest_kld.compare import compare
    from pytest_kld.intervals import paired
    from pytest_kld.progress import Progress
    from pytest_kld.quantinfo import model_info
    from pytest_kld.recipe import calibrated, plan_measured, verify, write
    from pytest_kld.sensitivity import measure, together

    def remeasure(extra=()):
        return measure(cache, reference, quant, bits=8, budget=args.budget, fine_roles=args.fine_roles, extra=extra,
                       group_sizes=args.group_sizes, progress=Progress(f"sensitivity of {quant.name}"))

    target = model_info(rival).bits_per_weight
    recipe, doc = plan_measured(remeasure(), remeasure, target_bpw=target)
    recipe, doc = calibrated(doc, recipe, remeasure, lambda d, chosen: together(
        cache, reference, quant, d, chosen, progress=Progress(f"the recipe's groups together on {quant.name}'s sample")),
        target_bpw=target)
    t = recipe["together"]
    Path(args.out).mkdir(parents=True, exist_ok=True)  # a --out given that does not exist yet
    out = Path(args.out) / f"recipe-{quant.name}-{rival.name}"
    shutil.rmtree(out, ignore_errors=True)
    write(recipe, out.with_suffix(""))
    print(f"recipe from {quant.name} for {target:.3f} bits/weight ({rival.name}'s): "
          + ", ".join(f"{g['group']}@{g['width']}" for g in recipe["groups"]))
    v = verify(cache, reference, quant, recipe, out, progress=Progress(f"verifying {out.name}"))
    m = v["measured"]
    print(f"  built {v['bits_per_weight']:.3f} bits/weight; whole short corpus, {v['positions']} positions: "
          f"{quant.name} {v['quant_mean']:.5f} -> recipe {v['recipe_mean']:.5f}; saving measured {m['diff']:+.5f} "
          f"[{m['low']:+.5f}, {m['high']:+.5f}], predicted {v['predicted']:+.5f} (off by {v['off_by']:+.5f})")
    print(f"  on the ranking's sample ({doc['positions']} positions): the groups put back together save "
          f"{t['diff']:+.5f} [{t['low']:+.5f}, {t['high']:+.5f}], their single savings summed {v['predicted']:+.5f}")
    theirs = compare(cache, rival, exec="float32", progress=Progress(f"comparing {rival.name}"))
    d = paired(theirs.kl, v["kl"], v["chunk"], quantiles={})["mean"]
    beats = d["low"] > 0 and v["bits_per_weight"] <= target + 1e-9
    print(f"  {rival.name} {theirs.summary['mean']:.5f} at {target:.3f} bits/weight; {rival.name} - recipe "
          f"{d['diff']:+.5f} [{d['low']:+.5f}, {d['high']:+.5f}] (paired, chunks resampled) -> recipe beats "
          f"{rival.name} with the interval excluding 0: {'yes' if beats else 'NO'}\n")
    return beats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", default=os.environ.get("PYTEST_KLD_DEMO_DIR"), help="demo model cache")
    ap.add_argument("--kld-cache-dir", default=None, help="reference cache directory (default: the user cache)")
    ap.add_argument("--budget", type=int, default=SENSITIVITY_BUDGET, help="default: the command's")
    ap.add_argument("--fine-roles", type=int, default=None)
    ap.add_argument("--group-sizes", type=int, nargs="*", default=(), help="finer group sizes for the recipes")
    ap.add_argument("--rank", nargs="*", default=["3bit-g64", "mixed_3_6"])
    ap.add_argument("--recipes", nargs="*", default=["3bit-g64:mixed_3_6", "4bit-g64:mixed_4_6"])
    ap.add_argument("--out", default=None, help="where recipes are built (default: a temporary directory)")
    args = ap.parse_args()
    prefer_system_blas()
    names = set(args.rank) | {n for pair in args.recipes for n in pair.split(":")}
    reference = smollm2.ensure_reference(args.cache_dir)
    quants = smollm2.ensure_quants(sorted(names), args.cache_dir)
    cache = _cache(reference, args.kld_cache_dir)
    ok = all([rank(cache, reference, quants[n], args) for n in args.rank])
    if args.recipes:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bench-sensitivity-") as tmp:
            args.out = args.out or tmp
            for pair in args.recipes:
                q, r = pair.split(":")
                ok = recipe_against(cache, reference, quants[q], quants[r], args) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
