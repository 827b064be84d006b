"""The command line: python -m pytest_kld REFERENCE QUANT..."""

from __future__ import annotations

import json
import subprocess
import sys


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
    # The leaderboard lists the better quant first.
    assert p.stdout.index(str(q8.name)) < p.stdout.index(str(q3.name))


def test_cli_bad_model_is_one_line_exit_2(tiny_model, tmp_path):
    p = run(tiny_model("llama"), tmp_path / "nope", "--n-chunks", 2, "--top-k", 8, "--cache-dir", tmp_path / "c")
    assert p.returncode == 2
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("pytest-kld: model")]
    assert len(err) == 1 and "nope" in err[0] and "not found" in err[0], p.stderr
