"""Per-position divergence between a sparse reference and a comparison model's log-probs.

Direction: KL(reference ‖ quant) = Σ_x p_ref(x) · (log p_ref(x) − log p_quant(x)), weighted by the
reference's probabilities.

The reference keeps, per scored position, its top-K log-probs (sorted, most probable first),
their ids, and the log of the remaining (tail) mass P_T. The comparison has the quant's whole
distribution. Exactly (chain rule of KL over the partition top-K | tail)::

    KL = Σ_top p log(p/q)  +  P_T log(P_T/Q_T)  +  P_T · KL(p̂_T ‖ q̂_T)

where p̂_T, q̂_T are the two tails renormalised. The first two terms ("the tail as one bin") are
a lower bound (log-sum inequality). The third is what the cache cannot know: the reference's
tail shape. It is estimated from the log-ratios ε = log q − log p the cache *does* see at the
low end of the top K (ranks K/2 .. K-1)::

    KL(p̂_T ‖ q̂_T) ≈ ½ Var_{K/2 <= j < K}(ε_j)

Assumption: in the tail, ε behaves like at ranks K/2..K-1 — independent of p̂_T, with the same
spread (exact for Gaussian ε: log E[e^ε] − E[ε] = σ²/2). Measured on SmolLM2-135M quants
(benchmarks/results/estimator.md): the spread of ε barely depends on rank (8-bit: ½Var 0.0046
at ranks 128-256 and 256-2048); at K=256 the mean bias goes from −3%..−4.7% (one bin) to
−0.2%..−0.35%, per-position P99 relative error from ~30% to ~6%, with the same cache bytes.

Properties kept: exact when K equals the vocabulary (no tail); self-comparison is exactly 0
(every ε is 0); never below the one-bin lower bound (the added term is ≥ 0). It is no longer
a lower bound itself. ``compare_rows(..., tail_spread=False)`` gives the one-bin bound.
Log-softmax, top-K and tails run in float32 in numpy; the KL sums run in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SparseRows:
    """The reference's record of some scored positions."""

    ids: np.ndarray  # [n, K] token ids, most probable first
    logprobs: np.ndarray  # [n, K] float32
    tail: np.ndarray  # [n] float32 log of the mass outside the top K (-inf when K == V)
    target: np.ndarray  # [n] float32 log-prob of the token that actually follows
    target_ids: np.ndarray  # [n] the token that actually follows (from the cached token ids)


def sparsify(lp, targets: np.ndarray, top_k: int, *, logits: bool = False) -> SparseRows:
    """Top-K of float32 log-probs ``lp`` ([n, V]) with the tail mass, no cancellation.

    The tail is log Σ_{x ∉ top-K} p(x), a log-sum-exp over the remaining entries, never
    ``log(1 - Σ top-K)``, which loses all precision when the tail is small. The top K are
    ordered most probable first, equal log-probs by token id (the same rule whatever the
    selection method: :func:`top_k_ids`).

    ``logits=True``: ``lp`` holds raw logits (a read-only view of the forward pass's output is
    fine: it is never written); the log-softmax is done block by block of :data:`ROW_BLOCK`
    rows, with the same figures as :func:`log_softmax` of the whole piece, without a copy of it.
    """
    lp = np.asarray(lp, dtype=np.float32)
    n, v = lp.shape
    k = min(int(top_k), int(v))
    targets = np.asarray(targets, dtype=np.int64)
    idx = np.empty((n, k), dtype=np.int64)
    vals = np.empty((n, k), dtype=np.float32)
    tail = np.full(n, -np.inf, dtype=np.float32)
    target = np.empty(n, dtype=np.float32)
    for b in _blocks(n):  # vocabulary-wide temporaries for one block of rows at a time
        x = _normalised(lp[b]) if logits else lp[b]
        target[b] = x[np.arange(x.shape[0]), targets[b]]
        idx[b] = top_k_ids(x, k)
        vals[b] = np.take_along_axis(x, idx[b], axis=-1)
        if k < v:
            rest = x if logits else x.copy()  # a fresh block from _normalised may be written
            np.put_along_axis(rest, idx[b], -np.inf, axis=-1)
            tail[b] = _logsumexp(rest)
    return SparseRows(ids=idx, logprobs=vals, tail=tail, target=target, target_ids=targets)


def top_k_ids(x: np.ndarray, k: int) -> np.ndarray:
    """The ids of each row's ``k`` largest values ([rows, k], int64), largest first, equal values
    by lower id (a rule, so the cache's bytes do not depend on the selection algorithm).

    Finding them without partitioning the whole vocabulary: a strided sample of each row gives a
    threshold with, almost always, somewhat more than ``k`` values at or above it; those
    candidates (every value equal to the k-th included) are then ordered exactly. A row where
    the sample's threshold leaves fewer than ``k`` takes its exact k-th value as the threshold.
    Rows that hold NaN (a broken model; the caller refuses them) fall back to a plain partition.
    """
    rows, v = x.shape
    if k >= v:
        return np.argsort(-x, axis=-1, kind="stable")
    stride = TOPK_STRIDE if v >= 4 * TOPK_STRIDE * k else 1
    if stride > 1:
        sample = x[:, ::stride]
        j = min(sample.shape[1], 2 * (-(-k // stride)))  # about 2k candidates expected
        t = np.partition(sample, sample.shape[1] - j, axis=-1)[:, sample.shape[1] - j]
    else:
        t = np.partition(x, v - k, axis=-1)[:, v - k]
    mask = x >= t[:, None]
    counts = mask.sum(axis=-1)
    short = counts < k
    if short.any():  # the sample was unlucky for these rows: the exact k-th value
        t[short] = np.partition(x[short], v - k, axis=-1)[:, v - k]
        mask[short] = x[short] >= t[short][:, None]
        counts[short] = mask[short].sum(axis=-1)
    out = np.empty((rows, k), dtype=np.int64)
    bad = counts < k  # NaN in the row: no order exists; any k ids
    if bad.any():
        out[bad] = np.argpartition(np.nan_to_num(-x[bad], nan=np.inf), k - 1, axis=-1)[:, :k]
    good = ~bad
    if good.any():
        r, c = np.nonzero(mask & good[:, None])  # row-major: ids ascending within a row
        width = int(counts[good].max())
        starts = np.concatenate([[0], np.cumsum(counts[good])[:-1]])
        row_of = np.cumsum(good) - 1  # position of each good row among the good rows
        pos = np.arange(r.size) - np.repeat(starts, counts[good])
        cand = np.full((int(good.sum()), width), -np.inf, dtype=x.dtype)
        cid = np.full((int(good.sum()), width), v, dtype=np.int64)  # padding sorts after every id
        cand[row_of[r], pos] = x[r, c]
        cid[row_of[r], pos] = c
        order = np.lexsort((cid, -cand), axis=-1)[:, :k]
        out[good] = np.take_along_axis(cid, order, axis=-1)
    return out


@dataclass
class PositionStats:
    """Per-position comparison figures (all float64 except flags)."""

    kl: np.ndarray  # KL(reference ‖ quant), nats; NaN where the quant's logits were not finite
    top1: np.ndarray  # bool: the quant's argmax equals the reference's
    ref_target: np.ndarray  # log p_ref(next token)
    quant_target: np.ndarray  # log p_quant(next token)


def compare_rows(ref: SparseRows, lq, *, tail_spread: bool = True, logits: bool = False) -> PositionStats:
    """KL(reference ‖ quant) at each position from the sparse reference and dense quant log-probs.

    ``lq`` is the quant's float32 log-probs over its WHOLE output ([n, V'], V' at least the
    reference's V), or with ``logits=True`` its raw logits (never written), normalised block by
    block as in :func:`sparsify`. Ids beyond the reference's V (padding rows) are part of the
    quant's distribution: mass there is missing at the reference's ids (it counts as damage, in
    the tail term) and an argmax there is a top-1 disagreement. ``tail_spread``: add the tail's estimated inner KL (module docstring);
    False gives the one-bin lower bound.
    """
    lq = np.asarray(lq, dtype=np.float32)
    n = lq.shape[0]
    finite = np.empty(n, dtype=bool)
    q_arg = np.empty(n, dtype=np.int64)
    q_target = np.empty(n)
    q_top = np.empty(ref.ids.shape)
    has_tail = bool(np.any(np.isfinite(ref.tail)))
    q_tail = np.full(n, -np.inf)
    for b in _blocks(n):  # one block of the piece at a time, not a copy of the whole piece
        with np.errstate(invalid="ignore"):
            x = _normalised(lq[b]) if logits else lq[b]
        finite[b] = np.all(np.isfinite(x), axis=-1)
        q_arg[b] = np.argmax(x, axis=-1)
        q_target[b] = x[np.arange(x.shape[0]), ref.target_ids[b]]
        q_top[b] = np.take_along_axis(x, ref.ids[b], axis=-1)
        if has_tail:
            rest = x if logits else x.copy()
            np.put_along_axis(rest, ref.ids[b], -np.inf, axis=-1)
            with np.errstate(invalid="ignore"):
                q_tail[b] = _logsumexp(rest)
    return kl_from_parts(ref, q_top, q_tail, q_target, q_arg, finite, tail_spread=tail_spread)


def kl_from_parts(ref: SparseRows, q_top, q_tail, q_target, q_arg, finite, *, tail_spread: bool = True) -> PositionStats:
    """The float64 reductions of :func:`compare_rows` from the quant's [n, K] log-probs at the
    reference's top-K ids (``q_top``), its tail log-mass beyond them (``q_tail``), its log-prob of
    the next token, its argmax and whether its row was finite: whichever backend gathered them
    (:mod:`pytest_kld.vocab`)."""
    q_top, q_tail = np.asarray(q_top, dtype=np.float64), np.asarray(q_tail, dtype=np.float64)
    p_lp = ref.logprobs.astype(np.float64)
    p = np.exp(p_lp)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        log_ratio = p_lp - q_top  # log p − log q on the reference's top K
        kl = np.sum(p * log_ratio, axis=-1)
        r_tail = ref.tail.astype(np.float64)
        p_tail = np.exp(r_tail)
        inner = tail_inner_kl(log_ratio) if tail_spread else 0.0
        tail_term = np.where(p_tail > 0, p_tail * (r_tail - q_tail + inner), 0.0)
    kl = kl + tail_term
    kl[~np.asarray(finite, dtype=bool)] = np.nan

    return PositionStats(
        kl=kl,
        top1=np.asarray(q_arg).astype(np.int64) == ref.ids[:, 0],
        ref_target=np.asarray(ref.target, dtype=np.float64),
        quant_target=np.asarray(q_target, dtype=np.float64),
    )


def tail_inner_kl(log_ratio: np.ndarray) -> np.ndarray:
    """Estimated KL between the renormalised tails: ½ the variance of log p − log q over the
    top-K ranks K/2 .. K-1 (float64, [n]); 0 with fewer than two ranks there."""
    k = log_ratio.shape[-1]
    window = log_ratio[..., k // 2 :]
    if window.shape[-1] < 2:
        return np.zeros(log_ratio.shape[:-1])
    return 0.5 * np.var(window, axis=-1)


ROW_BLOCK = 32  # rows per block of vocabulary-wide temporaries: 32 × 248,320 × 4 B = 32 MB
TOPK_STRIDE = 8  # top_k_ids samples every 8th value of a row for its threshold


def _normalised(lg: np.ndarray) -> np.ndarray:
    """Float32 log-softmax of one block of logit rows, as a new array (the input is not written):
    the same figures as :func:`log_softmax`, whose log-sum-exp runs over the same blocks."""
    return lg - _logsumexp(lg)[..., None]


def _blocks(n: int):
    return (slice(lo, min(n, lo + ROW_BLOCK)) for lo in range(0, n, ROW_BLOCK))


def logsumexp(a: np.ndarray) -> np.ndarray:
    """log Σ exp over the last axis, float32, stable; -inf for a row that is all -inf. Rows are
    done in blocks of :data:`ROW_BLOCK`, so the temporaries stay small (each row's sum is the
    same whatever its block)."""
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[0] <= ROW_BLOCK:
        return _logsumexp(a)
    return np.concatenate([_logsumexp(a[b]) for b in _blocks(a.shape[0])])


def _logsumexp(a: np.ndarray) -> np.ndarray:
    m = np.max(a, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, np.float32(0))
    with np.errstate(divide="ignore"):
        e = a - m
        np.exp(e, out=e)
        return (np.log(np.sum(e, axis=-1, keepdims=True)) + m)[..., 0]


def log_softmax(lg: np.ndarray) -> np.ndarray:
    """Float32 log-softmax over the last axis, in place on ``lg`` (a fresh copy of the logits)."""
    lg -= logsumexp(lg)[..., None]
    return lg


def dense_kl(ref_lp: np.ndarray, quant_lp: np.ndarray) -> np.ndarray:
    """Full-vocabulary KL(reference ‖ quant) in float64 from two dense log-prob arrays (numpy).

    The independent check of the sparse path, used in tests and the bias report.
    """
    r = ref_lp.astype(np.float64)
    q = quant_lp.astype(np.float64)
    r = r - np.logaddexp.reduce(r, axis=-1, keepdims=True)
    q = q - np.logaddexp.reduce(q, axis=-1, keepdims=True)
    return np.sum(np.exp(r) * (r - q), axis=-1)
