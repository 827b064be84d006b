"""Bad input gets one line, not a traceback (issue 10): truncated weights as reference or as
compared model, a model path that is not UTF-8, n_ctx too small to score anything, a dataset
that is a directory, long mode offline asked once per session."""

from __future__ import annotations

import os
import shutil

import pytest

from pytest_kld.cache import ensure_reference
from pytest_kld.compare import compare
from pytest_kld.errors import CorpusError, ModelError
from pytest_kld.reference import Settings

S8 = Settings(top_k=8, chunk_tokens=16)


def _truncated_copy(src, dst, cut=100):
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    size = f.stat().st_size
    os.truncate(f, size - cut)
    return dst, f, size


def test_truncated_reference_weights_one_line(tiny_model, prose_spec, tmp_path):
    ref, f, size = _truncated_copy(tiny_model("llama"), tmp_path / "ref")
    with pytest.raises(ModelError) as e:
        ensure_reference(ref, prose_spec, S8, cache_dir=tmp_path / "c")
    msg = str(e.value)
    assert msg == f"{f} is truncated: its header describes {size} bytes but the file has {size - 100}; re-download or re-convert the model"


def test_truncated_quant_one_line(tiny_model, prose_spec, tmp_path):
    cache = ensure_reference(tiny_model("llama"), prose_spec, S8, cache_dir=tmp_path / "c")
    q, f, size = _truncated_copy(tiny_model("llama", bits=4), tmp_path / "q4")
    with pytest.raises(ModelError, match=r"is truncated: its header describes \d+ bytes but the file has \d+") as e:
        compare(cache, q)
    assert "\n" not in str(e.value)


def test_truncated_quant_through_the_plugin_is_one_line(pytester, tiny_model, tmp_path):
    q, f, _ = _truncated_copy(tiny_model("llama", bits=4), tmp_path / "q4")
    pytester.makepyfile(f"def test_q(assert_kld):\n    assert_kld({str(q)!r}, mean=1.0)\n")
    result = pytester.runpytest(f"--kld-reference={tiny_model('llama')}", f"--kld-cache-dir={pytester.path / 'c'}",
                                "--kld-n-chunks=2", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*{f} is truncated: *; re-download or re-convert the model"])
    assert "RuntimeError" not in result.stdout.str() and "Traceback" not in result.stdout.str()


def test_non_utf8_model_path_one_line(tiny_model, prose_spec, tmp_path):
    bad = os.path.join(os.fsencode(tmp_path), b"model-\xff")
    shutil.copytree(os.fsencode(tiny_model("llama")), bad)
    with pytest.raises(ModelError) as e:
        ensure_reference(os.fsdecode(bad), prose_spec, S8, cache_dir=tmp_path / "c")
    msg = str(e.value)
    assert "not valid UTF-8" in msg and "rename" in msg and "\n" not in msg and "bad_cast" not in msg


def test_dataset_that_is_a_directory(tmp_path):
    from pytest_kld.corpus import corpus_spec

    (tmp_path / "data.jsonl").mkdir()
    with pytest.raises(CorpusError) as e:
        corpus_spec("file", dataset=tmp_path / "data.jsonl")
    assert str(e.value) == f"{tmp_path / 'data.jsonl'}: the dataset is a directory; --kld-dataset takes one file (.txt, .jsonl or .parquet)"


@pytest.mark.parametrize("mode, smallest", [("short", 10), ("long", 3)])
def test_n_ctx_too_small_names_the_option_and_the_smallest_value(mode, smallest, tmp_path):
    from pytest_kld.corpus import corpus_spec

    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    kw = {"dataset": text} if mode == "long" else {}
    with pytest.raises(CorpusError) as e:
        corpus_spec(mode, n_ctx=smallest - 1, **kw)
    assert f"--kld-n-ctx={smallest - 1} leaves no position to score" in str(e.value)
    assert f"use at least {smallest}" in str(e.value) and "score_offset" not in str(e.value)
    corpus_spec(mode, n_ctx=smallest, **kw)  # the smallest value works


def test_long_mode_offline_is_asked_once_per_session(pytester, tiny_model, tmp_path, monkeypatch):
    """Three long-mode tests with no WikiText and the hub offline: each fails with the same one
    line, and the hub cache is consulted once, not once per test."""
    count = tmp_path / "asked"
    pytester.makeconftest(
        f"""
import pytest_kld.sources as sources

_fetch = sources._fetch_wikitext

def counted(*a, **k):
    with open({str(count)!r}, "a") as f:
        f.write("asked\\n")
    return _fetch(*a, **k)

sources._fetch_wikitext = counted
"""
    )
    pytester.makepyfile(
        "import pytest\n\n@pytest.mark.parametrize('i', range(3))\ndef test_long(kld_compare, i):\n"
        f"    kld_compare({str(tiny_model('llama', bits=4))!r})\n"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    result = pytester.runpytest(f"--kld-reference={tiny_model('llama')}", "--kld-mode=long",
                                f"--kld-cache-dir={pytester.path / 'c'}", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=3)
    lines = [ln[ln.index("WikiText-2 ("):] for ln in result.stdout.lines if "WikiText-2 (" in ln and "offline" in ln]
    assert len(lines) >= 3 and len(set(lines)) == 1, lines  # the same one line each time
    assert count.read_text().count("asked") == 1
