"""The terminal leaderboard and the JSON report. Plain rows in, text out; no mlx.

A row is a JSON-able dict made by :func:`result_row` from a KldResult plus the test's outcome.
"""

from __future__ import annotations

import math

DIRECTION = "KL(reference || quant)"

# (key, heading, format, better): better is "low" or "high"; None: not marked.
COLUMNS = [
    ("model", "model", "{}", None),
    ("size_mb", "size MB", "{:.1f}", "low"),
    ("bpw", "bits/w", "{:.3f}", "low"),
    ("mean", "mean", "{:.5f}", "low"),
    ("se", "± se", "{:.5f}", None),
    ("mean_per_bit", "mean/bit", "{:.5f}", "low"),
    ("median", "median", "{:.5f}", "low"),
    ("p95", "P95", "{:.4f}", "low"),
    ("p99", "P99", "{:.4f}", "low"),
    ("max", "max", "{:.4f}", "low"),
    ("top1", "top-1 %", "{:.2%}", "high"),
    ("result", "result", "{}", None),
]


# Settings that may differ between rows of one run: (row key, label in the model column).
VARIES = [("reference", "ref"), ("mode", "mode"), ("top_k", "K"), ("exec", "exec")]


def result_row(result, outcome: str | None = None) -> dict:
    """The leaderboard/JSON row of one comparison (no per-position arrays)."""
    info = result.info or {}
    s = result.summary
    bpw = info.get("bits_per_weight")
    wb = info.get("weight_bytes")
    mean = s.get("mean")
    return {
        "model": display_name(result.model),
        "model_arg": result.model,
        "path": result.path,
        "direction": DIRECTION,
        "is_reference": bool(result.is_reference),
        "exec": result.exec,
        "reference": result.reference.get("name"),
        "mode": (result.settings.get("corpus") or {}).get("mode"),
        "top_k": result.settings.get("top_k"),
        "size_mb": wb / 1e6 if isinstance(wb, (int, float)) else None,
        "bpw": bpw,
        "mean_per_bit": mean / bpw if bpw and mean is not None and math.isfinite(mean) else None,
        "summary": dict(s),
        "categories": result.categories,
        "info": info,
        "max_at": result.max_at,
        "fingerprint": result.fingerprint,
        "outcome": outcome,
        **{k: s.get(k) for k in ("mean", "se", "median", "p95", "p99", "max", "top1", "count", "nonfinite")},
    }


def display_name(model: str) -> str:
    """A short name for the table: a hub id as given, a local path by its last component(s)."""
    import os

    text = str(model).rstrip("/\\")
    if text.startswith((".", "/", "~")) or os.path.isdir(text):
        parts = [p for p in text.replace("\\", "/").split("/") if p not in ("", ".", "..", "~")]
        return "/".join(parts[-1:]) or text
    return text


def _fmt(fmt: str, v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def _best(rows: list[dict], key: str, better: str):
    vals = [r.get(key) for r in rows if not r.get("is_reference")]
    vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(vals) < 2:
        return None
    return min(vals) if better == "low" else max(vals)


def leaderboard_lines(rows: list[dict], *, by_category: bool = False) -> list[str]:
    """The leaderboard as lines of text: header, table sorted by mean KLD, best marked with *."""
    if not rows:
        return []
    rows = sorted((dict(r) for r in rows), key=lambda r: (not r.get("is_reference"), _sort_mean(r)))
    # Rows measured with different settings (a marker's K, mode...) say which, after the name.
    varying = [(k, h) for k, h in VARIES if len({str(r.get(k)) for r in rows}) > 1]
    for r in rows:
        if varying:
            what = ", ".join(f"{h}={display_name(str(r.get(k))) if k == 'reference' else r.get(k)}" for k, h in varying)
            r["model"] = f"{r.get('model')} [{what}]"
        r["result"] = {"passed": "pass", "failed": "FAIL"}.get(r.get("outcome"), r.get("outcome") or "-")
        if r.get("is_reference"):
            r["result"] = "reference"
    best = {k: _best(rows, k, b) for k, _, _, b in COLUMNS if b}
    table = [[h for _, h, _, _ in COLUMNS]]
    for r in rows:
        line = []
        for key, _, fmt, better in COLUMNS:
            cell = _fmt(fmt, r.get(key))
            if better and best.get(key) is not None and r.get(key) == best[key] and not r.get("is_reference"):
                cell += "*"
            line.append(cell)
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    out = []
    for j, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        out.append("  ".join(cells))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("* best in column (reference excluded); KLD in nats, " + DIRECTION)
    if by_category:
        out.extend(category_lines(rows))
    return out


def _sort_mean(r):
    m = r.get("mean")
    return m if isinstance(m, (int, float)) and math.isfinite(m) else math.inf


def header_fields(rows: list[dict]) -> dict:
    """Reference, mode, positions scored, K and exec of a set of rows (every distinct value)."""

    def distinct(values) -> str:
        seen = []
        for v in values:
            if v not in seen:
                seen.append(v)
        seen.sort(key=lambda v: (not isinstance(v, (int, float)), v if isinstance(v, (int, float)) else str(v)))
        return ", ".join(str(v) for v in seen) or "-"

    positions = [
        (r.get("count") or 0) + (r.get("nonfinite") or 0) for r in rows if r.get("count") is not None
    ]
    return {
        "reference": distinct(r.get("reference") for r in rows),
        "mode": distinct(r.get("mode") for r in rows),
        "positions": distinct(positions),
        "K": distinct(r.get("top_k") for r in rows),
        "exec": distinct(r.get("exec") for r in rows),
    }


def header_line(rows: list[dict]) -> str:
    """The leaderboard's header: direction, reference, mode, positions scored, K and exec."""
    return "  ".join([DIRECTION, *(f"{k}: {v}" for k, v in header_fields(rows).items())])


def category_lines(rows: list[dict]) -> list[str]:
    """Mean KLD per corpus category, one line per model."""
    cats = sorted({c for r in rows for c in (r.get("categories") or {})})
    if not cats:
        return []
    width = max(len(r["model"]) for r in rows)
    out = ["", "mean KLD by category:", " ".join(["model".ljust(width)] + [c.rjust(10) for c in cats])]
    for r in rows:
        vals = [_fmt("{:.5f}", (r.get("categories") or {}).get(c, {}).get("mean")).rjust(10) for c in cats]
        out.append(" ".join([r["model"].ljust(width)] + vals))
    return out
