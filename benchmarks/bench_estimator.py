"""Bias of the sparse KL estimator against the dense float64 KL, and candidates at the same bytes.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_estimator.py \\
        [--cache /tmp/demo-cache/smollm2-135m-instruct-v1] [--n-chunks 24] \\
        [--quants 8bit-g64 6bit-g64 4bit-g64 3bit-g64] [--out benchmarks/results/estimator.md]

Token set: the first ``--n-chunks`` prompts of the short corpus (24 → 3,640 scored positions,
all six categories), n_ctx 512, exec float32, chunk_tokens 512. For each quant the reference
and the quant are loaded (float32, dequantised) and run prompt by prompt; each prompt's dense
[n, V] log-probs live only while that prompt is scored. Per position:

* dense: full-vocabulary KL(reference ‖ quant) in float64 (``divergence.dense_kl``);
* the cache's estimator through the real code path (``sparsify`` then ``compare_rows``), with
  the tail as one bin (``tail_spread=False``, the lower bound) and with the tail-spread
  correction (the default), at K = 16, 64, 256, 1024;
* candidates at ~1544 bytes/position (numpy, float64 sums, the same stored values a cache
  would hold): float16 log-probs with K=384 (4K+8 B), with the quant's log-probs at the top K
  left float32 or rounded to float16 the same way (which makes self-comparison exact); and an
  entropy-constrained bound with one extra float32 per position (K=255: 6K+12 = 1542 B): the
  stored scalar is the reference tail's Σ p̂ log p̂, and the tail's inner KL is bounded below
  by min KL(p̂ ‖ q̂) over p̂ with that entropy, which is q̂ tempered (q̂^β, β by bisection).

Figures: mean bias = mean(est)/mean(dense) − 1; P99 bias = P99(est)/P99(dense) − 1 (the
percentile a leaderboard shows); per position: P50/P99 of |est − dense|/dense over positions
whose dense KL is at least 1e-4 nats (below that, float32 log-softmax rounding, ~1e-7 nats,
dominates any relative figure), P99 and max of |est − dense| in nats over all positions.
"reference" as a quant is the self-comparison. ``--save x.npz`` keeps every per-position array.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from pytest_kld.blas import prefer_system_blas

KS = (16, 64, 256, 1024)
BYTES = {  # per scored position, V <= 65536 (uint16 ids)
    "f32": lambda k: 6 * k + 8,  # ids 2 + log-probs 4, tail 4, target 4
    "f16": lambda k: 4 * k + 8,
    "f32+H": lambda k: 6 * k + 12,
}


def _lse(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))[..., 0]


def _masked_tail(lp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    out = lp.astype(np.float64)
    np.put_along_axis(out, ids, -np.inf, axis=-1)
    return out


def _q_tail(lq, ids: np.ndarray) -> np.ndarray:
    """The quant's tail log-mass as compare_rows computes it (float32 MLX logsumexp)."""
    import mlx.core as mx

    rest = mx.put_along_axis(lq, mx.array(ids.astype(np.int32)), mx.array(-mx.inf, dtype=lq.dtype), axis=-1)
    return np.array(mx.logsumexp(rest, axis=-1)).astype(np.float64)


def _estimate(pl, ql, r_tail, q_tail, spread: bool, inner=None):
    """The cache estimator in float64 from stored values: top-K terms + tail bin (+ inner KL)."""
    from pytest_kld.divergence import tail_inner_kl

    pl = pl.astype(np.float64)
    lr = pl - ql.astype(np.float64)
    kl = np.sum(np.exp(pl) * lr, axis=-1)
    if inner is None:
        inner = tail_inner_kl(lr) if spread else 0.0
    pt = np.exp(r_tail)
    return kl + np.where(pt > 0, pt * (r_tail - q_tail + inner), 0.0)


def _entropy_bound(ref_tail: np.ndarray, q_tail: np.ndarray, r_t: np.ndarray, q_t: np.ndarray) -> np.ndarray:
    """min KL(p ‖ q̂) over tails p with the reference tail's stored Σ p̂ log p̂ (float32)."""
    fin_r = np.isfinite(ref_tail)
    lp = np.where(fin_r, ref_tail - r_t[:, None], 0.0)
    h = np.sum(np.where(fin_r, np.exp(lp), 0.0) * lp, axis=-1).astype(np.float32).astype(np.float64)
    fin = np.isfinite(q_tail)
    ell = np.where(fin, q_tail - q_t[:, None], 0.0)

    def negent(beta):
        x = np.where(fin, beta[:, None] * ell, -np.inf)
        a = _lse(x)
        e = np.sum(np.exp(x - a[:, None]) * ell, axis=-1)
        return beta * e - a, e

    lo, hi = np.full(len(h), 1e-3), np.full(len(h), 50.0)
    for _ in range(40):  # negentropy of q̂^β rises with β
        mid = np.sqrt(lo * hi)
        above = negent(mid)[0] > h
        hi, lo = np.where(above, mid, hi), np.where(above, lo, mid)
    n, e = negent(np.sqrt(lo * hi))
    return np.maximum(n - e, 0.0)


def measure(root: Path, quant: str, chunks, ranges, vocab: int) -> dict[str, np.ndarray]:

    from pytest_kld.divergence import compare_rows, dense_kl, sparsify
    from pytest_kld.forward import chunk_logprobs, load_model

    ref = load_model(root / "reference", "float32")
    qm = ref if quant == "reference" else load_model(root / "quants" / quant, "float32")
    out: dict[str, list] = {}

    def put(name, v):
        out.setdefault(name, []).append(np.asarray(v, dtype=np.float64))

    for toks, (s, e) in zip(chunks, ranges):
        lp = chunk_logprobs(ref.model, toks[:e], s, e, chunk_tokens=512, vocab=vocab)
        lq = lp if qm is ref else chunk_logprobs(qm.model, toks[:e], s, e, chunk_tokens=512, vocab=vocab)
        r_np, q_np = np.array(lp), np.array(lq)
        targets = toks[s + 1 : e + 1]
        put("dense", dense_kl(r_np, q_np))
        for k in KS:
            rows = sparsify(lp, targets, k)
            put(f"bin K={k}", compare_rows(rows, lq, tail_spread=False).kl)
            put(f"spread K={k}", compare_rows(rows, lq).kl)
        # candidates at ~1544 B/position
        rows = sparsify(lp, targets, 384)
        ids = rows.ids
        r_t = rows.tail.astype(np.float64)
        q_t = _q_tail(lq, ids)
        p16 = rows.logprobs.astype(np.float16).astype(np.float32)
        q_top = np.take_along_axis(q_np, ids, axis=-1)
        q16 = q_top.astype(np.float16).astype(np.float32)
        for spread in (False, True):
            tag = "+spread" if spread else ""
            put(f"f16 K=384{tag}", _estimate(p16, q_top, r_t, q_t, spread))
            put(f"f16 K=384 q-rounded{tag}", _estimate(p16, q16, r_t, q_t, spread))
        rows = sparsify(lp, targets, 255)
        ids = rows.ids
        r_t = rows.tail.astype(np.float64)
        q_tail = _masked_tail(q_np, ids)
        q_t = _q_tail(lq, ids)
        inner = _entropy_bound(_masked_tail(r_np, ids), q_tail, r_t, q_t)
        q_top = np.take_along_axis(q_np, ids, axis=-1)
        put("f32 K=255 +H bound", _estimate(rows.logprobs, q_top, r_t, q_t, False, inner=inner))
        check = _estimate(rows.logprobs, q_top, r_t, q_t, True)
        real = compare_rows(rows, lq).kl
        np.testing.assert_allclose(check, real, rtol=1e-4, atol=1e-7)  # numpy path == real path
        del lp, lq, r_np, q_np
    if qm is not ref:
        qm.release()
    ref.release()
    return {k: np.concatenate(v) for k, v in out.items()}


REL_FLOOR = 1e-4  # nats: relative errors only where the dense KL is above float32 noise


def figures(est: np.ndarray, d: np.ndarray) -> dict:
    err = np.abs(est - d)
    big = d >= REL_FLOOR
    rel = err[big] / d[big]
    return {
        "mean_bias": est.mean() / d.mean() - 1,
        "p99_bias": np.quantile(est, 0.99) / np.quantile(d, 0.99) - 1,
        "rel_p50": np.median(rel),
        "rel_p99": np.quantile(rel, 0.99),
        "abs_p99": np.quantile(err, 0.99),
        "abs_max": err.max(),
        "mean": est.mean(),
    }


CANDIDATES = [  # name, bytes/position
    ("bin K=256", BYTES["f32"](256)),
    ("spread K=256", BYTES["f32"](256)),
    ("f16 K=384", BYTES["f16"](384)),
    ("f16 K=384+spread", BYTES["f16"](384)),
    ("f16 K=384 q-rounded", BYTES["f16"](384)),
    ("f16 K=384 q-rounded+spread", BYTES["f16"](384)),
    ("f32 K=255 +H bound", BYTES["f32+H"](255)),
    ("bin K=1024", BYTES["f32"](1024)),
    ("spread K=1024", BYTES["f32"](1024)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default="/tmp/demo-cache/smollm2-135m-instruct-v1")
    ap.add_argument("--n-chunks", type=int, default=24)
    ap.add_argument("--quants", nargs="*", default=["reference", "8bit-g64", "6bit-g64", "4bit-g64", "3bit-g64"])
    ap.add_argument("--out", default=None, help="write the tables as Markdown here")
    ap.add_argument("--save", default=None, help="save the per-position arrays (npz)")
    args = ap.parse_args()
    blas = prefer_system_blas()
    from pytest_kld.corpus import corpus_spec
    from pytest_kld.forward import load_model, logits_width
    from pytest_kld.tokens import tokenize_corpus

    root = Path(args.cache)
    lm = load_model(root / "reference", "float32")
    corpus = tokenize_corpus(corpus_spec("short", n_chunks=args.n_chunks), lm.tokenizer)
    vocab = logits_width(lm.model)
    lm.release()
    chunks = [np.asarray(c, dtype=np.int32) for c in corpus.chunks]
    ranges = [(int(s), int(e)) for s, e in corpus.score_ranges]
    n_pos = sum(e - s for s, e in ranges)
    lines = [
        f"Token set: short corpus, first {args.n_chunks} prompts, {n_pos} scored positions; "
        f"V={vocab}; exec float32; BLAS {blas}.",
        "",
    ]
    results = {}
    for q in args.quants:
        t0 = time.time()
        res = measure(root, q, chunks, ranges, vocab)
        results[q] = res
        print(f"{q}: dense mean {res['dense'].mean():.6g} ({time.time() - t0:.0f} s)", flush=True)
    if args.save:
        np.savez_compressed(args.save, **{f"{q}|{k}": v for q, r in results.items() for k, v in r.items()})

    quants = [q for q in args.quants if q != "reference"]
    lines += ["### Bias of the estimator vs dense float64 KL, by K (mean bias / P99 bias)", ""]

    def table(lead_heads, lead_cells, cell):
        """A Markdown table: lead columns, then one-bin and spread cells for every K."""
        out = ["| quant | " + "".join(f"{h} | " for h in lead_heads)
               + " | ".join(f"K={k} one bin | K={k} spread" for k in KS) + " |"]
        out.append("|---" * (1 + len(lead_heads) + 2 * len(KS)) + "|")
        for q in quants:
            d = results[q]["dense"]
            cells = [cell(figures(results[q][f"{kind} K={k}"], d)) for k in KS for kind in ("bin", "spread")]
            out.append(f"| {q} | " + "".join(f"{c} | " for c in lead_cells(d)) + " | ".join(cells) + " |")
        return out

    lines += table(["dense mean", "dense P99"], lambda d: [f"{d.mean():.5g}", f"{np.quantile(d, 0.99):.4g}"],
                   lambda f: f"{f['mean_bias']:+.2%} / {f['p99_bias']:+.2%}")
    small = {q: int(np.sum(results[q]["dense"] < REL_FLOOR)) for q in quants}
    lines += ["", "### Per-position error by K (P99 of |err|/dense where dense >= 1e-4; max |err| nats)", ""]
    lines += [f"Positions below 1e-4 nats (left out of relative figures): {small}.", ""]
    lines += table([], lambda d: [], lambda f: f"{f['rel_p99']:.1%}; {f['abs_max']:.2e}")
    lines += ["", "### Candidates (bytes/position; self = mean and max KL of the reference against itself)", ""]
    lines += ["| candidate | B/pos | quant | mean bias | P99 bias | rel err P50 | rel err P99 | abs err P99 | abs err max |"]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for name, nbytes in CANDIDATES:
        if "reference" in results:
            v = results["reference"][name]
            lines.append(f"| {name} | {nbytes} | self | mean {v.mean():.2e} | max {np.abs(v).max():.2e} | | | | |")
        for q in quants:
            f = figures(results[q][name], results[q]["dense"])
            lines.append(
                f"| {name} | {nbytes} | {q} | {f['mean_bias']:+.3%} | {f['p99_bias']:+.3%} | {f['rel_p50']:.3%} | "
                f"{f['rel_p99']:.2%} | {f['abs_p99']:.2e} | {f['abs_max']:.2e} |"
            )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
