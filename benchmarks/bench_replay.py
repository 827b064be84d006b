"""Sensitivity passes with and without replaying the layers before the swapped group (issue 27,
pytest_kld/replay.py), side by side in one run on SmolLM2-135M-Instruct.

    nice python benchmarks/bench_replay.py [--cache-dir DEMO_DIR] [--kld-cache-dir /tmp/reuse/kld-cache]
        [--budget 512] [--quant 3bit-g64] [--groups embed_tokens layers.0.mlp ...] [--repeat 2]

The quant is loaded once (``sensitivity.Bench``), its own pass run (recording the layers' inputs,
then the safety net); then each group is swapped in and its pass run both ways, the order
alternating, and swapped back. Prints each group's wall and CPU seconds both ways (the least
disturbed of ``--repeat`` passes) and their ratio, checks that the KL of every position (so the
saving and its interval) is the same bit for bit, and projects the whole ranking (every group of the quant, one pass each, plus
the quant's own) from a straight line fitted to the passes' times against the layers they ran.
On a shared machine the times of single passes vary (other jobs): keep ``--repeat`` at 2 or more.
CPU seconds count every thread, spinning BLAS threads too. Exit 1 when a saving differs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import repo_paths  # noqa: F401  (demo/ and tests/ on sys.path)
import smollm2

from pytest_kld.blas import prefer_system_blas

GROUPS = ["embed_tokens", "layers.0.mlp", "layers.0.self_attn", "layers.15.mlp", "layers.15.self_attn",
          "layers.29.mlp", "layers.29.self_attn"]


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", default=os.environ.get("PYTEST_KLD_DEMO_DIR"), help="demo model cache")
    ap.add_argument("--kld-cache-dir", default="/tmp/reuse/kld-cache", help="reference cache directory")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--quant", default="3bit-g64")
    ap.add_argument("--groups", nargs="*", default=GROUPS)
    ap.add_argument("--repeat", type=int, default=2, help="passes per group and way (the fastest is kept)")
    args = ap.parse_args()
    prefer_system_blas()
    from pytest_kld.cache import ensure_reference
    from pytest_kld.corpus import corpus_spec
    from pytest_kld.groups import layout
    from pytest_kld.intervals import paired
    from pytest_kld.progress import Progress
    from pytest_kld.reference import Settings
    from pytest_kld.sensitivity import Bench, sample_chunks

    reference = smollm2.ensure_reference(args.cache_dir)
    quant = smollm2.ensure_quants([args.quant], args.cache_dir)[args.quant]
    cache = ensure_reference(reference, corpus_spec("short"), Settings(exec="float32"), cache_dir=args.kld_cache_dir,
                             progress=Progress("reference cache"))
    lay = layout(reference, quant)
    every = {g.name: g for g in lay.groups}
    groups = {n: every[n] for g in args.groups for n in every if g in (n, n.split(" ")[0])}  # "embed_tokens (tied output)"
    bench = Bench(cache, reference, quant, args.quant, sample_chunks(cache, args.budget))
    try:
        bench.plan(every)  # as a whole ranking would: every layer's input kept
        r = bench.replay
        ct = cache.settings.chunk_tokens
        ranges = [int(cache.score_ranges[i][1]) for i in bench.chunk_ids]
        print(f"{args.quant}: {len(bench.chunk_ids)} chunks, {bench.tokens} tokens per pass (pieces of {ct}: "
              f"{sum(1 for e in ranges if not ct or e <= ct)} chunks of one call); {len(r.layers)} layers")
        base, w0, c0 = timed(lambda: bench.base(notify=print))
        kept = sum(int(a.nbytes) for s in r.states.values() for a in s.values())
        print(f"quant's own pass (recording, {kept / 2**20:.0f} MiB kept) and the safety net: {w0:.1f} s wall, "
              f"{c0:.1f} s CPU; replay {'on' if r.on else 'OFF: ' + str(r.why)}")
        if not r.on:
            return 1
        cluster, rows, same, total = bench.cluster(), [], True, [0.0, 0.0]
        print(f"{'group':<26} {'starts':>6} {'replay s':>9} {'full s':>8} {'wall x':>7} {'CPU x':>6}  saving (both ways)")
        for k, (name, g) in enumerate(groups.items()):
            start = bench.starts.get(name)
            old = bench.swap(g, 8)
            try:
                t, kl = {"replay": [], "full": []}, {}
                for rep in range(args.repeat):  # replay-full, full-replay, ...: a drift in the load evens out
                    for way in (("replay", "full") if (k + rep) % 2 == 0 else ("full", "replay")):
                        kl[way], w, c = timed(lambda s=start if way == "replay" else None: bench.kl(start=s))
                        t[way].append((w, c))
            finally:
                bench.restore(old)
            d = {way: paired(base, kl[way], cluster, quantiles={})["mean"] for way in kl}
            equal = np.array_equal(kl["replay"], kl["full"]) and d["replay"] == d["full"]
            same = same and equal
            (wr, cr), (wf, cf) = (min(t["replay"]), min(t["full"]))  # the least disturbed of the repeats
            rows.append((len(r.layers) - (start or 0), wr))
            rows.append((len(r.layers), wf))
            s = d["full"]
            print(f"{name:<26} {start or 0:>6} {wr:>9.2f} {wf:>8.2f} {wf / wr:>7.2f} {cf / cr:>6.2f}  {s['diff']:+.5f} "
                  f"[{s['low']:+.5f}, {s['high']:+.5f}] {'identical' if equal else 'DIFFERENT'}")
            total[0] += wr
            total[1] += wf
        print(f"these {len(groups)} groups: {total[1] / total[0]:.2f}x faster with the replay (wall, the least "
              f"disturbed of {args.repeat} passes each way)")
        project(rows, bench, lay, len(r.layers))
        print(f"every saving identical with and without the replay: {'yes' if same else 'NO'} "
              f"(load average now {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores)")
        return 0 if same else 1
    finally:
        bench.release()


def project(rows, bench, lay, n_layers: int) -> None:
    """The whole ranking's time both ways, from a line fitted to every pass's wall seconds
    against the layers it ran (a whole pass runs all of them)."""
    x, y = np.array([n for n, _ in rows], dtype=float), np.array([w for _, w in rows])
    if len(set(x)) < 2:
        return
    b, a = np.polyfit(x, y, 1)
    starts = [bench.starts.get(g.name, 0) for g in lay.groups]
    whole = a + b * n_layers
    replayed = whole + (a + b) + sum(a + b * (n_layers - s) for s in starts)  # own pass, safety net, groups
    print(f"whole ranking ({len(starts)} groups + the quant's own pass), projected: {whole * (1 + len(starts)) / replayed:.2f}x "
          f"faster with the replay (fitted: a pass costs {a / whole:.1%} of a whole one + {b / whole:.2%} per layer run)")


if __name__ == "__main__":
    sys.exit(main())
