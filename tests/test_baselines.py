"""Baselines (issue 17): record a quant's result beside the tests, gate its next build against it
with a paired, clustered test and a tolerance; refuse a baseline of another reference cache;
fail on a missing one naming the flag that records it."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from pytest_kld.baselines import Baseline, BaselineError, foreign, load, slot_path
from pytest_kld.errors import ThresholdError
from pytest_kld.regression import judge, parse_tolerance

TEST = (
    "import os\n"
    "def test_q(assert_kld):\n"
    "    assert_kld(os.environ['CANDIDATE'], name='candidate', mean=100)\n"
)


def _pytest(pytester, tiny_model, *extra, n_chunks=6):
    return pytester.runpytest_subprocess(f"--kld-reference={tiny_model('llama')}", f"--kld-n-chunks={n_chunks}",
                                         f"--kld-cache-dir={pytester.path / 'cache'}", "-p", "no:cacheprovider",
                                         f"--kld-json={pytester.path / 'r.json'}", *extra)


def _row(pytester) -> dict:
    from tiny import validate_results

    doc = json.loads((pytester.path / "r.json").read_text())
    validate_results(doc)
    (row,) = doc["results"]
    return row


def test_record_rerun_worse_update_round_trip(pytester, tiny_model, monkeypatch):
    pytester.makepyfile(test_q=TEST)
    monkeypatch.setenv("CANDIDATE", str(tiny_model("llama", bits=8)))
    _pytest(pytester, tiny_model).assert_outcomes(passed=1)  # no kld_baselines/: nothing gated
    assert "baseline" not in _row(pytester)

    result = _pytest(pytester, tiny_model, "--kld-update-baselines")
    result.assert_outcomes(passed=1)
    path = pytester.path / "kld_baselines" / "test_q" / "test_q" / "candidate.json"
    result.stdout.fnmatch_lines(["*1 baseline(s) recorded under*kld_baselines*"])
    doc = json.loads(path.read_text())
    assert doc["slot"] == "candidate" and doc["cache"]["key"] and doc["model"]["fingerprint"].startswith("sha256-")

    result = _pytest(pytester, tiny_model)  # unchanged: the same, difference exactly 0
    result.assert_outcomes(passed=1)
    b = _row(pytester)["baseline"]
    assert b["verdict"] == "same"
    for figure in ("mean", "p99"):
        f = b["figures"][figure]
        assert (f["diff"], f["low"], f["high"]) == (0.0, 0.0, 0.0), figure
    assert any("vs baseline" in line for line in result.stdout.lines)

    monkeypatch.setenv("CANDIDATE", str(tiny_model("llama", bits=3)))  # a worse quant in the same slot
    result = _pytest(pytester, tiny_model)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*KLD regression: candidate is worse than its baseline beyond noise and tolerance "
                                 "(mean:5%,p99:10%)*", "*mean: baseline * -> now *, diff +*95% CI [+*FAILED*",
                                 f"*baseline {path}*", "*--kld-update-baselines*"])
    assert _row(pytester)["baseline"]["verdict"] == "worse"

    _pytest(pytester, tiny_model, "--kld-update-baselines").assert_outcomes(passed=1)
    _pytest(pytester, tiny_model).assert_outcomes(passed=1)
    assert _row(pytester)["baseline"]["verdict"] == "same"


def test_missing_foreign_opt_out_and_per_test_tolerance(pytester, tiny_model, monkeypatch):
    monkeypatch.setenv("CANDIDATE", str(tiny_model("llama", bits=8)))
    pytester.makepyfile(test_q=TEST)
    (pytester.path / "kld_baselines").mkdir()
    result = _pytest(pytester, tiny_model)  # the directory exists, the slot's baseline does not
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*no KLD baseline for candidate in test_q.py::test_q: *candidate.json does not "
                                 "exist; record it with --kld-update-baselines*"])
    _pytest(pytester, tiny_model, "--kld-update-baselines").assert_outcomes(passed=1)

    result = _pytest(pytester, tiny_model, n_chunks=5)  # another corpus
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*recorded against another reference cache: number of chunks differs "
                                 "(baseline 6, now 5); not compared*"])
    result = pytester.runpytest_subprocess(f"--kld-reference={tiny_model('llama', bits=4)}", "--kld-n-chunks=6",
                                           f"--kld-cache-dir={pytester.path / 'cache'}", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)  # another reference, with the same tokenizer
    result.stdout.fnmatch_lines(["*recorded against another reference cache: reference weights differs*"])

    monkeypatch.setenv("CANDIDATE", str(tiny_model("llama", bits=3)))
    pytester.makepyfile(test_q=TEST.replace("mean=100)", "mean=100, baseline=False)"))
    _pytest(pytester, tiny_model).assert_outcomes(passed=1)  # opted out: not gated
    pytester.makepyfile(test_q=TEST.replace("mean=100)", "mean=100, baseline_fail='mean:100,p99:100')"))
    _pytest(pytester, tiny_model).assert_outcomes(passed=1)  # worse, but within this test's tolerance
    assert _row(pytester)["baseline"]["verdict"] == "worse within tolerance"
    pytester.makepyfile(test_q="import os, pytest\n@pytest.mark.kld(baseline_fail='mean:0.000001')\n"
                        + TEST.replace("import os\n", ""))
    result = _pytest(pytester, tiny_model, "--kld-baseline-fail=mean:100000%")  # the marker wins
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*(mean:1e-06)*"])


def test_bad_tolerance_is_one_usage_line(pytester, tiny_model):
    pytester.makepyfile(test_q=TEST)
    result = _pytest(pytester, tiny_model, "--kld-baseline-fail=mean=5")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ERROR: --kld-baseline-fail='mean=5': write FIGURE:VALUE[%],..., e.g. mean:5%,p99:0.5" in result.stderr.lines


def test_cli_records_and_gates_by_name(tiny_model, tmp_path):
    def run(model, *extra):
        return subprocess.run([sys.executable, "-m", "pytest_kld", "compare", str(tiny_model("llama")), str(model),
                               "--n-chunks", "6", "--cache-dir", str(tmp_path / "c"), "--name", "candidate",
                               "--baselines", str(tmp_path / "b"), *extra], capture_output=True, text=True)

    p = run(tiny_model("llama", bits=8), "--update-baselines")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "pytest-kld: 1 baseline(s) recorded under" in p.stdout  # the note the plugin prints too
    assert (tmp_path / "b" / "cli" / "candidate.json").is_file()
    p = run(tiny_model("llama", bits=8))
    assert p.returncode == 0 and " same " in p.stdout + " ", p.stdout
    p = run(tiny_model("llama", bits=3))
    assert p.returncode == 1 and "KLD regression: candidate is worse than its baseline" in p.stderr, p.stderr[-2000:]


# -- the verdict on synthetic data, without models


def _baseline(kl, cluster, tmp_path, summary=None) -> Baseline:
    kl = np.asarray(kl, dtype=np.float32)
    s = summary or {"mean": float(np.mean(kl.astype(np.float64))), "p99": float(np.percentile(kl, 99))}
    return Baseline(tmp_path / "b.json", {"summary": s, "model": {"name": "base"}}, kl, np.asarray(cluster))


@pytest.fixture
def synthetic():
    rng = np.random.default_rng(0)
    cluster = np.repeat(np.arange(40), 50)
    difficulty = np.exp(np.repeat(rng.normal(0, 0.5, 40), 50) + rng.normal(-1, 0.5, 2000))
    return cluster, difficulty


@pytest.mark.parametrize("factor, spec, want", [
    (1.0, "mean:5%", "same"),
    (1.2, "mean:5%", "worse"),  # +20%, tolerance 5%
    (1.02, "mean:5%", "worse within tolerance"),  # beyond noise (paired), within 5%
    (0.8, "mean:5%", "better"),
    (1.2, "mean:1", "worse within tolerance"),  # absolute: 1 nat
    (1.2, "p99:10%", "worse"),
])
def test_verdicts(synthetic, tmp_path, factor, spec, want):
    cluster, base = synthetic
    now = base * factor
    b = _baseline(base, cluster, tmp_path)
    s = {"mean": float(np.mean(now)), "p99": float(np.percentile(now, 99))}
    v = judge(now, cluster, s, b, parse_tolerance(spec))
    assert v["verdict"] == want, v


def test_noise_alone_is_same(synthetic, tmp_path):
    """A rebuild that moves each position by independent noise, not systematically: same."""
    cluster, base = synthetic
    now = base * np.exp(np.random.default_rng(1).normal(0, 0.05, base.size))
    v = judge(now, cluster, {"mean": float(now.mean())}, _baseline(base, cluster, tmp_path), parse_tolerance("mean:0"))
    f = v["figures"]["mean"]
    assert f["low"] <= 0 <= f["high"] and v["verdict"] == "same"


@pytest.mark.parametrize("spec, why", [
    ("mean", "write FIGURE:VALUE"), ("max:5%", "unknown figure 'max'"), ("mean:-1", "at least 0"),
    ("mean:x%", "not a number"), ("mean:nan", "finite"), ({"mean": True}, "at least 0"),
])
def test_bad_tolerances(spec, why):
    with pytest.raises(ThresholdError, match=why):
        parse_tolerance(spec)


def test_tolerance_forms():
    assert parse_tolerance("mean:5%, p99:0.5") == {"mean": ("rel", 0.05), "p99": ("abs", 0.5)}
    assert parse_tolerance({"p95": "10%", "median": 0}) == {"p95": ("rel", 0.1), "median": ("abs", 0.0)}


def test_slot_paths_stay_inside_the_directory(tmp_path):
    p = slot_path(tmp_path, "tests/../../etc/test_x.py::TestA::test_b[a/b-..]", "../../x y")
    assert tmp_path in p.parents and ".." not in p.relative_to(tmp_path).parts
    assert p.relative_to(tmp_path).parts[:2] == ("tests", "etc")
    assert len(slot_path(tmp_path, "t.py::" + "x" * 500, "s").name) <= 105


def test_tampered_or_truncated_baseline_is_refused(tiny_model, tmp_path):
    from pytest_kld.baselines import record
    from pytest_kld.cache import ensure_reference
    from pytest_kld.compare import compare
    from pytest_kld.corpus import corpus_spec

    cache = ensure_reference(tiny_model("llama"), corpus_spec("short", n_chunks=3), cache_dir=tmp_path / "c")
    result = compare(cache, tiny_model("llama", bits=4))
    path = record(tmp_path / "b", result, "t.py::test", "q4")
    b = load(path)
    assert foreign(b, result) is None and b.kl.dtype == np.float32 and b.kl.size == result.kl.size
    assert np.array_equal(b.kl, result.kl.astype(np.float32))
    doc = json.loads(path.read_text())
    doc["summary"]["mean"] = 0.0  # a figure edited by hand is only a figure; the data are checked
    raw = bytearray(__import__("base64").b64decode(doc["positions"]["data"]))
    raw[0] ^= 1
    doc["positions"]["data"] = __import__("base64").b64encode(bytes(raw)).decode()
    path.write_text(json.dumps(doc))
    with pytest.raises(BaselineError, match="do not match their sha256"):
        load(path)
    path.write_text(path.read_text()[:100])
    with pytest.raises(BaselineError, match="unreadable"):
        load(path)
    nan = compare(cache, tiny_model("llama", bits=4))
    nan.summary["nonfinite"] = 3
    with pytest.raises(BaselineError, match="broken model is not recorded"):
        record(tmp_path / "b", nan, "t.py::test", "q4")
    assert math.isfinite(b.summary["mean"])
