"""The two comparison fixtures' callables: ``kld_compare`` (no KLD thresholds) and
``assert_kld`` (thresholds), as objects with real signatures. A failure is one message through
``pytest.fail`` (no traceback into pytest-kld); every comparison is recorded for the leaderboard,
JUnit XML (``user_properties``) and xdist."""

from __future__ import annotations

import inspect

import pytest

from . import options
from .errors import KldError
from .thresholds import nonfinite_line

JUNIT_FIGURES = ("mean", "se", "se_cluster", "ci95_low", "ci95_high", "median", "p95", "p99", "p99_ci95_low",
                 "p99_ci95_high", "max", "top1")


class KldCompare:
    """``kld_compare(model, *, nonfinite=0, name=None, exec=None, revision=None) -> KldResult``:
    compare with no KLD thresholds (the test's ``@pytest.mark.kld`` settings apply). A model whose
    log-probs are NaN or inf at more than ``nonfinite`` positions is broken: the test fails.
    ``revision`` pins a hub model (branch, tag or commit)."""

    def __init__(self, node, session, settings: dict, cache):
        self.node, self.session, self.settings, self.cache = node, session, settings, cache
        self.slots: dict[str, str] = {}  # baseline slot -> the model this test's assert_kld gave it

    def __call__(self, model, *, nonfinite: int = 0, name: str | None = None, exec: str | None = None,
                 revision: str | None = None):
        __tracebackhide__ = True
        from .step import limits

        checks = _or_fail(lambda: limits(self.settings, {}, nonfinite=nonfinite, baseline=False, where="kld_compare"))
        result = self.measure(model, checks, name=name, exec=exec, revision=revision).result
        line = nonfinite_line(result, checks.nonfinite)
        if line:
            pytest.fail(f"{result.model} is broken: {line}", pytrace=False)
        return result

    def measure(self, model, checks, *, name=None, exec=None, revision=None):
        """The per-model step (:func:`pytest_kld.step.measure`), recorded; a KldError fails the test
        in one line."""
        __tracebackhide__ = True
        from .step import measure

        label = f"comparing {name or model}"
        m = _or_fail(lambda: measure(self.cache, self.settings, model, checks, test=self.node.nodeid, name=name,
                                     exec=exec, revision=revision, progress=self.session.progress(label),
                                     explain_progress=self.session.progress(f"sensitivity of {name or model}")))
        self.record(m.row, m.result)
        return m

    def record(self, r: dict, result) -> None:
        """The row for the leaderboard (travelling on the test's report) and the figures as the
        test's ``user_properties`` (JUnit XML)."""
        r["nodeid"] = self.node.nodeid
        s, baseline = result.summary, r.get("baseline")
        figures = (*JUNIT_FIGURES, *(f.name for f in options.FIGURES if f.name not in JUNIT_FIGURES))
        props = [("kld_model", result.model), ("kld_reference", result.reference.get("name")),
                 ("kld_direction", "KL(reference || quant)"), ("kld_exec", result.exec)]
        props += [(f"kld_{k}", s[k]) for k in figures if s.get(k) is not None]
        props += [("kld_positions", s.get("count", 0) + s.get("nonfinite", 0)), ("kld_nonfinite", s.get("nonfinite", 0))]
        props += [(f"kld_threshold_{k}", v) for k, v in (r.get("thresholds") or {}).items()]
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
    value; a value equal to its threshold passes. The thresholds are the figures table's
    (:data:`pytest_kld.options.FIGURES`; ``inspect.signature`` lists them). In drift mode
    (``@pytest.mark.kld(mode="drift")``), ``drift_match`` is a lower bound on the mean number of
    tokens the quant's own greedy continuation stays with the reference's, ``drift_kld`` an upper
    bound on the mean KLD along the reference's continuation (:mod:`pytest_kld.drift`).
    ``categories`` maps a corpus category to its own thresholds, e.g. ``{"code": {"mean": 0.05}}``.
    More than ``nonfinite`` positions with NaN or inf log-probs fail the test too (a broken model).
    The reference is set up before the test runs (a missing one is a setup error).

    With a baselines directory (``--kld-baselines``, or ``kld_baselines/`` under the rootdir), the
    quant is also checked against its baseline — the slot is the test and ``name`` (or the model's
    short name) — and fails when it is worse beyond the paired interval and beyond ``baseline_fail``
    (``"mean:5%,p99:10%"`` by default; see :mod:`pytest_kld.regression`). A missing baseline fails,
    naming ``--kld-update-baselines``, which records instead of checking. ``baseline=False``: this
    call is not gated on a baseline.
    """

    def __init__(self, compare: KldCompare):
        self._compare = compare

    @property
    def __signature__(self) -> inspect.Signature:
        """The call's real signature: the model, one keyword per threshold of the figures table, the rest."""
        kw = inspect.Parameter.KEYWORD_ONLY
        params = [inspect.Parameter("model", inspect.Parameter.POSITIONAL_ONLY)]
        params += [inspect.Parameter(f.name, kw, default=None) for f in options.thresholds()]
        params += [inspect.Parameter(k, kw, default=v) for k, v in (
            ("categories", None), ("nonfinite", 0), ("name", None), ("exec", None), ("revision", None),
            ("baseline", True), ("baseline_fail", None))]
        return inspect.Signature(params)

    def __call__(self, model, /, *positional, categories: dict | None = None, nonfinite: int = 0,
                 name: str | None = None, exec: str | None = None, revision: str | None = None,
                 baseline: bool = True, baseline_fail=None, **thresholds):
        __tracebackhide__ = True
        from .step import limits

        def checked():
            if positional:
                raise KldError(
                    "assert_kld: thresholds are keywords, e.g. assert_kld(model, mean=0.1, p99=1.0); "
                    f"got positional {', '.join(map(repr, positional))}"
                )
            return limits(self._compare.settings, thresholds, categories=categories, nonfinite=nonfinite,
                          baseline=baseline, baseline_fail=baseline_fail)

        checks = _or_fail(checked)
        if checks.tolerance is not None and self._compare.settings.get("baselines"):
            _or_fail(lambda: self._slot(model, name))  # two models of one test in one slot: an error
        m = self._compare.measure(model, checks, name=name, exec=exec, revision=revision)
        if m.message:
            pytest.fail(m.message, pytrace=False)
        return m.result

    def _slot(self, model, name) -> str:
        """The call's baseline slot: ``name`` or the model's short name; two models of one test
        in one slot (directories with the same last name, no ``name=``) are an error."""
        from .board import display_name

        slot = name or display_name(str(model))
        first = self._compare.slots.setdefault(slot, str(model))
        if first != str(model):
            raise KldError(f"assert_kld: {self._compare.node.nodeid} compares {first} and {model} under one "
                           f"baseline slot {slot!r}; give each call its own name=, e.g. name='{slot}-2'")
        return slot

def _or_fail(fn):
    """``fn()``, or the test failed with the KldError's one line (no chained traceback)."""
    __tracebackhide__ = True
    try:
        return fn()
    except KldError as e:
        message = str(e)
    pytest.fail(message, pytrace=False)
