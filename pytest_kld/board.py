"""The leaderboard model: built once per run from result rows, rendered by every output.

    board = build(rows)   # rows: run.row dicts, or the "results" of a results JSON file
    report.terminal_lines(board) | markdown.markdown(board) | board.to_json() | chart.chart_figure(board)

No renderer sorts, marks or pairs rows itself; each reads the board:

- ``rows``: copies of the rows in leaderboard order (ONE sort key, :func:`sort_key`: the reference
  first, broken models last, the rest by mean KLD ascending), each with its ``label`` (the short
  name, plus the settings that differ between rows: ``q4 [K=64]``), ``status`` ("reference",
  "passed", "failed" or None) and every column's figure at the top level (read from its
  ``summary`` when absent there);
- ``columns``: the figures shown (:class:`Column`): size, bits/w, then the figures table's
  (:data:`pytest_kld.options.FIGURES`, those with a heading) with mean/bit after the mean;
- ``best``: ``{column key: best value or None}`` over the quants (the reference and broken rows
  excluded; None with fewer than two distinct values); :meth:`Board.marked` says if a cell is one;
- ``pairs``: ``{i: {"diff", "se", "low", "high", "apart", "above"}}``: row i's mean KLD minus row
  i-1's, paired over the same positions, with its 95% interval (chunks resampled);
- ``categories`` and ``category_rows``: mean KLD per corpus category, ``[(row, [(mean, best)])]``;
- ``quant``: one ``(name, info)`` per model (a model under several settings once);
- ``drift``: the rows measured in drift mode; ``pareto``: indices of the rows on the bits/KLD
  front (no other quant both smaller and better); ``header``: reference, mode, positions, K, exec;
- ``sections``: further :class:`Section` s (a sensitivity study, model cards...), which the terminal
  and the Markdown print after the rest and the JSON carries under their names.

KLD everywhere is KL(reference || quant) in nats.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

DIRECTION = "KL(reference || quant)"

# Settings that may differ between rows of one run: (row key, label in the model's name).
VARIES = [("reference", "ref"), ("mode", "mode"), ("top_k", "K"), ("exec", "exec")]


@dataclass(frozen=True)
class Column:
    key: str  # the row's key
    heading: str
    fmt: str  # the terminal's format
    better: str | None  # "low" or "high": the best is marked; None: not marked


@dataclass
class Section:
    """A section a later feature plugs in: its name (the JSON key), terminal lines, Markdown lines
    and JSON-able data."""

    name: str
    terminal: list = field(default_factory=list)
    markdown: list = field(default_factory=list)
    data: object = None


@dataclass
class Board:
    results: list  # the rows as given, in the order given (the JSON's "results")
    rows: list
    columns: list
    best: dict
    pairs: dict
    categories: list
    category_rows: list
    quant: list
    drift: list
    pareto: list
    header: dict
    sections: list = field(default_factory=list)
    recorded: list = field(default_factory=list)  # baseline slots recorded by this run (run.collect)

    @property
    def broken(self) -> bool:
        return any(nonfinite(r) for r in self.rows)

    @property
    def with_baseline(self) -> bool:
        return any(r.get("baseline") for r in self.rows)

    def marked(self, i: int, key: str) -> bool:
        """Row ``i``'s value of ``key`` is the best of its column (the reference and broken rows never are)."""
        r, best = self.rows[i], self.best.get(key)
        return best is not None and r.get(key) == best and clean(r)

    def marks(self) -> dict:
        """``{column key: [labels of the rows marked best]}``."""
        return {c.key: [r["label"] for i, r in enumerate(self.rows) if self.marked(i, c.key)]
                for c in self.columns if c.better}

    def to_json(self) -> dict:
        """What the results JSON carries beside its rows (schema: ``$defs/leaderboard``)."""
        return {
            "order": [r["label"] for r in self.rows],
            "columns": [{"key": c.key, "heading": c.heading, "better": c.better} for c in self.columns],
            "best": {k: v for k, v in self.best.items() if v is not None},
            "marks": self.marks(),
            "pairs": [{"model": self.rows[i]["label"], "above": self.rows[i - 1]["label"],
                       **{k: d[k] for k in ("diff", "se", "low", "high", "apart")}} for i, d in self.pairs.items()],
            "pareto": [self.rows[i]["label"] for i in self.pareto],
            "categories": {c: {r["label"]: cells[j][0] for r, cells in self.category_rows if cells[j][0] is not None}
                           for j, c in enumerate(self.categories)},
            "drift": [r["label"] for r in self.drift],
            "sections": {s.name: s.data for s in self.sections},
        }


def build(rows) -> Board:
    """The leaderboard of result rows (see the module's docstring). A Board is returned as is
    (known by its shape, not its class: a module imported again, as pytester's in-process runs do,
    makes a second Board class)."""
    if isinstance(rows, Board) or (hasattr(rows, "rows") and hasattr(rows, "columns") and hasattr(rows, "pairs")):
        return rows
    rows = list(rows)
    out = sorted((_flat(r) for r in rows), key=sort_key)
    _label(out)
    columns = board_columns()
    best = {c.key: best_value(out, c.key, c.better) for c in columns if c.better}
    cats, cat_rows = category_means(out)
    return Board(results=rows, rows=out, columns=columns, best=best, pairs=neighbours(out), categories=cats,
                 category_rows=cat_rows, quant=_quant(out),
                 drift=[r for r in out if (r.get("summary") or {}).get("drift_match") is not None],
                 pareto=pareto(out), header=header_fields(out), sections=_sections(out))


def _sections(rows: list[dict]) -> list:
    """The sections the rows call for: ``explain`` when a row carries a sensitivity study."""
    if not any(r.get("sensitivity") for r in rows):
        return []
    from .explain import section
    from .options import EXPLAIN_TOP

    found = section(rows, EXPLAIN_TOP)
    return [Section(*found)] if found else []


def board_columns() -> list[Column]:
    """size, bits/w, then each figure of the table with a heading, mean/bit after the mean."""
    from . import options

    out = [Column("size_mb", "size MB", "{:.1f}", "low"), Column("bpw", "bits/w", "{:.3f}", "low")]
    for f in options.FIGURES:
        if f.heading:
            out.append(Column(f.name, f.heading, f.fmt, f.better))
            if f.name == "mean":
                out.append(Column("mean_per_bit", "mean/bit", "{:.5f}", "low"))
    return out


def sort_key(r: dict):
    """The one order: the reference first, broken models last, then mean KLD ascending (no mean last)."""
    m = r.get("mean")
    return (not r.get("is_reference"), nonfinite(r) > 0, m if _finite(m) else math.inf)


def _flat(row: dict) -> dict:
    """A copy of ``row`` with its figures at the top level, its size, bits/w, mean/bit and status."""
    from . import options

    r, s, info = dict(row), row.get("summary") or {}, row.get("info") or {}
    for f in options.FIGURES:
        if r.get(f.name) is None and s.get(f.name) is not None:
            r[f.name] = s[f.name]
    for key in ("se", "se_cluster", "ci95_low", "ci95_high", "count"):
        r.setdefault(key, s.get(key))
    if r.get("bpw") is None and _finite(info.get("bits_per_weight")):
        r["bpw"] = info["bits_per_weight"]
    if r.get("size_mb") is None and _finite(info.get("weight_bytes")):
        r["size_mb"] = info["weight_bytes"] / 1e6
    mean, bpw = r.get("mean"), r.get("bpw")
    if r.get("mean_per_bit") is None and _finite(mean) and _finite(bpw) and bpw > 0:
        r["mean_per_bit"] = mean / bpw
    r["status"] = "reference" if r.get("is_reference") else {True: "passed", False: "failed"}.get(row_passed(r))
    return r


def _label(rows: list[dict]) -> None:
    varying = [(k, h) for k, h in VARIES if len({str(r.get(k)) for r in rows}) > 1]
    for r in rows:
        name = str(r.get("model", "?"))
        if varying:
            what = ", ".join(f"{h}={display_name(str(r.get(k))) if k == 'reference' else r.get(k)}" for k, h in varying)
            name = f"{name} [{what}]"
        r["label"] = name


def row_passed(row: dict):
    """True, False or None, from ``passed`` or the pytest ``outcome`` ("passed"/"failed")."""
    passed = row.get("passed")
    if passed is None:
        passed = {"passed": True, "failed": False}.get(row.get("outcome"))
    return passed


def nonfinite(row: dict) -> int:
    """Positions where the model's log-probs were NaN or inf (left out of every figure)."""
    n = row.get("nonfinite")
    if n is None:
        n = (row.get("summary") or {}).get("nonfinite")
    return int(n) if _finite(n) else 0


def clean(row: dict) -> bool:
    """Neither the reference nor broken: a row that may be marked best."""
    return not row.get("is_reference") and not nonfinite(row)


def best_value(rows: list[dict], key: str, better: str):
    """The best finite value of ``key`` over the clean rows; None when there is nothing to mark
    (fewer than two such values, or all equal)."""
    vals = [r.get(key) for r in rows if clean(r)]
    vals = [v for v in vals if _finite(v)]
    if len(vals) < 2 or min(vals) == max(vals):
        return None
    return min(vals) if better == "low" else max(vals)


def neighbours(rows: list[dict]) -> dict[int, dict]:
    """For rows in leaderboard order: ``{i: paired difference of row i's mean KLD minus row
    i−1's}`` (``{"diff", "se", "low", "high", "apart", "above"}``), for each row whose neighbour
    above was measured on the same cache and positions (per-chunk sums in ``row["chunks"]``); the
    reference and broken rows are skipped. numpy is imported only when there is a pair."""
    out = {}
    for i in range(1, len(rows)):
        a, b = rows[i], rows[i - 1]
        if any(r.get("is_reference") or r.get("nonfinite") or not r.get("chunks") for r in (a, b)):
            continue
        if (a.get("cache") or {}).get("key") != (b.get("cache") or {}).get("key"):
            continue
        from .intervals import paired_sums

        d = paired_sums(a["chunks"]["sum"], a["chunks"]["count"], b["chunks"]["sum"], b["chunks"]["count"])
        if math.isfinite(d["low"]):
            out[i] = {**d, "apart": not (d["low"] <= 0 <= d["high"]), "above": b.get("label", b.get("model"))}
    return out


def category_means(rows: list[dict]) -> tuple[list[str], list]:
    """(categories, [(row, [(mean KLD, is best), ...]), ...]); best = lowest, clean rows only."""
    cats = sorted({c for r in rows for c in (r.get("categories") or {})})

    def mean(r, c):
        return ((r.get("categories") or {}).get(c) or {}).get("mean")

    best = {c: best_value([{"m": mean(r, c), "is_reference": r.get("is_reference"), "nonfinite": nonfinite(r)}
                           for r in rows], "m", "low") for c in cats}
    return cats, [(r, [(mean(r, c), clean(r) and best[c] is not None and mean(r, c) == best[c]) for c in cats])
                  for r in rows]


def _quant(rows: list[dict]) -> list[tuple[str, dict]]:
    seen, out = set(), []
    for r in rows:
        ident = r.get("path") or r.get("model")
        if ident not in seen:
            seen.add(ident)
            out.append((display_name(str(r["model_arg"])) if r.get("model_arg") else str(r.get("model", "?")),
                        r.get("info") or {}))
    return out


def pareto(rows: list[dict]) -> list[int]:
    """Indices of the clean rows with bits/w and a positive mean that no other such row beats on
    both (fewer or as many bits and a lower mean, or fewer bits and as low a mean), by bits/w."""
    points = sorted((r["bpw"], r["mean"], i) for i, r in enumerate(rows)
                    if clean(r) and _finite(r.get("bpw")) and _finite(r.get("mean")) and r["mean"] > 0)
    out, lowest = [], math.inf
    for _, mean, i in points:
        if mean < lowest:
            out.append(i)
            lowest = mean
    return out


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

    positions = [(r.get("count") or 0) + (r.get("nonfinite") or 0) for r in rows if r.get("count") is not None]
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


def display_name(model: str) -> str:
    """A short name for the table: a hub id as given, a local path by its last component(s)."""
    text = str(model).rstrip("/\\")
    if text.startswith((".", "/", "~")) or os.path.isdir(text):
        parts = [p for p in text.replace("\\", "/").split("/") if p not in ("", ".", "..", "~")]
        return "/".join(parts[-1:]) or text
    return text


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
