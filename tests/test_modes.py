"""One reference cache directory holds several corpus modes, each built once and chosen at
comparison time (issue 5)."""

from __future__ import annotations

from pytest_kld.cache import ensure_reference
from pytest_kld.compare import compare
from pytest_kld.corpus import corpus_spec
from pytest_kld.reference import Settings


def test_modes_share_one_reference_directory(tiny_model, prose_file, tmp_path):
    ref = tiny_model("llama")
    specs = {
        "short": corpus_spec("short", n_chunks=4),
        "file": corpus_spec("file", dataset=str(prose_file), n_ctx=128),
        "long": corpus_spec("long", dataset=str(prose_file), n_ctx=256, n_chunks=4),
    }
    builds = []
    caches = {
        mode: ensure_reference(ref, spec, Settings(top_k=16), cache_dir=tmp_path, on_build=builds.append)
        for mode, spec in specs.items()
    }
    assert len(builds) == 3
    # Three entries under one reference directory, named by mode.
    parents = {c.path.parent for c in caches.values()}
    assert len(parents) == 1
    assert sorted(p.name.split("-")[0] for p in parents.pop().iterdir() if p.is_dir()) == ["file", "long", "short"]
    # Each is reused, not rebuilt, whichever is asked for first.
    for mode in ("long", "short", "file"):
        again = ensure_reference(ref, specs[mode], Settings(top_k=16), cache_dir=tmp_path, on_build=builds.append)
        assert again.path == caches[mode].path
    assert len(builds) == 3
    # The comparison runs on the mode it is given: different positions, categories and figures.
    q = tiny_model("llama", bits=4)
    results = {mode: compare(c, q) for mode, c in caches.items()}
    assert results["short"].summary["count"] == caches["short"].n_positions
    assert set(results["short"].categories) >= {"prose", "code", "json", "math"}
    assert results["long"].settings["corpus"]["mode"] == "long"
    assert len({r.summary["count"] for r in results.values()}) == 3
