"""The pytest plugin, end to end through ``pytester``: options and ini keys, the reference
fixture, ``assert_kld``, the ``kld`` marker, the leaderboard, JSON and JUnit XML, xdist.

The tiny models are built once per session (``tiny_model`` in conftest.py); every pytester run
gets its own reference cache directory and scores only the first 4 bundled prompts (about 1,500
positions), so a reference build takes a fraction of a second. Runs that need a fresh
interpreter (xdist, "is mlx imported?", output reaching the terminal) use
``runpytest_subprocess``; the rest run in-process, which reuses this process's imports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from tiny import validate_results

from pytest_kld.plugin import NO_REFERENCE

# Thresholds between the tiny llama's 8-bit (mean ~0.002, P99 ~0.01) and 4-bit (mean ~0.7,
# P99 ~2.6) quants on the first 4 bundled prompts.
MEAN, P99 = 0.1, 1.0

QUANT_TEST = """
import pytest

@pytest.mark.parametrize("quant", {paths!r}, ids={ids!r})
def test_quant_quality(assert_kld, quant):
    result = assert_kld(quant, mean={mean}, p99={p99})
    assert result.summary["mean"] <= {mean}
"""


@pytest.fixture(scope="session")
def models(tiny_model, tmp_path_factory):
    """Paths (str) of the tiny reference, its quants and a copy with NaN in one embedding row."""
    import mlx.core as mx

    ref = tiny_model("llama")
    nan = tmp_path_factory.mktemp("nan-model") / "llama-nan"
    shutil.copytree(ref, nan)
    weights = mx.load(str(nan / "model.safetensors"))
    emb = weights["model.embed_tokens.weight"]
    row = 63 - 33  # the byte-level id of "?": from the first "?" on, a chunk's logits are NaN
    weights["model.embed_tokens.weight"] = mx.where(
        (mx.arange(emb.shape[0]) == row)[:, None], mx.array(float("nan"), emb.dtype), emb
    )
    mx.save_safetensors(str(nan / "model.safetensors"), weights, metadata={"format": "mlx"})
    return {
        "ref": str(ref),
        "q8": str(tiny_model("llama", bits=8)),
        "q4": str(tiny_model("llama", bits=4)),
        "q4g32": str(tiny_model("llama", bits=4, group_size=32)),
        "nan": str(nan),
    }


@pytest.fixture
def kld_args(pytester, models):
    """Reference, a cache directory of this test's own, and a 4-prompt corpus."""
    return [
        f"--kld-reference={models['ref']}",
        f"--kld-cache-dir={pytester.path / 'kld-cache'}",
        "--kld-n-chunks=4",
    ]


def quant_test(models, names, mean=MEAN, p99=P99) -> str:
    return QUANT_TEST.format(paths=[models[n] for n in names], ids=list(names), mean=mean, p99=p99)


def count_builds_conftest(path) -> str:
    """A conftest.py that appends one line per reference build (any process) to ``path``."""
    return f"""
import os
import pytest_kld.cache as reference

_build = reference._build

def _counted(plan, **kw):
    with open({str(path)!r}, "a") as f:
        f.write(f"{{os.getpid()}} {{os.environ.get('PYTEST_XDIST_WORKER', '-')}}\\n")
    return _build(plan, **kw)

reference._build = _counted
"""


def literal(pattern: str) -> str:
    """``pattern`` for fnmatch with ``[``, ``]`` and ``?`` taken literally (``*`` stays a wildcard)."""
    return re.sub(r"([\[\]?])", r"[\1]", pattern)


def line_index(lines: list[str], pattern: str) -> int:
    for i, line in enumerate(lines):
        if re.search(pattern, line):
            return i
    raise AssertionError(f"no line matches {pattern!r}")


# ------------------------------------------------------------------------------------------
# Options and ini keys


def test_help_shows_every_option_with_its_default(pytester, monkeypatch):
    """pytest --help and the command line's --help list the same settings with the same
    defaults, both derived from the one table (pytest_kld.options.OPTIONS)."""
    import subprocess
    import sys

    from pytest_kld.options import OPTIONS, threshold_names

    monkeypatch.setenv("COLUMNS", "250")  # no wrapping inside a help line
    result = pytester.runpytest("--help")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["KL divergence of quantised models (pytest-kld):", "  --kld-reference=REFERENCE*"])
    flat = " ".join(result.stdout.str().split())  # argparse may put the help on the next line
    cli = subprocess.run([sys.executable, "-m", "pytest_kld", "compare", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "250"})
    assert cli.returncode == 0
    cli_flat = " ".join(cli.stdout.split())
    for o in OPTIONS:
        shown = o.name if o.kind is bool else f"{o.name}={o.metavar}"
        default = re.escape(f"(default: {o.shown_default})")
        pattern = rf"--kld-{re.escape(shown)} (?:(?! --kld-).)*?{default}; ini: kld_{o.dest} "
        assert re.search(pattern, flat), f"pytest --help: --kld-{o.name}: default {o.shown_default!r} or ini key not shown"
        if o.name != "reference":  # the command line's reference is its first argument
            flag = o.name if o.kind is bool else f"{o.name} {o.metavar}"
            assert re.search(rf"--{re.escape(flag)} (?:(?! --).)*?{default}", cli_flat), f"pytest-kld --help: --{o.name}"
    for t in threshold_names():
        flag = t.replace("_", ".") if t.startswith("p") else t.replace("_", "-")  # --p99.9, --drift-match
        assert f"--{flag} X" in cli_flat
    out = result.stdout.str()
    for key in ("kld_reference", "kld_mode", "kld_top_k", "kld_n_ctx", "kld_chunk_tokens",
                "kld_cache_dir", "kld_rebuild", "kld_json", "kld_exec"):
        assert re.search(rf"^  {key} \(", out, re.M), f"ini key {key} not in --help"
    assert "kld(reference=None" in pytester.runpytest("--markers").stdout.str()


SETTINGS_TEST = """
import json

def test_settings(kld_session):
    with open("settings.json", "w") as f:
        json.dump(kld_session.settings, f)
"""

INI_FILES = {
    "pytest.ini": ("pytest.ini", "[pytest]\nkld_top_k = 7\nkld_mode = long\nkld_rebuild = true\n"),
    "pyproject": (
        "pyproject.toml",
        '[tool.pytest.ini_options]\nkld_top_k = "7"\nkld_mode = "long"\nkld_rebuild = true\n',
    ),
    "pyproject-native": (  # pytest 9's [tool.pytest] table: TOML types as written
        "pyproject.toml",
        '[tool.pytest]\nkld_top_k = 7\nkld_mode = "long"\nkld_rebuild = true\n',
    ),
}


@pytest.mark.parametrize("style", sorted(INI_FILES))
def test_ini_keys_are_read_and_the_option_wins(pytester, style):
    if style == "pyproject-native" and int(pytest.__version__.split(".")[0]) < 9:
        pytest.skip("[tool.pytest] needs pytest 9")
    name, text = INI_FILES[style]
    pytester.path.joinpath(name).write_text(text)
    pytester.makepyfile(SETTINGS_TEST)

    result = pytester.runpytest("-W", "error::pytest.PytestDeprecationWarning")
    result.assert_outcomes(passed=1)
    s = json.loads(pytester.path.joinpath("settings.json").read_text())
    assert (s["top_k"], s["mode"], s["rebuild"]) == (7, "long", True)
    assert (s["chunk_tokens"], s["exec"], s["reference"]) == (512, "auto", None)  # defaults

    result = pytester.runpytest("--kld-top-k=9", "--kld-mode=short")
    result.assert_outcomes(passed=1)
    s = json.loads(pytester.path.joinpath("settings.json").read_text())
    assert (s["top_k"], s["mode"], s["rebuild"]) == (9, "short", True)


@pytest.mark.parametrize(
    "args, ini, message",
    [
        (["--kld-mode=bogus"], "", "*--kld-mode 'bogus': choose short, long, file or drift*"),
        (["--kld-top-k=0"], "", "*--kld-top-k must be at least 1, got 0*"),
        (["--kld-top-k=many"], "", "*--kld-top-k: invalid int value: 'many'*"),
        ([], "kld_top_k = many", "*ini key kld_top_k: *'many'*"),
        (["--kld-json=no/such/dir/out.json"], "", "*--kld-json no/such/dir/out.json: directory */no/such/dir does not exist*"),
    ],
    ids=["mode", "top-k-zero", "top-k-text", "ini-top-k-text", "json-dir"],
)
def test_bad_settings_are_usage_errors(pytester, args, ini, message):
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_no_reference_is_a_one_line_setup_error(pytester, models):
    pytester.makepyfile(
        f"""
        def test_assert(assert_kld):
            assert_kld({models['q8']!r}, mean=1.0)

        def test_compare(kld_compare):
            kld_compare({models['q8']!r})

        def test_session_fixture(kld_reference):
            pass

        def test_unrelated():
            pass
        """
    )
    result = pytester.runpytest(f"--kld-cache-dir={pytester.path / 'cache'}")
    result.assert_outcomes(errors=3, passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    # Once per test as the whole message, on a line of its own (the short summary repeats it
    # after "ERROR ... - Failed: ", cut to the terminal width unless CI is set).
    assert [line for line in out.splitlines() if line == NO_REFERENCE] == [NO_REFERENCE] * 3, out
    assert "--kld-reference=MODEL" in NO_REFERENCE and "\n" not in NO_REFERENCE
    assert "Traceback" not in out and "plugin.py" not in out
    result.stdout.fnmatch_lines(["ERROR *::test_assert - Failed: *"])
    assert not (pytester.path / "cache").exists()


# ------------------------------------------------------------------------------------------
# assert_kld, the leaderboard, JSON and JUnit XML


def test_thresholds_gate_the_exit_code_and_explain_themselves(pytester, models, kld_args):
    pytester.makepyfile(quant_test(models, ["q8", "q4", "ref"]))
    result = pytester.runpytest(*kld_args)
    result.assert_outcomes(passed=2, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED

    # One message: model, reference, every threshold observed against allowed, the settings.
    result.stdout.fnmatch_lines(
        [
            f"KLD over threshold for {models['q4']} against {models['ref']}: * of 2 checks failed",
            f"  mean: * > allowed {MEAN:g} (+*%)  FAILED",
            f"  p99: * allowed {P99:g}*",
            "  KL(reference || quant) in nats over * scored positions; mode short, K=256, n_ctx 512, exec float32, chunk_tokens 512",
            "If the new figures are expected, raise the thresholds in the test.",
        ]
    )
    out = result.stdout.str()
    assert "Traceback" not in out and "def run(" not in out  # __tracebackhide__, no pytrace
    result.stdout.fnmatch_lines(["FAILED *::test_quant_quality[[]q4[]]*"])

    # The leaderboard: printed once, header names reference, mode, positions and K; sorted by
    # mean (reference first); best values marked; pass/FAIL per model.
    assert out.count("pytest-kld leaderboard") == 1
    result.stdout.fnmatch_lines(
        [
            "*= pytest-kld leaderboard =*",
            f"KL(reference || quant)  reference: {models['ref']}  mode: short  positions: *  K: 256  exec: float32"
            "  vocab work: numpy",
            "model*size MB*bits/w*mean*mean/bit*median*P95*P99*max*top-1 %*result",
            "-----*",
            "llama *16.000*100.00%*reference",
            "llama-q8-g64 *pass",
            "llama-q4-g64 *FAIL",
            "[*] best in column (reference excluded)*",
        ]
    )
    lines = out.splitlines()
    q8 = lines[line_index(lines, r"^llama-q8-g64 ")].split()
    q4 = lines[line_index(lines, r"^llama-q4-g64 ")].split()
    # columns: model size bpw mean 95%-CI vs-above mean/bit median p95 p99 max top1 result
    assert all(c.endswith("*") for c in (q8[3], q8[6], q8[7], q8[8], q8[9], q8[10], q8[11]))
    assert q8[5] == "-" and q4[5][0] in "+×"  # q4 is told apart from q8, paired (no ≈)
    assert q4[2].endswith("*") and not q4[3].endswith("*")  # fewer bits, worse KLD
    assert float(q8[2]) > 8 > float(q4[2].rstrip("*")) > 4
    header = lines[line_index(lines, r"^KL\(reference \|\| quant\)  reference")]
    positions = int(re.search(r"positions: (\d+)", header).group(1))
    assert 500 < positions < 5000


def test_json_report_has_settings_versions_and_every_result(pytester, models, kld_args):
    pytester.makepyfile(
        quant_test(models, ["q8", "q4"])
        + """
def test_reference_fixture(kld_reference):
    assert kld_reference.top_k == 256 and kld_reference.n_positions > 0
"""
    )
    out, md = pytester.path / "kld.json", pytester.path / "kld.md"
    result = pytester.runpytest(*kld_args, f"--kld-json={out}", f"--kld-markdown={md}")
    result.assert_outcomes(passed=2, failed=1)
    text = md.read_text()
    assert "llama-q8-g64" in text and "llama-q4-g64" in text and "**K**: 256" in text, text
    doc = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert doc["direction"] == "KL(reference || quant)"
    s = doc["settings"]
    assert (s["reference"], s["mode"], s["top_k"], s["n_chunks"], s["exec"]) == (models["ref"], "short", 256, 4, "auto")
    for pkg in ("pytest-kld", "mlx", "mlx-lm", "numpy", "pytest"):
        assert doc["versions"][pkg], pkg
    by_model = {r["model"]: r for r in doc["results"]}
    assert set(by_model) == {"llama-q8-g64", "llama-q4-g64"}
    q8, q4 = by_model["llama-q8-g64"], by_model["llama-q4-g64"]
    assert (q8["outcome"], q4["outcome"]) == ("passed", "failed")
    for r in (q8, q4):
        assert r["direction"] == "KL(reference || quant)"
        assert (r["reference"], r["mode"], r["top_k"], r["exec"]) == (models["ref"], "short", 256, "float32")
        assert r["vocab_backend"] == r["cache"]["vocab_backend"]["chosen"] == "numpy"  # auto on a CPU
        assert r["cache"]["vocab_backend"]["requested"] == "auto"
        assert r["nodeid"].startswith("test_json_report")
        assert r["summary"]["count"] == r["count"] > 500 and r["nonfinite"] == 0
        assert 0 <= r["summary"]["median"] <= r["p95"] <= r["p99"] <= r["max"]
    assert 0 < q8["mean"] < MEAN < q4["mean"]
    assert q8["bpw"] > q4["bpw"] and q8["info"]["quantized"] and q4["info"]["base_bits"] == 4


def test_figures_reach_junit_xml_as_properties(pytester, models, kld_args):
    pytester.makepyfile(quant_test(models, ["q8", "q4"]))
    xml = pytester.path / "junit.xml"
    pytester.runpytest(*kld_args, f"--junitxml={xml}").assert_outcomes(passed=1, failed=1)
    cases = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        cases[case.get("name")] = props
    assert set(cases) == {"test_quant_quality[q8]", "test_quant_quality[q4]"}
    for name, props in cases.items():
        quant = models["q8" if "q8" in name else "q4"]
        assert props["kld_model"] == quant and props["kld_reference"] == models["ref"]
        for key in ("kld_mean", "kld_median", "kld_p95", "kld_p99", "kld_max", "kld_top1", "kld_bits_per_weight"):
            float(props[key])
        assert int(props["kld_positions"]) > 500 and props["kld_nonfinite"] == "0"
        assert all(len(v) < 200 for v in props.values())  # figures, not a serialised row
    assert float(cases["test_quant_quality[q4]"]["kld_mean"]) > MEAN > float(cases["test_quant_quality[q8]"]["kld_mean"])


@pytest.mark.parametrize(
    "call, message",
    [
        ("meen=0.1", "assert_kld: unknown threshold 'meen'; known: mean, median, p90, p95, p99, p99_9, max, top1, drift_match, drift_kld"),
        ("mean=-0.1", "assert_kld: threshold mean=-0.1 is negative; KLD is never below 0"),
        ("top1=1.5", "assert_kld: threshold top1=1.5 is a fraction and must be at most 1"),
        ("p99=float('nan')", "assert_kld: threshold p99=nan must be a finite number"),
        ("mean='0.1'", "assert_kld: threshold mean='0.1' must be a finite number"),
        ("0.1", "assert_kld: thresholds are keywords, e.g. assert_kld(model, mean=0.1, p99=1.0); got positional 0.1"),
        ("categories={'code': 0.1}", "assert_kld: categories['code'] must be a dict of thresholds, got 0.1"),
        ("categories={'code': {'p95': -1}}", "assert_kld categories['code']: threshold p95=-1 is negative*"),
    ],
    ids=["unknown", "negative", "top1>1", "nan", "string", "positional", "category-type", "category-negative"],
)
def test_nonsense_thresholds_are_a_clear_error(pytester, models, kld_args, call, message):
    pytester.makepyfile(
        f"""
        def test_it(assert_kld):
            assert_kld({models['q8']!r}, {call})
        """
    )
    result = pytester.runpytest(*kld_args)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([literal(message)])
    assert "Traceback" not in result.stdout.str()
    assert "pytest-kld leaderboard" not in result.stdout.str()  # refused before comparing


def test_unknown_category_and_top1_minimum(pytester, models, kld_args):
    pytester.makepyfile(
        f"""
        def test_it(assert_kld):
            assert_kld({models['q4']!r}, top1=0.99, categories={{"nope": {{"mean": 1.0}}}})
        """
    )
    result = pytester.runpytest(*kld_args)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*: 2 of 2 checks failed",
            "  top1: 0.* < minimum 0.9900  FAILED",
            "  category 'nope': not in this corpus (has: *prose*)  FAILED",
        ]
    )


@pytest.mark.parametrize(
    "value",
    ["numpy.float32(50)", "numpy.float64(50)", "numpy.int64(50)", "fractions.Fraction(50, 1)", "decimal.Decimal('50')"],
)
def test_thresholds_accept_any_real_number_type(pytester, models, kld_args, value):
    pytester.makepyfile(
        f"""
        import decimal, fractions, numpy

        def test_it(assert_kld):
            assert_kld({models['q8']!r}, mean={value}, p99={value})
        """
    )
    pytester.runpytest(*kld_args).assert_outcomes(passed=1)


def test_huge_threshold_is_one_line(pytester, models, kld_args):
    pytester.makepyfile(
        f"""
        def test_it(assert_kld):
            assert_kld({models['q8']!r}, mean=10**400)
        """
    )
    result = pytester.runpytest(*kld_args)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*assert_kld: threshold mean=1000* must be a finite number"])
    assert "OverflowError" not in result.stdout.str() and "Traceback" not in result.stdout.str()


def test_nan_logits_fail_with_a_count_of_positions(pytester, models, kld_args):
    pytester.makepyfile(quant_test(models, ["nan", "q8"], mean=10.0, p99=100.0))
    out = pytester.path / "kld.json"
    result = pytester.runpytest(*kld_args, f"--kld-json={out}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            f"broken model for {models['nan']} against *: 1 of 3 checks failed",
            "  * of * positions (*%) had NaN or inf log-probs, more than the 0 allowed; *  FAILED",
            "  mean: * <= allowed 10  ok",
            "The model is broken (NaN/inf), so no threshold can make it pass.",
        ]
    )
    assert "raise the thresholds" not in result.stdout.str()
    n, total = map(int, re.search(r"(\d+) of (\d+) positions \(", result.stdout.str()).groups())
    assert 0 < n < total
    assert "INTERNALERROR" not in result.stdout.str()
    # the leaderboard: a non-finite column, the broken row last, failed, and never marked best
    result.stdout.fnmatch_lines(["model * non-finite *result", "llama-nan *FAIL: non-finite"])
    nan_line = next(ln for ln in result.stdout.lines if ln.startswith("llama-nan "))
    assert "*" not in nan_line.replace("FAIL: non-finite", ""), nan_line
    assert f"{n} (" in nan_line
    doc = json.loads(out.read_text())
    validate_results(doc)
    rows = {r["model"]: r for r in doc["results"]}
    assert [r["model"] for r in doc["results"]] == sorted(rows)  # stable order, whatever finished first
    assert rows["llama-nan"]["nonfinite"] == n and rows["llama-nan"]["count"] == total - n
    assert rows["llama-nan"]["nonfinite_share"] == pytest.approx(n / total)
    assert rows["llama-nan"]["outcome"] == "failed"


def test_nan_model_never_best_even_when_its_finite_positions_agree(pytester, models, kld_args):
    """The NaN model's finite positions can agree with the reference better than any quant (it is
    the reference with one poisoned embedding row): it must still not win a column, through
    ``kld_compare`` (which fails it) and the Markdown report."""
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.parametrize("quant", [{models['nan']!r}, {models['q4']!r}, {models['q8']!r}], ids=["nan", "q4", "q8"])
        def test_compare(kld_compare, quant):
            kld_compare(quant)

        def test_allowed(kld_compare):
            r = kld_compare({models['nan']!r}, nonfinite=10**9, name="nan-allowed")
            assert r.summary["nonfinite"] > 0
        """
    )
    md = pytester.path / "kld.md"
    result = pytester.runpytest(*kld_args, f"--kld-markdown={md}")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines([f"*{models['nan']} is broken: * positions (*) had NaN or inf log-probs, more than the 0 allowed*"])
    board = [ln for ln in result.stdout.lines if ln.startswith(("llama-nan", "nan-allowed"))][:2]
    assert len(board) == 2 and all("*" not in ln.split("  FAIL")[0].replace("(", "") for ln in board), board
    text = md.read_text()
    nan_md = next(ln for ln in text.splitlines() if "llama-nan" in ln)
    assert "**" not in nan_md and "non-finite" in nan_md, nan_md
    assert "| non-finite |" in text


# ------------------------------------------------------------------------------------------
# The marker


def test_marker_overrides_settings_per_test(pytester, models):
    pytester.makepyfile(
        f"""
        import pytest

        pytestmark = pytest.mark.kld(reference={models['ref']!r})  # no --kld-reference given

        def test_module_settings(kld_compare):
            r = kld_compare({models['q8']!r})
            assert r.reference["name"] == {models['ref']!r} and r.settings["top_k"] == 256

        @pytest.mark.kld(top_k=8)
        def test_closest_marker_wins(kld_compare):
            r = kld_compare({models['q8']!r})
            assert r.settings["top_k"] == 8 and r.reference["name"] == {models['ref']!r}

        @pytest.mark.kld(topk=8)
        def test_unknown_key(kld_compare):
            pass

        @pytest.mark.kld(top_k="many")
        def test_bad_value(kld_compare):
            pass

        @pytest.mark.kld(exec="fast")
        def test_bad_choice(kld_compare):
            pass
        """
    )
    result = pytester.runpytest(f"--kld-cache-dir={pytester.path / 'cache'}", "--kld-n-chunks=4")
    result.assert_outcomes(passed=2, errors=3)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_unknown_key*",
            literal("@pytest.mark.kld: unknown setting(s) topk; known: baseline_fail, chunk_tokens, dataset, drift_tokens, exec, explain, mode, *top_k"),
            "*ERROR at setup of test_bad_value*",
            "@pytest.mark.kld: top_k='many' must be an integer of at least 1",
            "*ERROR at setup of test_bad_choice*",
            "@pytest.mark.kld: exec='fast': choose auto, native or float32",
        ]
    )
    # one row per K; the header names both
    result.stdout.fnmatch_lines(
        [
            "KL(reference || quant)  reference: *  mode: short  positions: *  K: 8, 256  exec: float32  vocab work: numpy",
            "model *",
            "---*",
            literal("llama-q8-g64 [K=8] *pass"),  # (K=8 reads lower: the top-K estimator's bias)
            literal("llama-q8-g64 [K=256] *pass"),
        ]
    )
    assert len(list((pytester.path / "cache").glob("ref-*/short-*[!k]"))) == 2  # two cache entries


# ------------------------------------------------------------------------------------------
# Fresh interpreters: xdist, imports, the terminal


def test_xdist_builds_once_prints_once_and_rebuilds_once(pytester, models, kld_args):
    builds = pytester.path / "builds.txt"
    workers = pytester.path / "workers.txt"
    pytester.makeconftest(count_builds_conftest(builds))
    pytester.makepyfile(
        quant_test(models, ["q8", "q4", "q4g32", "ref"], p99=5.0).replace(
            "    result = assert_kld(",
            "    import os\n"
            f"    open({str(workers)!r}, 'a').write(os.environ['PYTEST_XDIST_WORKER'] + '\\n')\n"
            "    result = assert_kld(",
        )
    )
    out = pytester.path / "kld.json"
    result = pytester.runpytest_subprocess("-n", "2", *kld_args, f"--kld-json={out}")
    result.assert_outcomes(passed=2, failed=2)  # mean 0.1 fails both 4-bit quants
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert set(workers.read_text().split()) == {"gw0", "gw1"}  # both workers needed the cache
    assert len(builds.read_text().splitlines()) == 1, builds.read_text()
    text = result.stdout.str()
    assert text.count("pytest-kld leaderboard") == 1
    board = text.split("quantisation (read from", 1)[0]  # the leaderboard, not the quant table
    for name in ("llama ", "llama-q8-g64", "llama-q4-g64", "llama-q4-g32"):
        assert len([ln for ln in board.splitlines() if ln.startswith(name)]) == 1, name
        assert len([ln for ln in text.splitlines() if ln.startswith(name)]) == 2, name  # + quant table
    assert len(json.loads(out.read_text())["results"]) == 4
    assert "building reference cache" in result.stderr.str()  # from the worker that built it

    # --kld-rebuild: the two workers of one session rebuild the existing entry exactly once
    result = pytester.runpytest_subprocess("-n", "2", *kld_args, "--kld-rebuild")
    result.assert_outcomes(passed=2, failed=2)
    assert len(builds.read_text().splitlines()) == 2, builds.read_text()
    assert result.stdout.str().count("pytest-kld leaderboard") == 1


def test_progress_reaches_the_terminal_despite_capture(pytester, models, kld_args):
    pytester.makepyfile(quant_test(models, ["q8"]))
    result = pytester.runpytest_subprocess(*kld_args)  # default capture (fd)
    result.assert_outcomes(passed=1)
    err = result.stderr.str()
    assert "pytest-kld: building reference cache" in err and "tokens to run" in err
    assert re.search(r"building reference cache .*: (\d+)/\1 tokens, [\d,]+ tok/s, ETA 0s", err), err
    # A second session loads the cache: no build line (in-process is enough for that).
    result = pytester.runpytest(*kld_args)
    result.assert_outcomes(passed=1)
    assert "building reference cache" not in result.stderr.str() + result.stdout.str()


def test_a_suite_without_kld_tests_never_imports_mlx(pytester, models, kld_args):
    pytester.makeconftest(
        """
        import sys

        HEAVY = ("mlx", "mlx.core", "mlx_lm", "numpy", "pytest_kld.reference", "pytest_kld.compare")

        def pytest_unconfigure(config):
            with open("imported.txt", "w") as f:
                f.write(" ".join(m for m in HEAVY if m in sys.modules) + "\\n")
        """
    )
    pytester.makepyfile(
        """
        import sys

        def test_plain():
            assert "mlx" not in sys.modules

        def test_settings_fixture(kld_session):
            assert kld_session.settings["n_chunks"] == 4
        """
    )
    out = pytester.path / "kld.json"
    result = pytester.runpytest_subprocess(*kld_args, f"--kld-json={out}")
    result.assert_outcomes(passed=2)
    assert (pytester.path / "imported.txt").read_text().split() == []
    assert "pytest-kld leaderboard" not in result.stdout.str()
    doc = json.loads(out.read_text())  # still written, for CI that reads it
    assert doc["results"] == [] and doc["settings"]["reference"] == models["ref"]


def test_p_no_kld_disables_the_plugin(pytester, monkeypatch):
    pytester.makepyfile(
        """
        def test_unrelated():
            pass
        """
    )
    pytester.runpytest("-p", "no:kld").assert_outcomes(passed=1)
    monkeypatch.setenv("COLUMNS", "250")
    help_text = pytester.runpytest("-p", "no:kld", "--help").stdout.str()
    assert "--kld-" not in help_text and "kld_reference" not in help_text
    result = pytester.runpytest("-p", "no:kld", "--kld-reference=x")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unrecognized arguments: --kld-reference=x*"])
    result = pytester.runpytest("-p", "no:kld", "--fixtures")
    assert "assert_kld" not in result.stdout.str()


def test_workflow_markdown_option_with_equals_reads_the_ini_and_space_form_says_why_not(pytester, models, tmp_path,
                                                                                         monkeypatch):
    """Issue 14: the example workflow's `pytest -n 2 --kld-markdown="$GITHUB_STEP_SUMMARY"`, with
    the summary file outside the repository, reads the project's ini (kld_reference); written
    with a space, pytest takes the value for a test path when choosing the rootdir, the ini is
    not read, and the error says so."""
    pytester.makepyprojecttoml(
        f'[tool.pytest.ini_options]\nkld_reference = "{models["ref"]}"\nkld_n_chunks = 2\n'
        f'kld_cache_dir = "{pytester.path / "cache"}"\n'
    )
    pytester.makepyfile(test_q=f"def test_q(assert_kld):\n    assert_kld({models['q8']!r}, mean=1.0)\n")
    outside = tmp_path / "runner" / "step_summary.md"
    outside.parent.mkdir()
    outside.write_text("# earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(outside))
    result = pytester.runpytest_subprocess("-n", "2", f"--kld-markdown={outside}", "--junitxml=kld-junit.xml",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert outside.read_text().startswith("# earlier step\n") and "llama-q8-g64" in outside.read_text()
    result = pytester.runpytest_subprocess("--kld-markdown", str(outside), "-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*no reference model set*--kld-markdown was given its value as a separate "
                                 "argument*write --kld-markdown=VALUE*"])


def test_a_hub_quant_is_pinned_by_revision(pytester, models, tmp_path, monkeypatch):
    """Issue 14: assert_kld/kld_compare take the compared model's hub revision (offline, from a
    laid-out hub cache): the pinned commit resolves, another one fails in one line."""
    from test_models import make_hub_cache

    commit = "fedcba9876543210fedcba9876543210fedcba98"
    files = {p.name: p.read_bytes() for p in Path(models["q8"]).iterdir() if p.is_file()}
    make_hub_cache(tmp_path / "hub", "org/tiny-q8", files, commit=commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytester.makepyfile(
        f"""
        def test_pinned(assert_kld):
            r = assert_kld("org/tiny-q8", revision={commit!r}, mean=1.0)
            assert r.path.endswith({commit!r})

        def test_other_revision(kld_compare):
            kld_compare("org/tiny-q8", revision="0" * 40)
        """
    )
    result = pytester.runpytest_subprocess(f"--kld-reference={models['ref']}", f"--kld-cache-dir={pytester.path / 'c'}",
                                           "--kld-n-chunks=2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*model org/tiny-q8@0000000000000000000000000000000000000000 is not in the hub cache*"])
