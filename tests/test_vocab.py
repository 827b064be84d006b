"""The vocabulary-wide work (issue 13): numpy's row-blocked path gives the same bytes as one
block; MLX's path agrees with numpy's within float32 rounding; a cache records the backend it
was built with and its comparisons use the same, so self-comparison stays exactly 0."""

from __future__ import annotations

import numpy as np
import pytest

from pytest_kld import divergence
from pytest_kld.cache import ensure_reference
from pytest_kld.compare import compare
from pytest_kld.divergence import compare_rows, log_softmax, logsumexp, sparsify
from pytest_kld.vocab import position_stats, sparse_rows


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    ref = (rng.normal(0, 3, (70, 3000))).astype(np.float32)
    quant = (ref + rng.normal(0, 0.3, ref.shape)).astype(np.float32)
    return ref, quant, rng.integers(0, 3000, 70)


def test_row_blocks_change_no_byte(logits, monkeypatch):
    ref, quant, targets = logits
    monkeypatch.setattr(divergence, "ROW_BLOCK", 10_000)  # one block: the unblocked computation
    whole = (logsumexp(ref), sparsify(log_softmax(ref.copy()), targets, 64))
    whole_kl = compare_rows(whole[1], log_softmax(quant.copy())).kl
    monkeypatch.setattr(divergence, "ROW_BLOCK", 7)
    assert np.array_equal(logsumexp(ref), whole[0])
    rows = sparsify(log_softmax(ref.copy()), targets, 64)
    for name in ("ids", "logprobs", "tail", "target"):
        assert np.array_equal(getattr(rows, name), getattr(whole[1], name)), name
    assert np.array_equal(compare_rows(rows, log_softmax(quant.copy())).kl, whole_kl)


def test_mlx_and_numpy_agree_within_float32(logits):
    import mlx.core as mx

    ref, quant, targets = logits
    a, b = sparse_rows(mx.array(ref), targets, 64, "numpy"), sparse_rows(mx.array(ref), targets, 64, "mlx")
    assert np.array_equal(np.sort(a.ids, axis=1), np.sort(b.ids, axis=1))
    for name in ("logprobs", "tail", "target"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=0, atol=2e-5, err_msg=name)
    kn, km = position_stats(a, mx.array(quant), "numpy"), position_stats(a, mx.array(quant), "mlx")
    np.testing.assert_allclose(kn.kl, km.kl, rtol=0, atol=1e-5)  # log-probs of size ~10 carry float32 error ~1e-6
    assert np.array_equal(kn.top1, km.top1) and kn.kl.mean() > 0.01
    np.testing.assert_allclose(kn.quant_target, km.quant_target, atol=2e-5)


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_each_backend_recorded_and_self_comparison_exactly_zero(tiny_model, prose_spec, tmp_path, backend):
    cache = ensure_reference(tiny_model("llama"), prose_spec, cache_dir=tmp_path, vocab_backend=backend)
    assert cache.manifest["settings"]["vocab_backend"] == backend
    assert np.all(compare(cache, tiny_model("llama")).kl == 0.0)
    q = compare(cache, tiny_model("llama", bits=4))
    assert q.summary["mean"] > 0


def test_auto_is_numpy_on_a_cpu_and_rebuilds_the_same_bytes(tiny_model, prose_spec, tmp_path):
    import mlx.core as mx

    if mx.default_device().type != mx.DeviceType.cpu:
        pytest.skip("this machine runs MLX on a GPU: auto times both there (next test)")
    cache = ensure_reference(tiny_model("llama"), prose_spec, cache_dir=tmp_path)
    chosen = cache.manifest["vocab_backend"]
    assert chosen["requested"] == "auto" and chosen["chosen"] == "numpy" and chosen["seconds"] == {}
    assert cache.manifest["settings"]["vocab_backend"] == "numpy"
    again = ensure_reference(tiny_model("llama"), prose_spec, cache_dir=tmp_path, rebuild=True)
    assert np.array_equal(again.topk_logprobs, cache.topk_logprobs) and np.array_equal(again.tail, cache.tail)


def test_auto_with_a_gpu_times_both_and_keeps_the_clearly_faster():
    import mlx.core as mx

    from pytest_kld.vocab import MLX_MARGIN, choose

    rng = np.random.default_rng(0)
    lg = mx.array(rng.normal(size=(64, 4096)).astype(np.float32))
    targets = rng.integers(0, 4096, size=64)
    chosen, s = choose(lg, targets, 32, "auto", device="gpu")
    assert set(s) == {"numpy", "mlx"} and all(v > 0 for v in s.values())
    assert chosen == ("mlx" if s["mlx"] * MLX_MARGIN < s["numpy"] else "numpy")
    assert choose(lg, targets, 32, "mlx", device="cpu") == ("mlx", {})


def _old_sparsify(lp, targets, k):
    """The selection as specified, computed the plain way: a stable sort of the whole row, so equal
    log-probs are ordered (and cut at K) by lower token id. (The argpartition this replaced left
    ties in whatever order numpy's partition kernel returns them, which differs between CPUs: its
    SIMD kernels on AVX-512 and AVX2 machines order ties differently.)"""
    idx = np.argsort(-lp, axis=-1, kind="stable")[:, :k]
    rest = lp.copy()
    np.put_along_axis(rest, idx, -np.inf, axis=-1)
    return idx, np.take_along_axis(lp, idx, axis=-1), logsumexp(rest)


@pytest.mark.parametrize("vocab", [3000, 49_152])
def test_logits_read_in_place_give_the_same_bytes_as_a_copied_log_softmax(vocab):
    """The numpy path reads the forward pass's logits where they are (never written) and
    normalises block by block: the same bytes as a log-softmax of a copy of the whole piece, and
    as the whole-row argpartition it replaced (at 49,152 the sampled threshold is used)."""
    rng = np.random.default_rng(1)
    ref = rng.normal(0, 3, (75, vocab)).astype(np.float32)
    quant = (ref + rng.normal(0, 0.3, ref.shape)).astype(np.float32)
    targets = rng.integers(0, vocab, 75)
    ref.flags.writeable = quant.flags.writeable = False  # a write would raise
    rows = sparsify(ref, targets, 256, logits=True)
    copied = sparsify(log_softmax(ref.copy()), targets, 256)
    ids, vals, tail = _old_sparsify(log_softmax(ref.copy()), targets, 256)
    assert np.array_equal(rows.ids, ids) and np.array_equal(rows.logprobs, vals) and np.array_equal(rows.tail, tail)
    for name in ("ids", "logprobs", "tail", "target", "target_ids"):
        assert np.array_equal(getattr(rows, name), getattr(copied, name)), name
    kl_in_place = compare_rows(rows, quant, logits=True)
    kl_copied = compare_rows(rows, log_softmax(quant.copy()))
    for name in ("kl", "top1", "ref_target", "quant_target"):
        assert np.array_equal(getattr(kl_in_place, name), getattr(kl_copied, name)), name
    assert kl_in_place.kl.mean() > 0.01 and np.all(compare_rows(rows, ref, logits=True).kl == 0.0)


def test_top_k_ties_go_to_the_lower_id_and_unlucky_samples_fall_back():
    """Equal values are ordered (and cut at K) by token id, whichever way the candidates were
    found; a row whose strided sample holds the top values takes the exact threshold; a NaN row
    gives K ids without failing (the build refuses it afterwards)."""
    v, k = 49_152, 256
    rng = np.random.default_rng(2)
    tied = np.round(rng.normal(0, 2, (40, v))).astype(np.float32)  # a few dozen distinct values
    got = divergence.top_k_ids(tied, k)
    for i in range(len(tied)):
        assert np.array_equal(got[i], np.lexsort((np.arange(v), -tied[i]))[:k]), i
    unlucky = rng.normal(0, 1, (3, v)).astype(np.float32)
    unlucky[:, :: divergence.TOPK_STRIDE][:, :400] += 50  # the sample is all top values
    assert np.array_equal(divergence.top_k_ids(unlucky, k), np.argsort(-unlucky, axis=-1, kind="stable")[:, :k])
    broken = rng.normal(0, 1, (2, v)).astype(np.float32)
    broken[0] = np.nan
    out = divergence.top_k_ids(broken, k)
    assert out.shape == (2, k) and np.array_equal(out[1], np.argsort(-broken[1], kind="stable")[:k])


@pytest.mark.parametrize("split", [True, False])
def test_a_scored_piece_holds_one_copy_of_its_logits(split, monkeypatch):
    """A forward piece's logits are handed out as a view of the head's output (no gathered copy)
    and dropped before the next piece (without overlap): MLX's peak memory over a build-shaped
    pass (first piece unscored, then scored pieces) stays within a bare forward pass's, which holds
    one piece of logits too. A copy would add a whole piece: 256 x 32,768 x 4 B = 32 MB."""
    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.models.cache import make_prompt_cache

    from pytest_kld.forward import iter_chunk_logprobs

    monkeypatch.setenv("PYTEST_KLD_OVERLAP", "0")  # a CPU's way (with overlap, two pieces by design)
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=32_768,
                           tie_word_embeddings=False)
    model = llama.Model(args)
    mx.eval(model.parameters())
    if not split:
        model._pytest_kld_split = False  # the model's own call, sliced
    tokens = np.random.default_rng(0).integers(0, args.vocab_size, 1025).astype(np.int32)
    piece = 256 * args.vocab_size * 4

    def bare():
        cache = make_prompt_cache(model)
        for s in range(0, 1024, 256):
            mx.eval(model(mx.array(tokens[None, s:s + 256]), cache=cache))

    bare()  # warm: the allocator's cache holds what the pass needs
    mx.reset_peak_memory()
    bare()
    bare_peak = mx.get_peak_memory()
    mx.reset_peak_memory()
    rows = 0
    for _, lg in iter_chunk_logprobs(model, tokens, 256, 1024, chunk_tokens=256, raw=True):
        rows += int(lg.shape[0])
        del lg
    assert rows == 768
    assert mx.get_peak_memory() <= bare_peak + piece // 4, (mx.get_peak_memory() - bare_peak) / piece
