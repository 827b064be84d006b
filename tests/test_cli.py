"""The command line: python -m pytest_kld REFERENCE QUANT..."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import validate_results


def run(*args):
    return subprocess.run([sys.executable, "-m", "pytest_kld", *map(str, args)], capture_output=True, text=True)


def test_cli_prints_the_leaderboard_and_json(tiny_model, tmp_path):
    ref, q8, q3 = tiny_model("llama"), tiny_model("llama", bits=8), tiny_model("llama", bits=3)
    out = tmp_path / "r.json"
    p = run(ref, q3, q8, "--n-chunks", 4, "--top-k", 32, "--cache-dir", tmp_path / "c", "--json", out)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("KL(reference || quant)") and "K: 32" in lines[0]
    doc = json.loads(out.read_text())
    means = {r["path"]: r["mean"] for r in doc["results"]}
    assert 0 < means[str(q8)] < means[str(q3)]
    # The BLAS the comparisons ran on (issue 22): under the header, in each row, in versions.
    from pytest_kld.blas import machine

    blas_lines = [ln for ln in lines if ln.startswith("BLAS: ")]
    assert len(blas_lines) == 1 and lines[1] == blas_lines[0]
    assert {r["blas"] for r in doc["results"]} == {blas_lines[0][len("BLAS: "):]} == {doc["versions"]["blas"]}
    if sys.platform.startswith("linux") and machine() in ("x86_64", "aarch64"):
        assert "OpenBLAS" in doc["versions"]["blas"] or "mlx bundled" in doc["versions"]["blas"]
    # The leaderboard lists the better quant first.
    assert p.stdout.index(str(q8.name)) < p.stdout.index(str(q3.name))


def test_cli_bad_model_is_one_line_exit_2(tiny_model, tmp_path):
    p = run(tiny_model("llama"), tmp_path / "nope", "--n-chunks", 2, "--top-k", 8, "--cache-dir", tmp_path / "c")
    assert p.returncode == 2
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("pytest-kld: model")]
    assert len(err) == 1 and "nope" in err[0] and "not found" in err[0], p.stderr


def test_cli_json_to_a_missing_directory_fails_before_any_work(tiny_model, tmp_path):
    cache = tmp_path / "c"
    p = run(tiny_model("llama"), tiny_model("llama", bits=4), "--cache-dir", cache, "--json", tmp_path / "no" / "r.json")
    assert p.returncode == 2
    assert p.stderr.strip() == f"pytest-kld: --json {tmp_path / 'no' / 'r.json'}: directory {tmp_path / 'no'} does not exist"
    assert not cache.exists()  # nothing was built


def test_cli_broken_model_exits_1_with_strict_json(tiny_model, tmp_path):
    """A model with NaN log-probs fails the command (exit 1) unless --nonfinite allows them, and
    the JSON stays strict (no NaN literal)."""
    import shutil

    import mlx.core as mx

    ref = tiny_model("llama")
    nan = tmp_path / "llama-nan"
    shutil.copytree(ref, nan)
    w = mx.load(str(nan / "model.safetensors"))
    emb = w["model.embed_tokens.weight"]
    w["model.embed_tokens.weight"] = mx.where((mx.arange(emb.shape[0]) == 30)[:, None], mx.array(float("nan"), emb.dtype), emb)
    mx.save_safetensors(str(nan / "model.safetensors"), w, metadata={"format": "mlx"})
    out = tmp_path / "r.json"
    common = ("--n-chunks", 6, "--top-k", 16, "--cache-dir", tmp_path / "c", "--json", out)
    p = run(ref, nan, *common)
    assert p.returncode == 1, p.stderr
    assert f"broken model for {nan}" in p.stderr and "had NaN or inf log-probs" in p.stderr
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    validate_results(json.loads(text))
    row = json.loads(text)["results"][0]
    assert row["nonfinite"] > 0 and row["outcome"] == "failed"
    assert "FAIL" not in p.stdout.split("non-finite")[0] or "non-finite" in p.stdout
    p = run(ref, nan, *common, "--nonfinite", 10**6)
    assert p.returncode == 0, p.stderr


def test_cli_threshold_exit_1_strict_versioned_json_and_progress(tiny_model, tmp_path):
    """Issue 11's must-show: over budget -> exit 1 with the checks on stderr, strict JSON with
    its schema version and thresholds, and a comparison prints progress with rate and ETA."""
    ref, q3 = tiny_model("llama"), tiny_model("llama", bits=3)
    out = tmp_path / "r.json"
    p = run(ref, q3, "--mean", 0.01, "--n-chunks", 3, "--top-k", 16, "--cache-dir", tmp_path / "c", "--json", out)
    assert p.returncode == 1, p.stderr
    assert "KLD over threshold for" in p.stderr and "mean: " in p.stderr and "> allowed 0.01" in p.stderr
    assert re.search(rf"pytest-kld: comparing {re.escape(str(q3))}: \d+/\d+ tokens, [\d,]+ tok/s, ETA \d+s", p.stderr)
    text = out.read_text()
    assert "NaN" not in text
    doc = json.loads(text)
    validate_results(doc)
    assert doc["schema_version"] == 1 and doc["direction"] == "KL(reference || quant)"
    (r,) = doc["results"]
    assert r["outcome"] == "failed" and r["thresholds"] == {"mean": 0.01, "nonfinite": 0}
    assert r["margins"]["mean"] == pytest.approx(0.01 - r["mean"]) and r["margins"]["mean"] < 0
    assert r["margins"]["nonfinite"] == 0
    entry = Path(r["cache"]["path"])
    assert json.loads((entry / "manifest.json").read_text())["key"] == r["cache"]["key"]
    assert r["cache"]["corpus_sha256"] and r["cache"]["reference_fingerprint"].startswith("sha256-full:")
    # the same within budget: exit 0, and the cache is reused (said so), not rebuilt
    p = run(ref, q3, "--mean", 10, "--n-chunks", 3, "--top-k", 16, "--cache-dir", tmp_path / "c")
    assert p.returncode == 0, p.stderr
    assert "pytest-kld: reference cache reused: built " in p.stderr and "building" not in p.stderr


def test_cli_build_info_and_compare_against_a_cache_without_the_reference(tiny_model, tmp_path):
    import shutil

    ref = tmp_path / "ref"
    shutil.copytree(tiny_model("llama"), ref)
    p = run("build", ref, "--n-chunks", 3, "--top-k", 16, "--cache-dir", tmp_path / "c")
    assert p.returncode == 0, p.stderr
    entry = p.stdout.strip().splitlines()[-1]
    assert (tmp_path / "c") in __import__("pathlib").Path(entry).parents
    info = run("info", entry)
    assert info.returncode == 0, info.stderr
    facts = json.loads(info.stdout)
    assert facts["settings"]["top_k"] == 16 and facts["positions"] > 0 and facts["reference"]["name"] == str(ref)
    shutil.rmtree(ref)  # the reference's weights are gone: the cache alone serves
    p = run("compare", entry, tiny_model("llama", bits=8))
    assert p.returncode == 0, p.stderr
    assert "llama-q8" in p.stdout


def test_cli_version_and_usage_errors(tmp_path):
    from pytest_kld import __version__

    p = run("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"pytest-kld {__version__}"
    p = run("info", tmp_path / "nothing")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "not usable" in p.stderr
