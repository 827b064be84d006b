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
    ("ci_text", "95% CI", "{}", None),
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
    nonfinite = int(s.get("nonfinite") or 0)
    total = int(s.get("count") or 0) + nonfinite
    return {
        "model": display_name(result.model),
        "model_arg": result.model,
        "path": result.path,
        "direction": DIRECTION,
        "is_reference": bool(result.is_reference),
        "exec": result.exec,
        "vocab_backend": result.settings.get("vocab_backend", "numpy"),  # the cache's: numpy or mlx
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
        **{k: s.get(k) for k in ("mean", "se", "se_cluster", "ci95_low", "ci95_high", "median", "p95", "p99", "max",
                                 "top1", "count")},
        "nonfinite": nonfinite,
        "nonfinite_share": nonfinite / total if total else 0.0,
    }


def nonfinite(row: dict) -> int:
    """Positions where the model's log-probs were NaN or inf (left out of every figure)."""
    n = row.get("nonfinite")
    if n is None:
        n = (row.get("summary") or {}).get("nonfinite")
    return int(n) if isinstance(n, (int, float)) and math.isfinite(n) else 0


def nonfinite_text(row: dict) -> str:
    n = nonfinite(row)
    share = row.get("nonfinite_share")
    return f"{n} ({share:.1%})" if n and isinstance(share, float) else str(n)


NONFINITE_NOTE = (
    "non-finite: positions where the model's log-probs were NaN or inf, left out of every figure; "
    "such a model is broken, fails its test and is never marked best"
)


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


def best_value(rows: list[dict], key: str, better: str):
    """The best finite value of ``key`` over the rows that are neither the reference nor broken
    (any non-finite position); None when there is nothing to mark (fewer than two such values,
    or all equal)."""
    vals = [r.get(key) for r in rows if not r.get("is_reference") and not nonfinite(r)]
    vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(vals) < 2 or min(vals) == max(vals):
        return None
    return min(vals) if better == "low" else max(vals)


def leaderboard_lines(
    rows: list[dict], *, by_category: bool = False, quant: bool = True, width: int = 120
) -> list[str]:
    """The leaderboard as lines of text: table sorted by mean KLD, best marked with * (the
    reference excluded), then the per-model quantisation table (``quant``) and the mean KLD per
    corpus category (``by_category``)."""
    if not rows:
        return []
    rows = sorted((dict(r) for r in rows), key=lambda r: (not r.get("is_reference"), nonfinite(r) > 0, _sort_mean(r)))
    columns = list(COLUMNS)
    broken = any(nonfinite(r) for r in rows)
    if broken:
        columns.insert(-1, ("nonfinite_text", "non-finite", "{}", None))
    pairs, notes = _paired_columns(rows, columns)
    # Rows measured with different settings (a marker's K, mode...) say which, after the name.
    varying = [(k, h) for k, h in VARIES if len({str(r.get(k)) for r in rows}) > 1]
    for r in rows:
        if varying:
            what = ", ".join(f"{h}={display_name(str(r.get(k))) if k == 'reference' else r.get(k)}" for k, h in varying)
            r["model"] = f"{r.get('model')} [{what}]"
        r["result"] = {"passed": "pass", "failed": "FAIL"}.get(r.get("outcome"), r.get("outcome") or "-")
        if r.get("is_reference"):
            r["result"] = "reference"
        elif nonfinite(r) and r.get("outcome") != "passed":
            r["result"] = "FAIL: non-finite" if r.get("outcome") == "failed" else "non-finite"
        r["nonfinite_text"] = nonfinite_text(r)
        r["ci_text"] = ci_text(r)
    best = {k: best_value(rows, k, b) for k, _, _, b in columns if b}
    table = [[h for _, h, _, _ in columns]]
    for r in rows:
        line = []
        for key, _, fmt, better in columns:
            cell = _fmt(fmt, r.get(key))
            clean = not r.get("is_reference") and not nonfinite(r)
            if better and best.get(key) is not None and r.get(key) == best[key] and clean:
                cell += "*"
            line.append(cell)
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    out = []
    for j, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        out.append("  ".join(cells))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append(f"* best in column (reference excluded). KLD: nats, {DIRECTION}, lower is better. mean/bit = mean / bits/w")
    out.extend(notes)
    if broken:
        out.append(NONFINITE_NOTE)
    if pairs:
        from .regression import neighbour_lines

        out.extend(neighbour_lines(rows, pairs))
    from .drift import lines as drift_lines

    out.extend(drift_lines(rows))
    if quant:
        out.extend(quant_lines(rows, width=width))
    if by_category:
        out.extend(category_lines(rows))
    return out


def _paired_columns(rows: list[dict], columns: list) -> tuple[dict, list[str]]:
    """Add the "vs above" (paired difference from the neighbour above) and "vs baseline" columns
    where they have something to say: (the neighbour pairs, the legend's lines)."""
    from .regression import neighbour_text, neighbours

    pairs = neighbours(rows)
    notes = ["95% CI: of the mean, chunks resampled (positions in a chunk are not independent)"]
    if pairs:
        columns.insert(columns.index(("ci_text", "95% CI", "{}", None)) + 1, ("vs_above", "vs above", "{}", None))
        notes[0] += "; vs above: paired difference from the row above, ≈ cannot be told apart"
    for i, d in pairs.items():
        rows[i]["vs_above"] = neighbour_text(d, rows[i - 1].get("mean"))
    if any(r.get("baseline") for r in rows):
        columns.insert(-1, ("vs_baseline", "vs baseline", "{}", None))
        notes.append("vs baseline: paired against the recorded baseline; worse fails only beyond noise and tolerance")
        for r in rows:
            r["vs_baseline"] = (r.get("baseline") or {}).get("verdict")
    return pairs, notes


def ci_text(r: dict) -> str | None:
    """``0.4012-0.4433``: the clustered 95% interval of the mean, or None without one."""
    lo, hi = r.get("ci95_low"), r.get("ci95_high")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and math.isfinite(lo) and math.isfinite(hi):
        return f"{lo:.5f}-{hi:.5f}"
    return None


def _sort_mean(r):
    m = r.get("mean")
    return m if isinstance(m, (int, float)) and math.isfinite(m) else math.inf


def header_fields(rows: list[dict]) -> dict:
    """Reference, mode, positions scored, K, exec and where the vocabulary-wide work ran, of a set
    of rows (every distinct value)."""

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
    fields = {
        "reference": distinct(r.get("reference") for r in rows),
        "mode": distinct(r.get("mode") for r in rows),
        "positions": distinct(positions),
        "K": distinct(r.get("top_k") for r in rows),
        "exec": distinct(r.get("exec") for r in rows),
    }
    if any(r.get("vocab_backend") for r in rows):  # rows of older results files lack it
        fields["vocab work"] = distinct(r.get("vocab_backend") or "?" for r in rows)
    return fields


def header_line(rows: list[dict]) -> str:
    """The leaderboard's header: direction, reference, mode, positions scored, K, exec, vocab work;
    then, on a line of its own, the BLAS the comparisons ran on and why others were refused."""
    head = "  ".join([DIRECTION, *(f"{k}: {v}" for k, v in header_fields(rows).items())])
    blas = list(dict.fromkeys(r["blas"] for r in rows if r.get("blas")))
    return head + "".join(f"\nBLAS: {b}" for b in blas)


def category_means(rows: list[dict]) -> tuple[list[str], list[tuple[dict, list[tuple[object, bool]]]]]:
    """(categories, [(row, [(mean KLD, is best), ...]), ...]): the per-category table that the
    terminal and the Markdown both show; best = lowest, the reference and broken rows excluded."""
    cats = sorted({c for r in rows for c in (r.get("categories") or {})})

    def mean(r, c):
        return ((r.get("categories") or {}).get(c) or {}).get("mean")

    best = {c: best_value([{"m": mean(r, c), "is_reference": r.get("is_reference"), "nonfinite": nonfinite(r)}
                           for r in rows], "m", "low") for c in cats}
    table = []
    for r in rows:
        clean = not r.get("is_reference") and not nonfinite(r)
        table.append((r, [(mean(r, c), clean and best[c] is not None and mean(r, c) == best[c]) for c in cats]))
    return cats, table


def category_lines(rows: list[dict]) -> list[str]:
    """Mean KLD per corpus category, one line per model; the lowest per category (reference
    excluded) marked with *."""
    cats, means = category_means(rows)
    if not cats:
        return []
    table = [["model", *cats]]
    for r, cells in means:
        table.append([str(r.get("model"))] + [_fmt("{:.5f}", v) + ("*" if b else "") for v, b in cells])
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    out = ["", f"mean KLD by category: nats, {DIRECTION}; * lowest (reference excluded)"]
    for t in table:
        out.append("  ".join([t[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(t[1:], widths[1:])]))
    return out


# -- the per-model quantisation table (from ModelInfo dicts; models.py reads the files)


def bits_hist_text(hist: dict | None) -> str:
    """``{"6": 28, "8": 2, "16": 4}`` -> ``"6b ×28, 8b ×2, 16b float ×4"`` (a count of one is not
    written; above 8 bits a matrix is a float one left unquantised, under its dtype's width)."""
    parts = []
    for b, n in sorted((hist or {}).items(), key=lambda kv: _int_or(kv[0])):
        kind = " float" if _int_or(b)[0] == 0 and int(b) > 8 else ""
        parts.append(f"{b}b{kind}" + (f" ×{n}" if n != 1 else ""))
    return ", ".join(parts)


def elevated_parts(elevated: dict | None) -> list[str]:
    """Tensors above the base bits by role, in models.py's role order: ``["embed_tokens 6b",
    "self_attn 6b ×14", ...]``."""
    return [f"{role} {bits_hist_text({b: n})}" for role, hist in (elevated or {}).items()
            for b, n in sorted(hist.items(), key=lambda kv: _int_or(kv[0]))]


def overrides_text(info: dict) -> str:
    n = info.get("overrides")
    if n is None:
        return "-"
    return f"{n} ({bits_hist_text(info.get('override_bits'))})" if n and info.get("override_bits") else str(n)


def params_text(v) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= div:
            return f"{v / div:.3g}{unit}"
    return str(int(v))


def family_text(info: dict) -> str:
    fam = info.get("family") or "unknown"
    return f"{fam} ({info['recipe']})" if info.get("recipe") else fam


def _int_or(v):
    try:
        return (0, int(v))
    except (TypeError, ValueError):
        return (1, str(v))


QUANT_HEADINGS = ["model", "family", "mode", "base", "overrides (bits)", "elevated above base (by role)"]


def quant_cells(info: dict) -> list[str]:
    """family, mode, base, overrides, elevated of one model's ModelInfo dict."""
    if info.get("error"):
        return ["metadata unreadable: " + str(info["error"]), "", "", "", ""]
    if not info:
        return ["-"] * 5
    if not info.get("quantized"):
        return [family_text(info), info.get("dtype") or info.get("label") or "-", "-", overrides_text(info), "-"]
    base = "-" if info.get("base_bits") is None else f"{info['base_bits']}b"
    if info.get("group_size") is not None:
        base += f" g{info['group_size']}"
    return [family_text(info), info.get("mode") or "-", base, overrides_text(info),
            ", ".join(elevated_parts(info.get("elevated"))) or "none"]


def quant_lines(rows: list[dict], *, width: int = 120) -> list[str]:
    """One line per model (rows of one model under other settings once): quant family, mode,
    base bits and group size, overrides with their bit histogram, tensors elevated above the
    base by role. The last column wraps within ``width``."""
    seen, table = set(), []
    for r in rows:
        ident = r.get("path") or r.get("model")
        if ident in seen:
            continue
        seen.add(ident)
        name = display_name(str(r["model_arg"])) if r.get("model_arg") else str(r.get("model"))
        table.append([name, *quant_cells(r.get("info") or {})])
    if not table:
        return []
    heads = QUANT_HEADINGS
    widths = [max(len(heads[i]), *(len(t[i]) for t in table)) for i in range(len(heads) - 1)]
    indent = sum(widths) + 2 * len(widths)
    room = max(width - indent, 24)  # narrower than that, the line runs long rather than read badly
    out = ["", "quantisation (read from config.json and the safetensors headers):"]
    for t in [heads, None, *table]:
        if t is None:
            out.append("  ".join("-" * w for w in widths) + "  " + "-" * min(room, max(len(x[-1]) for x in [heads, *table])))
            continue
        head = "  ".join(c.ljust(w) for c, w in zip(t[:-1], widths)) + "  "
        for k, piece in enumerate(_wrap(t[-1], room)):
            out.append(((head if k == 0 else " " * indent) + piece).rstrip())
    return out


def _wrap(text: str, room: int) -> list[str]:
    """Split a ", "-joined list into lines of at most ``room`` characters (never inside an item)."""
    lines, cur = [], ""
    for item in text.split(", "):
        cand = f"{cur}, {item}" if cur else item
        if cur and len(cand) > room:
            lines.append(cur + ",")
            cur = item
        else:
            cur = cand
    return [*lines, cur]


def row_passed(row: dict):
    """True, False or None; also reads report.py's ``outcome`` ("passed"/"failed")."""
    passed = row.get("passed")
    if passed is None:
        passed = {"passed": True, "failed": False}.get(row.get("outcome"))
    return passed


def row_summary(row: dict) -> dict:
    return row.get("summary") or {}


def row_mean(row: dict):
    m = row_summary(row).get("mean")
    return m if isinstance(m, (int, float)) and not math.isnan(m) else None


def ordered_rows(rows) -> list[dict]:
    """The reference first, then by mean KLD ascending (rows without a mean last)."""
    rows = list(rows)
    return sorted(
        rows,
        key=lambda r: (
            not r.get("is_reference"),
            nonfinite(r) > 0,
            row_mean(r) is None,
            row_mean(r) if row_mean(r) is not None else 0.0,
        ),
    )
