"""The terminal leaderboard: a :class:`pytest_kld.board.Board` (or result rows, built into one) in,
lines of text out; no mlx. Also the quantisation table's text helpers, which the Markdown shares.
"""

from __future__ import annotations

import math

from .board import DIRECTION, Board, build, nonfinite

NONFINITE_NOTE = (
    "non-finite: positions where the model's log-probs were NaN or inf, left out of every figure; "
    "such a model is broken, fails its test and is never marked best"
)
RESULT_TEXT = {"reference": "reference", "passed": "pass", "failed": "FAIL"}


def nonfinite_text(row: dict) -> str:
    n = nonfinite(row)
    share = row.get("nonfinite_share")
    return f"{n} ({share:.1%})" if n and isinstance(share, float) else str(n)


def result_text(row: dict) -> str:
    if nonfinite(row) and row["status"] not in ("reference", "passed"):
        return "FAIL: non-finite" if row["status"] == "failed" else "non-finite"
    return RESULT_TEXT.get(row["status"], row.get("outcome") or "-")


def _fmt(fmt: str, v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def leaderboard_lines(board: Board | list, *, by_category: bool = False, quant: bool = True,
                      width: int = 120) -> list[str]:
    """The leaderboard as lines of text: the table in the board's order, best marked with * (the
    reference excluded), the neighbour pairs, the drift section, then the per-model quantisation
    table (``quant``), the mean KLD per corpus category (``by_category``) and any further sections."""
    board = build(board)
    if not board.rows:
        return []
    table = [_head(board)] + [_cells(board, i) for i in range(len(board.rows))]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    out = []
    for j, row in enumerate(table):
        out.append("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append(f"* best in column (reference excluded). KLD: nats, {DIRECTION}, lower is better. mean/bit = mean / bits/w")
    note = "95% CI: of the mean, chunks resampled (positions in a chunk are not independent)"
    if board.pairs:
        note += "; vs above: paired difference from the row above, ≈ cannot be told apart"
    out.append(note)
    if board.with_baseline:
        out.append("vs baseline: paired against the recorded baseline; worse fails only beyond noise and tolerance")
    if board.broken:
        out.append(NONFINITE_NOTE)
    out.extend(neighbour_lines(board))
    from .drift import lines as drift_lines

    out.extend(drift_lines([dict(r, model=r["label"]) for r in board.drift]))
    if quant:
        out.extend(quant_lines(board, width=width))
    if by_category:
        out.extend(category_lines(board))
    for section in board.sections:
        out.extend(section.terminal)
    return out


def heading(c) -> str:
    """A column's terminal heading: the table's, with " %" for a share (the terminal's unit)."""
    return c.heading + (" %" if c.fmt.endswith("%}") else "")


def _head(board: Board) -> list[str]:
    head = ["model"]
    for c in board.columns:
        head.append(heading(c))
        if c.key == "mean":
            head += ["95% CI", *(["vs above"] if board.pairs else [])]
    return head + (["non-finite"] if board.broken else []) + (["vs baseline"] if board.with_baseline else []) + ["result"]


def _cells(board: Board, i: int) -> list[str]:
    r = board.rows[i]
    line = [r["label"]]
    for c in board.columns:
        line.append(_fmt(c.fmt, r.get(c.key)) + ("*" if c.better and board.marked(i, c.key) else ""))
        if c.key == "mean":
            line.append(ci_text(r) or "-")
            if board.pairs:
                line.append(neighbour_text(board.pairs[i], board.rows[i - 1].get("mean")) if i in board.pairs else "-")
    if board.broken:
        line.append(nonfinite_text(r))
    if board.with_baseline:
        line.append((r.get("baseline") or {}).get("verdict") or "-")
    return line + [result_text(r)]


def ci_text(r: dict) -> str | None:
    """``0.4012-0.4433``: the clustered 95% interval of the mean, or None without one."""
    lo, hi = r.get("ci95_low"), r.get("ci95_high")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and math.isfinite(lo) and math.isfinite(hi):
        return f"{lo:.5f}-{hi:.5f}"
    return None


def neighbour_text(d: dict, mean_above) -> str:
    """The "vs above" cell: the paired difference relative to the row above, ≈ when the two
    cannot be told apart."""
    rel = d["diff"] / mean_above if isinstance(mean_above, (int, float)) and mean_above > 0 else None
    if rel is None:
        text = f"{d['diff']:+.3g}"
    else:  # a ratio reads better than a percentage in the thousands
        text = f"×{1 + rel:.1f}" if rel >= 9.995 else f"{rel:+.1%}"
    return text if d["apart"] else f"≈{text}"


def neighbour_lines(board: Board) -> list[str]:
    """One line per neighbouring pair: the paired difference of mean KLD with its interval."""
    if not board.pairs:
        return []
    out = ["", "paired difference of mean KLD from the row above (same positions; 95% interval, "
               "chunks resampled):"]
    for i, d in board.pairs.items():
        verdict = "told apart" if d["apart"] else "cannot be told apart"
        out.append(f"  {board.rows[i]['label']} - {d['above']}: {d['diff']:+.5f} [{d['low']:+.5f}, {d['high']:+.5f}]"
                   f"  {verdict}")
    return out


def header_line(board: Board | list) -> str:
    """The leaderboard's header: direction, reference, mode, positions scored, K, exec, vocab work;
    then, on a line of its own, the BLAS the comparisons ran on and why others were refused."""
    board = build(board)
    head = "  ".join([DIRECTION, *(f"{k}: {v}" for k, v in board.header.items())])
    blas = list(dict.fromkeys(r["blas"] for r in board.rows if r.get("blas")))
    return head + "".join(f"\nBLAS: {b}" for b in blas)


def category_lines(board: Board | list) -> list[str]:
    """Mean KLD per corpus category, one line per model; the lowest per category (reference
    excluded) marked with *."""
    board = build(board)
    if not board.categories:
        return []
    table = [["model", *board.categories]]
    for r, cells in board.category_rows:
        table.append([r["label"]] + [_fmt("{:.5f}", v) + ("*" if b else "") for v, b in cells])
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


def quant_lines(board: Board | list, *, width: int = 120) -> list[str]:
    """One line per model (the board's ``quant``: a model under several settings once): quant
    family, mode, base bits and group size, overrides with their bit histogram, tensors elevated
    above the base by role. The last column wraps within ``width``."""
    table = [[name, *quant_cells(info)] for name, info in build(board).quant]
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
