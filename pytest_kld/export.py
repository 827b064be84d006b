"""Export a leaderboard: a GitHub Markdown summary and a PNG chart. Plain dicts in, files out.

A row is a plain dict::

    {"model": str, "info": ModelInfo.to_dict(), "is_reference": bool, "passed": bool | None,
     "summary": {"mean", "median", "p95", "p99", "max", "top1", "count", ...}}

Missing keys print as "-". matplotlib is imported only by :func:`write_chart`, and only its
object-oriented Agg canvas is used: no pyplot, no change to the process's matplotlib backend.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import KldError

DIRECTION = "KL(reference ‖ quant)"

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


def _mb(v) -> str:
    return _num(v / 1e6, "{:.1f}") if isinstance(v, (int, float)) else "-"


def _params(v) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= div:
            return f"{v / div:.3g}{unit}"
    return str(int(v))


def _passed(row: dict):
    """True, False or None; also reads report.py's ``outcome`` ("passed"/"failed")."""
    passed = row.get("passed")
    if passed is None:
        passed = {"passed": True, "failed": False}.get(row.get("outcome"))
    return passed


def _summary(row: dict) -> dict:
    return row.get("summary") or {}


def _result(row: dict) -> str:
    if row.get("is_reference"):
        return "reference"
    passed = _passed(row)
    if passed is True:
        return "✅ pass"
    if passed is False:
        return "❌ fail"
    return "-"


def _mean(row: dict):
    m = _summary(row).get("mean")
    return m if isinstance(m, (int, float)) and not math.isnan(m) else None


def ordered_rows(rows) -> list[dict]:
    """The reference first, then by mean KLD ascending (rows without a mean last)."""
    rows = list(rows)
    return sorted(
        rows,
        key=lambda r: (
            not r.get("is_reference"),
            _mean(r) is None,
            _mean(r) if _mean(r) is not None else 0.0,
        ),
    )


def _table(headings: list[str], body: list[list[str]], right: set[int]) -> list[str]:
    lines = ["| " + " | ".join(headings) + " |"]
    lines.append(
        "|" + "|".join("---:" if i in right else ":---" for i in range(len(headings))) + "|"
    )
    for cells in body:
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _hist_text(hist: dict | None, unit: str = "b") -> str:
    if not hist:
        return ""
    return ", ".join(f"{n}×{b}{unit}" for b, n in sorted(hist.items(), key=lambda kv: int(kv[0])))


def _elevated_text(elevated: dict | None) -> str:
    if not elevated:
        return "none"
    parts = []
    for role, hist in elevated.items():
        for b, n in sorted(hist.items(), key=lambda kv: int(kv[0])):
            parts.append(f"{role} {b}b ×{n}")
    return ", ".join(parts)


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

    headings = [
        "#",
        "model",
        "quant",
        "bits/w",
        "size MB",
        f"mean {DIRECTION}",
        "median",
        "P95",
        "P99",
        "max",
        "top-1",
        "positions",
        "result",
    ]
    body = []
    for n, row in enumerate(rows, 1):
        info = row.get("info") or {}
        s = _summary(row)
        count = s.get("count")
        mean = _num(s.get("mean"))
        if isinstance(s.get("se"), (int, float)) and mean not in ("-", "nan"):
            mean += f" ± {_num(s['se'], '{:.2g}')}"
        body.append(
            [
                str(n),
                _esc(row.get("model", "?")),
                _esc(info.get("label") or "-"),
                _num(info.get("bits_per_weight"), "{:.3f}"),
                _mb(info.get("weight_bytes")),
                mean,
                _num(s.get("median")),
                _num(s.get("p95")),
                _num(s.get("p99")),
                _num(s.get("max")),
                _pct(s.get("top1")),
                str(int(count)) if isinstance(count, (int, float)) else "-",
                _result(row),
            ]
        )
    out += _table(headings, body, right={0, 3, 4, 5, 6, 7, 8, 9, 10, 11})
    out.append("")
    out.append(
        f"{DIRECTION} in nats per scored position, weighted by the reference's probabilities; "
        "lower is better. top-1: positions where both models rank the same token first. "
        "bits/w: every tensor's bytes × 8 / parameters of the unquantised model."
    )
    out.append("")

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
        fam = info.get("family") or "-"
        if info.get("recipe"):
            fam = f"{fam} ({info['recipe']})"
        ov = info.get("overrides")
        ov_text = "-" if ov is None else str(ov)
        if ov:
            ov_text += f" ({_hist_text(info.get('override_bits'))})"
        quantized = info.get("quantized")
        body.append(
            [
                _esc(row.get("model", "?")),
                _esc(fam),
                _esc(info.get("mode") or "-"),
                _esc(info.get("base_bits") if info.get("base_bits") is not None else "-"),
                _esc(info.get("group_size") if info.get("group_size") is not None else "-"),
                _params(info.get("params")),
                _esc(ov_text),
                _esc(_elevated_text(info.get("elevated")) if quantized else "-"),
            ]
        )
    out += _table(headings, body, right={3, 4, 5})
    out.append("")
    return "\n".join(out) + "\n"


def write_markdown(rows, path, header: dict | None = None, *, append: bool = False) -> Path:
    """Write the leaderboard and the per-model quantisation table as GitHub Markdown.

    ``append=True`` adds to the file, as ``$GITHUB_STEP_SUMMARY`` expects from each step.
    """
    path = Path(os.fspath(path))
    text = markdown(rows, header)
    try:
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a" if append else "w", encoding="utf-8") as f:
            if append and path.exists() and path.stat().st_size:
                f.write("\n")
            f.write(text)
    except OSError as e:
        raise KldError(f"cannot write the Markdown summary to {path}: {e.strerror or e}") from None
    return path


def _color(row: dict) -> str:
    if _passed(row) is True:
        return "#2ca02c"
    if _passed(row) is False:
        return "#d62728"
    return "#1f77b4"


def write_chart(rows, path, *, title: str | None = None, dpi: int = 120) -> Path:
    """A PNG of mean KLD (log y) against effective bits per weight, one labelled point per model.

    Rows without a positive, finite mean or without bits per weight (the reference against
    itself reads 0) are listed in a note instead of plotted. Green: passed, red: failed,
    blue: no verdict.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise KldError(
            "writing the KLD chart needs matplotlib, which is not installed: "
            "pip install 'pytest-kld[chart]'"
        ) from None

    path = Path(os.fspath(path))
    fig = Figure(figsize=(8, 5), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    plotted, skipped = [], []
    for row in ordered_rows(rows):
        mean = _mean(row)
        bpw = (row.get("info") or {}).get("bits_per_weight")
        if (
            mean is None
            or not math.isfinite(mean)
            or mean <= 0
            or not isinstance(bpw, (int, float))
        ):
            skipped.append(row)
        else:
            plotted.append((float(bpw), float(mean), row))
    for bpw, mean, row in plotted:
        ax.scatter(
            [bpw], [mean], s=40, color=_color(row), zorder=3, edgecolors="black", linewidths=0.5
        )
        ax.annotate(
            str(row.get("model", "?")),
            (bpw, mean),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
    if plotted:
        ax.set_yscale("log")
        ax.margins(y=0.15)
        seen = {(_passed(r), _color(r)) for _, _, r in plotted}
        names = {True: "passed", False: "failed", None: "no threshold"}
        handles = [
            ax.scatter([], [], s=40, color=c, edgecolors="black", linewidths=0.5, label=names[p])
            for p, c in sorted(seen, key=lambda pc: str(pc[0]))
        ]
        if len(handles) > 1:
            ax.legend(handles=handles, loc="upper right", fontsize=8)
        xs = [p[0] for p in plotted]
        lo, hi = min(xs), max(xs)
        pad = max(0.25, 0.08 * (hi - lo))
        ax.set_xlim(lo - pad, hi + pad + 0.15 * (hi - lo + 1))
    else:
        ax.text(
            0.5,
            0.5,
            "no quantised results to plot",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    if skipped:
        names = ", ".join(str(r.get("model", "?")) for r in skipped)
        ax.text(
            0.01,
            0.01,
            f"not plotted (mean ≤ 0 or unknown): {names}",
            fontsize=7,
            color="gray",
            transform=ax.transAxes,
        )
    ax.set_xlabel("effective bits per weight (weights, scales, biases, float tensors)")
    ax.set_ylabel("mean KLD, nats (log scale)")
    ax.set_title(title or f"mean {DIRECTION} against bits per weight")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    try:
        if not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    except OSError as e:
        raise KldError(f"cannot write the KLD chart to {path}: {e.strerror or e}") from None
    return path
