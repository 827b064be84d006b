"""The quant's model card (issue 25): `pytest-kld card RESULTS.json QUANT` writes the quant's row
and its neighbours into a marked section of its README.md and the same figures as model-index
eval results (huggingface_hub's card API); the author's text and keys stay; a rerun replaces;
bad input writes nothing; --push goes through huggingface_hub's public API only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from pytest_kld.card import CHART_NAME, END, START
from pytest_kld.cli import main

# An author's card: front matter in huggingface_hub's own YAML style (so it can come back byte for
# byte), an eval result of another tool, and text before and after where the section will go.
AUTHOR_YAML = """\
license: apache-2.0
base_model: org/base-model
library_name: mlx
tags:
- mlx
- 4-bit
quant_recipe:
  bits: 4
  group_size: 64
model-index:
- name: my-quant
  results:
  - task:
      type: text-generation
    dataset:
      name: HellaSwag
      type: hellaswag
    metrics:
    - type: acc
      value: 0.41
    source:
      url: https://example.org/evals
      name: my own harness
"""
AUTHOR_TEXT = "\n# My quant\n\nMade with care.  Trailing spaces stay.  \n\n## Usage\n\n```\nmlx_lm.generate\n```\n"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "pytest_kld", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    """One comparison of three tiny quants (copies: the cards are written into them), with a chart."""
    root = tmp_path_factory.mktemp("card")
    quants = {}
    for bits in (8, 4, 3):
        quants[bits] = root / f"q{bits}"
        shutil.copytree(tiny_model("llama", bits=bits), quants[bits])
    ref = root / "ref"
    shutil.copytree(tiny_model("llama"), ref)
    p = cli("compare", ref, *quants.values(), "--n-chunks", 3, "--top-k", 16, "--cache-dir", root / "cache",
            "--json", root / "results.json", "--chart", root / "chart.png")
    assert p.returncode == 0, p.stderr
    return root / "results.json", quants, ref


@pytest.fixture
def quant(run, tmp_path):
    """A fresh copy of the 4-bit quant holding the author's card."""
    q = tmp_path / "my-quant"
    shutil.copytree(run[1][4], q)
    (q / "README.md").write_text(f"---\n{AUTHOR_YAML}---\n{AUTHOR_TEXT}")
    return q


def _row(results, name):
    return next(r for r in json.loads(results.read_text())["results"] if r["model"] == name)


def test_the_authors_text_and_keys_stay_byte_for_byte(run, quant):
    from huggingface_hub import metadata_load

    before = metadata_load(quant / "README.md")
    assert main(["card", str(run[0]), str(quant)]) == 0
    text = (quant / "README.md").read_text()
    # front matter: the author's keys, values and order as they were, then model-index
    head, body = text.split("\n---\n", 1)
    assert head.startswith("---\n" + AUTHOR_YAML.split("model-index:")[0])  # byte for byte up to model-index
    _same_keys(before, metadata_load(quant / "README.md"))
    # body: the author's text, then the section, byte for byte
    assert body.startswith(AUTHOR_TEXT) and body.count(START) == body.count(END) == 1
    assert body[len(AUTHOR_TEXT):] == "\n" + body[body.index(START):]
    assert (quant / CHART_NAME).read_bytes() == (run[0].parent / "chart.png").read_bytes()


def test_hand_written_yaml_keeps_its_keys_and_values(run, quant):
    """YAML in another style (comments, quotes, flow lists) goes through huggingface_hub's dump:
    keys, values and order are kept, the formatting and comments are not (documented)."""
    from huggingface_hub import metadata_load

    (quant / "README.md").write_text('---\n# my comment\nlicense: "apache-2.0"\ntags: [mlx, 4-bit]\n'
                                     'quant_recipe: {bits: 4, group_size: 64}\n---\n' + AUTHOR_TEXT)
    before = metadata_load(quant / "README.md")
    assert main(["card", str(run[0]), str(quant)]) == 0
    _same_keys(before, metadata_load(quant / "README.md"))
    assert (quant / "README.md").read_text().split("\n---\n", 1)[1].startswith(AUTHOR_TEXT)


def _same_keys(before: dict, after: dict) -> None:
    assert [k for k in after if k != "model-index"] == [k for k in before if k != "model-index"]
    assert {k: v for k, v in after.items() if k != "model-index"} == {k: v for k, v in before.items()
                                                                     if k != "model-index"}
    assert "model-index" in after


def test_a_rerun_replaces_the_section_and_keeps_text_on_both_sides(run, quant, tmp_path):
    main(["card", str(run[0]), str(quant)])
    readme = quant / "README.md"
    # the author adds text after the section; a rerun with other figures replaces only the section
    readme.write_text(readme.read_text() + "\n## Changelog\n\n- v2: re-quantised\n")
    first = readme.read_text()
    doc = json.loads(run[0].read_text())
    row = next(r for r in doc["results"] if r["model"] == "q4")
    row["mean"], row["p99"] = 0.123456789, 1.5
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(doc))
    assert main(["card", str(changed), str(quant)]) == 0
    second = readme.read_text()
    assert second.count(START) == second.count(END) == 1 and second.count("## KL divergence") == 1
    assert "**0.12346**" in second and "**1.5000**" in second and f"**{_row(run[0], 'q4')['mean']:.5f}**" not in second
    a, b = second.split(START), first.split(START)
    assert a[0].split("\n---\n", 1)[1] == b[0].split("\n---\n", 1)[1]  # text before the section
    assert a[1].split(END)[1] == b[1].split(END)[1] == "\n\n## Changelog\n\n- v2: re-quantised\n"  # and after
    assert main(["card", str(changed), str(quant)]) == 0 and readme.read_text() == second  # same input, same bytes


def test_eval_results_load_back_through_huggingface_hub(run, quant):
    from huggingface_hub import ModelCard, metadata_load

    assert main(["card", str(run[0]), str(quant)]) == 0
    row = _row(run[0], "q4")
    data = ModelCard.load(quant / "README.md").data
    assert data.model_name == "my-quant"  # the author's model-index name is kept
    ours = {r.metric_type: r for r in data.eval_results if r.source_name == "pytest-kld"}
    assert {k: r.metric_value for k, r in ours.items()} == {
        "kl_divergence": row["mean"], "kl_divergence_p99": row["p99"], "top1_agreement": row["top1"],
        "bits_per_weight": row["bpw"]}
    mean = ours["kl_divergence"]
    assert "KL(reference || quant)" in mean.metric_name and "nats" in mean.metric_name
    assert mean.metric_args["ci95"] == [row["ci95_low"], row["ci95_high"]]
    assert mean.metric_args["reference_fingerprint"] == row["cache"]["reference_fingerprint"]
    assert mean.metric_args["top_k"] == 16 and mean.metric_args["exec"] == row["exec"]
    assert mean.dataset_args["corpus_sha256"] == row["cache"]["corpus_sha256"]
    # the other tool's result is still there, unchanged
    theirs = [r for r in data.eval_results if r.source_name == "my own harness"]
    assert [(r.metric_type, r.metric_value, r.dataset_type) for r in theirs] == [("acc", 0.41, "hellaswag")]
    index = metadata_load(quant / "README.md")["model-index"]
    assert len(index) == 1 and len(index[0]["results"]) == 2


def test_the_section_shows_the_row_its_neighbours_and_provenance(run, quant):
    main(["card", str(run[0]), str(quant)])
    section = (quant / "README.md").read_text().split(START)[1].split(END)[0]
    rows = [line for line in section.splitlines() if line.startswith("| q") or line.startswith("| **q")]
    assert [r.split("|")[1].strip() for r in rows] == ["q8", "**q4**", "q3"]  # by mean KLD, this one bold
    row = _row(run[0], "q4")
    assert f"**{row['ci95_low']:.5f}-{row['ci95_high']:.5f}**" in section and f"**{row['top1']:.2%}**" in section
    for fact in (row["cache"]["reference_fingerprint"], row["cache"]["corpus_sha256"], row["fingerprint"],
                 "KL(reference || quant)", "K (reference log-probs kept per position): 16", "`float32`",
                 f"![mean KLD against bits per weight, every quant of the run]({CHART_NAME})"):
        assert fact in section, fact


def test_a_copy_elsewhere_matches_by_fingerprint_and_out_leaves_the_quant_alone(run, tmp_path):
    copy = tmp_path / "renamed-somewhere"
    shutil.copytree(run[1][3], copy)
    before = (copy / "README.md").read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    assert main(["card", str(run[0]), str(copy), "--out", str(out)]) == 0
    assert (copy / "README.md").read_bytes() == before
    assert "| **q3** |" in (out / "README.md").read_text()


def test_a_card_without_front_matter_keeps_its_text_and_line_endings(run, quant):
    (quant / "README.md").write_bytes(b"# Plain card\r\n\r\nNo YAML here.")
    assert main(["card", str(run[0]), str(quant)]) == 0
    data = (quant / "README.md").read_bytes()
    body = data.split(b"\r\n---\r\n", 1)[1]
    assert body.startswith(b"# Plain card\r\n\r\nNo YAML here.\r\n\r\n" + START.encode())
    assert b"\n" not in data.replace(b"\r\n", b"")  # every line ending the card's own


@pytest.mark.parametrize("case", ["missing row", "schema 2", "bad yaml", "reference", "two marker pairs", "two rows"])
def test_bad_input_one_line_and_nothing_written(run, quant, tmp_path, capsys, case):
    results, readme = run[0], quant / "README.md"
    target = quant
    if case == "missing row":
        target = tmp_path / "other"
        shutil.copytree(run[1][4], target)
        cfg = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**cfg, "rope_theta": 12345.0}))  # other bytes
        readme = target / "README.md"
    elif case == "schema 2":
        results = tmp_path / "v2.json"
        results.write_text(json.dumps({**json.loads(run[0].read_text()), "schema_version": 2}))
    elif case == "bad yaml":
        readme.write_text("---\nlicense: [apache-2.0\n---\n# text\n")
    elif case == "reference":
        target, readme = run[2], run[2] / "README.md"
    elif case == "two rows":  # the same quant at two settings in one file
        doc = json.loads(run[0].read_text())
        doc["results"].append({**_row(run[0], "q4"), "top_k": 8})
        results = tmp_path / "two.json"
        results.write_text(json.dumps(doc))
    else:
        readme.write_text(f"# text\n{START}\n{END}\n{START}\n{END}\n")
    before = readme.read_bytes() if readme.exists() else None
    files = sorted(os.listdir(target))
    assert main(["card", str(results), str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pytest-kld: "), err
    assert {"missing row": "no row", "schema 2": "schema version 2", "bad yaml": "front matter does not parse",
            "reference": "is the reference", "two marker pairs": "markers", "two rows": "2 rows match"}[case] in err
    assert (readme.read_bytes() if readme.exists() else None) == before and sorted(os.listdir(target)) == files


def test_push_uses_huggingface_hub_public_api(run, quant, monkeypatch):
    """The upload cannot run here (no hub): its one call is checked, with what it uploads."""
    import huggingface_hub

    calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda self, *a, **k: calls.append((a, k)))
    assert main(["card", str(run[0]), str(quant), "--push", "org/my-quant"]) == 0
    (args, kw), = calls
    assert args == ("org/my-quant",) and kw["repo_type"] == "model"
    ops = {op.path_in_repo: op.path_or_fileobj for op in kw["operations"]}
    assert ops == {"README.md": str(quant / "README.md"), CHART_NAME: str(quant / CHART_NAME)}


def test_push_offline_says_so_in_one_line(run, quant, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda self, *a, **k: pytest.fail("uploaded"))
    before = (quant / "README.md").read_bytes()
    assert main(["card", str(run[0]), str(quant), "--push", "org/my-quant"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HF_HUB_OFFLINE" in err
    assert (quant / "README.md").read_bytes() == before


def _lay_out_model(hub, repo_id: str, folder) -> None:
    """huggingface_hub's cache layout of a model repo: refs/main, snapshots/<commit>/..., blobs."""
    import hashlib

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    for f in folder.iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)


def test_a_hub_repo_from_the_hub_cache_offline(run, quant, tmp_path, monkeypatch, capsys):
    """A hub repo id: its snapshot is fingerprinted, its README.md is the card's start, the card
    goes to --out (the hub cache is never written)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _lay_out_model(tmp_path / "hub", "org/my-quant", quant)
    assert main(["card", str(run[0]), "org/my-quant"]) == 2
    assert "--out DIR" in capsys.readouterr().err
    out = tmp_path / "out"
    out.mkdir()
    assert main(["card", str(run[0]), "org/my-quant", "--out", str(out)]) == 0
    text = (out / "README.md").read_text()
    assert AUTHOR_TEXT in text and "| **q4** |" in text and (out / CHART_NAME).is_file()
    assert (quant / "README.md").read_text() == f"---\n{AUTHOR_YAML}---\n{AUTHOR_TEXT}"
