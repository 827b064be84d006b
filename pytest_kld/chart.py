"""The leaderboard as a PNG chart: mean KLD (log scale) against effective bits per weight, from a
:class:`pytest_kld.board.Board` (or result rows, built into one): each point with its 95% interval
as an error bar, failed quants drawn as crosses, the Pareto front (no quant both smaller and
better) as a dashed line. matplotlib is imported only here, and only its object-oriented Agg canvas is used: no pyplot, no
change to the process's matplotlib backend.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .board import DIRECTION, build, display_name
from .errors import KldError

STYLE = {"passed": ("#2ca02c", "o", "passed"), "failed": ("#d62728", "X", "failed"),
         None: ("#1f77b4", "o", "no threshold")}  # status: colour, marker, legend


def _style(row: dict) -> tuple[str, str, str]:
    return STYLE.get(row.get("status"), STYLE[None])


def write_chart(board, path, *, title: str | None = None, dpi: int = 120) -> Path:
    """Write :func:`chart_figure` as a PNG at ``path``."""
    import io

    from .files import write_bytes

    path = Path(os.fspath(path))
    fig = chart_figure(board, title=title, dpi=dpi)
    try:
        if not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        png = io.BytesIO()
        fig.savefig(png, format="png")
        write_bytes(path, png.getvalue())
    except OSError as e:
        raise KldError(f"cannot write the KLD chart to {path}: {e.strerror or e}") from None
    return path


def chart_figure(board, *, title: str | None = None, dpi: int = 120):
    """A matplotlib Figure (Agg canvas, no pyplot) of mean KLD (log y) against effective bits
    per weight, one labelled point per model with its 95% interval, the Pareto front a line.

    Labels are placed so that they overlap neither each other nor the points. The reference is
    not plotted (its KLD against itself is 0, off a log axis): a note names it, with its bits
    per weight; other rows without a positive, finite mean or without bits per weight are listed
    in the same note. Green: passed, red cross: failed, blue: no verdict.
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
    board = build(board)
    plotted, skipped, references = _sort_rows(board)
    for bpw, mean, row in plotted:
        color, marker, _ = _style(row)
        low, high = row.get("ci95_low"), row.get("ci95_high")
        if isinstance(low, float) and isinstance(high, float) and math.isfinite(low) and math.isfinite(high):
            below = mean - max(low, mean * 1e-3)  # a log axis has no 0
            ax.errorbar([bpw], [mean], yerr=[[max(below, 0.0)], [max(high - mean, 0.0)]], fmt="none",
                        ecolor=color, elinewidth=1, capsize=3, zorder=2)
        ax.scatter([bpw], [mean], s=55 if marker == "X" else 40, marker=marker, color=color, zorder=3,
                   edgecolors="black", linewidths=0.5)
    front = [(board.rows[i]["bpw"], board.rows[i]["mean"]) for i in board.pareto]
    if len(front) > 1:
        ax.plot(*zip(*front), linestyle="--", color="dimgray", linewidth=1, zorder=1,
                label="Pareto front: no quant both smaller and better")
    notes = _notes(references, skipped)
    if notes:
        ax.text(0.01, 0.01, "\n".join(notes), fontsize=7, color="dimgray", transform=ax.transAxes)
    ax.set_xlabel("effective bits per weight (weights, scales, biases, float tensors)")
    ax.set_ylabel("mean KLD, nats (log scale); lower is better")
    sub = _chart_subtitle(board.rows)
    ax.set_title(title or f"mean {DIRECTION} against bits per weight" + (f"\n{sub}" if sub else ""), fontsize=10)
    if plotted:
        _scale_and_legend(ax, plotted, bool(notes))
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


def _sort_rows(board):
    """(plotted [(bits/w, mean, row)], skipped rows, reference rows), in the board's order: a row
    is plotted when it has a positive, finite mean and a bits/w (a log axis has no 0)."""
    plotted, skipped, references = [], [], []
    for row in board.rows:
        mean = row.get("mean")
        bpw = row.get("bpw")
        if row.get("is_reference"):
            references.append(row)
        elif not isinstance(mean, (int, float)) or not math.isfinite(mean) or mean <= 0 or not isinstance(bpw, (int, float)) or isinstance(bpw, bool):
            skipped.append(row)
        else:
            plotted.append((float(bpw), float(mean), row))
    return plotted, skipped, references


def _notes(references, skipped) -> list[str]:
    notes = []
    for row in references:
        bpw = (row.get("info") or {}).get("bits_per_weight")
        at = f", {bpw:.2f} bits/w" if isinstance(bpw, (int, float)) else ""
        notes.append(f"not plotted: the reference \"{row['label']}\"{at} (KLD 0 against itself)")
    if skipped:
        names = ", ".join(r["label"] for r in skipped)
        notes.append(f"not plotted (mean KLD 0 or unknown, or bits/w unknown): {names}")
    return notes


def _scale_and_legend(ax, plotted, notes: bool) -> None:
    """Log y axis, limits with room for the labels (and the notes), the colours' legend, a grid."""
    ax.set_yscale("log")
    seen = sorted({_style(r) for _, _, r in plotted}, key=lambda st: st[2])
    handles = [ax.scatter([], [], s=40, marker=m, color=c, edgecolors="black", linewidths=0.5, label=name)
               for c, m, name in seen]
    handles += [line for line in ax.get_lines() if line.get_label().startswith("Pareto")]
    ax.legend(handles=handles, loc="upper right", fontsize=8)  # what the colours, crosses and line mean
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


def _chart_subtitle(rows) -> str:
    """Reference, mode, positions and K of the board's rows."""

    parts = []
    refs = sorted({str(r.get("reference")) for r in rows if r.get("reference")})
    if refs:
        parts.append("reference: " + ", ".join(display_name(x) for x in refs))
    modes = sorted({str(r.get("mode")) for r in rows if r.get("mode")})
    if modes:
        parts.append("mode " + ", ".join(modes))
    counts = sorted({int(r["count"]) for r in rows if isinstance(r.get("count"), (int, float))})
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
                row["label"],
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
