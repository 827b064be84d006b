"""The per-model step, the same for the pytest fixture and the command line:

    settings checked ─► (per model) compare ─► baseline gate ─► thresholds ─► row

:func:`prepare` checks a run's settings before any work (every option, the output directories,
the baseline tolerance) and resolves the baselines directory; :func:`limits` validates one call's
thresholds; :func:`measure` runs one model through compare, gate and thresholds and returns the
result, its leaderboard row and the failure message (None when it passes). What to do with a
failure is the caller's: ``pytest.fail`` (assertion.py) or an exit status (cli.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import KldError


def prepare(s: dict, *, prefix: str, root) -> dict:
    """``s`` checked (one KldError line naming the option as ``prefix`` spells it: ``--kld-`` or
    ``--``) with its baselines directory resolved under ``root``."""
    from .options import OPTIONS, check
    from .regression import parse_tolerance
    from .run import baselines_dir, output_paths

    for o in OPTIONS:
        why = check(o.dest, s.get(o.dest), f"{prefix}{o.name}")
        if why:
            raise KldError(why)
    output_paths(s, prefix=prefix)
    parse_tolerance(s["baseline_fail"], f"{prefix}baseline-fail")
    return dict(s, baselines=baselines_dir(s.get("baselines"), root, bool(s.get("update_baselines"))))


@dataclass(frozen=True)
class Limits:
    """One call's checks, validated: thresholds by figure, per-category thresholds, the non-finite
    positions allowed, the baseline tolerance (None: no baseline gate)."""

    thresholds: dict
    categories: dict
    nonfinite: int
    tolerance: str | None

    @property
    def recorded(self) -> dict:
        """The row's ``thresholds``: every threshold and the non-finite allowance."""
        return {**self.thresholds, "nonfinite": self.nonfinite}


def limits(s: dict, thresholds: dict, *, categories=None, nonfinite=0, baseline: bool = True,
           baseline_fail=None, where: str = "assert_kld") -> Limits:
    """The checks of one call, validated (one KldError line for a bad one); the tolerance is
    ``baseline_fail`` or the run's ``--kld-baseline-fail``."""
    from .regression import parse_tolerance
    from .thresholds import allowed_nonfinite, validate, validate_categories

    if not isinstance(baseline, bool):
        raise KldError(f"{where}: baseline={baseline!r} must be True or False")
    spec = s["baseline_fail"] if baseline_fail is None else baseline_fail
    parse_tolerance(spec, f"{where}: baseline_fail" if baseline_fail is not None else "--kld-baseline-fail")
    return Limits(validate(thresholds, where), validate_categories(categories, where),
                  allowed_nonfinite(nonfinite, where), spec if baseline else None)


@dataclass
class Measured:
    result: object  # the KldResult
    row: dict  # its leaderboard row, with the gate's "baseline" entry
    message: str | None  # the failure: thresholds and baseline, one message; None: passed


def measure(cache, s: dict, model, checks: Limits, *, test: str, name=None, exec=None, revision=None,
            progress=None, explain_progress=None) -> Measured:
    """One model: compared with the cache, gated on its baseline (slot: ``test`` and ``name`` or
    the model's short name), checked against its thresholds, made a row. A failure with
    ``s["explain"]`` set is explained: the groups of tensors that cause the KLD end the message and
    the row carries the study (:func:`pytest_kld.sensitivity.explain`)."""
    from .board import display_name
    from .regression import gate
    from .run import compare_model, row
    from .thresholds import evaluate

    result = compare_model(cache, s, model, name=name, exec=exec, revision=revision, progress=progress)
    entry, gate_message = None, None
    if checks.tolerance is not None:
        slot = name or display_name(str(model))
        entry, gate_message = gate(s, test, slot, result, checks.tolerance)
    failed = evaluate(result, checks.thresholds, checks.categories, checks.nonfinite)
    message = "\n".join(m for m in (failed, gate_message) if m) or None
    r = row(result, "failed" if message else "passed", checks.recorded)
    if entry is not None:
        r["baseline"] = entry
    if message and s.get("explain"):
        from .options import EXPLAIN_TOP, SENSITIVITY_BITS, SENSITIVITY_BUDGET
        from .sensitivity import explain

        text, study = explain(cache, result.path, top=EXPLAIN_TOP, bits=SENSITIVITY_BITS, budget=SENSITIVITY_BUDGET,
                              progress=explain_progress)
        if study is not None:
            r["sensitivity"] = study
        message += "\n" + text
    return Measured(result, r, message)
