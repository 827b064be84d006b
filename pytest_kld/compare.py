"""Compare one model against a reference cache: KL(reference ‖ quant) at every scored position.

One model in memory at a time: the reference ran when the cache was built; here only the
comparison model is loaded, and it is released before returning.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import ModelError, TokenizerMismatch
from .reference import ReferenceCache
from .refpass import TOKENIZER_PROBE, tokenizer_size

# How the tail beyond the cached top K is treated (divergence.py): one bin plus the estimated
# inner KL of the tails from the log-ratio spread at ranks K/2..K.
ESTIMATOR = "top-K + tail bin + tail spread (ranks K/2..K)"


@dataclass
class KldResult:
    """Everything one comparison produced. The per-position arrays stay for later breakdowns."""

    model: str  # the name the user gave
    path: str  # the resolved model directory
    exec: str  # the execution precision actually used
    reference: dict  # the cache's reference identity
    settings: dict  # top_k, chunk_tokens, exec of the cache; corpus identity
    summary: dict  # stats.summarize output (mean, se, median, p99, max, top1, ...)
    categories: dict  # category -> summary
    info: dict = field(default_factory=dict)  # model metadata (size, bits per weight, ...)
    fingerprint: str = ""
    is_reference: bool = False
    seconds: float = 0.0
    kl: np.ndarray | None = None  # float64 [N]: KL(reference ‖ quant) per scored position
    top1: np.ndarray | None = None  # bool [N]
    ref_target: np.ndarray | None = None  # float64 [N] log p_ref(next token)
    quant_target: np.ndarray | None = None  # float64 [N] log p_quant(next token)
    chunk_category: np.ndarray | None = None  # int32 [N] category index of each position
    chunk: np.ndarray | None = None  # int32 [N] chunk (prompt) index of each position: the cluster
    max_at: dict | None = None  # where the largest KL sits (chunk, position, token, next_token)
    drift: dict | None = None  # drift mode, per prompt: match, match_strict, ties, near, length (drift.follow)

    @property
    def direction(self) -> str:
        return "KL(reference || quant)"


def check_tokenizer(cache: ReferenceCache, tokenizer, model: str) -> None:
    """Refuse a comparison model whose tokenizer is not the reference's."""
    ref = cache.manifest["reference"]["name"]
    probe = [int(x) for x in tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)]
    size = tokenizer_size(tokenizer)
    if probe != cache.manifest["tokenizer_probe"] or size != cache.manifest["tokenizer_size"]:
        why = "other token ids for the same text" if probe != cache.manifest["tokenizer_probe"] else (
            f"{size} tokens against the reference's {cache.manifest['tokenizer_size']}"
        )
        raise TokenizerMismatch(
            f"tokenizer mismatch: {model} is not tokenised like the reference {ref} ({why}); "
            "KLD needs both models to share one tokenizer"
        )


def compare(
    cache: ReferenceCache,
    model: str | os.PathLike,
    *,
    exec: str | None = None,
    chunk_tokens: int | None = None,
    name: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[int, int], None] | None = None,
    full_hash: bool | None = None,
    launch=None,
) -> KldResult:
    """Run ``model`` over the cache's token ids (verbatim) and measure KL(reference || model).

    ``exec`` defaults to the exec the reference was built with, and ``chunk_tokens`` to its
    chunking, so self-comparison reproduces the reference's numbers exactly. ``full_hash``
    re-reads every byte of the model's weights for its fingerprint (trusting no remembered hash).
    ``progress(done, total)`` hears the tokens run. ``launch`` (a
    :class:`pytest_kld.distributed.Launch`) runs the model sharded over MLX's distributed
    engine, for a model too large for one machine; the figures are computed as here, by rank 0.
    """
    from .blas import prefer_system_blas
    from .hub import resolve_model
    from .intervals import clustered
    from .stats import summarize, summarize_groups

    t0 = time.time()
    name = str(model) if name is None else name
    path = resolve_model(model, revision=revision)
    fp, is_reference = _identify(cache, path, full_hash)
    settings = cache.manifest["settings"]
    ct = settings["chunk_tokens"] if chunk_tokens is None else chunk_tokens
    if launch is not None:
        from .distributed import sharded_compare

        parts, exec_used = sharded_compare(cache, path, name, exec or settings["exec"], ct, launch,
                                           trust_remote_code=trust_remote_code, progress=progress)
        followed = None
    else:
        parts, exec_used, followed = run_passes(cache, path, name, exec or settings["exec"], ct, trust_remote_code, progress)

    def cat(attr):
        return np.concatenate([getattr(p, attr) for p in parts]) if parts else np.zeros(0)

    kl, top1 = cat("kl"), cat("top1").astype(bool)
    ref_t, q_t = cat("ref_target"), cat("quant_target")
    per_pos_cat = np.repeat(cache.chunk_category, np.diff(cache.row_offsets)).astype(np.int32)
    per_pos_chunk = np.repeat(np.arange(cache.n_chunks), np.diff(cache.row_offsets)).astype(np.int32)
    # the reference's own weights give exactly 0 at every position; anything else is not the reference
    is_reference = bool(is_reference and kl.size and np.all(kl == 0.0))
    summary = summarize(kl, top1, ref_t, q_t)
    summary.update(clustered(kl, per_pos_chunk))
    if followed is not None:
        from .drift import summarize as drift_summary

        summary.update(drift_summary(kl, cache, followed, int(cache.manifest["corpus"].get("drift_tokens") or 0)))
    categories = summarize_groups(per_pos_cat, cache.categories, kl=kl, top1=top1, ref_target=ref_t, quant_target=q_t)
    return KldResult(
        model=name, path=str(path), exec=exec_used, reference=dict(cache.manifest["reference"]),
        settings={**settings, "corpus": cache.manifest.get("corpus", {}), "blas": prefer_system_blas(),
                  "estimator": ESTIMATOR, "cache": {"key": cache.manifest.get("key"), "path": str(cache.path),
                            "key_material": cache.manifest.get("key_material"),
                            # where the vocabulary-wide work ran: asked, chosen, and what choosing measured
                            "vocab_backend": cache.manifest.get("vocab_backend")}},
        summary=summary, categories=categories, info=_info(path), fingerprint=fp, is_reference=is_reference,
        seconds=time.time() - t0, kl=kl, top1=top1, ref_target=ref_t, quant_target=q_t, chunk_category=per_pos_cat,
        chunk=per_pos_chunk,
        max_at=cache.position_of(summary["argmax"]) if summary.get("argmax") is not None else None,
        drift=followed,
    )


def _identify(cache: ReferenceCache, path, full_hash: bool | None) -> tuple[str, bool]:
    """(the model's fingerprint, whether its weights are the cache's reference's, byte for
    byte). The row is labelled ``reference`` only if its KL is exactly 0 as well (:func:`compare`)."""
    from .fingerprint import MEMO_FILE, tokenizer_fingerprint, weights_fingerprint
    from .reference import default_cache_dir

    fp = weights_fingerprint(path, full=bool(full_hash), memo=default_cache_dir() / MEMO_FILE)
    tokenizer_fingerprint(path)  # no tokenizer files: the same one line as for the reference
    return fp, fp == cache.manifest["reference"]["fingerprint"]


def run_passes(cache: ReferenceCache, path, name: str, exec_mode: str, chunk_tokens, trust_remote_code: bool, progress,
         load=None, share=None):
    """The model's per-position figures against the cache (one model in memory) and its exec.
    ``load`` and ``share``: as in :func:`pytest_kld.refpass.reference_pass` (a sharded model)."""
    from .forward import iter_corpus_logprobs, load_model, logits_width
    from .vocab import position_stats

    lm = (load or load_model)(path, exec_mode, trust_remote_code=trust_remote_code)
    try:
        check_tokenizer(cache, lm.tokenizer, name)
        chunks = [cache.chunk(i) for i in range(cache.n_chunks)]
        ranges = [tuple(int(v) for v in r) for r in cache.score_ranges]
        if share is not None:
            share(chunks, ranges)
        vocab = int(cache.manifest["vocab_size"])
        width = logits_width(lm.model)
        if width < vocab:
            raise ModelError(
                f"{name} has {width} output logits, fewer than the reference's {vocab}; "
                "it cannot be compared over the reference's vocabulary"
            )
        backend = cache.manifest["settings"].get("vocab_backend", "numpy")  # the build's: self-comparison is 0
        # drift mode: the quant's greedy pick at every step, over its whole output (drift.follow)
        picks = [] if (cache.manifest.get("corpus") or {}).get("mode") == "drift" else None
        parts = []
        # vocab=None: the quant's log-softmax runs over its WHOLE output, padding rows included, so
        # mass it puts on ids the reference never predicts lowers its log-probs at the reference's
        # ids (damage), and an argmax there is a top-1 disagreement (divergence.compare_rows)
        for i, row, lg in iter_corpus_logprobs(lm.model, chunks, ranges, chunk_tokens=chunk_tokens,
                                               vocab=None, progress=progress, raw=True):
            if picks is not None:
                from .drift import greedy_picks

                picks.append(greedy_picks(lg))
            parts.append(position_stats(cache.rows(i, row, row + int(lg.shape[0])), lg, backend))
            del lg  # one piece's logits alive at a time (forward.iter_chunk_logprobs)
        if picks is None:
            return parts, lm.exec, None
        from .drift import follow

        return parts, lm.exec, follow(cache, picks)
    finally:
        lm.release()


def _info(path) -> dict:
    """What the model is (quantinfo); a courtesy: the KL figures stand without it."""
    from .quantinfo import model_info

    try:
        return model_info(path).to_dict()
    except Exception as e:
        return {"error": str(e).splitlines()[0] if str(e) else type(e).__name__}
