"""Thresholds: validated once, checked against a result, each line observed against allowed.
Shared by ``assert_kld`` and the command line. No pytest, no mlx."""

from __future__ import annotations

import math
import numbers

from .errors import ThresholdError
from .options import real_number, thresholds


def bounds() -> dict[str, str]:
    """``{threshold name: "upper" or "lower"}``, from the figures table (options.FIGURES) as it is now."""
    return {f.name: f.bound for f in thresholds()}


def validate(limits: dict, where: str = "assert_kld") -> dict:
    """``{name: float}`` of the thresholds given; one line for an unknown name or a value that
    is not a finite, non-negative real number (top1 at most 1)."""
    out, bound = {}, bounds()
    for key, value in limits.items():
        if key not in bound:
            raise ThresholdError(f"{where}: unknown threshold {key!r}; known: {', '.join(bound)}")
        if value is None:
            continue
        number = real_number(value)
        if number is None or not math.isfinite(number):
            raise ThresholdError(f"{where}: threshold {key}={value!r} must be a finite number")
        if number < 0:
            raise ThresholdError(f"{where}: threshold {key}={value!r} is negative; KLD is never below 0")
        if key == "top1" and number > 1:
            raise ThresholdError(f"{where}: threshold top1={value!r} is a fraction and must be at most 1")
        out[key] = number
    return out


def validate_categories(categories, where: str = "assert_kld") -> dict:
    if categories is None:
        return {}
    if not isinstance(categories, dict):
        raise ThresholdError(f"{where}: categories must be a dict of category -> thresholds, got {categories!r}")
    out = {}
    for cat, lim in categories.items():
        if not isinstance(lim, dict):
            raise ThresholdError(f"{where}: categories[{cat!r}] must be a dict of thresholds, got {lim!r}")
        out[cat] = validate(lim, f"{where} categories[{cat!r}]")
    return out


def allowed_nonfinite(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ThresholdError(f"{where}: nonfinite={value!r} must be a whole number of positions, at least 0")
    return int(value)


def nonfinite_line(result, allowed: int = 0) -> str | None:
    """The failure line of a model with more NaN/inf positions than ``allowed``, else None."""
    s = result.summary
    bad = int(s.get("nonfinite") or 0)
    if bad <= allowed:
        return None
    total = int(s.get("count") or 0) + bad
    return (
        f"{bad} of {total} positions ({bad / max(total, 1):.1%}) had NaN or inf log-probs, more than the "
        f"{allowed} allowed; a model that computes NaN or inf is broken, not over a budget "
        "(check the weights and the quantisation; nonfinite=N allows N such positions)"
    )


def check(result, thresholds: dict, categories: dict | None = None) -> tuple[list[str], int]:
    """One line per threshold, observed against allowed, and the number broken. A value equal to
    its threshold passes."""
    lines: list[str] = []
    broken = _check(result.summary, thresholds, "", lines)
    for cat, limits in (categories or {}).items():
        if cat not in result.categories:
            broken += 1
            lines.append(f"category {cat!r}: not in this corpus (has: {', '.join(sorted(result.categories))})  FAILED")
            continue
        broken += _check(result.categories[cat], limits, f"[{cat}] ", lines)
    return lines, broken


def _check(summary: dict, limits: dict, where: str, lines: list[str]) -> int:
    broken, bound = 0, bounds()
    for key, allowed in limits.items():
        got = summary.get(key)
        if got is None and key.startswith("drift"):
            broken += 1
            lines.append(f"{where}{key}: measured only in drift mode (--kld-mode=drift, or "
                         "@pytest.mark.kld(mode='drift'))  FAILED")
        elif got is None or (isinstance(got, float) and math.isnan(got)):
            broken += 1
            lines.append(f"{where}{key}: no value (no finite positions); allowed {allowed:.6g}  FAILED")
        elif bound[key] == "lower":
            ok = got >= allowed
            broken += not ok
            lines.append(f"{where}{key}: {got:.4f} {'>=' if ok else '<'} minimum {allowed:.4f}  {'ok' if ok else 'FAILED'}")
        else:
            ok = got <= allowed
            broken += not ok
            by = f" (+{got / allowed - 1:.0%})" if not ok and allowed > 0 else ""
            lines.append(f"{where}{key}: {got:.6g} {'<=' if ok else '>'} allowed {allowed:.6g}{by}  {'ok' if ok else 'FAILED'}")
    return broken


def failure_message(result, lines: list[str], broken: int, nan_line: str | None) -> str:
    """The one message of a failed check: what failed, every check, where, what to do."""
    st, corpus = result.settings, result.settings.get("corpus") or {}
    s = result.summary
    total = s.get("count", 0) + int(s.get("nonfinite") or 0)
    only_nan = bool(nan_line) and broken == 1
    what = "broken model" if only_nan else "KLD over threshold"
    head = f"{what} for {result.model} against {result.reference.get('name')}: {broken} of {len(lines)} checks failed"
    where = (
        f"{result.direction} in nats over {total} scored positions; mode {corpus.get('mode')}, "
        f"K={st.get('top_k')}, n_ctx {corpus.get('n_ctx', '-')}, exec {result.exec}, "
        f"chunk_tokens {st.get('chunk_tokens')}"
    )
    hint = (
        "The model is broken (NaN/inf), so no threshold can make it pass."
        if only_nan
        else "If the new figures are expected, raise the thresholds in the test."
    )
    return "\n".join([head, *("  " + ln for ln in lines), "  " + where, hint])


def evaluate(result, thresholds: dict, categories: dict | None = None, nonfinite: int = 0) -> str | None:
    """The failure message of ``result`` against its thresholds, or None when it passes."""
    lines, broken = check(result, thresholds, categories)
    nan_line = nonfinite_line(result, nonfinite)
    if nan_line:
        broken += 1
        lines.insert(0, f"{nan_line}  FAILED")
    return failure_message(result, lines, broken, nan_line) if broken else None
