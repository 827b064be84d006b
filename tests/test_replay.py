"""Sensitivity passes that replay the layers before the swapped group (pytest_kld.replay) give
the savings of full passes bit for bit, on every tiny architecture, with chunks of one forward
call and of several; the safety net and the memory cap fall back to full passes."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import PROSE

from pytest_kld import replay, sensitivity
from pytest_kld.cache import ensure_reference
from pytest_kld.reference import Settings

ARCHS = ["llama", "qwen3", "qwen3_5", "qwen3_5_moe"]


@pytest.fixture(scope="module")
def records_spec(tmp_path_factory):
    """Records of 30 to 120 bytes (the tiny tokenizer's tokens): with pieces of 64 tokens, some
    take one forward call and some two."""
    from pytest_kld.corpus import corpus_spec

    path = tmp_path_factory.mktemp("records") / "records.jsonl"
    words = PROSE.split()
    lines = [json.dumps({"text": " ".join(words[i:i + n]), "category": f"c{i % 2}"})
             for i, n in zip(range(0, 200, 20), [6, 20, 8, 22, 5, 19, 7, 21, 6, 20])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return corpus_spec("file", dataset=str(path), n_ctx=128)


@pytest.fixture
def cache_ct(tiny_model, prose_spec, records_spec, tmp_path_factory):
    """``cache_ct(arch, chunk_tokens)``: with ``chunk_tokens`` 0, a cache of 128-token chunks of
    prose run as one call each; otherwise of records of several lengths, in pieces of it."""
    def get(arch, chunk_tokens):
        root = tmp_path_factory.mktemp(f"kld-cache-{chunk_tokens}")
        return ensure_reference(tiny_model(arch), records_spec if chunk_tokens else prose_spec,
                                Settings(top_k=256, chunk_tokens=chunk_tokens), cache_dir=root)
    return get


def run(cache, ref, quant, monkeypatch, *, on: bool, budget=250):
    """(the document, the Replay objects made, the notes) of a fresh measurement (no store); the
    progress calls heard go to ``run.heard``."""
    shutil.rmtree(sensitivity.store_path(cache, "x").parent, ignore_errors=True)
    made, notes, run.heard = [], [], []

    class Spy(replay.Replay):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    with monkeypatch.context() as m:
        m.setattr(replay, "Replay", Spy)
        m.setenv("PYTEST_KLD_REPLAY", "1" if on else "0")
        doc = sensitivity.measure(cache, ref, quant, bits=8, budget=budget, notify=notes.append,
                                  progress=lambda d, t: run.heard.append((d, t)))
    return doc, made, notes


def check_progress(heard, *, at_most: int):
    """Whole-model tokens heard: from 0, never back, ending at the total of the last estimate,
    which is at most ``at_most``."""
    assert heard[0][0] == 0
    assert all(a[0] <= b[0] for a, b in zip(heard, heard[1:]))
    assert heard[-1][0] == heard[-1][1] <= at_most
    return heard[-1][1]


def single_piece(cache, doc) -> list[bool]:
    ct = cache.settings.chunk_tokens
    return [not ct or int(cache.score_ranges[i][1]) <= ct for i in doc["chunks"]]


@pytest.mark.parametrize(("arch", "chunk_tokens"), [(a, 0) for a in ARCHS] + [("llama", 64), ("qwen3_5", 64)],
                         ids=lambda v: {0: "one-call", 64: "several-pieces"}.get(v, v))
def test_replay_gives_the_full_passes_savings_bit_for_bit(arch, chunk_tokens, tiny_model, cache_ct, monkeypatch):
    """Every group's saving (diff, se, low, high) and the quant's mean equal with and without the
    replay. With whole chunks in one call, every chunk of every group past layer 0 is replayed
    (and once more for the safety net); with 64-token pieces of 128-token chunks, the chunks of
    several pieces run every layer and only the shorter ones are replayed."""
    cache = cache_ct(arch, chunk_tokens)
    ref, quant = tiny_model(arch), tiny_model(arch, bits=4)
    fast, made, notes = run(cache, ref, quant, monkeypatch, on=True)
    fast_heard = run.heard
    slow, none, _ = run(cache, ref, quant, monkeypatch, on=False)
    assert not none and not notes
    runs = sum(s["8"]["measured"] for s in slow["savings"].values())
    whole = sum(int(cache.score_ranges[i][1]) for i in slow["chunks"]) * (1 + runs)
    assert check_progress(run.heard, at_most=whole) == whole  # every pass the whole model
    assert check_progress(fast_heard, at_most=whole) < whole  # the replayed passes count their share
    assert fast["base_mean"] == slow["base_mean"] and fast["base_mean"] > 0
    assert fast["savings"] == slow["savings"]
    (r,) = made
    assert r.on and r.why is None
    late = [g["name"] for g in fast["groups"] if (g["layer"] or 0) > 0 and fast["savings"][g["name"]]["8"]["measured"]]
    assert late
    ones = single_piece(cache, fast)
    if chunk_tokens:
        assert 0 < sum(ones) < len(ones), "the sample needs chunks of one call and of several"
    assert r.replayed == sum(ones) * (1 + len(late))
    assert sorted(r.states) == sorted(c for c, one in zip(fast["chunks"], ones) if one)


def test_the_safety_net_falls_back_when_the_replay_disagrees(tiny_model, cache_ct, monkeypatch):
    """A replay that hands the wrong state on (the skipped layers' input instead of their
    output): the deepest replay differs from the base pass, so every group runs the whole model,
    a note says so, and the savings are the full passes' bit for bit."""
    cache = cache_ct("llama", 0)
    ref, quant = tiny_model("llama"), tiny_model("llama", bits=4)
    slow, _, _ = run(cache, ref, quant, monkeypatch, on=False)
    monkeypatch.setattr(replay._Skip, "__call__", lambda self, h, *a, **k: h)
    fast, (r,), notes = run(cache, ref, quant, monkeypatch, on=True)
    assert not r.on and "does not reproduce the quant's own pass bit for bit" in r.why
    whole = sum(int(cache.score_ranges[i][1]) for i in slow["chunks"]) * (1 + sum(
        s["8"]["measured"] for s in slow["savings"].values()))
    assert check_progress(run.heard, at_most=whole) == whole  # estimated with the replay, then known to be off
    assert r.replayed == len(fast["chunks"])  # the safety net's pass only
    assert len(notes) == 1 and "every group runs the whole model" in notes[0]
    assert fast["savings"] == slow["savings"] and fast["base_mean"] == slow["base_mean"]


def test_a_layer_list_the_model_does_not_read_records_nothing(tiny_model, cache_ct, monkeypatch):
    """The stand-ins put in a copy of the layers (a list the model's loop never reads): nothing
    is recorded, so nothing is replayed, and the savings are the full passes'."""
    cache = cache_ct("llama", 0)
    ref, quant = tiny_model("llama"), tiny_model("llama", bits=4)
    slow, _, _ = run(cache, ref, quant, monkeypatch, on=False)
    found, copies = replay.find_layer, {}

    def elsewhere(model, path):
        hit = found(model, path)
        return hit and (copies.setdefault(id(hit[0]), list(hit[0])), hit[1])

    monkeypatch.setattr(replay, "find_layer", elsewhere)
    fast, (r,), notes = run(cache, ref, quant, monkeypatch, on=True)
    assert not r.on and "does not call each of its layers" in r.why and r.replayed == 0
    assert len(notes) == 1
    assert fast["savings"] == slow["savings"]


def test_states_past_the_memory_cap_are_not_kept(tiny_model, cache_ct, monkeypatch):
    cache = cache_ct("llama", 0)
    ref, quant = tiny_model("llama"), tiny_model("llama", bits=4)
    slow, _, _ = run(cache, ref, quant, monkeypatch, on=False)
    monkeypatch.setattr(replay, "MAX_BYTES", 1000)
    fast, (r,), notes = run(cache, ref, quant, monkeypatch, on=True)
    assert not r.on and "GiB" in r.why and r.replayed == 0 and not r.states
    assert fast["savings"] == slow["savings"]


def test_layers_found_from_module_paths(tiny_model):
    """The list of layers and each group's first layer, through ``language_model`` too; the
    embedding, the head and groups of layer 0 start nowhere (the whole model)."""
    from pytest_kld.forward import load_model
    from pytest_kld.groups import layout

    for arch, inner in (("llama", "model"), ("qwen3_5_moe", "language_model.model")):
        lm = load_model(tiny_model(arch), "float32")
        ref = tiny_model(arch)
        groups = {g.name: [m.path for m in g.modules] for g in layout(ref, ref).groups}
        layers, starts = replay.plan(lm.model, groups)
        body = lm.model
        for part in inner.split("."):
            body = body[part]
        assert layers is body["layers"]
        assert starts == {g: int(g.split(".")[1]) for g in groups if g.startswith("layers.") and g.split(".")[1] != "0"}
        assert replay.find_layer(lm.model, groups["embed_tokens"][0]) is None
        lm.release()
