"""The leaderboard as a GitHub Markdown summary. Plain dicts in, text and a file out.

A row is a plain dict::

    {"model": str, "info": ModelInfo.to_dict(), "is_reference": bool, "passed": bool | None,
     "summary": {"mean", "median", "p95", "p99", "max", "top1", "count", ...}}

Missing keys print as "-".
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import KldError
from .report import (
    DIRECTION,
    NONFINITE_NOTE,
    best_value,
    elevated_parts,
    family_text,
    nonfinite,
    nonfinite_text,
    ordered_rows,
    overrides_text,
    params_text,
    row_mean,
    row_passed,
    row_summary,
)

_MD_SPECIAL = "\\`*_[]<>|#"




def _esc(text) -> str:
    """A Markdown table cell: special characters escaped, newlines folded."""
    s = " ".join(str(text).split())
    return "".join("\\" + c if c in _MD_SPECIAL else c for c in s) or " "


LEADERBOARD_HEADINGS = (
    "#",
    "model",
    "quant",
    "bits/w",
    "size MB",
    f"mean {_esc(DIRECTION)}",
    "mean/bit",
    "median",
    "P95",
    "P99",
    "max",
    "top-1",
    "positions",
    "result",
)


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


def _mb(v) -> str:
    return _num(v / 1e6, "{:.1f}") if isinstance(v, (int, float)) else "-"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _result(row: dict) -> str:
    if row.get("is_reference"):
        return "reference"
    passed = row_passed(row)
    if nonfinite(row) and passed is not True:
        return "❌ fail: non-finite" if passed is False else "❌ non-finite"
    if passed is True:
        return "✅ pass"
    if passed is False:
        return "❌ fail"
    return "-"


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


# Leaderboard columns that mark their best value (the reference excluded): key, better.
_MARKED = {
    "bpw": "low",
    "size": "low",
    "mean": "low",
    "mean_per_bit": "low",
    "median": "low",
    "p95": "low",
    "p99": "low",
    "max": "low",
    "top1": "high",
}


def _flat(row: dict) -> dict:
    """The figures of a row that the Markdown leaderboard marks, under one name each."""
    info, s = row.get("info") or {}, row_summary(row)
    bpw, mean = info.get("bits_per_weight"), row_mean(row)
    out = {k: s.get(k) for k in ("median", "p95", "p99", "max", "top1")}
    out.update(
        bpw=bpw,
        size=info.get("weight_bytes"),
        mean=mean,
        mean_per_bit=mean / bpw if mean is not None and isinstance(bpw, (int, float)) and bpw > 0 else None,
        is_reference=row.get("is_reference"),
        nonfinite=nonfinite(row),
    )
    return {k: (None if isinstance(v, bool) and k != "is_reference" else v) for k, v in out.items()}


def markdown(rows, header: dict | None = None) -> str:
    """The Markdown text :func:`write_markdown` writes."""
    rows = ordered_rows(rows)
    out = [f"## pytest-kld: {DIRECTION}", ""]
    for key, value in (header or {}).items():
        if value is None or value == "":
            continue
        out.append(f"- **{_esc(key)}**: {_esc(value)}")
    if header:
        out.append("")

    out += _leaderboard(rows)
    from .drift import markdown_lines as drift_lines

    out += drift_lines(rows)
    out += _category_table(rows)
    out += _quant_table(rows)
    return "\n".join(out) + "\n"


def _leaderboard(rows) -> list[str]:
    """The main table: one row per model, the best of each column in bold, then its legend."""
    out: list[str] = []
    headings = list(LEADERBOARD_HEADINGS)
    broken = any(nonfinite(r) for r in rows)
    if broken:
        headings.insert(-1, "non-finite")
    with_baseline = any(r.get("baseline") for r in rows)
    if with_baseline:
        headings.insert(-1, "vs baseline")
    body = []
    flat = [_flat(r) for r in rows]
    best = {k: best_value(flat, k, better) for k, better in _MARKED.items()}

    def cell(text: str, f: dict, key: str) -> str:
        v = f.get(key)
        clean = not f.get("is_reference") and not nonfinite(f)
        if best[key] is not None and v == best[key] and clean and text not in ("-", "nan"):
            return f"**{text}**"
        return text

    for n, (row, f) in enumerate(zip(rows, flat), 1):
        info = row.get("info") or {}
        s = row_summary(row)
        count = s.get("count")
        mean = cell(_num(s.get("mean")), f, "mean")
        se = s.get("se_cluster") if _finite(s.get("se_cluster")) else s.get("se")  # clustered by chunk if known
        if _finite(se) and row_mean(row) is not None:
            mean += f" ± {_num(se, '{:.2g}')}"
        lo, hi = s.get("ci95_low"), s.get("ci95_high")
        if isinstance(lo, float) and isinstance(hi, float) and math.isfinite(lo) and math.isfinite(hi):
            mean += f" (95% CI {_num(lo)}–{_num(hi)})"
        body.append(
            [
                str(n),
                _esc(row.get("model", "?")),
                _esc(info.get("label") or "-"),
                cell(_num(info.get("bits_per_weight"), "{:.3f}"), f, "bpw"),
                cell(_mb(info.get("weight_bytes")), f, "size"),
                mean,
                cell(_num(f.get("mean_per_bit")), f, "mean_per_bit"),
                cell(_num(s.get("median")), f, "median"),
                cell(_num(s.get("p95")), f, "p95"),
                cell(_num(s.get("p99")), f, "p99"),
                cell(_num(s.get("max")), f, "max"),
                cell(_pct(s.get("top1")), f, "top1"),
                str(int(count)) if isinstance(count, (int, float)) else "-",
                *([nonfinite_text(row)] if broken else []),
                *([_esc((row.get("baseline") or {}).get("verdict") or "-")] if with_baseline else []),
                _result(row),
            ]
        )
    out += _table(headings, body, right=set(range(len(headings) - 1)) - {1, 2})
    out.append("")
    out.append(_legend(broken, with_baseline))
    out.append("")
    out += _neighbours(rows)
    return out


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


def _neighbours(rows) -> list[str]:
    """The paired difference of each row's mean from the row above, when both were measured on
    the same positions: told apart, or not."""
    from .regression import neighbours

    pairs = neighbours(rows)
    if not pairs:
        return []
    out = ["| model | row above | paired Δ mean | 95% CI | |", "|:---|:---|---:|---:|:---|"]
    for i, d in pairs.items():
        out.append(f"| {_esc(rows[i].get('model', '?'))} | {_esc(d['above'] or '?')} | {d['diff']:+.5f} | "
                   f"{d['low']:+.5f} – {d['high']:+.5f} | {'told apart' if d['apart'] else '≈ cannot be told apart'} |")
    return [*out, ""]


def _quant_table(rows) -> list[str]:
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
    for row in rows:
        info = row.get("info") or {}
        if info.get("error"):
            body.append(
                [_esc(row.get("model", "?")), _esc(f"unreadable: {info['error']}")] + ["-"] * 6
            )
            continue
        fam = family_text(info) if info else "-"
        ov_text = overrides_text(info)
        quantized = info.get("quantized")
        body.append(
            [
                _esc(row.get("model", "?")),
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


def _category_table(rows) -> list[str]:
    """Mean KLD per corpus category (the terminal's --kld-by-category table), when the corpus
    has more than one category."""
    from .report import category_means

    cats, means = category_means(rows)
    if len(cats) < 2:
        return []
    body = [[_esc(r.get("model", "?"))] + [(f"**{_num(v)}**" if b else _num(v)) for v, b in cells] for r, cells in means]
    out = [f"### Mean {_esc(DIRECTION)} by corpus category (bold: lowest, the reference excluded)", ""]
    out += _table(["model", *map(_esc, cats)], body, right=set(range(1, len(cats) + 1)))
    return out + [""]


def write_markdown(rows, path, header: dict | None = None, *, append: bool = False) -> Path:
    """Write the leaderboard and the per-model quantisation table as GitHub Markdown.

    ``append=True`` adds to the file, as ``$GITHUB_STEP_SUMMARY`` expects from each step.
    """
    from .files import write_text

    path = Path(os.fspath(path))
    text = markdown(rows, header)
    try:
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        if append and path.is_file() and not path.is_symlink() and path.stat().st_size:
            text = "\n" + text
        write_text(path, text, append=append)
    except OSError as e:
        raise KldError(f"cannot write the Markdown summary to {path}: {e.strerror or e}") from None
    return path
