"""The two comparison fixtures' callables: ``kld_compare`` (no KLD thresholds) and
``assert_kld`` (thresholds), as objects with real signatures. A failure is one message through
``pytest.fail`` (no traceback into pytest-kld); every comparison is recorded for the leaderboard,
JUnit XML (``user_properties``) and xdist."""

from __future__ import annotations

import pytest

from .errors import KldError
from .thresholds import allowed_nonfinite, evaluate, nonfinite_line, validate, validate_categories

JUNIT_FIGURES = ("mean", "se", "se_cluster", "ci95_low", "ci95_high", "median", "p95", "p99", "p99_ci95_low",
                 "p99_ci95_high", "max", "top1")


class KldCompare:
    """``kld_compare(model, *, nonfinite=0, name=None, exec=None, revision=None) -> KldResult``:
    compare with no KLD thresholds (the test's ``@pytest.mark.kld`` settings apply). A model whose
    log-probs are NaN or inf at more than ``nonfinite`` positions is broken: the test fails.
    ``revision`` pins a hub model (branch, tag or commit)."""

    def __init__(self, node, session, settings: dict, cache):
        self.node, self.session, self.settings, self.cache = node, session, settings, cache

    def __call__(self, model, *, nonfinite: int = 0, name: str | None = None, exec: str | None = None,
                 revision: str | None = None):
        __tracebackhide__ = True
        allowed = _or_fail(lambda: allowed_nonfinite(nonfinite, "kld_compare"))
        result = self.compare(model, name=name, exec=exec, revision=revision, thresholds={"nonfinite": allowed})
        line = nonfinite_line(result, allowed)
        if line:
            pytest.fail(f"{result.model} is broken: {line}", pytrace=False)
        return result

    def compare(self, model, *, name=None, exec=None, revision=None, thresholds: dict | None = None):
        """One comparison, recorded; a KldError fails the test in one line."""
        __tracebackhide__ = True
        result = self.run(model, name=name, exec=exec, revision=revision)
        self.record(result, thresholds)
        return result

    def run(self, model, *, name=None, exec=None, revision=None):
        """One comparison, not yet recorded; a KldError fails the test in one line."""
        __tracebackhide__ = True
        from .run import compare_model

        label = f"comparing {name or model}"
        return _or_fail(lambda: compare_model(self.cache, self.settings, model, name=name, exec=exec,
                                              revision=revision, progress=self.session.progress(label)))

    def record(self, result, thresholds: dict | None, baseline: dict | None = None,
               sensitivity: dict | None = None) -> None:
        from .run import row

        r = row(result, thresholds=thresholds)
        r["nodeid"] = self.node.nodeid
        if baseline is not None:
            r["baseline"] = baseline
        if sensitivity is not None:  # --kld-explain on a failure (pytest_kld.sensitivity.public)
            r["sensitivity"] = sensitivity
        s = result.summary
        props = [("kld_model", result.model), ("kld_reference", result.reference.get("name")),
                 ("kld_direction", "KL(reference || quant)"), ("kld_exec", result.exec)]
        props += [(f"kld_{k}", s[k]) for k in JUNIT_FIGURES if s.get(k) is not None]
        props += [("kld_positions", s.get("count", 0) + s.get("nonfinite", 0)), ("kld_nonfinite", s.get("nonfinite", 0))]
        props += [(f"kld_threshold_{k}", v) for k, v in (thresholds or {}).items()]
        if r.get("bpw") is not None:
            props.append(("kld_bits_per_weight", r["bpw"]))
        if baseline is not None:
            props.append(("kld_baseline", baseline["verdict"]))
            for figure, f in (baseline.get("figures") or {}).items():
                props += [(f"kld_baseline_{figure}_{k}", f[k]) for k in ("baseline", "diff", "low", "high", "allowed")]
        self.session.record(self.node, r, props)


class AssertKld:
    """``assert_kld(model, *, mean=None, median=None, p90=None, p95=None, p99=None, p99_9=None,
    max=None, top1=None, drift_match=None, drift_kld=None, categories=None, nonfinite=0, name=None,
    exec=None, revision=None, baseline=True, baseline_fail=None) -> KldResult``

    Compares ``model`` with the reference and fails the test, in one message, listing every
    threshold with its observed value: KLD figures (nats, KL(reference || quant)) must be at most
    their value, top1 (the share of positions where both models' top token agree) at least its
    value; a value equal to its threshold passes. In drift mode (``@pytest.mark.kld(mode="drift")``),
    ``drift_match`` is a lower bound on the mean number of tokens the quant's own greedy
    continuation stays with the reference's, ``drift_kld`` an upper bound on the mean KLD along the
    reference's continuation (:mod:`pytest_kld.drift`). ``categories`` maps a corpus category to its own
    thresholds, e.g. ``{"code": {"mean": 0.05}}``. More than ``nonfinite`` positions with NaN or inf
    log-probs fail the test too (a broken model). The reference is set up before the test runs (a
    missing one is a setup error).

    With a baselines directory (``--kld-baselines``, or ``kld_baselines/`` under the rootdir), the
    quant is also checked against its baseline — the slot is the test and ``name`` (or the model's
    short name) — and fails when it is worse beyond the paired interval and beyond ``baseline_fail``
    (``"mean:5%,p99:10%"`` by default; see :mod:`pytest_kld.regression`). A missing baseline fails,
    naming ``--kld-update-baselines``, which records instead of checking. ``baseline=False``: this
    call is not gated on a baseline.
    """

    def __init__(self, compare: KldCompare):
        self._compare = compare

    def __call__(
        self,
        model,
        /,
        *positional,
        mean=None,
        median=None,
        p90=None,
        p95=None,
        p99=None,
        p99_9=None,
        max=None,
        top1=None,
        drift_match=None,
        drift_kld=None,
        categories: dict | None = None,
        nonfinite: int = 0,
        name: str | None = None,
        exec: str | None = None,
        revision: str | None = None,
        baseline: bool = True,
        baseline_fail=None,
        **unknown,
    ):
        __tracebackhide__ = True
        from .regression import gate, parse_tolerance

        limits = dict(mean=mean, median=median, p90=p90, p95=p95, p99=p99, p99_9=p99_9, max=max, top1=top1,
                      drift_match=drift_match, drift_kld=drift_kld)
        settings = self._compare.settings

        def checked():
            if positional:
                raise KldError(
                    "assert_kld: thresholds are keywords, e.g. assert_kld(model, mean=0.1, p99=1.0); "
                    f"got positional {', '.join(map(repr, positional))}"
                )
            if not isinstance(baseline, bool):
                raise KldError(f"assert_kld: baseline={baseline!r} must be True or False")
            spec = settings["baseline_fail"] if baseline_fail is None else baseline_fail
            parse_tolerance(spec, "assert_kld: baseline_fail" if baseline_fail is not None else "--kld-baseline-fail")
            return validate({**limits, **unknown}), validate_categories(categories), allowed_nonfinite(
                nonfinite, "assert_kld"), spec

        thresholds, cats, allowed, spec = _or_fail(checked)
        result = self._compare.run(model, name=name, exec=exec, revision=revision)
        entry, gate_message = (None, None)
        if baseline:
            from .report import display_name

            slot = name or display_name(str(model))
            entry, gate_message = _or_fail(lambda: gate(settings, self._compare.node.nodeid, slot, result, spec))
        message = "\n".join(m for m in (evaluate(result, thresholds, cats, allowed), gate_message) if m)
        text, ranking = self._explain(result) if message and settings.get("explain") else (None, None)
        self._compare.record(result, {**thresholds, "nonfinite": allowed}, entry, ranking)
        if text:
            message += "\n" + text
        if message:
            pytest.fail(message, pytrace=False)
        return result

    def _explain(self, result) -> tuple[str, dict | None]:
        """--kld-explain: the groups of tensors whose damage matters most (pytest_kld.sensitivity)."""
        from .options import EXPLAIN_TOP, SENSITIVITY_BITS, SENSITIVITY_BUDGET
        from .sensitivity import explain

        label = f"sensitivity of {result.model}"
        return explain(self._compare.cache, result.path, top=EXPLAIN_TOP, bits=SENSITIVITY_BITS,
                       budget=SENSITIVITY_BUDGET, progress=self._compare.session.progress(label))


def _or_fail(fn):
    """``fn()``, or the test failed with the KldError's one line (no chained traceback)."""
    __tracebackhide__ = True
    try:
        return fn()
    except KldError as e:
        message = str(e)
    pytest.fail(message, pytrace=False)
