"""Per-category results and gating (issue 5): summaries per corpus category, the leaderboard's
--kld-by-category table, and assert_kld(..., categories={...}) failing and passing as expected."""

from __future__ import annotations

import pytest

from pytest_kld.cache import ensure_reference
from pytest_kld.compare import compare
from pytest_kld.corpus import corpus_spec
from pytest_kld.reference import Settings


@pytest.fixture(scope="module")
def short_cache(tiny_model, tmp_path_factory):
    spec = corpus_spec("short", n_chunks=12)
    return ensure_reference(tiny_model("llama"), spec, Settings(top_k=32), cache_dir=tmp_path_factory.mktemp("c"))


def test_category_summaries_partition_the_positions(short_cache, tiny_model):
    r = compare(short_cache, tiny_model("llama", bits=4))
    cats = r.categories
    assert set(cats) == {"chat", "code", "json", "math", "multilingual", "prose"}
    assert sum(c["count"] for c in cats.values()) == r.summary["count"]
    # The overall mean is the count-weighted mean of the category means.
    weighted = sum(c["mean"] * c["count"] for c in cats.values()) / r.summary["count"]
    assert weighted == pytest.approx(r.summary["mean"], rel=1e-9)
    assert len({round(c["mean"], 6) for c in cats.values()}) > 1


GATE = """
import json, pytest
Q = {q!r}
def test_gate(assert_kld):
    r = assert_kld(Q, categories={cats})
"""


@pytest.mark.parametrize("slack, outcome", [(2.0, "passed"), (0.5, "failed")])
def test_category_gate(pytester, short_cache, tiny_model, slack, outcome):
    q = str(tiny_model("llama", bits=4))
    observed = compare(short_cache, q).categories
    cats = {"code": {"mean": observed["code"]["mean"] * slack}, "json": {"p99": observed["json"]["p99"] * slack}}
    pytester.makepyfile(GATE.format(q=q, cats=cats))
    res = pytester.runpytest_subprocess(
        f"--kld-reference={tiny_model('llama')}",
        f"--kld-cache-dir={short_cache.path.parent.parent}",
        "--kld-top-k=32",
        "--kld-n-chunks=12",
        "--kld-by-category",
        "-p", "no:cacheprovider",
    )
    res.assert_outcomes(**{outcome: 1})
    if outcome == "failed":
        res.stdout.fnmatch_lines(["*[[]code[]] mean: * > allowed *", "*[[]json[]] p99: * > allowed *"])
    res.stdout.fnmatch_lines(["*mean KLD by category:*", "*code*json*math*"])


def test_unknown_category_is_a_clear_failure(pytester, short_cache, tiny_model):
    q = str(tiny_model("llama", bits=8))
    pytester.makepyfile(GATE.format(q=q, cats={"poetry": {"mean": 1.0}}))
    res = pytester.runpytest_subprocess(
        f"--kld-reference={tiny_model('llama')}",
        f"--kld-cache-dir={short_cache.path.parent.parent}",
        "--kld-top-k=32", "--kld-n-chunks=12", "-p", "no:cacheprovider",
    )
    res.assert_outcomes(failed=1)
    res.stdout.fnmatch_lines(["*category 'poetry': not in this corpus (has: chat, code, json, math, multilingual, prose)*"])
