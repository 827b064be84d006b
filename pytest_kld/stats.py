"""Summary statistics of per-position KL(reference ‖ quant), in float64.

The figures follow llama.cpp's perplexity tool: mean ± standard error, median, std, the 90/95/99/
99.9 percentiles, max and min, the share of positions where the quant's top token is the
reference's ("same top"), mean and RMS Δp of the next token (p_quant − p_ref), and the two
perplexities with their ratio.
"""

from __future__ import annotations

import math

import numpy as np

from . import options


def summarize(
    kl: np.ndarray,
    top1: np.ndarray | None = None,
    ref_target: np.ndarray | None = None,
    quant_target: np.ndarray | None = None,
) -> dict:
    """Summary of finite per-position KL values; non-finite positions are counted, not averaged.
    The percentiles are those of the figures table (:data:`pytest_kld.options.FIGURES`), the median
    as numpy's median."""
    percentiles = {k: q for k, q in options.percentiles().items() if k != "median"}
    kl = np.asarray(kl, dtype=np.float64)
    ok = np.isfinite(kl)
    x = kl[ok]
    n = int(x.size)
    out: dict = {"count": n, "nonfinite": int(kl.size - n)}
    if n == 0:
        for key in ["mean", "se", "std", "median", "min", "max", *percentiles]:
            out[key] = math.nan
        out["argmax"] = None
        return out
    mean = float(np.mean(x))
    std = float(np.std(x, ddof=1)) if n > 1 else 0.0
    out.update(
        mean=mean,
        se=std / math.sqrt(n) if n > 1 else 0.0,
        std=std,
        median=float(np.median(x)),
        min=float(np.min(x)),
        max=float(np.max(x)),
    )
    for key, q in percentiles.items():
        out[key] = float(np.percentile(x, q))
    out["argmax"] = int(np.flatnonzero(ok)[int(np.argmax(x))])
    if top1 is not None:
        out["top1"] = float(np.mean(np.asarray(top1)[ok]))
    if ref_target is not None and quant_target is not None:
        r = np.asarray(ref_target, dtype=np.float64)[ok]
        q = np.asarray(quant_target, dtype=np.float64)[ok]
        dp = np.exp(q) - np.exp(r)
        out["dp_mean"] = float(np.mean(dp))
        out["dp_rms"] = float(np.sqrt(np.mean(dp * dp)))
        out["ppl_ref"] = float(np.exp(-np.mean(r)))
        out["ppl_quant"] = float(np.exp(-np.mean(q)))
        out["ppl_ratio"] = out["ppl_quant"] / out["ppl_ref"]
    return out


def summarize_groups(groups: np.ndarray, names: list[str], **arrays) -> dict[str, dict]:
    """``summarize`` per group label (e.g. corpus category); ``groups`` indexes ``names``."""
    out = {}
    for gi, name in enumerate(names):
        sel = np.asarray(groups) == gi
        if not np.any(sel):
            continue
        out[name] = summarize(**{k: (None if v is None else np.asarray(v)[sel]) for k, v in arrays.items()})
    return out
