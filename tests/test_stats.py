"""stats.py and intervals.py against independent computations on known data (issue 17): each
figure pinned so that a wrong formula fails a test (P99 computed as P95, the standard error over
n instead of √n, non-finite positions averaged in as 0), and the clustered interval's coverage on
synthetic clustered data, where the i.i.d. interval visibly fails."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from pytest_kld.intervals import cluster_sums, clustered, paired, paired_sums, quantile_interval, weighted_quantiles
from pytest_kld.stats import summarize, summarize_groups

# 1..200 / 100: percentiles, mean and spread known by hand, and P99 far from P95.
X = np.arange(1, 201, dtype=np.float64) / 100


def test_mean_std_se_median_min_max_against_the_standard_library():
    s = summarize(X)
    values = list(X)
    assert s["count"] == 200 and s["nonfinite"] == 0
    assert s["mean"] == pytest.approx(statistics.fmean(values), rel=1e-15)
    assert s["std"] == pytest.approx(statistics.stdev(values), rel=1e-12)
    assert s["se"] == pytest.approx(statistics.stdev(values) / math.sqrt(200), rel=1e-12)  # √n, not n
    assert s["median"] == pytest.approx(statistics.median(values))
    assert (s["min"], s["max"], s["argmax"]) == (0.01, 2.0, 199)


@pytest.mark.parametrize("key, q", [("p90", 90), ("p95", 95), ("p99", 99), ("p99_9", 99.9)])
def test_each_percentile_is_its_own_linear_interpolation(key, q):
    """Linear interpolation between order statistics (numpy's default, llama.cpp's choice):
    rank (n − 1)·q/100."""
    rank = (X.size - 1) * q / 100
    lo = int(math.floor(rank))
    want = X[lo] + (X[min(lo + 1, X.size - 1)] - X[lo]) * (rank - lo)
    assert summarize(X)[key] == pytest.approx(want, rel=1e-12)
    assert summarize(X)["p99"] != pytest.approx(summarize(X)["p95"])  # the data tell them apart


def test_non_finite_positions_are_counted_never_averaged():
    kl = np.concatenate([X, [np.nan, np.inf, -np.inf]])
    s = summarize(kl)
    assert s["count"] == 200 and s["nonfinite"] == 3
    assert s["mean"] == pytest.approx(float(X.mean()))  # as 0 they would pull it to 200/203 of it
    assert s["mean"] != pytest.approx(float(X.sum() / 203))
    assert s["max"] == 2.0 and s["argmax"] == 199
    empty = summarize(np.array([np.nan, np.nan]))
    assert empty["count"] == 0 and empty["nonfinite"] == 2 and math.isnan(empty["mean"])


def test_top1_dp_and_perplexity_ratio_by_hand():
    kl = np.array([0.1, 0.2, np.nan, 0.4])
    top1 = np.array([True, False, True, True])
    ref = np.log(np.array([0.5, 0.25, 0.5, 0.125]))
    quant = np.log(np.array([0.25, 0.25, 0.9, 0.5]))
    s = summarize(kl, top1, ref, quant)
    ok = [0, 1, 3]  # the NaN position is left out of every figure
    assert s["top1"] == pytest.approx(2 / 3)
    dp = np.exp(quant[ok]) - np.exp(ref[ok])
    assert s["dp_mean"] == pytest.approx(dp.mean()) and s["dp_rms"] == pytest.approx(math.sqrt((dp**2).mean()))
    assert s["ppl_ref"] == pytest.approx(math.exp(-ref[ok].mean()))
    assert s["ppl_ratio"] == pytest.approx(math.exp(-quant[ok].mean()) / math.exp(-ref[ok].mean()))


def test_groups_are_summarised_separately():
    groups = np.array([0, 0, 1, 1, 1])
    out = summarize_groups(groups, ["a", "b", "c"], kl=np.array([1.0, 3.0, 10.0, 20.0, 30.0]))
    assert set(out) == {"a", "b"} and out["a"]["mean"] == 2.0 and out["b"]["mean"] == 20.0


def test_cluster_robust_se_by_hand():
    kl = np.array([1.0, 2.0, 3.0, 10.0, 12.0, np.nan])
    cluster = np.array([0, 0, 0, 1, 1, 1])
    sums, counts = cluster_sums(kl, cluster)
    assert list(sums) == [6.0, 22.0] and list(counts) == [3.0, 2.0]
    m = 28.0 / 5
    want = math.sqrt(2 / 1 * ((6 - 3 * m) ** 2 + (22 - 2 * m) ** 2)) / 5
    c = clustered(kl, cluster)
    assert c["se_cluster"] == pytest.approx(want) and c["clusters"] == 2
    assert c["ci95_low"] <= m <= c["ci95_high"]
    assert clustered(np.zeros(10), np.repeat([0, 1], 5)) == {"se_cluster": 0.0, "ci95_low": 0.0, "ci95_high": 0.0,
                                                           "p99_ci95_low": 0.0, "p99_ci95_high": 0.0, "clusters": 2}


def test_clustered_interval_covers_where_the_iid_one_does_not():
    """Synthetic positions in 40 chunks of 50: a chunk effect (sd 0.5) plus noise (sd 0.5) around a
    known mean of 1. Over 200 trials the clustered 95% interval covers the mean in >= 90% of
    them; the i.i.d. one (mean ± 1.96·se) far less often."""
    rng = np.random.default_rng(7)
    g, k, trials, true = 40, 50, 200, 1.0
    cluster = np.repeat(np.arange(g), k)
    hit_cluster = hit_iid = 0
    for _ in range(trials):
        kl = true + np.repeat(rng.normal(0, 0.5, g), k) + rng.normal(0, 0.5, g * k)
        c = clustered(kl, cluster, resamples=400)
        hit_cluster += c["ci95_low"] <= true <= c["ci95_high"]
        s = summarize(kl)
        hit_iid += abs(s["mean"] - true) <= 1.96 * s["se"]
    print(f"coverage of the true mean over {trials} trials: clustered {hit_cluster / trials:.1%}, "
          f"i.i.d. {hit_iid / trials:.1%}")
    assert hit_cluster / trials >= 0.90
    assert hit_iid / trials <= 0.60


def test_weighted_quantile_is_the_inverted_cdf_of_the_resampled_data():
    """A resample that takes cluster 0 twice and drops cluster 1 is the data with cluster 0's
    positions repeated: its quantile is numpy's inverted-CDF quantile of that repeated data."""
    rng = np.random.default_rng(3)
    values = rng.exponential(1.0, 300)
    cluster = np.repeat(np.arange(3), 100)
    for w in ([1.0, 1.0, 1.0], [2.0, 0.0, 1.0], [0.0, 3.0, 0.0]):
        data = np.concatenate([np.repeat(values[cluster == g], int(w[g])) for g in range(3)])
        for q in (0.5, 0.95, 0.99):
            got = weighted_quantiles(values, cluster, np.array([w]), q)[0]
            assert got == np.percentile(data, q * 100, method="inverted_cdf"), (w, q)


def test_p99_interval_covers_the_true_p99_of_clustered_data():
    """Chunk effects make P99 vary from corpus to corpus as whole chunks come and go: the cluster
    bootstrap interval covers the population P99 (from a million draws) in >= 85% of 200 trials
    (a bootstrap interval of a tail percentile runs a little short of 95%)."""
    rng = np.random.default_rng(11)
    g, k, trials = 40, 50, 200

    def draw(n_chunks):
        return np.exp(np.repeat(rng.normal(0, 0.4, n_chunks), k) + rng.normal(-1.0, 0.8, n_chunks * k))

    true = float(np.percentile(draw(20000), 99))
    cluster = np.repeat(np.arange(g), k)
    hits = 0
    for _ in range(trials):
        low, high = quantile_interval(draw(g), cluster, 0.99, resamples=400)
        hits += low <= true <= high
    print(f"coverage of the true P99 over {trials} trials: {hits / trials:.1%}")
    assert hits / trials >= 0.85


def test_paired_difference_by_hand_and_exactly_zero_against_itself():
    now = np.array([1.0, 2.0, 3.0, 10.0, 12.0, 4.0, 5.0])
    base = np.array([0.5, 2.0, 2.0, 9.0, 12.5, 4.0, 3.0])
    cluster = np.array([0, 0, 0, 1, 1, 2, 2])
    out = paired(now, base, cluster)
    d = now - base
    diff = d.mean()
    sums = np.array([d[:3].sum(), d[3:5].sum(), d[5:].sum()])
    counts = np.array([3.0, 2.0, 2.0])
    se = math.sqrt(3 / 2 * float(np.sum((sums - counts * diff) ** 2))) / 7
    assert out["mean"]["diff"] == pytest.approx(diff) and out["mean"]["se"] == pytest.approx(se)
    assert out["mean"]["low"] <= diff <= out["mean"]["high"]
    assert out["p99"]["diff"] == pytest.approx(np.percentile(now, 99) - np.percentile(base, 99))
    assert paired_sums(*cluster_sums(now, cluster), *cluster_sums(base, cluster))["se"] == pytest.approx(se)
    same = paired(now, now.copy(), cluster)
    assert same["mean"] == {"diff": 0.0, "se": 0.0, "low": 0.0, "high": 0.0}
    assert same["p99"] == {"diff": 0.0, "low": 0.0, "high": 0.0}


def test_paired_interval_tells_a_small_shift_apart_where_two_separate_intervals_overlap():
    """Two quants on the same positions: shared per-chunk and per-position difficulty, and one is
    worse by 3%. The paired interval excludes 0; the two separate clustered intervals overlap."""
    rng = np.random.default_rng(5)
    g, k = 50, 100
    cluster = np.repeat(np.arange(g), k)
    difficulty = np.exp(np.repeat(rng.normal(0, 0.7, g), k) + rng.normal(-1, 0.7, g * k))
    a = difficulty * np.exp(rng.normal(0, 0.05, g * k))
    b = 1.03 * difficulty * np.exp(rng.normal(0, 0.05, g * k))
    ca, cb = clustered(a, cluster), clustered(b, cluster)
    assert ca["ci95_high"] > cb["ci95_low"]  # apart, they cannot be told apart
    out = paired(b, a, cluster)
    assert out["mean"]["low"] > 0  # paired, they can
    true = float(np.mean(b - a))
    assert out["mean"]["low"] <= true <= out["mean"]["high"]
