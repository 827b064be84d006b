"""Hardening, round 2 (issue 23): results that a model, a baseline or a file cannot fake, no write
outside where it belongs, no hang and no traceback on hostile input. One test (at least) per
numbered item of the issue; each fails on the code before the fix."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pytest_kld.cache import ensure_reference
from pytest_kld.compare import compare
from pytest_kld.reference import Settings


def _padded(src, dst, *, extra: int = 64, scale: float = 3.0):
    """A copy of the tiny model ``src`` with ``extra`` more output rows (a padded vocabulary) that
    carry most of the probability mass: rows of its own head, scaled up."""
    import mlx.core as mx

    shutil.copytree(src, dst)
    weights = mx.load(str(dst / "model.safetensors"))
    head = weights["lm_head.weight"]
    weights["lm_head.weight"] = mx.concatenate([head, head[:extra] * scale])
    emb = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = mx.concatenate([emb, mx.zeros((extra, emb.shape[1]), emb.dtype)])
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = json.loads((dst / "config.json").read_text())
    config["vocab_size"] += extra
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)
    return dst


# ---------------------------------------------------------------------------------------------
# 1. mass outside the reference's vocabulary
# ---------------------------------------------------------------------------------------------


def test_mass_on_padding_rows_is_damage_and_an_argmax_there_a_disagreement(tiny_model, prose_spec, tmp_path):
    """K = the vocabulary, so the sparse record is exact: each position's KL must equal a dense
    float64 KL(reference || quant) with the quant normalised over its whole (wider) output, and
    top-1 must count an argmax among the padding rows as a disagreement."""
    import mlx.core as mx

    from pytest_kld.forward import load_model

    wide = _padded(tiny_model("llama"), tmp_path / "padded")
    cache = ensure_reference(tiny_model("llama"), prose_spec, Settings(top_k=1 << 20, chunk_tokens=0),
                             cache_dir=tmp_path / "c")
    vocab = cache.manifest["vocab_size"]
    r = compare(cache, wide)
    assert not r.is_reference
    lms = {"ref": load_model(tiny_model("llama"), "float32"), "quant": load_model(wide, "float32")}
    try:
        kl, agree = [], []
        for i in range(cache.n_chunks):
            s, e = (int(v) for v in cache.score_ranges[i])
            toks = mx.array(cache.chunk(i)[None, :e].astype(np.int32))
            lp = {k: np.array(lm.model(toks)[0, s:e].astype(mx.float32), dtype=np.float64) for k, lm in lms.items()}
            ref = lp["ref"] - np.logaddexp.reduce(lp["ref"], axis=-1, keepdims=True)
            q = lp["quant"] - np.logaddexp.reduce(lp["quant"], axis=-1, keepdims=True)  # whole output
            assert q.shape[1] == vocab + 64
            kl.append(np.sum(np.exp(ref) * (ref - q[:, :vocab]), axis=-1))
            agree.append(np.argmax(q, axis=-1) == np.argmax(ref, axis=-1))
    finally:
        for lm in lms.values():
            lm.release()
    kl, agree = np.concatenate(kl), np.concatenate(agree)
    assert (~agree).mean() > 0.2  # the padding rows win often: the case the issue describes
    np.testing.assert_allclose(r.kl, kl, rtol=2e-3, atol=2e-6)
    assert r.summary["mean"] > 0.1
    assert r.summary["top1"] == pytest.approx(agree.mean())
    # the reference itself is still exactly 0
    same = compare(cache, tiny_model("llama"))
    assert same.is_reference and np.all(same.kl == 0.0) and same.summary["top1"] == 1.0


def test_padding_mass_counts_in_drift_mode(tiny_model, tmp_path):
    """Trajectory KLD along the reference's continuation sees the padding rows' mass too, and the
    quant's own greedy continuation (which picks padding ids) leaves the reference's."""
    from pytest_kld.corpus import corpus_spec

    wide = _padded(tiny_model("llama"), tmp_path / "padded")
    cache = ensure_reference(tiny_model("llama"), corpus_spec("drift", n_chunks=3, drift_tokens=8),
                             cache_dir=tmp_path / "c")
    r = compare(cache, wide)
    assert r.summary["drift_kld"] > 0.1 and r.summary["top1"] < 0.9
    assert r.summary["drift_match_strict"] < 8
