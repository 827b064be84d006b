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
from .report import (
    NONFINITE_NOTE,
    best_value,
    elevated_parts,
    family_text,
    nonfinite,
    nonfinite_text,
    overrides_text,
    params_text,
)

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
    if nonfinite(row) and passed is not True:
        return "❌ fail: non-finite" if passed is False else "❌ non-finite"
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
            nonfinite(r) > 0,
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
    info, s = row.get("info") or {}, _summary(row)
    bpw, mean = info.get("bits_per_weight"), _mean(row)
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

    headings = [
        "#",
        "model",
        "quant",
        "bits/w",
        "size MB",
        f"mean {DIRECTION}",
        "mean/bit",
        "median",
        "P95",
        "P99",
        "max",
        "top-1",
        "positions",
        "result",
    ]
    broken = any(nonfinite(r) for r in rows)
    if broken:
        headings.insert(-1, "non-finite")
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
        s = _summary(row)
        count = s.get("count")
        mean = cell(_num(s.get("mean")), f, "mean")
        if isinstance(s.get("se"), (int, float)) and not isinstance(s.get("se"), bool) and _mean(row) is not None:
            mean += f" ± {_num(s['se'], '{:.2g}')}"
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
                _result(row),
            ]
        )
    out += _table(headings, body, right=set(range(len(headings) - 1)) - {1, 2})
    out.append("")
    out.append(
        f"{DIRECTION} in nats per scored position, weighted by the reference's probabilities; "
        "lower is better. **Bold**: best in its column, the reference excluded. "
        "mean/bit: mean KLD / bits per weight. top-1: positions where both models rank the same "
        "token first. bits/w: every tensor's bytes × 8 / parameters of the unquantised model."
        + (f" {NONFINITE_NOTE[0].upper()}{NONFINITE_NOTE[1:]}." if broken else "")
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
    return "\n".join(out) + "\n"


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


def _color(row: dict) -> str:
    if _passed(row) is True:
        return "#2ca02c"
    if _passed(row) is False:
        return "#d62728"
    return "#1f77b4"


def write_chart(rows, path, *, title: str | None = None, dpi: int = 120) -> Path:
    """Write :func:`chart_figure` as a PNG at ``path``."""
    import io

    from .files import write_bytes

    path = Path(os.fspath(path))
    fig = chart_figure(rows, title=title, dpi=dpi)
    try:
        if not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        png = io.BytesIO()
        fig.savefig(png, format="png")
        write_bytes(path, png.getvalue())
    except OSError as e:
        raise KldError(f"cannot write the KLD chart to {path}: {e.strerror or e}") from None
    return path


def chart_figure(rows, *, title: str | None = None, dpi: int = 120):
    """A matplotlib Figure (Agg canvas, no pyplot) of mean KLD (log y) against effective bits
    per weight, one labelled point per model.

    Labels are placed so that they overlap neither each other nor the points. The reference is
    not plotted (its KLD against itself is 0, off a log axis): a note names it, with its bits
    per weight; other rows without a positive, finite mean or without bits per weight are listed
    in the same note. Green: passed, red: failed, blue: no verdict.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise KldError(
            "writing the KLD chart needs matplotlib, which is not installed: "
            "pip install 'pytest-kld[chart]'"
        ) from None

    fig = Figure(figsize=(8, 5), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    plotted, skipped, references = [], [], []
    for row in ordered_rows(rows):
        mean = _mean(row)
        bpw = (row.get("info") or {}).get("bits_per_weight")
        if row.get("is_reference"):
            references.append(row)
        elif (
            mean is None
            or not math.isfinite(mean)
            or mean <= 0
            or not isinstance(bpw, (int, float))
            or isinstance(bpw, bool)
        ):
            skipped.append(row)
        else:
            plotted.append((float(bpw), float(mean), row))
    for bpw, mean, row in plotted:
        ax.scatter(
            [bpw], [mean], s=40, color=_color(row), zorder=3, edgecolors="black", linewidths=0.5
        )
    notes = []
    for row in references:
        bpw = (row.get("info") or {}).get("bits_per_weight")
        at = f", {bpw:.2f} bits/w" if isinstance(bpw, (int, float)) else ""
        notes.append(f"not plotted: the reference \"{row.get('model', '?')}\"{at} (KLD 0 against itself)")
    if skipped:
        names = ", ".join(str(r.get("model", "?")) for r in skipped)
        notes.append(f"not plotted (mean KLD 0 or unknown, or bits/w unknown): {names}")
    if notes:
        ax.text(0.01, 0.01, "\n".join(notes), fontsize=7, color="dimgray", transform=ax.transAxes)
    ax.set_xlabel("effective bits per weight (weights, scales, biases, float tensors)")
    ax.set_ylabel("mean KLD, nats (log scale); lower is better")
    sub = _chart_subtitle(rows)
    ax.set_title(title or f"mean {DIRECTION} against bits per weight" + (f"\n{sub}" if sub else ""), fontsize=10)
    if plotted:
        ax.set_yscale("log")
        seen = {(_passed(r), _color(r)) for _, _, r in plotted}
        names = {True: "passed", False: "failed", None: "no threshold"}
        handles = [
            ax.scatter([], [], s=40, color=c, edgecolors="black", linewidths=0.5, label=names[p])
            for p, c in sorted(seen, key=lambda pc: str(pc[0]))
        ]
        ax.legend(handles=handles, loc="upper right", fontsize=8)  # what the colours mean
        xs = [p[0] for p in plotted]
        ys = [p[1] for p in plotted]
        lo, hi = min(xs), max(xs)
        pad = max(0.25, 0.08 * (hi - lo))
        ax.set_xlim(lo - pad, hi + pad + 0.15 * (hi - lo + 1))
        ylo, yhi = math.log10(min(ys)), math.log10(max(ys))
        ypad = max(0.3, 0.12 * (yhi - ylo))
        ax.set_ylim(10 ** (ylo - ypad - (0.15 * (yhi - ylo) if notes else 0)), 10 ** (yhi + ypad))
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.1)
    else:
        ax.text(
            0.5,
            0.5,
            "no quantised results to plot",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    if plotted:
        _place_labels(ax, canvas.get_renderer(), plotted)
    return fig


def _chart_subtitle(rows) -> str:
    """Reference, mode, positions and K of the rows (the flat keys of report.result_row)."""
    from .report import display_name

    parts = []
    refs = sorted({str(r.get("reference")) for r in rows if r.get("reference")})
    if refs:
        parts.append("reference: " + ", ".join(display_name(x) for x in refs))
    modes = sorted({str(r.get("mode")) for r in rows if r.get("mode")})
    if modes:
        parts.append("mode " + ", ".join(modes))
    counts = sorted({int(_summary(r)["count"]) for r in rows if isinstance(_summary(r).get("count"), (int, float))})
    if counts:
        parts.append(", ".join(map(str, counts)) + " positions")
    ks = sorted({r.get("top_k") for r in rows if isinstance(r.get("top_k"), int)})
    if ks:
        parts.append("K " + ", ".join(map(str, ks)))
    return " · ".join(parts)


# Label offsets (points) tried in order: beside the marker first, then further out with a leader.
_OFFSETS = [
    (7, 3, "left"), (7, -11, "left"), (-7, 3, "right"), (-7, -11, "right"),
    (0, 8, "center"), (0, -17, "center"),
    (14, 14, "left"), (14, -24, "left"), (-14, 14, "right"), (-14, -24, "right"),
    (0, 22, "center"), (0, -31, "center"), (24, 26, "left"), (-24, 26, "right"),
    (24, -36, "left"), (-24, -36, "right"),
]


def _place_labels(ax, renderer, plotted) -> None:
    """Label each point where its text overlaps no other label, no marker and stays inside the
    axes; failing that, where it overlaps least. Far placements get a thin leader line."""
    from matplotlib.transforms import Bbox

    axes_box = ax.get_window_extent(renderer)
    r = 6.0 * ax.figure.dpi / 72  # marker radius and a margin, in pixels
    markers = []
    for bpw, mean, _ in plotted:
        x, y = ax.transData.transform((bpw, mean))
        markers.append(Bbox.from_extents(x - r, y - r, x + r, y + r))
    halos = [m.expanded(2.2, 2.2) for m in markers]
    taken: list = []
    legend = ax.get_legend()
    if legend is not None:
        taken.append(legend.get_window_extent(renderer))

    def overlap(a, b) -> float:
        w = min(a.x1, b.x1) - max(a.x0, b.x0)
        h = min(a.y1, b.y1) - max(a.y0, b.y0)
        return w * h if w > 0 and h > 0 else 0.0

    # the most crowded points first, so they get the nearest places
    def crowd(i):
        x0, y0 = markers[i].x0, markers[i].y0
        return -sum(1 for m in markers if abs(m.x0 - x0) < 80 and abs(m.y0 - y0) < 40)

    for i in sorted(range(len(plotted)), key=crowd):
        bpw, mean, row = plotted[i]
        best = None
        for dx, dy, ha in _OFFSETS:
            far = abs(dx) > 10 or abs(dy) > 20
            ann = ax.annotate(
                str(row.get("model", "?")),
                (bpw, mean),
                textcoords="offset points",
                xytext=(dx, dy),
                ha=ha,
                fontsize=8,
                arrowprops={"arrowstyle": "-", "color": "gray", "lw": 0.5, "shrinkA": 0, "shrinkB": 4} if far else None,
            )
            box = ann.get_window_extent(renderer).expanded(1.04, 1.1)
            outside = box.width * box.height - overlap(box, axes_box)
            cost = outside * 4 + sum(overlap(box, o) for o in taken) + sum(
                overlap(box, m) for j, m in enumerate(markers) if j != i
            )
            cost += 0.5 * sum(overlap(box, m) for j, m in enumerate(markers) if j == i)
            # a label close to another point reads as that point's: keep a wider berth
            cost += 0.3 * sum(overlap(box, m) for j, m in enumerate(halos) if j != i)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        taken.append(best[2])
