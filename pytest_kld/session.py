"""The pytest session's pytest-kld state: resolved settings, the reference caches opened so far,
and the leaderboard rows of every test — on the xdist controller, every worker's.

Rows travel as a plain attribute of each test report (xdist serialises it), so the controller
sees them all in ``pytest_runtest_logreport``; reports are computed in ``pytest_sessionfinish``
and printed in ``pytest_terminal_summary``, which never raises.
"""

from __future__ import annotations

import sys

import pytest

ROWS = pytest.StashKey[list]()  # rows recorded by a test item, not yet attached to a report


class NoReference(Exception):
    pass


NO_REFERENCE = (
    "pytest-kld: no reference model set: pass --kld-reference=MODEL (a local MLX model directory "
    "or hub id), set kld_reference in [tool.pytest.ini_options], or use @pytest.mark.kld(reference=...)"
)


class KldSession:
    """Registered as a plugin object: its hooks see every report of the run."""

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
        """The reference cache for settings ``s``: built once, opened once per process; a failure
        is remembered, so later tests fail at once with the same line."""
        from .run import open_reference

        if not s.get("reference") and not s.get("reference_cache"):
            raise NoReference()
        key = tuple(str(s.get(k)) for k in ("reference", "reference_cache", "revision", "mode", "dataset", "n_ctx", "n_chunks",
                                             "no_chat_template", "top_k", "chunk_tokens", "exec", "cache_dir",
                                             "full_hash", "drift_tokens", "vocab_backend"))
        if key not in self.caches:
            out = self.writer()
            label = f"building reference cache {s.get('reference')} [{s['mode']}]"
            try:
                self.caches[key] = open_reference(
                    s, progress=self.progress(label), notify=lambda line: out(line, "\n"),
                    rebuild_before=self.start if s.get("rebuild") else None,
                )
            except Exception as e:
                self.caches[key] = e
        if isinstance(self.caches[key], Exception):
            raise self.caches[key]
        return self.caches[key]

    def progress(self, label: str):
        from .progress import Progress

        return Progress(label, self.writer())

    def writer(self):
        """Write a line to the real terminal, through pytest's output capture."""
        config = self.config

        def write(line: str, end: str) -> None:
            capman = config.pluginmanager.getplugin("capturemanager")
            if capman is None:
                _emit(config, line, end)
                return
            with capman.global_and_fixture_disabled():
                _emit(config, line, end)

        return write

    def record(self, node, row: dict, props: list) -> None:
        node.user_properties.extend(props)
        node.stash.setdefault(ROWS, []).append(row)

    # -- hooks

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        rows = item.stash.get(ROWS, None)
        if rows:
            outcome.get_result().kld_rows = list(rows)
            rows.clear()

    def pytest_runtest_logreport(self, report):
        for row in getattr(report, "kld_rows", None) or ():
            self.rows.append(dict(row, outcome=report.outcome))

    def pytest_sessionfinish(self, session, exitstatus):
        if hasattr(self.config, "workerinput"):
            return
        from .run import unique_rows, write_reports

        self.final_rows = unique_rows(self.rows)
        try:
            write_reports(self.settings, self.final_rows)
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
            recorded = {r["baseline"].get("path") for r in self.rows  # every slot, not one per model
                        if (r.get("baseline") or {}).get("verdict") == "recorded"}
            if recorded:
                tr.write_line(f"pytest-kld: {len(recorded)} baseline(s) recorded under {self.settings.get('baselines')}; "
                              "commit them, and later runs gate each quant against its own")
            if self.report_error:
                tr.write_line(self.report_error, red=True)
        except Exception as e:  # never raise in the summary
            terminalreporter.write_line(f"pytest-kld: could not print the leaderboard: {e}")


def _emit(config, line: str, end: str) -> None:
    # Start on a fresh line after pytest's "test_x.py ..." progress (not on xdist workers, whose
    # stdout is not the terminal); pytest repeats the file name when it goes on.
    tr = config.pluginmanager.getplugin("terminalreporter")
    if tr is not None and not hasattr(config, "workerinput") and end == "\n":
        tr.ensure_newline()
        sys.stdout.flush()
    sys.stderr.write(line + end)
    sys.stderr.flush()
