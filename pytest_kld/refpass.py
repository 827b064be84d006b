"""The reference pass: run the reference model once over the corpus and keep, per scored
position, its top-K log-probs, their ids, the tail mass and the log-prob of the token that
follows (``divergence.sparsify``), plus the exact token ids fed. The cache store
(:mod:`pytest_kld.reference`) writes what this returns; this module knows nothing of storage.
"""

from __future__ import annotations

import time

import numpy as np

from .errors import KldError

# Text whose ids the cache records: a comparison model's tokenizer must give the same ids.
TOKENIZER_PROBE = (
    "The quick brown fox jumps over 13 lazy dogs; naïve café, straße. "
    "def f(x): return {\"a\": [1, 2.5e-3]}  日本語のテキスト。 Привет, мир! مرحبا 🙂"
)



def id_dtype(vocab: int):
    """The narrowest unsigned integer type that holds every id of a ``vocab``-sized vocabulary."""
    return np.uint16 if vocab <= 1 << 16 else np.uint32



def tokenizer_size(tok) -> int:
    """Number of tokens of an mlx-lm TokenizerWrapper or HF tokenizer, added tokens included."""
    inner = getattr(tok, "_tokenizer", tok)
    return int(len(inner))


def reference_pass(path, corpus_spec, *, top_k: int, chunk_tokens, exec_mode: str, progress=None,
                   trust_remote_code: bool = False, name: str | None = None, load=None,
                   share=None, vocab_backend: str = "auto") -> tuple[dict, dict]:
    """(arrays, manifest facts) of the reference at ``path`` over ``corpus_spec``.

    ``load`` replaces :func:`pytest_kld.forward.load_model` (same signature; a model sharded
    over ranks, :mod:`pytest_kld.shardrank`), and ``share(chunks, ranges)`` hears the token ids
    before the first forward pass (to hand them to the other ranks).
    """
    from .forward import load_model, logits_width
    from .tokens import tokenize_corpus

    name = name or str(path)
    t0 = time.time()
    lm = (load or load_model)(path, exec_mode, trust_remote_code=trust_remote_code)
    tok = lm.tokenizer
    if corpus_spec.mode == "drift":  # the reference writes the text: its greedy continuations
        from .drift import reference_corpus

        # batched across prompts where that is token-exact (float32; drift.continuations)
        corpus = reference_corpus(lm.model, tok, corpus_spec, _generating(progress), batched=lm.exec == "float32")
    else:
        corpus = tokenize_corpus(corpus_spec, tok)
    chunks = [np.asarray(c, dtype=np.int32) for c in corpus.chunks]
    ranges = [(int(s), int(e)) for s, e in corpus.score_ranges]
    for i, (c, (s, e)) in enumerate(zip(chunks, ranges)):
        if not (0 <= s <= e <= len(c) - 1):
            raise KldError(f"corpus chunk {i}: scored range [{s}, {e}) does not fit its {len(c)} tokens")
    if share is not None:
        share(chunks, ranges)
    vocab = logits_width(lm.model)
    tok_len = tokenizer_size(tok)
    if tok_len > vocab:
        raise KldError(f"{name}: tokenizer has {tok_len} tokens but the model only {vocab} logits")
    k = min(top_k, vocab)
    backend: dict = {"requested": vocab_backend}
    records = _sparse_records(lm.model, chunks, ranges, k, vocab, chunk_tokens, progress, name, backend)
    probe = [int(x) for x in tok.encode(TOKENIZER_PROBE, add_special_tokens=False)]
    exec_used = lm.exec
    lm.release()
    cat_names = sorted(set(corpus.categories))
    arrays = {
        "tokens": np.concatenate(chunks).astype(np.int32) if chunks else np.zeros(0, np.int32),
        "chunk_offsets": np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64),
        "score_ranges": np.array(ranges, dtype=np.int32).reshape(-1, 2),
        "chunk_category": np.array([cat_names.index(c) for c in corpus.categories], dtype=np.int32),
        **records,
    }
    n_pos = int(arrays["topk_ids"].shape[0])
    return arrays, {
        "settings": {"top_k": k, "chunk_tokens": chunk_tokens or 0, "exec": exec_used,
                     "vocab_backend": backend.get("chosen", "numpy")},
        "vocab_backend": backend,
        "corpus": {**corpus.identity, "mode": corpus_spec.mode},
        "categories": cat_names,
        "vocab_size": vocab,
        "tokenizer_size": tok_len,
        "tokenizer_probe": probe,
        "positions": n_pos,
        "bytes_per_position": int(sum(records[n].nbytes for n in records) // max(n_pos, 1)),
        "build_seconds": round(time.time() - t0, 3),
        "versions": _versions(),
        "blas": _blas(),
    }


def _generating(progress):
    """Drift mode: a line when the reference starts and ends continuing the prompts."""
    say = getattr(progress, "say", None)
    if say is None:
        return None

    def tell(done: int, total: int) -> None:
        if done in (1, total):
            say(f"pytest-kld: drift: the reference continued {done}/{total} prompts greedily")

    return tell


def _sparse_records(model, chunks, ranges, k: int, vocab: int, chunk_tokens, progress, name: str,
                    backend: dict) -> dict:
    """The top-K record of every scored position, piece by piece (one piece's log-probs in memory).
    ``backend["requested"]`` is where the vocabulary-wide work runs (:mod:`pytest_kld.vocab`);
    the one chosen, and what choosing measured, are written back into ``backend``."""
    from .forward import iter_corpus_logprobs
    from .vocab import choose, sparse_rows

    idt = id_dtype(vocab)
    ids_l, lp_l, tail_l, tgt_l = [], [], [], []
    for i, row, lg in iter_corpus_logprobs(model, chunks, ranges, chunk_tokens=chunk_tokens, vocab=vocab,
                                           progress=progress, raw=True):
        first = ranges[i][0] + row  # the output position of this piece's first row
        targets = chunks[i][first + 1 : first + 1 + int(lg.shape[0])]
        if "chosen" not in backend:
            backend["chosen"], backend["seconds"] = choose(lg, targets, k, backend["requested"])
        rows = sparse_rows(lg, targets, k, backend["chosen"])
        if not (np.all(np.isfinite(rows.logprobs)) and np.all(np.isfinite(rows.target))):
            raise KldError(f"{name}: the reference produced NaN or inf log-probs in chunk {i}")
        ids_l.append(rows.ids.astype(idt))
        lp_l.append(rows.logprobs)
        tail_l.append(rows.tail)
        tgt_l.append(rows.target)
        del lg  # one piece's logits alive at a time (forward.iter_chunk_logprobs)
    return {
        "topk_ids": np.concatenate(ids_l) if ids_l else np.zeros((0, k), idt),
        "topk_logprobs": np.concatenate(lp_l) if lp_l else np.zeros((0, k), np.float32),
        "tail": np.concatenate(tail_l) if tail_l else np.zeros(0, np.float32),
        "target": np.concatenate(tgt_l) if tgt_l else np.zeros(0, np.float32),
    }


def _versions() -> dict:
    import mlx.core as mx
    import mlx_lm

    from . import __version__

    return {"pytest_kld": __version__, "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}


def _blas() -> str:
    from .blas import prefer_system_blas

    return prefer_system_blas()
