"""Generation drift (issue 15): the reference's greedy continuations cached as one more mode, the
quant's own greedy continuation against them (match length, ties), and KL(reference || quant)
along the reference's continuation, teacher-forced."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pytest_kld import drift
from pytest_kld.cache import ensure_reference
from pytest_kld.compare import compare
from pytest_kld.corpus import corpus_spec

N = 12


@pytest.fixture(scope="module")
def spec():
    return corpus_spec("drift", n_chunks=5, drift_tokens=N)


@pytest.mark.parametrize("arch", ["llama", "qwen3_5"])  # qwen3_5: hybrid, its generation cache is not a KV cache
def test_self_comparison_matches_to_the_end_with_zero_kld_at_every_step(tiny_model, spec, tmp_path, arch):
    cache = ensure_reference(tiny_model(arch), spec, cache_dir=tmp_path)
    assert cache.manifest["corpus"]["mode"] == "drift" and cache.manifest["corpus"]["drift_tokens"] == N
    r = compare(cache, tiny_model(arch))
    assert r.is_reference and np.all(r.kl == 0.0) and r.kl.size == cache.n_positions
    s = r.summary
    assert s["drift_prompts"] == 5 and s["drift_match"] == s["drift_match_strict"] == N
    assert s["drift_full_share"] == 1.0 and s["drift_ties"] == 0
    assert s["drift_kld"] == s["drift_kld_early"] == s["drift_kld_late"] == 0.0


@pytest.mark.parametrize("arch", ["llama", "qwen3_5"])
def test_cached_continuation_is_the_reference_greedy_one_and_match_is_the_first_difference(tiny_model, spec,
                                                                                             tmp_path, arch):
    from pytest_kld.forward import load_model

    cache = ensure_reference(tiny_model(arch), spec, cache_dir=tmp_path)
    quant = tiny_model(arch, bits=4)
    r = compare(cache, quant)
    lm_ref, lm_q = load_model(tiny_model(arch), "float32"), load_model(quant, "float32")
    try:
        strict = []
        for i in range(cache.n_chunks):
            start, end = (int(v) for v in cache.score_ranges[i])
            ids = cache.chunk(i).tolist()
            prompt, ref = ids[: start + 1], ids[start + 1 : end + 1]
            assert drift.greedy(lm_ref.model, prompt, N) [: len(ref)] == ref  # what the cache holds
            mine = drift.greedy(lm_q.model, prompt, len(ref))
            strict.append(next((t for t, (a, b) in enumerate(zip(mine, ref)) if a != b), len(ref)))
    finally:
        lm_ref.release()
        lm_q.release()
    assert r.summary["drift_match_strict"] == pytest.approx(np.mean(strict))
    assert r.summary["drift_match"] >= r.summary["drift_match_strict"]
    assert r.summary["drift_kld"] == pytest.approx(r.summary["mean"]) and r.summary["drift_kld"] > 0
    steps = np.concatenate([np.arange(int(e) - int(s)) for s, e in cache.score_ranges])
    assert r.summary["drift_kld_early"] == pytest.approx(float(r.kl[steps < N / 3].mean()))
    assert r.summary["drift_kld_late"] == pytest.approx(float(r.kl[steps >= 2 * N / 3].mean()))


@pytest.mark.parametrize("arch", ["llama", "qwen3_5"])
def test_greedy_with_the_generation_cache_equals_full_recomputation(tiny_model, spec, arch):
    """greedy() steps mlx-lm's generation cache (for qwen3_5 also the linear-attention layers'
    conv and recurrent state): its tokens equal the argmax of the whole sequence re-run through
    the model at every step, with no cache at all. An end-of-sequence id ends it after that token."""
    import mlx.core as mx

    from pytest_kld.forward import load_model

    lm = load_model(tiny_model(arch), "float32")
    try:
        for prompt, _, _ in drift.prompt_ids(spec, lm.tokenizer)[:3]:
            seq = list(prompt)
            for _ in range(10):
                seq.append(int(mx.argmax(lm.model(mx.array(seq, dtype=mx.int32)[None])[0, -1]).item()))
            free = drift.greedy(lm.model, prompt, 10)
            assert free == seq[len(prompt):]
            assert drift.greedy(lm.model, prompt, 10, {free[4]}) == free[: free.index(free[4]) + 1]
    finally:
        lm.release()


def test_a_differing_pick_where_the_reference_is_torn_is_a_tie():
    """The quant picks 9 at step 1 and 8 at step 3; the reference's top-2 were within TIE_NATS at
    step 1 only: step 1 is a tie (the run goes on on the reference's token), step 3 a divergence.
    Near-ties: the quant's own top-2 gaps below NEAR_NATS at the steps the run looked at."""
    ref = np.array([1, 2, 3, 4, 5])
    picks = np.array([1, 9, 3, 8, 5])
    margin = np.array([1.0, drift.TIE_NATS / 2, 1.0, 1.0, 1.0])
    gap = np.array([1.0, 1.0, 1.0, 1.0, 0.0])
    assert drift.match_one(picks, ref, margin, gap) == (3, 1, 1, 0)  # (match, strict, ties, near)
    gap[3] = drift.NEAR_NATS / 2  # the step the run stopped at was a near-tie of the quant's
    assert drift.match_one(picks, ref, margin, gap) == (3, 1, 1, 1)
    margin[3] = 0.0
    assert drift.match_one(picks, ref, margin, gap) == (5, 1, 2, 2)  # both torn: to the end
    assert drift.match_one(ref, ref, margin, gap) == (5, 5, 0, 2)
    assert drift.match_one(picks[:0], ref[:0], margin[:0], gap[:0]) == (0, 0, 0, 0)


@pytest.mark.parametrize("arch", ["llama", "qwen3_5"])
@pytest.mark.parametrize("tie_nats", [drift.TIE_NATS, 0.5])  # 0.5: ties happen (a tiny model's are rare)
def test_match_from_the_teacher_forced_pass_equals_free_greedy_generation(tiny_model, tmp_path, monkeypatch,
                                                                          arch, tie_nats):
    """Issue 26: match, strict match and ties read from the comparison pass equal the quant's free
    greedy generation (mlx-lm generate_step, one token at a time, a fresh prefill after each tie:
    tests/free_greedy.py), prompt by prompt, or differ only where the pass counted a near-tie."""
    import free_greedy

    from pytest_kld.forward import load_model

    monkeypatch.setattr(drift, "TIE_NATS", tie_nats)
    cache = ensure_reference(tiny_model(arch), corpus_spec("drift", n_chunks=6, drift_tokens=16), cache_dir=tmp_path)
    quant = tiny_model(arch, bits=4)
    r = compare(cache, quant)
    lm = load_model(quant, "float32")
    try:
        free = free_greedy.follow(lm.model, cache, tie_nats)
    finally:
        lm.release()
    same = np.all([free[k] == r.drift[k] for k in ("match", "match_strict", "ties")], axis=0)
    assert np.all(same | (r.drift["near"] > 0)), (free, r.drift)
    assert np.sum(same) >= cache.n_chunks - 1  # a near-tie is rare: not an excuse for every prompt
    assert r.summary["drift_match"] == pytest.approx(np.mean(r.drift["match"]))
    assert r.summary["drift_ties"] == int(np.sum(r.drift["ties"]))
    assert r.summary["drift_near_ties"] == int(np.sum(r.drift["near"]))
    assert 0 < r.summary["drift_match_strict"] < 16  # the quant leaves the reference, not at once
    if tie_nats > drift.TIE_NATS:
        assert r.summary["drift_ties"] > 0  # the tie rule was exercised on both sides


def test_greedy_picks_are_over_the_whole_output_width():
    """The quant's pick is its argmax over every output logit (a padded vocabulary included), and
    the gap is between its two largest."""
    import mlx.core as mx

    lg = mx.array([[0.0, 3.0, 1.0, 5.0], [2.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.5, 2.0]])
    arg, gap = drift.greedy_picks(lg)
    assert arg.tolist() == [3, 0, 2] and gap.tolist() == pytest.approx([2.0, 0.0, 0.5])
    arg, _ = drift.greedy_picks(lg[:, :3])  # the reference's vocabulary only: another pick
    assert arg.tolist() == [1, 0, 2]


@pytest.mark.parametrize("arch", ["llama", "qwen3_5"])  # qwen3_5: hybrid, masks in its recurrent layers too
def test_batched_continuations_are_token_for_token_the_unbatched_ones(tiny_model, monkeypatch, arch):
    """Issue 26: the reference's continuations generated batched across prompts (prompts of
    different lengths: right padding and masks; some stopped early by an end-of-sequence id, some
    not) are greedy()'s, one prompt at a time, token for token; and none needed generating alone."""
    from pytest_kld.forward import load_model

    lm = load_model(tiny_model(arch), "float32")
    try:
        prompts = [p for p, _, _ in drift.prompt_ids(corpus_spec("drift", n_chunks=10, drift_tokens=12), lm.tokenizer)]
        assert len({len(p) for p in prompts}) > 3
        alone = [drift.greedy(lm.model, p, 12) for p in prompts]
        eos = {alone[0][5], alone[3][2]}  # tokens that end some continuations early
        alone = [drift.greedy(lm.model, p, 12, eos) for p in prompts]
        assert len({len(a) for a in alone}) > 1 and max(len(a) for a in alone) == 12
        heard = []
        batched, solo = drift.continuations(lm.model, prompts, 12, eos, progress=lambda d, t: heard.append((d, t)))
        assert batched == alone and solo == 0 and heard[-1] == (10, 10)
        monkeypatch.setattr(drift, "NEAR_NATS", np.inf)  # every step a near-tie: all generated alone
        assert drift.continuations(lm.model, prompts, 12, eos) == (alone, len(prompts))
        assert drift.continuations(lm.model, prompts[:3], 12, eos, batched=False) == (alone[:3], 3)
    finally:
        lm.release()


def test_batched_build_is_byte_identical_and_old_caches_still_load(tiny_model, tmp_path, monkeypatch):
    """A drift cache built from the batched continuations has the same key and the same bytes as
    one built the way drift mode always did (one prompt at a time); an entry built that way is
    found and used by a comparison as it is (not rebuilt), with its drift figures."""
    from functools import partial

    from pytest_kld.reference import ReferenceCache

    spec5 = corpus_spec("drift", n_chunks=5, drift_tokens=10)
    old = tmp_path / "old"
    with monkeypatch.context() as m:
        m.setattr(drift, "reference_corpus", partial(drift.reference_corpus, batched=False))
        before = ensure_reference(tiny_model("llama"), spec5, cache_dir=old)
    new = ensure_reference(tiny_model("llama"), spec5, cache_dir=tmp_path / "new")
    for k in ("key", "arrays_sha256", "arrays_bytes", "corpus"):
        assert before.manifest[k] == new.manifest[k], k
    again = ensure_reference(tiny_model("llama"), spec5, cache_dir=old)
    assert again.path == before.path and again.manifest == ReferenceCache.load(before.path).manifest
    assert again.manifest["build_seconds"] == before.manifest["build_seconds"]  # loaded, not rebuilt
    r = compare(again, tiny_model("llama", bits=4))
    assert r.summary["drift_prompts"] == 5 and 0 <= r.summary["drift_match_strict"] <= r.summary["drift_match"] <= 10


def test_drift_cache_is_its_own_mode_beside_short(tiny_model, tmp_path):
    a = ensure_reference(tiny_model("llama"), corpus_spec("drift", n_chunks=3, drift_tokens=4), cache_dir=tmp_path)
    b = ensure_reference(tiny_model("llama"), corpus_spec("drift", n_chunks=3, drift_tokens=6), cache_dir=tmp_path)
    c = ensure_reference(tiny_model("llama"), corpus_spec("short", n_chunks=3), cache_dir=tmp_path)
    assert len({a.path, b.path, c.path}) == 3 and a.path.parent == c.path.parent
    assert a.path.name.startswith("drift-") and a.n_positions <= 12 and b.n_positions <= 18


def test_drift_from_pytest_thresholds_and_leaderboard(pytester, tiny_model):
    q = str(tiny_model("llama", bits=4))
    pytester.makepyfile(test_d=f"""
import pytest

@pytest.mark.kld(mode="drift", drift_tokens=8)
def test_loose(assert_kld):
    assert_kld({q!r}, drift_match=0, drift_kld=1e9)

@pytest.mark.kld(mode="drift", drift_tokens=8)
def test_strict(assert_kld):
    assert_kld({q!r}, drift_match=8, name="strict")

def test_not_drift(assert_kld):
    assert_kld({q!r}, drift_match=1, name="prefill")
""")
    out = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(f"--kld-reference={tiny_model('llama')}", "--kld-n-chunks=3",
                                           f"--kld-cache-dir={pytester.path / 'c'}", "-p", "no:cacheprovider",
                                           f"--kld-json={out}")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*drift_match: * < minimum 8.0000  FAILED*"])
    result.stdout.fnmatch_lines(["*drift_match: measured only in drift mode*FAILED*"])
    result.stdout.fnmatch_lines(["generation drift: greedy, up to 8 tokens per prompt*",
                                 "model*match*median*to end*strict*ties*KLD early*middle*late"])
    from tiny import validate_results

    doc = json.loads(out.read_text())
    validate_results(doc)  # the shipped schema knows the drift mode and its figures
    rows = {r["model"]: r for r in doc["results"]}
    s = rows["strict"]["summary"]
    assert rows["strict"]["mode"] == "drift" and 0 <= s["drift_match"] <= 8 and s["drift_tokens"] == 8


@pytest.mark.parametrize("arch", ["llama", "qwen3_5"])
def test_match_and_trajectory_kld_against_mlx_lm_generation_and_dense_float64(tiny_model, tmp_path, arch):
    """Independent of drift.py's own code: the quant's strict match length is where mlx-lm's
    stream_generate (greedy sampler) first leaves the reference's cached continuation; with K =
    the vocabulary the sparse record is exact, so each step's KL equals a dense float64 KL of the
    two models' log-probs from one un-chunked forward pass over the whole sequence."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from pytest_kld.divergence import dense_kl
    from pytest_kld.forward import load_model
    from pytest_kld.reference import Settings

    spec4 = corpus_spec("drift", n_chunks=4, drift_tokens=N)
    cache = ensure_reference(tiny_model(arch), spec4, Settings(top_k=1 << 20, chunk_tokens=8), cache_dir=tmp_path)
    assert cache.top_k == cache.manifest["vocab_size"]
    quant = tiny_model(arch, bits=4)
    r = compare(cache, quant)
    vocab = cache.manifest["vocab_size"]
    lms = {"ref": load_model(tiny_model(arch), "float32"), "quant": load_model(quant, "float32")}
    try:
        strict = []
        for i in range(cache.n_chunks):
            s, e = (int(v) for v in cache.score_ranges[i])
            toks = cache.chunk(i)
            q = lms["quant"]
            gen = [int(t.token) for t in stream_generate(q.model, q.tokenizer, toks[: s + 1].tolist(),
                                                          max_tokens=e - s, sampler=make_sampler(temp=0.0))]
            ref_cont = toks[s + 1 : e + 1].tolist()
            strict.append(next((j for j, (a, b) in enumerate(zip(gen, ref_cont)) if a != b), len(ref_cont)))
            lp = {k: np.array(lm.model(mx.array(toks[None].astype(np.int32)))[0, s:e, :vocab].astype(mx.float32),
                              dtype=np.float64) for k, lm in lms.items()}
            rows = slice(int(cache.row_offsets[i]), int(cache.row_offsets[i + 1]))
            np.testing.assert_allclose(r.kl[rows], dense_kl(lp["ref"], lp["quant"]), rtol=2e-3, atol=2e-6)
    finally:
        for lm in lms.values():
            lm.release()
    assert r.summary["drift_match_strict"] == pytest.approx(np.mean(strict))
    assert r.kl.mean() > 0 and r.summary["drift_match"] >= r.summary["drift_match_strict"]


def test_drift_from_the_command_line_under_xdist_and_alone(tiny_model, tmp_path, pytester):
    """The command line runs drift mode with its thresholds (exit 1 on a failed one, the section
    printed, the JSON valid and carrying the drift figures); and two xdist workers share one drift
    entry, built once."""
    import subprocess
    import sys

    from tiny import validate_results

    ref, q4 = tiny_model("llama"), tiny_model("llama", bits=4)
    out = tmp_path / "r.json"
    args = [ref, q4, "--mode", "drift", "--n-chunks", 3, "--drift-tokens", 6, "--cache-dir", tmp_path / "c",
            "--json", out]
    p = subprocess.run([sys.executable, "-m", "pytest_kld", *map(str, args), "--drift-match", "1000"],
                       capture_output=True, text=True)
    assert p.returncode == 1, p.stderr
    assert "drift_match" in p.stdout + p.stderr and "generation drift: greedy, up to 6 tokens" in p.stdout
    doc = json.loads(out.read_text())
    validate_results(doc)
    s = doc["results"][0]["summary"]
    assert s["drift_prompts"] == 3 and 0 <= s["drift_match_strict"] <= s["drift_match"] <= 6
    p = subprocess.run([sys.executable, "-m", "pytest_kld", *map(str, args), "--drift-match", "0"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr

    pytester.makepyfile(test_d=f"""
import pytest

@pytest.mark.kld(mode="drift", drift_tokens=6)
@pytest.mark.parametrize("i", range(4))
def test_each(assert_kld, i):
    assert_kld({str(q4)!r}, drift_match=0, name=f"q{{i}}")
""")
    res = pytester.runpytest_subprocess(f"--kld-reference={ref}", "--kld-n-chunks=3", "-n", "2",
                                        f"--kld-cache-dir={pytester.path / 'c'}", "-p", "no:cacheprovider")
    res.assert_outcomes(passed=4)
    assert len(list((pytester.path / "c").glob("ref-*/drift-*/manifest.json"))) == 1


@pytest.mark.parametrize("exec_mode, batched", [("float32", True), ("native", False)])
def test_the_reference_generates_batched_in_float32_only(tiny_model, monkeypatch, exec_mode, batched):
    """Half-precision logits round too coarsely for batched decoding to be token-exact: a native
    (float16 here) build generates one prompt at a time, a float32 one batched."""
    from pytest_kld.refpass import reference_pass

    seen = []
    real = drift.continuations

    def spy(*a, **kw):
        seen.append(kw["batched"])
        return real(*a, **kw)

    monkeypatch.setattr(drift, "continuations", spy)
    arrays, facts = reference_pass(tiny_model("llama"), corpus_spec("drift", n_chunks=2, drift_tokens=3), top_k=8,
                                   chunk_tokens=None, exec_mode=exec_mode)
    assert seen == [batched] and facts["settings"]["exec"] == exec_mode and arrays["target"].shape[0] == 6


def test_a_wider_quant_is_picked_over_its_whole_output_and_scored_as_in_prefill(tiny_model, tmp_path, monkeypatch):
    """A quant with more (padding) output rows than the reference's vocabulary: its greedy picks
    see every row, and its trajectory KL is bit for bit what a prefill comparison of the same
    chunks gives."""
    import copy

    from tiny import build_model

    cache = ensure_reference(tiny_model("llama"), corpus_spec("drift", n_chunks=3, drift_tokens=6), cache_dir=tmp_path)
    wide = build_model(tmp_path / "wide", "llama", vocab_size=384)
    widths = []
    real = drift.greedy_picks
    monkeypatch.setattr(drift, "greedy_picks", lambda lg: (widths.append(lg.shape[-1]), real(lg))[1])
    r = compare(cache, wide)
    prefill = copy.copy(cache)
    prefill.manifest = {**cache.manifest, "corpus": {**cache.manifest["corpus"], "mode": "file"}}
    p = compare(prefill, wide)
    assert widths and set(widths) == {384} and cache.manifest["vocab_size"] == 320
    assert p.drift is None and r.drift is not None and np.array_equal(r.kl, p.kl) and np.all(np.isfinite(r.kl))


def test_near_ties_are_named_under_the_drift_section_only_when_there_are_some():
    row = {"drift_tokens": 8, "drift_match": 3.0, "drift_match_strict": 2.0, "drift_ties": 1}
    rows = [{"model": "q8", "summary": {**row, "drift_near_ties": 0}},
            {"model": "q|4", "summary": {**row, "drift_near_ties": 2}}]
    text = drift.lines(rows)
    assert text[-1].startswith("near-ties (the quant's own top-2 within 0.001 nats") and text[-1].endswith(": q|4 2")
    md = drift.markdown_lines(rows)
    assert any(line.startswith("near-ties") and line.endswith("q\\|4 2") for line in md)
    rows[1]["summary"]["drift_near_ties"] = 0
    assert not [line for line in drift.lines(rows) + drift.markdown_lines(rows) if "near-ties" in line]
