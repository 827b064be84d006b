"""Reference caches that travel (issue 12): exported, laid out in a hub cache, used offline with
no reference weights anywhere; damaged on the way, refused; results of runners that each
compared some quants merged into the one leaderboard a single run gives."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

COMMIT = "abcdefabcdefabcdefabcdefabcdefabcdefabcd"


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pytest_kld", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def _exported(tiny_model, tmp_path) -> tuple[Path, Path]:
    """(a reference copy, the folder `export` wrote for its short-mode cache)."""
    ref = tmp_path / "ref"
    shutil.copytree(tiny_model("llama"), ref)
    p = cli("build", ref, "--n-chunks", 3, "--top-k", 16, "--cache-dir", tmp_path / "cache")
    assert p.returncode == 0, p.stderr
    entry = p.stdout.strip().splitlines()[-1]
    p = cli("export", entry, tmp_path / "export")
    assert p.returncode == 0, p.stderr
    return ref, tmp_path / "export"


def _lay_out_dataset(hub: Path, repo_id: str, folder: Path) -> Path:
    """huggingface_hub's cache layout for a dataset repo: refs/main, snapshots/<commit>/..., blobs."""
    repo = hub / ("datasets--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    for f in folder.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = repo / "snapshots" / COMMIT / f.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, link.parent), link)
    return repo


def test_a_cache_from_the_hub_cache_serves_with_no_reference_weights(pytester, tiny_model, tmp_path, monkeypatch):
    ref, folder = _exported(tiny_model, tmp_path)
    repo = _lay_out_dataset(tmp_path / "hub", "org/tiny-kld-cache", folder)
    shutil.rmtree(ref)  # no reference weights anywhere
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytester.makepyfile(f"def test_q(assert_kld):\n    assert_kld({str(tiny_model('llama', bits=8))!r}, mean=1.0)\n")
    result = pytester.runpytest_subprocess("--kld-reference-cache=org/tiny-kld-cache", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "reference cache reused" in result.stderr.str() or "pytest-kld leaderboard" in result.stdout.str()
    # a pinned revision works too; a damaged download is refused in one line
    result = pytester.runpytest_subprocess(f"--kld-reference-cache=org/tiny-kld-cache@{COMMIT}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    blob = max((repo / "blobs").iterdir(), key=lambda b: b.stat().st_size)  # the arrays
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x20
    blob.write_bytes(bytes(data))
    result = pytester.runpytest_subprocess("--kld-reference-cache=org/tiny-kld-cache", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*reference cache * is not usable: arrays.safetensors is corrupt (checksum mismatch)*"])


def test_an_exported_folder_serves_the_command_line(tiny_model, tmp_path):
    ref, folder = _exported(tiny_model, tmp_path)
    shutil.rmtree(ref)
    p = cli("compare", tiny_model("llama", bits=8), "--reference-cache", folder, "--mean", 1.0)
    assert p.returncode == 0, p.stderr
    assert "llama-q8-g64" in p.stdout
    p = cli("compare", tiny_model("llama", bits=8), "--reference-cache", folder, "--mode", "long")
    assert p.returncode == 2 and "no entry for mode 'long'" in p.stderr and p.stderr.count("\n") == 1


def test_merge_of_two_partial_runs_equals_one_full_run(tiny_model, tmp_path):
    ref, q8, q4 = tiny_model("llama"), tiny_model("llama", bits=8), tiny_model("llama", bits=4)
    common = ("--n-chunks", 3, "--top-k", 16, "--cache-dir", tmp_path / "c")
    for name, quants in (("full", (q8, q4)), ("a", (q8,)), ("b", (q4,))):
        p = cli(ref, *quants, *common, "--json", tmp_path / f"{name}.json")
        assert p.returncode == 0, p.stderr
    p = cli("merge", tmp_path / "a.json", tmp_path / "b.json", "--json", tmp_path / "merged.json")
    assert p.returncode == 0, p.stderr
    figures = ("model", "mean", "se", "median", "p95", "p99", "max", "top1", "count", "nonfinite")

    def rows(name):
        return [{k: r[k] for k in figures} for r in json.loads((tmp_path / f"{name}.json").read_text())["results"]]

    assert rows("merged") == rows("full")
    board = {n: json.loads((tmp_path / f"{n}.json").read_text())["leaderboard"] for n in ("merged", "full")}
    assert board["merged"] == board["full"] and len(board["full"]["order"]) == 2  # one leaderboard model
    # results of another cache (other K) are refused, not merged
    p = cli(ref, q4, "--n-chunks", 3, "--top-k", 8, "--cache-dir", tmp_path / "c", "--json", tmp_path / "k8.json")
    assert p.returncode == 0, p.stderr
    p = cli("merge", tmp_path / "a.json", tmp_path / "k8.json")
    assert p.returncode == 2 and "different reference caches" in p.stderr and p.stderr.count("\n") == 1


def test_push_uses_huggingface_hub_public_api(tmp_path, monkeypatch):
    """The upload cannot run here (no hub): its call is checked, and stays this thin."""
    import huggingface_hub

    from pytest_kld.cli import main

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: calls.append(("create", a, k)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **k: calls.append(("upload", k)))
    assert main(["push", str(tmp_path), "org/cache"]) == 0
    assert calls[0] == ("create", ("org/cache",), {"repo_type": "dataset", "private": False, "exist_ok": True})
    assert calls[1][1]["repo_type"] == "dataset" and calls[1][1]["folder_path"] == str(tmp_path)
