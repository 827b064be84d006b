"""The gate, threshold by threshold (issue 17): a breach of one threshold alone fails the test
while every other passes; a value equal to its threshold passes; an end-to-end run with more
than one forward piece per chunk gives the figures of the default run."""

from __future__ import annotations

import json

import pytest

KEYS = ("mean", "median", "p90", "p95", "p99", "p99_9", "max", "top1")


@pytest.fixture(scope="module")
def q4_figures(tiny_model, tmp_path_factory):
    """The 4-bit quant's figures, from a kld_compare run's JSON."""
    import subprocess
    import sys

    d = tmp_path_factory.mktemp("gate")
    (d / "test_q.py").write_text(f"def test_q(kld_compare):\n    kld_compare({str(tiny_model('llama', bits=4))!r})\n")
    p = subprocess.run([sys.executable, "-m", "pytest", str(d / "test_q.py"), f"--kld-reference={tiny_model('llama')}",
                        "--kld-n-chunks=3", f"--kld-cache-dir={d / 'c'}", f"--kld-json={d / 'r.json'}",
                        "-p", "no:cacheprovider", "-q"], capture_output=True, text=True, cwd=d)
    assert p.returncode == 0, p.stdout[-2000:]
    (row,) = json.loads((d / "r.json").read_text())["results"]
    return row["summary"], d / "c"


def _run(pytester, tiny_model, cache, limits: dict, *extra):
    pytester.makepyfile(f"def test_q(assert_kld):\n    assert_kld({str(tiny_model('llama', bits=4))!r}, **{limits!r})\n")
    return pytester.runpytest_subprocess(f"--kld-reference={tiny_model('llama')}", "--kld-n-chunks=3",
                                         f"--kld-cache-dir={cache}", "-p", "no:cacheprovider", *extra)


def _loose(s: dict) -> dict:
    return {k: (0.0 if k == "top1" else s[k] * 2 + 1) for k in KEYS}


@pytest.mark.parametrize("key", [k for k in KEYS if k != "mean"])
def test_one_threshold_alone_fails_the_test(pytester, tiny_model, q4_figures, key):
    s, cache = q4_figures
    limits = _loose(s)
    limits[key] = min(1.0, s[key] * 1.01 + 1e-6) if key == "top1" else s[key] * 0.99
    result = _run(pytester, tiny_model, cache, limits)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*: 1 of 8 checks failed", f"  {key}: *FAILED"])
    failed = {ln.split(":")[0].strip() for ln in result.stdout.lines if ln.startswith("  ") and ln.endswith("FAILED")}
    assert failed == {key}  # the one breached, whether pytest repeats the message in its summary (CI) or not


def test_every_threshold_at_its_observed_value_passes(pytester, tiny_model, q4_figures):
    s, cache = q4_figures
    result = _run(pytester, tiny_model, cache, {k: s[k] for k in KEYS})
    result.assert_outcomes(passed=1)


def test_several_forward_pieces_per_chunk_give_the_same_figures(pytester, tiny_model, q4_figures, tmp_path):
    s, _ = q4_figures
    pytester.makepyfile(f"def test_q(kld_compare):\n    kld_compare({str(tiny_model('llama', bits=4))!r})\n")
    out = tmp_path / "r.json"
    result = pytester.runpytest_subprocess(f"--kld-reference={tiny_model('llama')}", "--kld-n-chunks=3",
                                           "--kld-chunk-tokens=24", f"--kld-cache-dir={tmp_path / 'c'}",
                                           f"--kld-json={out}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    (row,) = json.loads(out.read_text())["results"]
    assert row["summary"]["count"] == s["count"]
    for k in ("mean", "median", "p99", "max"):
        assert row["summary"][k] == pytest.approx(s[k], rel=1e-4), k
