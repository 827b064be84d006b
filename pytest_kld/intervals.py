"""Uncertainty of mean KLD when positions are not independent.

Positions inside one chunk or prompt share their context, so their KL values are correlated:
the i.i.d. standard error ``std / √n`` treats n correlated positions as n independent draws and
is too small. Here the chunk (prompt) is the unit of resampling:

- cluster-robust standard error (CR1): with cluster sums S_g, counts n_g, N = Σ n_g, G clusters
  and the mean m, ``se² = G/(G−1) · Σ_g (S_g − n_g·m)² / N²``;
- a 95% cluster-bootstrap percentile interval: clusters drawn with replacement (multinomial
  weights w_g, Σ w_g = G), each resample's mean ``Σ w_g S_g / Σ w_g n_g``; the 2.5th and 97.5th
  percentiles of :data:`RESAMPLES` resamples, seeded, so a result is reproducible.

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
    """``{"se_cluster", "ci95_low", "ci95_high", "clusters"}`` of the mean of finite ``kl``,
    clustered by ``cluster``; NaN figures with fewer than two clusters."""
    sums, counts = cluster_sums(kl, cluster)
    g = int(sums.size)
    if g < 2:
        return {"se_cluster": math.nan, "ci95_low": math.nan, "ci95_high": math.nan, "clusters": g}
    n = float(counts.sum())
    mean = float(sums.sum()) / n
    se = math.sqrt(g / (g - 1) * float(np.sum((sums - counts * mean) ** 2))) / n
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(g, np.full(g, 1.0 / g), size=resamples).astype(np.float64)
    means = (weights @ sums) / (weights @ counts)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"se_cluster": float(se), "ci95_low": float(low), "ci95_high": float(high), "clusters": g}
