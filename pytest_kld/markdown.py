"""The leaderboard as a GitHub Markdown summary: a :class:`pytest_kld.board.Board` (or result
rows, built into one) in, text and a file out. Missing figures print as "-".
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .board import DIRECTION, Board, build, nonfinite
from .errors import KldError
from .report import NONFINITE_NOTE, elevated_parts, family_text, nonfinite_text, overrides_text, params_text

_MD_SPECIAL = "\\`*_[]<>|#"


def _esc(text) -> str:
    """A Markdown table cell: special characters escaped, newlines folded."""
    s = " ".join(str(text).split())
    return "".join("\\" + c if c in _MD_SPECIAL else c for c in s) or " "


def _num(v, fmt: str = "{:.4g}") -> str:
    if v is None or isinstance(v, bool):
        return "-"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "-"
    if math.isnan(f):
        return "nan"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    if f == 0:
        return "0"
    return fmt.format(f)


def _pct(v) -> str:
    return _num(v, "{:.2%}") if v is not None else "-"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _result(row: dict) -> str:
    status = row["status"]
    if status == "reference":
        return "reference"
    if nonfinite(row) and status != "passed":
        return "❌ fail: non-finite" if status == "failed" else "❌ non-finite"
    return {"passed": "✅ pass", "failed": "❌ fail"}.get(status, "-")


def _table(headings: list[str], body: list[list[str]], right: set[int]) -> list[str]:
    lines = ["| " + " | ".join(headings) + " |"]
    lines.append(
        "|" + "|".join("---:" if i in right else ":---" for i in range(len(headings))) + "|"
    )
    for cells in body:
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _elevated_text(elevated: dict | None) -> str:
    return ", ".join(elevated_parts(elevated)) or "none"


def markdown(board: Board | list, header: dict | None = None) -> str:
    """The Markdown text :func:`write_markdown` writes: the board's leaderboard, neighbour pairs,
    drift, categories (two or more), quantisation table and further sections."""
    board = build(board)
    out = [f"## pytest-kld: {DIRECTION}", ""]
    for key, value in (header or {}).items():
        if value is None or value == "":
            continue
        out.append(f"- **{_esc(key)}**: {_esc(value)}")
    if header:
        out.append("")
    out += _leaderboard(board)
    from .drift import markdown_lines as drift_lines

    out += drift_lines([dict(r, model=r["label"]) for r in board.drift])
    out += _category_table(board)
    out += _quant_table(board)
    for section in board.sections:
        out += section.markdown
    return "\n".join(out) + "\n"


def _cell(board: Board, i: int, c) -> str:
    """One figure's cell: 4 significant digits (bits/w 3 decimals, size 1, shares in %), bold
    when best."""
    v = board.rows[i].get(c.key)
    text = _pct(v) if c.fmt.endswith("%}") else _num(v, {"bpw": "{:.3f}", "size_mb": "{:.1f}"}.get(c.key, "{:.4g}"))
    return f"**{text}**" if c.better and board.marked(i, c.key) and text not in ("-", "nan") else text


def _mean_cell(board: Board, i: int, c) -> str:
    """The mean with its standard error (clustered by chunk if known) and 95% interval."""
    r, text = board.rows[i], _cell(board, i, c)
    se = r.get("se_cluster") if _finite(r.get("se_cluster")) else r.get("se")
    if _finite(se) and _finite(r.get("mean")):
        text += f" ± {_num(se, '{:.2g}')}"
    lo, hi = r.get("ci95_low"), r.get("ci95_high")
    if isinstance(lo, float) and isinstance(hi, float) and math.isfinite(lo) and math.isfinite(hi):
        text += f" (95% CI {_num(lo)}–{_num(hi)})"
    return text


def _leaderboard(board: Board) -> list[str]:
    """The main table: one row per model in the board's order, the best of each column in bold."""
    headings = ["#", "model", "quant"] + [f"mean {_esc(DIRECTION)}" if c.key == "mean" else _esc(c.heading)
                                          for c in board.columns] + ["positions"]
    headings += (["non-finite"] if board.broken else []) + (["vs baseline"] if board.with_baseline else [])
    body = []
    for i, row in enumerate(board.rows):
        count = row.get("count")
        cells = [str(i + 1), _esc(row["label"]), _esc((row.get("info") or {}).get("label") or "-")]
        cells += [(_mean_cell if c.key == "mean" else _cell)(board, i, c) for c in board.columns]
        cells.append(str(int(count)) if isinstance(count, (int, float)) else "-")
        cells += [nonfinite_text(row)] if board.broken else []
        cells += [_esc((row.get("baseline") or {}).get("verdict") or "-")] if board.with_baseline else []
        body.append(cells + [_result(row)])
    out = _table(headings + ["result"], body, right=set(range(len(headings))) - {1, 2})
    return [*out, "", _legend(board.broken, board.with_baseline), "", *_neighbours(board)]


def _legend(broken: bool, with_baseline: bool) -> str:
    return (
        f"{_esc(DIRECTION)} in nats per scored position, weighted by the reference's probabilities; "
        "lower is better. **Bold**: best in its column, the reference excluded. "
        "mean/bit: mean KLD / bits per weight. top-1: positions where both models rank the same "
        "token first. bits/w: every tensor's bytes × 8 / parameters of the unquantised model. "
        "± and 95% CI: of the mean, clustered by chunk (positions in a chunk are not independent)."
        + (" vs baseline: paired against the quant's recorded baseline; worse fails only beyond noise and "
           "tolerance." if with_baseline else "")
        + (f" {NONFINITE_NOTE[0].upper()}{NONFINITE_NOTE[1:]}." if broken else "")
    )


def _neighbours(board: Board) -> list[str]:
    """The paired difference of each row's mean from the row above, when both were measured on
    the same positions: told apart, or not."""
    if not board.pairs:
        return []
    out = ["| model | row above | paired Δ mean | 95% CI | |", "|:---|:---|---:|---:|:---|"]
    for i, d in board.pairs.items():
        out.append(f"| {_esc(board.rows[i]['label'])} | {_esc(d['above'] or '?')} | {d['diff']:+.5f} | "
                   f"{d['low']:+.5f} – {d['high']:+.5f} | {'told apart' if d['apart'] else '≈ cannot be told apart'} |")
    return [*out, ""]


def _quant_table(board: Board) -> list[str]:
    """What each model is: family, mode, base bits and group, overrides, elevated tensors."""
    out: list[str] = []
    out.append("### Quantisation (read from config.json and the safetensors headers)")
    out.append("")
    headings = [
        "model",
        "family",
        "mode",
        "base bits",
        "group",
        "params",
        "overrides",
        "tensors elevated above base",
    ]
    body = []
    for name, info in board.quant:
        if info.get("error"):
            body.append([_esc(name), _esc(f"unreadable: {info['error']}")] + ["-"] * 6)
            continue
        fam = family_text(info) if info else "-"
        ov_text = overrides_text(info)
        quantized = info.get("quantized")
        body.append(
            [
                _esc(name),
                _esc(fam),
                _esc((info.get("mode") if quantized else info.get("dtype")) or info.get("mode") or "-"),
                _esc(info.get("base_bits") if info.get("base_bits") is not None else "-"),
                _esc(info.get("group_size") if info.get("group_size") is not None else "-"),
                params_text(info.get("params")),
                _esc(ov_text),
                _esc(_elevated_text(info.get("elevated")) if quantized else "-"),
            ]
        )
    out += _table(headings, body, right={3, 4, 5})
    out.append("")
    return out


def _category_table(board: Board) -> list[str]:
    """Mean KLD per corpus category (the terminal's --kld-by-category table), when the corpus
    has more than one category."""
    cats = board.categories
    if len(cats) < 2:
        return []
    body = [[_esc(r["label"])] + [(f"**{_num(v)}**" if b else _num(v)) for v, b in cells]
            for r, cells in board.category_rows]
    out = [f"### Mean {_esc(DIRECTION)} by corpus category (bold: lowest, the reference excluded)", ""]
    out += _table(["model", *map(_esc, cats)], body, right=set(range(1, len(cats) + 1)))
    return out + [""]


def write_markdown(board: Board | list, path, header: dict | None = None, *, append: bool = False) -> Path:
    """Write the leaderboard and the per-model quantisation table as GitHub Markdown.

    ``append=True`` adds to the file, as ``$GITHUB_STEP_SUMMARY`` expects from each step.
    """
    from .files import write_text

    path = Path(os.fspath(path))
    text = markdown(board, header)
    try:
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        if append and path.is_file() and not path.is_symlink() and path.stat().st_size:
            text = "\n" + text
        write_text(path, text, append=append)
    except OSError as e:
        raise KldError(f"cannot write the Markdown summary to {path}: {e.strerror or e}") from None
    return path
