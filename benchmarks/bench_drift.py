"""Issue 26, measured side by side in one run on SmolLM2-135M-Instruct (float32, this machine):

    python benchmarks/bench_drift.py [--demo-dir DIR] [--n-chunks 20] [--drift-tokens 64]
                                     [--quants 8bit-g64 6bit-g64 4bit-g64 3bit-g64] [--json out.json]
                                     [--build-only] [--generation-only ROUNDS]

1. The reference's drift build (continuations + the teacher-forced top-K pass), once with the
   continuations generated one prompt at a time (mlx-lm's generate_step: how drift mode always
   built) and once batched across prompts (``drift.continuations``): both build times, and whether
   the two caches have the same key and byte-identical arrays (so the same tokens).
2. Per quant, on that cache: a drift-mode comparison (trajectory KLD + match lengths read from the
   same pass) against a prefill comparison of the same chunks (the same cache with its mode not
   drift: the KLD pass alone), alternating which runs first; the ratio drift / prefill.
3. Per quant, the oracle: the quant's free greedy generation with the tie rule (tests/free_greedy.py:
   generate_step token by token, a fresh prefill after each tie, stopping at the run's end), and
   prompt by prompt whether match, strict match and ties equal drift mode's, and where not, whether
   drift mode counted a quant near-tie on that prompt. Its time is printed too (it stops at each
   run's end, so it is cheaper than drift mode's old ``follow``, which generated every remaining token).
4. The rounding that drift.NEAR_NATS must cover, on the reference and the first 4 prompts: the
   largest difference between a step's log-probs computed incrementally one prompt at a time
   (generate_step, as free generation does), in the chunked teacher-forced pass (as drift mode
   reads them), and batched across prompts (BatchGenerator), at the same contexts.
``--generation-only ROUNDS``: the reference's continuations only, batched and one prompt at a time
with the model loaded once, alternating, best of ROUNDS (the builds above also time a pass and a
fingerprint, and on a shared machine two builds minutes apart see different loads).
``--rounds N --no-oracle --no-build-timing``: section 2 alone, best of N alternating rounds.
Exit 1 when the caches differ or a difference is not explained by a counted near-tie.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import repo_paths  # noqa: F401  (demo/ and tests/ on sys.path)


def build(ref: Path, spec, cache_dir: Path, batched: bool):
    """(seconds, seconds generating, prompts generated alone, cache) of a drift build with batched
    or one-at-a-time continuations."""
    from pytest_kld import drift
    from pytest_kld.cache import ensure_reference

    real, real_cont = drift.reference_corpus, drift.continuations
    gen = {}

    def timed(*a, **kw):
        t = time.perf_counter()
        out = real_cont(*a, **kw)
        gen["s"], gen["alone"] = time.perf_counter() - t, out[1]
        return out

    drift.reference_corpus = partial(real, batched=batched)  # refpass reads it at call time
    drift.continuations = timed
    try:
        t = time.perf_counter()
        cache = ensure_reference(ref, spec, cache_dir=cache_dir)
        return time.perf_counter() - t, gen["s"], gen["alone"], cache
    finally:
        drift.reference_corpus, drift.continuations = real, real_cont


def generation(ref: Path, spec, rounds: int) -> dict:
    """The reference's continuations alone, batched and one prompt at a time, the model loaded
    once, the order alternating between rounds: the best time of each, and whether they agree."""
    from pytest_kld import drift
    from pytest_kld.forward import load_model

    lm = load_model(ref, "float32")
    try:
        prompts = [p for p, _, _ in drift.prompt_ids(spec, lm.tokenizer)]
        eos = set(getattr(lm.tokenizer, "eos_token_ids", None) or [])
        drift.continuations(lm.model, prompts[:2], 4, eos)  # warm-up
        best, out = {True: math.inf, False: math.inf}, {}
        for k in range(rounds):
            for batched in ((True, False) if k % 2 == 0 else (False, True)):
                t = time.perf_counter()
                out[batched] = drift.continuations(lm.model, prompts, spec.drift_tokens, eos, batched=batched)
                best[batched] = min(best[batched], time.perf_counter() - t)
    finally:
        lm.release()
    return {"batched_s": round(best[True], 2), "one_at_a_time_s": round(best[False], 2),
            "ratio": round(best[False] / best[True], 2), "prompts_generated_alone_after_batching": out[True][1],
            "same_tokens": out[True][0] == out[False][0], "rounds": rounds}


def compare_both(cache, quant: Path, drift_first: bool, rounds: int = 1) -> dict:
    """Seconds of a drift-mode and a prefill comparison of the same chunks (the best of ``rounds``,
    the order alternating within and across rounds), and the drift result."""
    import copy

    from pytest_kld.compare import compare

    prefill = copy.copy(cache)
    prefill.manifest = {**cache.manifest, "corpus": {**cache.manifest["corpus"], "mode": "file"}}
    out = {"drift": float("inf"), "prefill": float("inf")}
    for k in range(rounds):
        order = ("drift", "prefill") if drift_first == (k % 2 == 0) else ("prefill", "drift")
        for mode in order:
            t = time.perf_counter()
            r = compare(cache if mode == "drift" else prefill, quant)
            out[mode] = min(out[mode], time.perf_counter() - t)
            out[f"{mode}_result"] = r
    assert out["prefill_result"].drift is None and out["drift_result"].drift is not None
    return out


def oracle(cache, quant: Path, result) -> dict:
    """The free-generation figures and, prompt by prompt, how they compare with drift mode's."""
    import free_greedy
    import numpy as np

    from pytest_kld import drift
    from pytest_kld.forward import load_model

    lm = load_model(quant, "float32")
    try:
        t = time.perf_counter()
        free = free_greedy.follow(lm.model, cache, drift.TIE_NATS)
        seconds = time.perf_counter() - t
    finally:
        lm.release()
    mine = result.drift
    same = np.all([free[k] == mine[k] for k in ("match", "match_strict", "ties")], axis=0)
    return {"seconds": round(seconds, 2), "identical_prompts": int(same.sum()),
            "differing_prompts": [int(i) for i in np.flatnonzero(~same)],
            "unexplained": [int(i) for i in np.flatnonzero(~same & (mine["near"] == 0))],
            "near_ties": int(mine["near"].sum()),
            "free": {k: free[k].tolist() for k in free},
            "teacher_forced": {k: mine[k].tolist() for k in ("match", "match_strict", "ties", "near")}}


def rounding(ref: Path, cache, n: int = 4) -> dict:
    """Largest |log-prob difference| between incremental, chunked and batched steps (section 4)."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.generate import BatchGenerator, generate_step

    from pytest_kld.forward import chunk_logprobs, load_model

    lm = load_model(ref, "float32")
    try:
        vocab = int(cache.manifest["vocab_size"])
        prompts, conts = [], []
        for i in range(min(n, cache.n_chunks)):
            s, e = (int(v) for v in cache.score_ranges[i])
            prompts.append(cache.chunk(i)[: s + 1].tolist())
            conts.append(cache.chunk(i)[s + 1 : e + 1].tolist())
        alone = []
        for p, c in zip(prompts, conts):
            steps = generate_step(mx.array(p, dtype=mx.int32), lm.model, max_tokens=len(c),
                                  sampler=lambda lp: mx.argmax(lp, axis=-1))
            alone.append(np.stack([np.array(lp, dtype=np.float32)[:vocab] for _, lp in steps]))
        gen = BatchGenerator(lm.model)
        uids = gen.insert(prompts, [len(c) for c in conts])
        batched = {u: [] for u in uids}
        while responses := gen.next_generated():
            for r in responses:
                batched[r.uid].append(np.array(r.logprobs, dtype=np.float32)[:vocab])
        gen.close()
        piece = cache.manifest["settings"]["chunk_tokens"] or None  # the pieces a comparison runs
        chunked = [chunk_logprobs(lm.model, cache.chunk(i), int(cache.score_ranges[i][0]),
                                  int(cache.score_ranges[i][1]), chunk_tokens=piece, vocab=vocab)
                   for i in range(len(prompts))]
    finally:
        lm.release()
    inc_vs_chunk = max(float(np.max(np.abs(a - c))) for a, c in zip(alone, chunked))
    inc_vs_batch = max(float(np.max(np.abs(a - np.stack(batched[u])))) for a, u in zip(alone, uids))
    return {"prompts": len(prompts), "incremental_vs_chunked": inc_vs_chunk, "incremental_vs_batched": inc_vs_batch}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo-dir", type=Path, default=None, help="demo model cache (see demo/smollm2.py)")
    ap.add_argument("--n-chunks", type=int, default=20)
    ap.add_argument("--drift-tokens", type=int, default=64)
    ap.add_argument("--quants", nargs="*", default=["8bit-g64", "6bit-g64", "4bit-g64", "3bit-g64"])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--build-only", action="store_true", help="section 1 only")
    ap.add_argument("--generation-only", type=int, default=0, metavar="ROUNDS",
                    help="only the reference's generation, batched vs one prompt at a time, best of ROUNDS")
    ap.add_argument("--no-build-timing", action="store_true", help="section 1: build once (batched), untimed")
    ap.add_argument("--no-oracle", action="store_true", help="skip sections 3 and 4 (free generation, rounding)")
    ap.add_argument("--rounds", type=int, default=1, help="section 2: best of this many rounds (default 1)")
    args = ap.parse_args(argv)
    from pytest_kld.blas import prefer_system_blas

    blas = prefer_system_blas()
    import numpy as np
    import smollm2

    from pytest_kld.corpus import corpus_spec
    from pytest_kld.drift import NEAR_NATS

    ref = smollm2.ensure_reference(args.demo_dir)
    quants = smollm2.ensure_quants(args.quants, args.demo_dir)
    spec = corpus_spec("drift", n_chunks=args.n_chunks, drift_tokens=args.drift_tokens)
    work = Path(tempfile.mkdtemp(prefix="kld-bench-drift-"))
    doc: dict = {"model": "SmolLM2-135M-Instruct", "exec": "float32", "blas": blas, "prompts": args.n_chunks,
                 "drift_tokens": args.drift_tokens}
    if args.generation_only:
        g = doc["generation"] = generation(ref, spec, args.generation_only)
        print(f"the reference's continuations ({args.n_chunks} prompts x {args.drift_tokens} tokens, best of "
              f"{g['rounds']}): one prompt at a time {g['one_at_a_time_s']:.1f} s, batched {g['batched_s']:.1f} s "
              f"({g['ratio']:.2f}x; {g['prompts_generated_alone_after_batching']} prompt(s) again alone after a "
              f"near-tie); the same tokens: {g['same_tokens']}")
        if args.json:
            args.json.write_text(json.dumps(doc, indent=1) + "\n")
        return 0 if g["same_tokens"] else 1
    # a warm-up (first-call costs), then the two builds, the batched one first
    build(ref, corpus_spec("drift", n_chunks=2, drift_tokens=4), work / "warm", batched=True)
    t_batched, g_batched, solo, batched = build(ref, spec, work / "batched", batched=True)
    if args.no_build_timing:
        same_key = same_bytes = same_tokens = True
    else:
        t_alone, g_alone, _, alone = build(ref, spec, work / "alone", batched=False)
        same_key = alone.manifest["key"] == batched.manifest["key"]
        same_bytes = alone.manifest["arrays_sha256"] == batched.manifest["arrays_sha256"]
        same_tokens = bool(np.array_equal(alone.tokens, batched.tokens))
        doc["build"] = {"one_at_a_time_s": round(t_alone, 2), "batched_s": round(t_batched, 2),
                        "ratio": round(t_alone / t_batched, 2), "generating_one_at_a_time_s": round(g_alone, 2),
                        "generating_batched_s": round(g_batched, 2), "generating_ratio": round(g_alone / g_batched, 2),
                        "prompts_generated_alone_after_batching": solo, "same_key": same_key,
                        "byte_identical": same_bytes, "same_tokens": same_tokens, "positions": batched.n_positions}
        print(f"reference drift build ({args.n_chunks} prompts x {args.drift_tokens} tokens, {batched.n_positions} "
              f"positions): one prompt at a time {t_alone:.1f} s (generating {g_alone:.1f} s), batched {t_batched:.1f} s "
              f"(generating {g_batched:.1f} s, {solo} prompt(s) again alone after a near-tie): {t_alone / t_batched:.2f}x "
              f"({g_alone / g_batched:.2f}x generating); same key {same_key}, arrays byte-identical {same_bytes}",
              flush=True)
    doc["quants"] = {}
    ok = same_key and same_bytes and same_tokens
    if args.build_only:
        if args.json:
            args.json.write_text(json.dumps(doc, indent=1) + "\n")
        return 0 if ok else 1
    print(f"{'quant':<10} {'prefill s':>9} {'drift s':>8} {'ratio':>6} {'match':>6} {'strict':>6} {'ties':>5} "
          f"{'near':>5} {'= free':>7} {'oracle s':>8}", flush=True)
    for j, (name, path) in enumerate(quants.items()):
        t = compare_both(batched, path, drift_first=j % 2 == 0, rounds=args.rounds)
        s = t["drift_result"].summary
        o = {"identical_prompts": -1, "seconds": math.nan, "unexplained": []} if args.no_oracle else oracle(
            batched, path, t["drift_result"])
        ok = ok and not o["unexplained"]
        doc["quants"][name] = {"prefill_s": round(t["prefill"], 2), "drift_s": round(t["drift"], 2),
                               "ratio": round(t["drift"] / t["prefill"], 3),
                               "summary": {k: v for k, v in s.items() if k.startswith("drift_")}, "oracle": o}
        print(f"{name:<10} {t['prefill']:9.1f} {t['drift']:8.1f} {t['drift'] / t['prefill']:6.2f} "
              f"{s['drift_match']:6.1f} {s['drift_match_strict']:6.1f} {s['drift_ties']:5d} {s['drift_near_ties']:5d} "
              f"{o['identical_prompts']:>3}/{args.n_chunks:<3} {o['seconds']:8.1f}", flush=True)
    if not args.no_oracle:
        doc["rounding"] = rounding(ref, batched)
        print(f"largest log-prob difference, same contexts (first {doc['rounding']['prompts']} prompts): incremental vs "
              f"chunked {doc['rounding']['incremental_vs_chunked']:.2e}, incremental vs batched "
              f"{doc['rounding']['incremental_vs_batched']:.2e} nats (drift.NEAR_NATS = {NEAR_NATS:g})")
    tot_p = sum(q["prefill_s"] for q in doc["quants"].values())
    tot_d = sum(q["drift_s"] for q in doc["quants"].values())
    doc["total"] = {"prefill_s": round(tot_p, 2), "drift_s": round(tot_d, 2), "ratio": round(tot_d / tot_p, 3)}
    print(f"all quants: prefill {tot_p:.1f} s, drift {tot_d:.1f} s, ratio {tot_d / tot_p:.2f}")
    from pytest_kld.drift import lines  # the leaderboard's drift section of these comparisons

    print("\n".join(lines([{"model": n, "summary": q["summary"]} for n, q in doc["quants"].items()])))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
