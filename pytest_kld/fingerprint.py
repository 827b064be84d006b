"""Every hash the package computes: files, JSON, token ids, a model's weights and its tokenizer.
Identity is content, never paths or modification times, so caches travel between machines.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from .errors import ModelError
from .models import read_header_bytes, weight_files


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokens_sha256(chunks, ranges) -> str:
    """The corpus checksum a manifest commits to: every chunk's length, scored range and ids."""
    h = hashlib.sha256()
    for c, (s, e) in zip(chunks, ranges):
        h.update(np.asarray([len(c), s, e], dtype="<i8").tobytes())
        h.update(np.asarray(c, dtype="<i4").tobytes())
    return h.hexdigest()

# ---------------------------------------------------------------------------------------------
# fingerprints
# ---------------------------------------------------------------------------------------------


# The sampled fingerprint reads, per weight file, its header and SAMPLE_BLOCKS blocks of
# SAMPLE_BYTES spread evenly over the tensor data (all of it when the data is smaller): at most
# 4 MiB per file, whatever its size.
SAMPLE_BLOCKS = 1024
SAMPLE_BYTES = 4096


def weights_fingerprint(path: Path, *, full: bool = False) -> str:
    """A fingerprint of a model's weights and config, by content only: no paths, no times, so a
    byte-identical copy (``cp -r``, a fresh hub download, a CI cache restore) keeps its cache.

    ``full=False`` (returns ``"sha256-sample:<hex>"``): SHA-256 over the sorted ``*.safetensors``
    file names, sizes and JSON headers (names, dtypes, shapes, offsets), a sample of each file's
    tensor data (:data:`SAMPLE_BLOCKS` evenly spread blocks, the whole data of a small file) and
    ``config.json``. Reads at most 4 MiB per file. Any re-quantisation or re-conversion rewrites
    nearly every block, so it is seen; an edit confined to a few bytes between two sampled
    blocks (one poisoned row of a large tensor) is not: ``full=True`` sees every byte.

    ``full=True`` (returns ``"sha256-full:<hex>"``): SHA-256 over the sorted file names, sizes
    and full contents (streamed) and ``config.json``.
    """
    path = Path(path)
    h = hashlib.sha256()
    h.update(b"pytest-kld weights v2 full\n" if full else b"pytest-kld weights v2 sample\n")
    for f in weight_files(path):
        size = f.stat().st_size  # follows hub-cache symlinks to the blob
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if full:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            else:
                header = read_header_bytes(f)
                h.update(struct.pack("<Q", len(header)))
                h.update(header)
                _hash_sample(h, fh, 8 + len(header), size)
    config = path / "config.json"
    if config.is_file():
        h.update(b"config.json\0")
        h.update(config.read_bytes())
    return ("sha256-full:" if full else "sha256-sample:") + h.hexdigest()


def _hash_sample(h, fh, start: int, end: int) -> None:
    """Feed ``h`` the bytes [start, end) of ``fh`` if small, else evenly spread blocks of it."""
    span = end - start
    if span <= SAMPLE_BLOCKS * SAMPLE_BYTES:
        fh.seek(start)
        h.update(fh.read(span))
        return
    stride = (span - SAMPLE_BYTES) / (SAMPLE_BLOCKS - 1)
    for i in range(SAMPLE_BLOCKS):
        fh.seek(start + int(i * stride))
        h.update(fh.read(SAMPLE_BYTES))


# Tokenizer files hashed (by content) when there is no tokenizer.json. tokenizer_config.json is
# deliberately absent: only its added_tokens_decoder (id -> content) is taken from it.
_TOKENIZER_FALLBACK_FILES = (
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def tokenizer_fingerprint(path: Path) -> str:
    """A fingerprint of the vocabulary: which string each token id stands for.

    With ``tokenizer.json`` (returns ``"vocab-sha256:<hex>"``): SHA-256 of the canonical JSON of
    the sorted ``(id, token)`` pairs of ``model.vocab`` (a ``{token: id}`` map for BPE, WordPiece
    and WordLevel; for Unigram the pieces of its ``[piece, score]`` list, id = position) together
    with ``added_tokens`` as ``(id, content)``. It does not cover merges, Unigram scores, the
    normalizer, pre-tokenizer, post-processor, decoder, the special flag of added tokens or
    anything in ``tokenizer_config.json`` (chat template, bos/eos choice): the comparison feeds the
    reference's token ids to both models, so what must agree is the meaning of each id.

    Without ``tokenizer.json`` (returns ``"files-sha256:<hex>"``): SHA-256 over the names and bytes
    of whichever of ``tokenizer.model``, ``vocab.json``, ``merges.txt``, ``vocab.txt``,
    ``added_tokens.json``, ``spiece.model``, ``sentencepiece.bpe.model`` and ``*.tiktoken`` exist,
    plus ``tokenizer_config.json``'s ``added_tokens_decoder`` as ``(id, content)``. The two kinds
    never compare equal to each other.
    """
    path = Path(path)
    tj = path / "tokenizer.json"
    if tj.is_file():
        try:
            data = json.loads(tj.read_text(encoding="utf-8"))
            model = data.get("model") or {}
            vocab = model.get("vocab")
            if isinstance(vocab, dict):
                pairs = sorted((int(i), str(t)) for t, i in vocab.items())
            elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
                pairs = [(i, str(e[0] if isinstance(e, list) else e)) for i, e in enumerate(vocab)]
            else:
                raise ValueError("model.vocab missing")
            added = sorted(
                (int(t["id"]), str(t["content"])) for t in (data.get("added_tokens") or [])
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(
                f"{tj} is not a readable tokenizer.json ({e}); re-download the tokenizer files"
            ) from None
        blob = json.dumps(
            {"vocab": pairs, "added": added}, ensure_ascii=False, separators=(",", ":")
        )
        return "vocab-sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()

    files = [path / n for n in _TOKENIZER_FALLBACK_FILES if (path / n).is_file()]
    files += sorted(path.glob("*.tiktoken"))
    added: list = []
    tc = path / "tokenizer_config.json"
    if tc.is_file():
        try:
            dec = json.loads(tc.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
            added = sorted((int(i), str(t.get("content"))) for i, t in dec.items())
        except (ValueError, TypeError, AttributeError):
            added = []
    if not files:
        raise ModelError(
            f"no tokenizer in {path} (no tokenizer.json, tokenizer.model, vocab.json or "
            "*.tiktoken): copy the reference model's tokenizer files into it"
        )
    h = hashlib.sha256(b"pytest-kld tokenizer files v1\n")
    for f in files:
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        h.update(f.read_bytes())
    h.update(json.dumps(added, ensure_ascii=False).encode("utf-8"))
    return "files-sha256:" + h.hexdigest()


