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
