"""Is this build worse than its baseline, beyond noise and beyond a tolerance?

Both results were scored on the same cached positions, so the test is paired
(:func:`pytest_kld.intervals.paired`): the difference now − baseline of the mean KLD and of each
percentile named in the tolerance, with a 95% interval from a bootstrap over chunks. Per figure:

- ``better``: the whole interval is below 0;
- ``same``: the interval holds 0 (the two cannot be told apart on this corpus);
- ``worse``: the interval is above 0 *and* the difference is above the tolerance — this fails;
- ``worse within tolerance``: above 0 beyond noise, but by no more than the tolerance — passes.

With fewer than two chunks there is no interval: the tolerance alone decides. The tolerance is
written like pytest-benchmark's ``--benchmark-compare-fail``: ``mean:5%,p99:10%`` — relative to
the baseline's figure with ``%``, in nats without (``mean:0.002``). Figures: mean and the
percentiles median, p90, p95, p99, p99_9.
"""

from __future__ import annotations

import math

from .errors import ThresholdError

DEFAULT_TOLERANCE = "mean:5%,p99:10%"
QUANTILES = {"median": 0.5, "p90": 0.90, "p95": 0.95, "p99": 0.99, "p99_9": 0.999}
FIGURES = ("mean", *QUANTILES)
ORDER = ("worse", "worse within tolerance", "same", "better")  # the row's verdict: the first one present


def parse_tolerance(spec, where: str = "--kld-baseline-fail") -> dict[str, tuple[str, float]]:
    """``"mean:5%,p99:0.5"`` or ``{"mean": "5%", "p99": 0.5}`` → ``{"mean": ("rel", 0.05),
    "p99": ("abs", 0.5)}``; one line for anything else."""
    if isinstance(spec, dict):
        items = [(str(k), v) for k, v in spec.items()]
    elif isinstance(spec, str):
        items = []
        for part in (p.strip() for p in spec.split(",")):
            name, sep, value = part.partition(":")
            if not part or not sep:
                raise ThresholdError(f"{where}={spec!r}: write FIGURE:VALUE[%],..., e.g. mean:5%,p99:0.5")
            items.append((name.strip(), value.strip()))
    else:
        raise ThresholdError(f"{where}={spec!r}: a string like 'mean:5%,p99:10%' or a dict like {{'mean': '5%'}}")
    out = {}
    for name, value in items:
        if name not in FIGURES:
            raise ThresholdError(f"{where}: unknown figure {name!r}; known: {', '.join(FIGURES)}")
        rel = isinstance(value, str) and value.endswith("%")
        try:
            number = float(value[:-1] if rel else value)
        except (TypeError, ValueError):
            raise ThresholdError(f"{where}: {name}:{value} is not a number (nats) or a percentage") from None
        if not math.isfinite(number) or number < 0 or isinstance(value, bool):
            raise ThresholdError(f"{where}: {name}:{value} must be a finite number of at least 0")
        out[name] = ("rel", number / 100) if rel else ("abs", number)
    if not out:
        raise ThresholdError(f"{where}={spec!r}: names no figure; e.g. mean:5%")
    return out


def tolerance_text(tolerance: dict) -> str:
    return ",".join(f"{k}:{v * 100:g}%" if kind == "rel" else f"{k}:{v:g}" for k, (kind, v) in tolerance.items())


def judge(kl, cluster, summary: dict, baseline, tolerance: dict) -> dict:
    """The verdict of a result (per-position ``kl``, its chunk ``cluster`` and ``summary``)
    against a :class:`~pytest_kld.baselines.Baseline`: ``{"verdict", "figures": {name: {...}},
    "tolerance", "path", ...}``. Per-position values are compared as float32, as recorded, so an
    unchanged rerun differs by exactly 0."""
    import numpy as np

    from .intervals import paired

    now = np.asarray(kl, dtype=np.float32).astype(np.float64)
    base = baseline.kl.astype(np.float64)
    if now.shape != base.shape or not np.array_equal(np.asarray(cluster), baseline.cluster):
        raise ThresholdError(f"baseline {baseline.path}: {base.size} positions in other chunks than now's "
                             f"{now.size}; it was recorded on another corpus")
    quantiles = {k: QUANTILES[k] for k in tolerance if k in QUANTILES}
    p = paired(now, base, cluster, quantiles=quantiles)
    figures = {}
    for name, (kind, value) in tolerance.items():
        then = baseline.summary.get(name)
        d = p[name]
        allowed = value * then if kind == "rel" and isinstance(then, (int, float)) else value
        figures[name] = {"baseline": then, "now": summary.get(name), "diff": d["diff"], "low": d["low"],
                         "high": d["high"], "allowed": allowed, "status": _status(d, allowed)}
    verdict = next((v for v in ORDER if any(f["status"] == v for f in figures.values())), "same")
    return {"verdict": verdict, "figures": figures, "tolerance": tolerance_text(tolerance),
            "path": str(baseline.path), "model": (baseline.doc.get("model") or {}).get("name"),
            "created": baseline.doc.get("created"), "clusters": p.get("clusters")}


def _status(d: dict, allowed: float) -> str:
    diff, low, high = d["diff"], d["low"], d["high"]
    if not math.isfinite(low):  # no interval: the tolerance alone
        return "worse" if diff > allowed else ("same" if diff >= 0 else "better")
    if high < 0:
        return "better"
    if low <= 0:
        return "same"
    return "worse" if diff > allowed else "worse within tolerance"


def message(model: str, verdict: dict) -> str:
    """The failure message of a verdict of "worse": baseline vs now per figure, the difference
    with its interval, the tolerance, which baseline, what to do."""
    lines = [f"KLD regression: {model} is worse than its baseline beyond noise and tolerance "
             f"({verdict['tolerance']})"]
    lines += ["  " + figure_line(name, f) for name, f in verdict["figures"].items()]
    lines.append(f"  baseline {verdict['path']} ({verdict.get('model')}, recorded {verdict.get('created')}); "
                 f"KL(reference || quant) in nats, paired over the same positions, 95% intervals over "
                 f"{verdict.get('clusters')} chunks")
    lines.append("If the new figures are expected, record them: --kld-update-baselines")
    return "\n".join(lines)


def figure_line(name: str, f: dict) -> str:
    interval = f"[{f['low']:+.4g}, {f['high']:+.4g}]" if math.isfinite(f["low"]) else "[no interval]"
    then, now = f.get("baseline"), f.get("now")
    rel = f" ({f['diff'] / then:+.1%})" if isinstance(then, (int, float)) and then > 0 else ""
    flag = "FAILED" if f["status"] == "worse" else f["status"]
    return (f"{name}: baseline {_g(then)} -> now {_g(now)}, diff {f['diff']:+.4g}{rel} 95% CI {interval}; "
            f"tolerance {f['allowed']:.4g}  {flag}")


def _g(v) -> str:
    return f"{v:.5g}" if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def gate(settings: dict, nodeid: str, slot: str, result, spec) -> tuple[dict | None, str | None]:
    """The baseline step of one ``assert_kld`` call: ``(the row's "baseline" entry, the failure
    message or None)``. No baselines directory: nothing. ``update_baselines``: record. Otherwise
    check against the slot's baseline: a missing, unreadable or foreign one fails in one line."""
    from .baselines import UPDATE_HINT, BaselineError, foreign, load, record, slot_path

    directory = settings.get("baselines")
    if not directory:
        return None, None
    if settings.get("update_baselines"):
        try:
            return {"verdict": "recorded", "path": str(record(directory, result, nodeid, slot))}, None
        except BaselineError as e:
            if int(result.summary.get("nonfinite") or 0):  # the broken model fails on its own
                return {"verdict": "not recorded", "why": str(e)}, None
            return {"verdict": "not recorded", "why": str(e)}, str(e)
    path = slot_path(directory, nodeid, slot)
    try:
        base = load(path, nodeid)
    except FileNotFoundError:
        return {"verdict": "missing", "path": str(path)}, (
            f"no KLD baseline for {slot} in {nodeid}: {path} does not exist; {UPDATE_HINT}, "
            "or pass baseline=False to assert_kld to not gate this call on one")
    except BaselineError as e:
        return {"verdict": "unreadable", "path": str(path)}, str(e)
    why = foreign(base, result)
    if why:
        return {"verdict": "foreign", "path": str(path), "why": why}, (
            f"baseline {path} was recorded against another reference cache: {why}; not compared. "
            f"{UPDATE_HINT[0].upper()}{UPDATE_HINT[1:]} against this one")
    verdict = judge(result.kl, result.chunk, result.summary, base, parse_tolerance(spec))
    return verdict, (message(result.model, verdict) if verdict["verdict"] == "worse" else None)


def neighbours(rows: list[dict]) -> dict[int, dict]:
    """For rows in leaderboard order: ``{i: paired difference of row i's mean KLD minus row
    i−1's}`` (``{"diff", "se", "low", "high", "apart", "above"}``), for each row whose neighbour
    above was measured on the same cache and positions (per-chunk sums in ``row["chunks"]``); the
    reference and broken rows are skipped."""
    from .intervals import paired_sums

    out = {}
    for i in range(1, len(rows)):
        a, b = rows[i], rows[i - 1]
        if any(r.get("is_reference") or r.get("nonfinite") or not r.get("chunks") for r in (a, b)):
            continue
        if (a.get("cache") or {}).get("key") != (b.get("cache") or {}).get("key"):
            continue
        d = paired_sums(a["chunks"]["sum"], a["chunks"]["count"], b["chunks"]["sum"], b["chunks"]["count"])
        if math.isfinite(d["low"]):
            out[i] = {**d, "apart": not (d["low"] <= 0 <= d["high"]), "above": b.get("model")}
    return out


def neighbour_text(d: dict, mean_above) -> str:
    """The leaderboard cell: the paired difference relative to the row above, ≈ when the two
    cannot be told apart."""
    rel = d["diff"] / mean_above if isinstance(mean_above, (int, float)) and mean_above > 0 else None
    if rel is None:
        text = f"{d['diff']:+.3g}"
    else:  # a ratio reads better than a percentage in the thousands
        text = f"×{1 + rel:.1f}" if rel >= 9.995 else f"{rel:+.1%}"
    return text if d["apart"] else f"≈{text}"


def neighbour_lines(rows: list[dict], pairs: dict[int, dict]) -> list[str]:
    """One line per neighbouring pair: the paired difference of mean KLD with its interval."""
    if not pairs:
        return []
    out = ["", "paired difference of mean KLD from the row above (same positions; 95% interval, "
               "chunks resampled):"]
    for i, d in pairs.items():
        verdict = "told apart" if d["apart"] else "cannot be told apart"
        out.append(f"  {rows[i].get('model')} - {d['above']}: {d['diff']:+.5f} [{d['low']:+.5f}, {d['high']:+.5f}]"
                   f"  {verdict}")
    return out
