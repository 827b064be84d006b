"""pytest-kld's pytest surface: options, ini keys, the ``kld`` marker, fixtures, the terminal
leaderboard and the JSON report.

Thin by design: no numerics here, and nothing heavy at import time. pytest imports every
installed plugin on every run, so mlx, mlx_lm and numpy are imported only when a test first asks
for a KLD fixture.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time

import pytest

# name: (type, default, help). Each is --kld-<name> and the ini key kld_<name>; the option wins.
# A default of None is described by the help text's own "(default: ...)".
OPTIONS = {
    "reference": (str, None, "reference model: a local MLX model directory or a hub id (default: none; KLD tests error without one)"),
    "revision": (str, None, "hub revision (branch, tag or commit) of the reference (default: the main branch)"),
    "mode": (str, "short", "corpus: short (bundled prompts), long (WikiText-2) or file (--kld-dataset)"),
    "dataset": (str, None, "a .txt, .jsonl or .parquet corpus file (sets mode to file) (default: none)"),
    "top-k": (int, 256, "log-probs kept per scored position in the reference cache"),
    "n-ctx": (int, None, "tokens per chunk (default by mode: short 512, long 2048, file 512)"),
    "n-chunks": (int, None, "first N records (short, file) or at most N chunks (long) (default: all; long 32)"),
    "chunk-tokens": (int, 512, "tokens per forward pass within a chunk (0: whole chunk)"),
    "exec": (str, "auto", "execution precision: auto, native or float32 (dequantised; fast on CPU)"),
    "cache-dir": (str, None, "reference cache directory (default: $PYTEST_KLD_CACHE_DIR or the user cache)"),
    "json": (str, None, "write settings, versions and every result to this JSON file (default: none)"),
    "markdown": (str, None, "write the leaderboard as a Markdown table, e.g. $GITHUB_STEP_SUMMARY (default: none)"),
    "chart": (str, None, "write a PNG chart of mean KLD against bits per weight (default: none)"),
    "lock-timeout": (int, 600, "seconds to wait for another process's reference build once it shows no sign of life"),
}
FLAGS = {
    "rebuild": "rebuild the reference cache once this session, even if a valid one exists",
    "by-category": "add mean KLD per corpus category to the leaderboard",
    "no-chat-template": "short mode: feed prompts as plain text, not through the chat template",
    "trust-remote-code": "allow models whose config names custom Python code",
    "allow-shared-cache": "use a cache directory that other users can write (they could plant entries)",
    "full-hash": "fingerprint weights by their full contents (sha256-full), not headers, sizes and a "
    "sample of 1,024 blocks per file (sha256-sample, which can miss an edit of a few bytes); reads every weight byte",
}
CHOICES = {"mode": ("short", "long", "file"), "exec": ("auto", "native", "float32")}
INT_MINIMUM = {"top_k": 1, "n_ctx": 2, "n_chunks": 1, "chunk_tokens": 0, "lock_timeout": 1}
MARKER_KEYS = {"reference", "revision", "mode", "dataset", "top_k", "n_ctx", "n_chunks", "chunk_tokens", "exec"}
THRESHOLDS_LOW = ("mean", "median", "p90", "p95", "p99", "p99_9", "max")
THRESHOLDS = THRESHOLDS_LOW + ("top1",)
# Integer ini keys are typed where pytest can (8.4+), so native TOML ([tool.pytest]) takes 64.
_INI_INT = "int" if tuple(int(x) for x in pytest.__version__.split(".")[:2] if x.isdigit()) >= (8, 4) else None

_SESSION = pytest.StashKey["KldSession"]()
_ROWS = pytest.StashKey[list]()  # rows recorded by a test item, not yet attached to a report


def pytest_addoption(parser):
    group = parser.getgroup("kld", "KL divergence of quantised models (pytest-kld)")
    for name, (typ, default, help_) in OPTIONS.items():
        shown = "" if default is None else f" (default: {default})"
        key = f"kld_{name.replace('-', '_')}"
        group.addoption(f"--kld-{name}", dest=key, type=typ, default=None,
                        metavar=name.split("-")[-1].upper(), help=f"{help_}{shown}; ini: {key}")
        parser.addini(key, help_ + shown, type=_INI_INT if typ is int else None, default=None)
    for name, help_ in FLAGS.items():
        key = f"kld_{name.replace('-', '_')}"
        group.addoption(f"--kld-{name}", dest=key, action="store_true",
                        default=None, help=f"{help_} (default: off); ini: {key}")
        parser.addini(key, help_ + " (default: false)", type="bool", default=False)


def _one_of(choices) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def _setting(config, name: str):
    """The option's value if given on the command line, else the ini key's, else the default."""
    key = f"kld_{name.replace('-', '_')}"
    value = config.getoption(key, default=None)
    if value is None:
        try:
            value = config.getini(key)
        except (pytest.UsageError, ValueError, TypeError) as e:  # pytest's own words lack the key
            raise pytest.UsageError(f"ini key {key}: {e}") from None
        if value in (None, "", []):
            value = None
        elif name in OPTIONS and OPTIONS[name][0] is int:
            try:
                value = int(value)
            except ValueError:
                raise pytest.UsageError(f"ini key {key} = {value!r} is not an integer") from None
    if value is None:
        value = OPTIONS[name][1] if name in OPTIONS else False
    return value


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "kld(reference=None, mode=None, dataset=None, top_k=None, n_ctx=None, n_chunks=None, "
        "chunk_tokens=None, exec=None): per-test pytest-kld settings",
    )
    settings = {name.replace("-", "_"): _setting(config, name) for name in [*OPTIONS, *FLAGS]}
    for name, choices in CHOICES.items():
        if settings[name] not in choices:
            raise pytest.UsageError(f"--kld-{name} {settings[name]!r}: choose {_one_of(choices)}")
    for name, low in INT_MINIMUM.items():
        if settings[name] is not None and settings[name] < low:
            raise pytest.UsageError(f"--kld-{name.replace('_', '-')} must be at least {low}, got {settings[name]}")
    for name in ("json", "markdown", "chart"):  # fail now, not after an hour of comparisons
        if settings[name]:
            parent = os.path.dirname(os.path.abspath(os.path.expanduser(settings[name])))
            if not os.path.isdir(parent):
                raise pytest.UsageError(f"--kld-{name} {settings[name]}: directory {parent} does not exist")
    workerinput = getattr(config, "workerinput", None)
    start = float(workerinput["kld_session_start"]) if workerinput and "kld_session_start" in workerinput else time.time()
    session = KldSession(config, settings, start)
    config.stash[_SESSION] = session
    config.pluginmanager.register(session, "kld-session")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist controller: hand the session's start time to each worker (one rebuild per session)."""
    session = node.config.stash.get(_SESSION, None)
    if session is not None:
        node.workerinput["kld_session_start"] = session.start


class KldSession:
    """The run's pytest-kld state: settings, loaded caches, rows collected from reports."""

    def __init__(self, config, settings: dict, start: float):
        self.config = config
        self.settings = settings
        self.start = start
        self.caches: dict = {}
        self.rows: list[dict] = []
        self.final_rows: list[dict] = []
        self.report_error: str | None = None

    def effective(self, overrides: dict) -> dict:
        s = dict(self.settings)
        s.update({k: v for k, v in overrides.items() if v is not None})
        if s.get("dataset") and "mode" not in overrides and s["mode"] == "short":
            s["mode"] = "file"
        return s

    def cache(self, s: dict):
        """The reference cache for settings ``s``: built once, loaded once per process."""
        from .corpus import corpus_spec
        from .reference import Settings, ensure_reference

        if not s.get("reference"):
            raise _NoReference()
        spec = corpus_spec(
            s["mode"],
            dataset=s.get("dataset"),
            n_ctx=s.get("n_ctx"),
            n_chunks=s.get("n_chunks"),
            chat_template=not s.get("no_chat_template"),
        )
        settings = Settings(top_k=int(s["top_k"]), chunk_tokens=int(s["chunk_tokens"]), exec=s["exec"])
        full_hash = bool(s.get("full_hash"))
        key = (s["reference"], s.get("revision"), repr(spec), settings, s.get("cache_dir"), full_hash)
        if key not in self.caches:
            try:
                self.caches[key] = ensure_reference(
                    s["reference"],
                    spec,
                    settings,
                    cache_dir=s.get("cache_dir"),
                    revision=s.get("revision"),
                    rebuild_before=self.start if s.get("rebuild") else None,
                    progress=Progress(self.config, f"{s['reference']} [{spec.mode}]"),
                    trust_remote_code=bool(s.get("trust_remote_code")),
                    full_hash=full_hash,
                    lock_timeout=float(s["lock_timeout"]),
                    allow_shared_cache=bool(s.get("allow_shared_cache")),
                    notify=Progress(self.config, "").say,
                )
            except Exception as e:  # remembered: later tests fail fast with the same line
                self.caches[key] = e
        if isinstance(self.caches[key], Exception):
            raise self.caches[key]
        return self.caches[key]

    # -- hooks (this object is registered as a plugin; on the xdist controller it sees every
    #    worker's reports, so the rows of all workers arrive here)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        """Attach the leaderboard rows made during this phase to its report, as a plain
        attribute: xdist serialises it with the report, so the controller receives every
        worker's rows (and JUnit XML stays free of them)."""
        outcome = yield
        rows = item.stash.get(_ROWS, None)
        if rows:
            outcome.get_result().kld_rows = list(rows)
            rows.clear()

    def pytest_runtest_logreport(self, report):
        for row in getattr(report, "kld_rows", None) or ():
            self.rows.append(dict(row, outcome=report.outcome))

    def pytest_sessionfinish(self, session, exitstatus):
        if hasattr(self.config, "workerinput"):
            return
        rows = self.final_rows = _unique_rows(self.rows)
        s = self.settings
        try:
            if s.get("json"):  # written even with no rows: CI that reads it finds the settings
                _write_json(s["json"], self, rows)
            if rows and (s.get("markdown") or s.get("chart")):
                from . import export
                from .report import header_fields

                if s.get("markdown"):  # GitHub's step summary collects; anything else is replaced
                    append = os.environ.get("GITHUB_STEP_SUMMARY") == s["markdown"]
                    export.write_markdown(rows, s["markdown"], header_fields(rows), append=append)
                if s.get("chart"):
                    export.write_chart(rows, s["chart"])
        except Exception as e:  # a report that cannot be written must not pass silently
            self.report_error = f"pytest-kld: could not write a report: {e}"
            if exitstatus == 0:
                session.exitstatus = pytest.ExitCode.INTERNAL_ERROR

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        if hasattr(config, "workerinput") or not self.final_rows:
            return
        try:
            from .report import header_line, leaderboard_lines

            tr = terminalreporter
            tr.write_sep("=", "pytest-kld leaderboard")
            tr.write_line(header_line(self.final_rows))
            for line in leaderboard_lines(self.final_rows, by_category=bool(self.settings.get("by_category"))):
                tr.write_line(line)
            if self.report_error:
                tr.write_line(self.report_error, red=True)
        except Exception as e:  # never raise in the summary
            terminalreporter.write_line(f"pytest-kld: could not print the leaderboard: {e}")


class _NoReference(Exception):
    pass


NO_REFERENCE = (
    "pytest-kld: no reference model set: pass --kld-reference=MODEL (a local MLX model directory "
    "or hub id), set kld_reference in [tool.pytest.ini_options], or use @pytest.mark.kld(reference=...)"
)


class Progress:
    """A build progress line (tokens, tok/s, ETA) on the real terminal, through output capture."""

    def __init__(self, config, label: str):
        self.config = config
        self.label = label
        self.t0 = None
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.time()
        if self.t0 is None or done == 0:
            self.t0, self.last = now, now
            self._write(f"pytest-kld: building reference cache {self.label}: {total} tokens to run", "\n")
            return
        tty = sys.stderr.isatty()
        if done < total and now - self.last < (0.5 if tty else 15.0):
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (total - done) / rate if rate > 0 else math.inf
        line = (
            f"pytest-kld: building reference cache {self.label}: {done}/{total} tokens, "
            f"{rate:,.0f} tok/s, ETA {eta:,.0f}s"
        )
        self._write(line, "\n" if done >= total or not tty else "\r")

    def say(self, line: str) -> None:
        """One line on the real terminal (e.g. whose lock a build waits for)."""
        self._write(line, "\n")

    def _write(self, line: str, end: str) -> None:
        capman = self.config.pluginmanager.getplugin("capturemanager")
        if capman is None:
            self._emit(line, end)
            return
        with capman.global_and_fixture_disabled():
            self._emit(line, end)

    def _emit(self, line: str, end: str) -> None:
        # Start on a fresh line after pytest's "test_x.py ..." progress (not on xdist workers,
        # whose stdout is not the terminal); pytest repeats the file name when it goes on.
        tr = self.config.pluginmanager.getplugin("terminalreporter")
        if tr is not None and not hasattr(self.config, "workerinput") and end == "\n":
            tr.ensure_newline()
            sys.stdout.flush()
        sys.stderr.write(line + end)
        sys.stderr.flush()


def _session(config) -> KldSession:
    return config.stash[_SESSION]


def _marker_overrides(node) -> dict:
    """Settings of the test's ``@pytest.mark.kld`` markers (the closest wins per key), checked."""
    out = {}
    for mark in reversed(list(node.iter_markers("kld"))):
        unknown = set(mark.kwargs) - MARKER_KEYS
        if unknown or mark.args:
            what = f"unknown setting(s) {', '.join(sorted(unknown))}" if unknown else (
                f"positional argument(s) {mark.args!r}; pass settings by keyword"
            )
            pytest.fail(f"@pytest.mark.kld: {what}; known: {', '.join(sorted(MARKER_KEYS))}", pytrace=False)
        out.update(mark.kwargs)
    for key, value in out.items():
        if value is None:
            continue
        if key in INT_MINIMUM and (
            isinstance(value, bool) or not isinstance(value, int) or value < INT_MINIMUM[key]
        ):
            pytest.fail(f"@pytest.mark.kld: {key}={value!r} must be an integer of at least {INT_MINIMUM[key]}", pytrace=False)
        if key in CHOICES and value not in CHOICES[key]:
            pytest.fail(f"@pytest.mark.kld: {key}={value!r}: choose {_one_of(CHOICES[key])}", pytrace=False)
        if key not in INT_MINIMUM and not isinstance(value, (str, os.PathLike)):
            pytest.fail(f"@pytest.mark.kld: {key}={value!r} must be a string", pytrace=False)
    if out.get("reference") is not None:
        out["reference"] = os.fspath(out["reference"])
    if out.get("dataset") is not None:
        out["dataset"] = os.fspath(out["dataset"])
    return out


@pytest.fixture(scope="session")
def kld_session(pytestconfig) -> KldSession:
    """The run's pytest-kld state (settings as resolved from options and ini keys)."""
    return _session(pytestconfig)


def _cache_for(kld_session, s):
    __tracebackhide__ = True
    from .errors import KldError

    try:
        return kld_session.cache(s)
    except _NoReference:
        message = NO_REFERENCE
    except KldError as e:
        message = str(e)
    pytest.fail(message, pytrace=False)  # outside the except: no chained traceback


@pytest.fixture(scope="session")
def kld_reference(kld_session):
    """The session's reference cache (a ReferenceCache): built lazily on first use, under a file
    lock, so xdist workers build it once and all load the same bytes."""
    return _cache_for(kld_session, kld_session.effective({}))


@pytest.fixture
def kld_compare(request, kld_session):
    """``kld_compare(model, *, name=None, exec=None, nonfinite=0) -> KldResult``: compare with
    no KLD thresholds (the test's ``@pytest.mark.kld`` settings apply). A model whose log-probs
    are NaN or inf at more than ``nonfinite`` positions is broken: the test fails."""
    s = kld_session.effective(_marker_overrides(request.node))
    cache = _cache_for(kld_session, s)

    def run(model, *, name=None, exec=None, nonfinite=0):
        __tracebackhide__ = True
        allowed = _allowed_nonfinite(nonfinite, "kld_compare")
        result = _compare(request.node, cache, s, model, name=name, exec=exec)
        line = nonfinite_line(result, allowed)
        if line:
            pytest.fail(f"{result.model} is broken: {line}", pytrace=False)
        return result

    run.cache, run.settings = cache, s  # assert_kld compares through the same cache and settings
    return run


def _compare(node, cache, s: dict, model, *, name=None, exec=None):
    """One comparison for a test, recorded for the leaderboard; a KldError fails the test."""
    __tracebackhide__ = True
    from .compare import compare
    from .errors import KldError

    try:
        result = compare(
            cache,
            model,
            exec=exec or (None if s["exec"] == "auto" else s["exec"]),
            chunk_tokens=int(s["chunk_tokens"]),
            name=name,
            trust_remote_code=bool(s.get("trust_remote_code")),
            full_hash=bool(s.get("full_hash")),
        )
    except KldError as e:
        result, message = None, str(e)
    if result is None:
        pytest.fail(message, pytrace=False)
    _record(node, result)
    return result


def _allowed_nonfinite(value, where: str) -> int:
    __tracebackhide__ = True
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        pytest.fail(f"{where}: nonfinite={value!r} must be a whole number of positions, at least 0", pytrace=False)
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


def _record(node, result) -> None:
    """Per-test figures into ``user_properties`` (JUnit XML ``<property>``, xdist reports);
    the full leaderboard row into the item's stash (attached to the report by the session)."""
    from .report import result_row

    row = json.loads(json.dumps(result_row(result), default=_jsonable))  # plain, serialisable
    row["nodeid"] = node.nodeid
    s = result.summary
    props = [("kld_model", result.model), ("kld_reference", result.reference.get("name"))]
    props += [(f"kld_{k}", s[k]) for k in ("mean", "median", "p95", "p99", "max", "top1") if s.get(k) is not None]
    props += [("kld_positions", s.get("count", 0) + s.get("nonfinite", 0)), ("kld_nonfinite", s.get("nonfinite", 0))]
    if row.get("bpw") is not None:
        props.append(("kld_bits_per_weight", row["bpw"]))
    node.user_properties.extend(props)
    node.stash.setdefault(_ROWS, []).append(row)


def _jsonable(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def check_thresholds(result, thresholds: dict, categories: dict | None = None) -> tuple[list[str], int]:
    """One line per threshold, observed against allowed, and the number broken."""
    lines, broken = [], 0

    def check(summary: dict, limits: dict, where: str):
        nonlocal broken
        for key, allowed in limits.items():
            got = summary.get(key)
            if got is None or (isinstance(got, float) and math.isnan(got)):
                broken += 1
                lines.append(f"{where}{key}: no value (no finite positions); allowed {allowed:.6g}  FAILED")
            elif key == "top1":
                ok = got >= allowed
                broken += not ok
                lines.append(f"{where}top1: {got:.4f} {'>=' if ok else '<'} minimum {allowed:.4f}  {'ok' if ok else 'FAILED'}")
            else:
                ok = got <= allowed
                broken += not ok
                by = f" (+{got / allowed - 1:.0%})" if not ok and allowed > 0 else ""
                lines.append(f"{where}{key}: {got:.6g} {'<=' if ok else '>'} allowed {allowed:.6g}{by}  {'ok' if ok else 'FAILED'}")

    check(result.summary, thresholds, "")
    for cat, limits in (categories or {}).items():
        if cat not in result.categories:
            broken += 1
            lines.append(f"category {cat!r}: not in this corpus (has: {', '.join(sorted(result.categories))})  FAILED")
            continue
        check(result.categories[cat], limits, f"[{cat}] ")
    return lines, broken


def validate_thresholds(limits: dict, where: str = "assert_kld") -> dict:
    """Refuse unknown keywords and nonsensical values with one line; any real number type
    (int, float, numpy scalars, Fraction, Decimal) is accepted."""
    from .errors import ThresholdError

    out = {}
    for key, value in limits.items():
        if key not in THRESHOLDS:
            raise ThresholdError(f"{where}: unknown threshold {key!r}; known: {', '.join(THRESHOLDS)}")
        if value is None:
            continue
        number = _real(value)
        if number is None or not math.isfinite(number):
            raise ThresholdError(f"{where}: threshold {key}={value!r} must be a finite number")
        if number < 0:
            raise ThresholdError(f"{where}: threshold {key}={value!r} is negative; KLD is never below 0")
        if key == "top1" and number > 1:
            raise ThresholdError(f"{where}: threshold top1={value!r} is a fraction and must be at most 1")
        out[key] = number
    return out


def _real(value) -> float | None:
    """``value`` as a float if it is a real number (not a bool), else None; inf if too large."""
    # Real numbers: int, float, Fraction, numpy scalars (numbers.Real) and Decimal (a Number
    # that is not Complex); never bool, str or complex.
    real = isinstance(value, numbers.Real) or (
        isinstance(value, numbers.Number) and not isinstance(value, numbers.Complex)
    )
    if isinstance(value, bool) or not real:
        try:  # numpy scalars register as numbers.Real; 0-d arrays and the like do not
            import numpy as np

            if not (isinstance(value, np.generic) and np.issubdtype(type(value), np.number)):
                return None
        except ImportError:
            return None
    try:
        return float(value)
    except OverflowError:
        return math.inf
    except (TypeError, ValueError):
        return None


@pytest.fixture
def assert_kld(request, kld_session, kld_compare):
    """``assert_kld(model, *, mean=None, median=None, p90=None, p95=None, p99=None, p99_9=None,
    max=None, top1=None, categories=None, name=None, exec=None) -> KldResult``

    Compares ``model`` with the reference and fails the test, in one message, listing every
    threshold with its observed value: KLD figures (nats, KL(reference || quant)) must be at most
    their value, top1 (the share of positions where both models' top token agree) at least its
    value. ``categories`` maps a corpus category to its own thresholds, e.g.
    ``{"code": {"mean": 0.05}}``. Positions where the model's log-probs are NaN or inf fail the
    test too. The reference is set up before the test runs (a missing one is a setup error).
    """
    from .errors import KldError

    def run(model, *args, categories=None, name=None, exec=None, nonfinite=0, **limits):
        __tracebackhide__ = True
        message = None
        allowed = _allowed_nonfinite(nonfinite, "assert_kld")
        try:
            if args:
                raise KldError(
                    f"assert_kld: thresholds are keywords, e.g. assert_kld(model, mean=0.1, p99=1.0); "
                    f"got positional {', '.join(map(repr, args))}"
                )
            thresholds = validate_thresholds(limits)
            cats = {}
            if categories is not None and not isinstance(categories, dict):
                raise KldError(f"assert_kld: categories must be a dict of category -> thresholds, got {categories!r}")
            for cat, lim in (categories or {}).items():
                if not isinstance(lim, dict):
                    raise KldError(f"assert_kld: categories[{cat!r}] must be a dict of thresholds, got {lim!r}")
                cats[cat] = validate_thresholds(lim, f"assert_kld categories[{cat!r}]")
        except KldError as e:
            message = str(e)
        if message:
            pytest.fail(message, pytrace=False)
        result = _compare(request.node, kld_compare.cache, kld_compare.settings, model, name=name, exec=exec)
        lines, broken = check_thresholds(result, thresholds, cats)
        s = result.summary
        bad = int(s.get("nonfinite") or 0)
        total = s.get("count", 0) + bad
        nan_line = nonfinite_line(result, allowed)
        if nan_line:
            broken += 1
            lines.insert(0, f"{nan_line}  FAILED")
        if broken:
            st, corpus = result.settings, result.settings.get("corpus") or {}
            what = "broken model" if nan_line and broken == 1 else "KLD over threshold"
            head = f"{what} for {result.model} against {result.reference.get('name')}: {broken} of {len(lines)} checks failed"
            where = (
                f"{result.direction} in nats over {total} scored positions; mode {corpus.get('mode')}, "
                f"K={st.get('top_k')}, n_ctx {corpus.get('n_ctx', '-')}, exec {result.exec}, "
                f"chunk_tokens {st.get('chunk_tokens')}"
            )
            hint = (
                "The model is broken (NaN/inf), so no threshold can make it pass."
                if nan_line and broken == 1
                else "If the new figures are expected, raise the thresholds in the test."
            )
            pytest.fail("\n".join([head, *("  " + ln for ln in lines), "  " + where, hint]), pytrace=False)
        return result

    return run


def _unique_rows(rows: list[dict]) -> list[dict]:
    """One row per (model, reference, mode, K, exec); a failed outcome wins over a pass."""
    out: dict = {}
    for r in rows:
        key = (r.get("path"), r.get("reference"), r.get("mode"), r.get("top_k"), r.get("exec"))
        if key not in out or r.get("outcome") == "failed":
            out[key] = r
    return list(out.values())


def _write_json(path: str, kld: KldSession, rows: list[dict]) -> None:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("pytest-kld", "mlx", "mlx-lm", "numpy", "pytest", "huggingface_hub"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    doc = {
        "direction": "KL(reference || quant)",
        "settings": {k: v for k, v in kld.settings.items()},
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": sys.platform,
        "results": rows,
    }
    from .files import write_text

    # strict JSON: NaN and inf become null
    write_text(path, json.dumps(_strict(json.loads(json.dumps(doc, default=_jsonable))), indent=2, allow_nan=False))


def _strict(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_strict(v) for v in x]
    return x


