"""pytest-kld's pytest surface: options and ini keys (from :mod:`pytest_kld.options`), the
``kld`` marker, the fixtures, and the session object that collects rows and writes reports
(:mod:`pytest_kld.session`).

Thin by design: no numerics here, and nothing heavy at import time. pytest imports every
installed plugin on every run, so mlx, mlx_lm and numpy are imported only when a test first asks
for a KLD fixture.
"""

from __future__ import annotations

import os
import time

import pytest

from .errors import KldError
from .options import MARKER_KEYS, OPTIONS, check
from .session import NO_REFERENCE, KldSession, NoReference

# Integer ini keys are typed where pytest can (8.4+), so native TOML ([tool.pytest]) takes 64.
_INI_INT = "int" if tuple(int(x) for x in pytest.__version__.split(".")[:2] if x.isdigit()) >= (8, 4) else None

_SESSION = pytest.StashKey[KldSession]()


def pytest_addoption(parser):
    group = parser.getgroup("kld", "KL divergence of quantised models (pytest-kld)")
    for o in OPTIONS:
        key = f"kld_{o.dest}"
        text = f"{o.help} (default: {o.shown_default}); ini: {key}"
        if o.kind is bool:
            group.addoption(f"--kld-{o.name}", dest=key, action="store_true", default=None, help=_escaped(text))
            parser.addini(key, text, type="bool", default=False)
        else:
            group.addoption(f"--kld-{o.name}", dest=key, type=o.kind, default=None, metavar=o.metavar,
                            help=_escaped(text))
            parser.addini(key, text, type=_INI_INT if o.kind is int else None, default=None)


def _escaped(text: str) -> str:
    """argparse formats help with %: a literal percent sign is written %%."""
    return text.replace("%", "%%")


def _setting(config, o):
    """The option's value if given on the command line, else the ini key's, else the default."""
    key = f"kld_{o.dest}"
    value = config.getoption(key, default=None)
    if value is None:
        try:
            value = config.getini(key)
        except (pytest.UsageError, ValueError, TypeError) as e:  # pytest's own words lack the key
            raise pytest.UsageError(f"ini key {key}: {e}") from None
        if value in (None, "", []):
            value = None
        elif o.kind is int:
            try:
                value = int(value)
            except ValueError:
                raise pytest.UsageError(f"ini key {key} = {value!r} is not an integer") from None
    return o.default if value is None else value


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        f"kld({', '.join(f'{o.dest}=None' for o in OPTIONS if o.marker)}): per-test pytest-kld settings",
    )
    from .step import prepare

    given = config.getoption("kld_baselines", default=None)
    root = config.invocation_params.dir if given else (config.inipath.parent if config.inipath else config.rootpath)
    try:
        settings = prepare({o.dest: _setting(config, o) for o in OPTIONS}, prefix="--kld-", root=root)
    except KldError as e:
        raise pytest.UsageError(str(e)) from None
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
        kind = next(o.kind for o in OPTIONS if o.dest == key)
        if kind is str and value is not None and not isinstance(value, (str, os.PathLike)):
            pytest.fail(f"@pytest.mark.kld: {key}={value!r} must be a string", pytrace=False)
        why = check(key, value, f"@pytest.mark.kld: {key}", marker=True)
        if why:
            pytest.fail(why, pytrace=False)
    for key in ("reference", "dataset"):
        if out.get(key) is not None:
            out[key] = os.fspath(out[key])
    return out


def _no_reference_message(config) -> str:
    """The missing-reference line, with the pitfall that most often causes it: an option value
    given as a separate argument, which pytest took for a test path when it chose the rootdir and
    ini file (before plugins load), so the ini's kld_reference was never read."""
    names = {f"--kld-{o.name}" for o in OPTIONS if o.kind is not bool}
    separate = [a for a in config.invocation_params.args if isinstance(a, str) and a in names]
    if not separate:
        return NO_REFERENCE
    return (
        f"{NO_REFERENCE}. Note: {separate[0]} was given its value as a separate argument, which pytest "
        f"took for a test path when it chose the rootdir and ini file: write {separate[0]}=VALUE"
    )


@pytest.fixture(scope="session")
def kld_session(pytestconfig) -> KldSession:
    """The run's pytest-kld state (settings as resolved from options and ini keys)."""
    return pytestconfig.stash[_SESSION]


def _cache_for(kld_session, s):
    __tracebackhide__ = True
    try:
        return kld_session.cache(s)
    except NoReference:
        message = _no_reference_message(kld_session.config)
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
    """``kld_compare(model, *, nonfinite=0, name=None, exec=None) -> KldResult``: compare with no
    KLD thresholds; a broken model (NaN/inf log-probs) fails. See :class:`~pytest_kld.assertion.KldCompare`."""
    from .assertion import KldCompare

    s = kld_session.effective(_marker_overrides(request.node))
    return KldCompare(request.node, kld_session, s, _cache_for(kld_session, s))


@pytest.fixture
def assert_kld(kld_compare):
    """``assert_kld(model, *, mean, median, p90, p95, p99, p99_9, max, top1, drift_match, drift_kld,
    categories, nonfinite, name, exec, revision, baseline, baseline_fail) -> KldResult``: compare and
    fail on any threshold, or on a regression against the quant's baseline, in one message. See
    :class:`~pytest_kld.assertion.AssertKld`."""
    from .assertion import AssertKld

    return AssertKld(kld_compare)
