"""Uncertainty of mean KLD when positions are not independent.

Positions inside one chunk or prompt share their context, so their KL values are correlated:
the i.i.d. standard error ``std / √n`` treats n correlated positions as n independent draws and
is too small. Here the chunk (prompt) is the unit of resampling:

- cluster-robust standard error (CR1): with cluster sums S_g, counts n_g, N = Σ n_g, G clusters
  and the mean m, ``se² = G/(G−1) · Σ_g (S_g − n_g·m)² / N²``;
- a 95% cluster-bootstrap percentile interval: clusters drawn with replacement (multinomial
  weights w_g, Σ w_g = G), each resample's mean ``Σ w_g S_g / Σ w_g n_g``; the 2.5th and 97.5th
  percentiles of :data:`RESAMPLES` resamples, seeded, so a result is reproducible;
- the same bootstrap for a percentile (P99): each resample weights every position by its
  cluster's w_g, and its q-quantile is the smallest value whose cumulative weight (values in
  ascending order) reaches q·Σw (the inverted-CDF quantile of the weighted sample).

Paired: every quant is scored on the same cached positions, so two results (a quant and its
baseline, or two neighbours on the leaderboard) differ position by position. The difference of
means is the mean of the per-cluster differences d_g = S_g(a) − S_g(b); its cluster-robust SE and
bootstrap interval follow from d_g exactly as above (the positions' shared difficulty cancels, which
is why a paired interval is far narrower than the two separate ones). The difference of two
percentiles uses one set of resample weights for both, per resample.

Only finite positions count (a non-finite one is a broken model, reported elsewhere). numpy only.
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 2000
SEED = 0


def cluster_sums(kl: np.ndarray, cluster: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum of finite KL, count of finite positions) per cluster id 0..G-1, float64."""
    kl = np.asarray(kl, dtype=np.float64)
    cluster = np.asarray(cluster)
    ok = np.isfinite(kl)
    g = int(cluster.max()) + 1 if cluster.size else 0
    sums = np.bincount(cluster[ok], weights=kl[ok], minlength=g)
    counts = np.bincount(cluster[ok], minlength=g).astype(np.float64)
    keep = counts > 0
    return sums[keep], counts[keep]


def clustered(kl: np.ndarray, cluster: np.ndarray, *, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """``{"se_cluster", "ci95_low", "ci95_high", "p99_ci95_low", "p99_ci95_high", "clusters"}``:
    the mean of finite ``kl`` and its P99, clustered by ``cluster``; NaN figures with fewer than
    two clusters."""
    sums, counts = cluster_sums(kl, cluster)
    g = int(sums.size)
    if g < 2:
        return {"se_cluster": math.nan, "ci95_low": math.nan, "ci95_high": math.nan,
                "p99_ci95_low": math.nan, "p99_ci95_high": math.nan, "clusters": g}
    n = float(counts.sum())
    mean = float(sums.sum()) / n
    se = math.sqrt(g / (g - 1) * float(np.sum((sums - counts * mean) ** 2))) / n
    weights = _weights(g, resamples, seed)
    low, high = np.percentile((weights @ sums) / (weights @ counts), [2.5, 97.5])
    kl = np.asarray(kl, dtype=np.float64)
    ok = np.isfinite(kl)
    ids, _ = _dense_clusters(np.asarray(cluster)[ok])
    p99_low, p99_high = np.percentile(weighted_quantiles(kl[ok], ids, weights, 0.99), [2.5, 97.5])
    return {"se_cluster": float(se), "ci95_low": float(low), "ci95_high": float(high),
            "p99_ci95_low": float(p99_low), "p99_ci95_high": float(p99_high), "clusters": g}


def _weights(g: int, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.multinomial(g, np.full(g, 1.0 / g), size=resamples).astype(np.float64)


def _dense_clusters(cluster: np.ndarray) -> tuple[np.ndarray, int]:
    """Cluster ids renumbered 0..G-1 (clusters without a position dropped), and G."""
    uniq, inverse = np.unique(np.asarray(cluster), return_inverse=True)
    return inverse.reshape(-1), int(uniq.size)


def weighted_quantiles(values: np.ndarray, cluster: np.ndarray, weights: np.ndarray, q: float) -> np.ndarray:
    """The q-quantile (0..1) of ``values`` under each row of cluster ``weights`` [R, G]: the
    smallest value whose cumulative weight, in ascending order, reaches q·Σw. Blocked over rows,
    so memory stays at 64 rows × N."""
    order = np.argsort(values, kind="stable")
    sorted_values, sorted_cluster = values[order], cluster[order]
    out = np.empty(weights.shape[0])
    for lo in range(0, weights.shape[0], 64):
        w = weights[lo:lo + 64][:, sorted_cluster]
        cum = np.cumsum(w, axis=1)
        idx = np.argmax(cum >= q * cum[:, -1:] * (1 - 1e-12), axis=1)
        out[lo:lo + 64] = sorted_values[idx]
    return out


def quantile_interval(kl: np.ndarray, cluster: np.ndarray, q: float, *, resamples: int = RESAMPLES,
                      seed: int = SEED) -> tuple[float, float]:
    """95% cluster-bootstrap interval of the q-quantile (0..1) of the finite ``kl``; NaNs with
    fewer than two clusters."""
    kl = np.asarray(kl, dtype=np.float64)
    ok = np.isfinite(kl)
    ids, g = _dense_clusters(np.asarray(cluster)[ok])
    if g < 2:
        return math.nan, math.nan
    qs = weighted_quantiles(kl[ok], ids, _weights(g, resamples, seed), q)
    low, high = np.percentile(qs, [2.5, 97.5])
    return float(low), float(high)


def paired(now: np.ndarray, base: np.ndarray, cluster: np.ndarray, *, quantiles: dict | None = None,
           resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """The paired difference ``now − base`` of two per-position KL arrays over the same positions:
    ``{"mean": {"diff", "se", "low", "high"}, name: {"diff", "low", "high"} for name, q in
    quantiles}``, each with a 95% cluster-bootstrap interval (one set of resample weights for
    all). Positions where either is non-finite are left out of both."""
    from .options import percentiles

    now, base = np.asarray(now, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if now.shape != base.shape or now.shape != np.asarray(cluster).shape:
        raise ValueError(f"paired arrays differ in shape: {now.shape}, {base.shape}, {np.shape(cluster)}")
    ok = np.isfinite(now) & np.isfinite(base)
    now, base = now[ok], base[ok]
    ids, g = _dense_clusters(np.asarray(cluster)[ok])
    quantiles = {k: percentiles()[k] / 100 for k in ("p99",)} if quantiles is None else quantiles
    nan = {"diff": math.nan, "low": math.nan, "high": math.nan}
    if g < 2:
        return {"mean": {**nan, "se": math.nan}, **{k: dict(nan) for k in quantiles}, "clusters": g}
    n = float(now.size)
    d = np.bincount(ids, weights=now - base, minlength=g)
    counts = np.bincount(ids, minlength=g).astype(np.float64)
    diff = float(np.sum(now - base)) / n
    se = math.sqrt(g / (g - 1) * float(np.sum((d - counts * diff) ** 2))) / n
    weights = _weights(g, resamples, seed)
    means = (weights @ d) / (weights @ counts)
    out = {"mean": {"diff": diff, "se": se, **_ci(means)}, "clusters": g}
    for name, q in quantiles.items():
        qdiff = weighted_quantiles(now, ids, weights, q) - weighted_quantiles(base, ids, weights, q)
        point = float(np.percentile(now, q * 100) - np.percentile(base, q * 100))
        out[name] = {"diff": point, **_ci(qdiff)}
    return out


def _ci(draws: np.ndarray) -> dict:
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"low": float(low), "high": float(high)}


def paired_sums(sums_a, counts_a, sums_b, counts_b, *, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """The paired difference of two means from per-cluster sums alone (what a leaderboard row
    carries): ``{"diff", "se", "low", "high"}``; NaNs unless both have the same positive counts
    per cluster (the same positions, all finite) and at least two clusters."""
    sa, sb = np.asarray(sums_a, dtype=np.float64), np.asarray(sums_b, dtype=np.float64)
    ca, cb = np.asarray(counts_a, dtype=np.float64), np.asarray(counts_b, dtype=np.float64)
    nan = {"diff": math.nan, "se": math.nan, "low": math.nan, "high": math.nan}
    if sa.shape != sb.shape or ca.shape != sa.shape or not np.array_equal(ca, cb) or sa.size < 2 or ca.sum() <= 0:
        return nan
    keep = ca > 0
    d, counts, g = (sa - sb)[keep], ca[keep], int(keep.sum())
    if g < 2:
        return nan
    n = float(counts.sum())
    diff = float(d.sum()) / n
    se = math.sqrt(g / (g - 1) * float(np.sum((d - counts * diff) ** 2))) / n
    weights = _weights(g, resamples, seed)
    return {"diff": diff, "se": se, **_ci((weights @ d) / (weights @ counts))}
