"""Sensitivity passes with and without replaying the layers before the swapped group (issue 27,
pytest_kld/replay.py), side by side in one run on SmolLM2-135M-Instruct.

    nice python benchmarks/bench_replay.py [--cache-dir DEMO_DIR] [--kld-cache-dir /tmp/reuse] [--budget 512]
        [--quant 3bit-g64] [--groups embed_tokens layers.0.mlp ...] [--repeat 1]

The quant is loaded once (``sensitivity.Bench``), its own pass run (recording the layers' inputs,
then the safety net); then each group is swapped in and its pass run both ways, the order
alternating from group to group, and swapped back. Prints each group's wall and CPU seconds both
ways and their ratio, checks that the KL of every position (so the saving and its interval) is the
same bit for bit, and projects the whole ranking (every group of the quant, one pass each, plus
the quant's own) from the measured times per first layer (a straight line in the layers run).
CPU seconds (all threads) are the steadier figure on a shared machine. Exit 1 when a saving differs.
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
    ap.add_argument("--repeat", type=int, default=1, help="passes per group and way")
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
    groups = {g: every[g] for g in args.groups}
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
        cluster, rows, same = bench.cluster(), [], True
        print(f"{'group':<22} {'starts':>6} {'replay s':>9} {'full s':>8} {'wall x':>7} {'CPU x':>6}  saving (both ways)")
        for k, (name, g) in enumerate(groups.items()):
            start = bench.starts.get(name)
            old = bench.swap(g, 8)
            try:
                t = {"replay": [0.0, 0.0], "full": [0.0, 0.0]}
                kl = {}
                for _ in range(args.repeat):
                    for way in (("replay", "full") if k % 2 == 0 else ("full", "replay")):
                        kl[way], w, c = timed(lambda s=start if way == "replay" else None: bench.kl(start=s))
                        t[way][0] += w
                        t[way][1] += c
            finally:
                bench.restore(old)
            d = {way: paired(base, kl[way], cluster, quantiles={})["mean"] for way in kl}
            equal = np.array_equal(kl["replay"], kl["full"]) and d["replay"] == d["full"]
            same = same and equal
            rows.append((start or 0, t["replay"][1] / args.repeat, t["full"][1] / args.repeat))
            s = d["full"]
            print(f"{name:<22} {start or 0:>6} {t['replay'][0]:>9.2f} {t['full'][0]:>8.2f} "
                  f"{t['full'][0] / t['replay'][0]:>7.2f} {t['full'][1] / t['replay'][1]:>6.2f}  {s['diff']:+.5f} "
                  f"[{s['low']:+.5f}, {s['high']:+.5f}] {'identical' if equal else 'DIFFERENT'}")
        project(rows, bench, lay, len(r.layers))
        print(f"every saving identical with and without the replay: {'yes' if same else 'NO'} "
              f"(load average now {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores)")
        return 0 if same else 1
    finally:
        bench.release()


def project(rows, bench, lay, n_layers: int) -> None:
    """The whole ranking's CPU time both ways, from a line fitted to the replayed passes' CPU
    seconds against the layers they run (a full pass runs all of them)."""
    full = float(np.mean([f for _, _, f in rows]))
    x = np.array([n_layers - s for s, _, _ in rows], dtype=float)
    y = np.array([r for _, r, _ in rows])
    if len(set(x)) < 2:
        return
    b, a = np.polyfit(x, y, 1)
    starts = [bench.starts.get(g.name, 0) for g in lay.groups]
    replayed = full + a + b * 1 + sum(a + b * (n_layers - s) for s in starts)  # own pass, safety net, groups
    plain = full * (1 + len(starts))
    print(f"whole ranking ({len(starts)} groups + the quant's own pass), projected CPU: {plain / replayed:.2f}x "
          f"faster with the replay (a pass: {a:.2f} s + {b:.3f} s per layer run; full {full:.2f} s)")


if __name__ == "__main__":
    sys.exit(main())
