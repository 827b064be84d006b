"""Where the damage comes from, as text: the sensitivity ranking's tables (plain and Markdown)
and the leaderboard's ``explain`` section, built from the rows' ``sensitivity`` objects
(:func:`pytest_kld.sensitivity.public`, carried by a row when ``--kld-explain`` explained a failed
check). No numpy, no mlx: the board imports it.

KLD is KL(reference || quant) in nats; a saving is the quant's mean minus the mean with one group
put back at more bits, paired over the same positions.
"""

from __future__ import annotations

import math

DIRECTION = "KL(reference || quant)"


def what(bits: int) -> str:
    """What a group is put back at, in words (0: the reference's own dtype, groups.FLOAT)."""
    return "the reference's own weights" if bits == 0 else f"the reference's weights at {bits} bits"


def table(rows: list[dict]) -> list[str]:
    """Ranking rows as a plain-text table."""
    out = [f"{'group':<28} {'saved':>9} {'95% interval':>21} {'+bits/w':>8} {'saved/bit':>9}"]
    for r in rows:
        interval = f"[{r['low']:+.5f}, {r['high']:+.5f}]"
        out.append(f"{r['group']:<28} {r['diff']:>+9.5f} {interval:>21} {r['added_bpw']:>8.4f} {_per_bit(r):>9}")
    return out


def markdown_table(rows: list[dict]) -> list[str]:
    """Ranking rows as a Markdown table."""
    out = ["| group | saved | 95% interval | + bits/w | saved per bit |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['group']} | {r['diff']:+.5f} | [{r['low']:+.5f}, {r['high']:+.5f}] | "
                   f"{r['added_bpw']:.4f} | {_per_bit(r)} |")
    return out


def _per_bit(r: dict) -> str:
    return "-" if r["per_bit"] is None or math.isnan(r["per_bit"]) else f"{r['per_bit']:.4f}"


def section(rows: list[dict], top: int):
    """The leaderboard's explain section, ``(name, terminal lines, Markdown lines, JSON data)``:
    for each row carrying a ``sensitivity`` object (--kld-explain on a failed check), its ``top``
    groups; None when no row does. The JSON data: per model label, the bits and positions of the
    study and its top groups (the whole ranking stays in the row)."""
    studies = [(r["label"], r["sensitivity"]) for r in rows if isinstance(r.get("sensitivity"), dict)]
    if not studies:
        return None
    title = f"where the damage comes from (explain): mean {DIRECTION} saved by putting one group back"
    terminal, md, data = ["", title], ["", f"### Where the damage comes from: mean {DIRECTION} saved by putting one "
                                       "group back", ""], {}
    for label, s in studies:
        about = (f"{what(s['bits'])}, {s['positions']} positions in {len(s['chunks'])} chunks, quant mean "
                 f"{_num(s.get('base_mean'))}; top {top} of {len(s['ranking'])} groups")
        terminal += [f"{label}: {about}"] + ["  " + line for line in table(s["ranking"][:top])]
        terminal.append(f"  all groups: pytest-kld sensitivity {s.get('reference')} {s.get('path')}")
        md += [f"**{label}**: {about}", ""] + markdown_table(s["ranking"][:top]) + [""]
        data[label] = {"bits": s["bits"], "positions": s["positions"], "base_mean": s.get("base_mean"),
                       "top": [{k: r[k] for k in ("group", "diff", "low", "high", "added_bpw")}
                               for r in s["ranking"][:top]]}
    return "explain", terminal, md, {"direction": DIRECTION, "models": data}


def _num(v) -> str:
    return "-" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v:.5f}"
