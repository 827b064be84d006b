"""Tokenising a corpus: spec + tokenizer -> chunks of token ids with their scored ranges.

Short and file records go through the tokenizer's chat template (prompt as the user turn, the
text as the assistant's reply, the reply scored); documents are cut into chunks of n_ctx tokens
with BOS, the second half scored (llama.cpp's convention). The ids made here are what the
reference cache stores and every comparison is fed verbatim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .corpus import CorpusSpec, Record, load_records, read_document
from .errors import CorpusError
from .fingerprint import sha256_file, tokens_sha256


@dataclass
class TokenizedCorpus:
    chunks: list[np.ndarray]  # int32 token ids per chunk, each len <= n_ctx
    score_ranges: list[tuple[int, int]]  # output positions [start, end) scored per chunk
    categories: list[str]
    identity: dict  # spec.key_dict() + counts + a digest of the ids and ranges
    names: list[str] = field(default_factory=list)  # record id (or chunk index) per chunk

    @property
    def n_tokens(self) -> int:
        return int(sum(len(c) for c in self.chunks))

    @property
    def n_scored(self) -> int:
        return int(sum(e - s for s, e in self.score_ranges))


def _encode(tokenizer, text: str) -> list[int]:
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:  # a tokenizer without the keyword
        ids = tokenizer.encode(text)
    if hasattr(ids, "ids"):  # a raw `tokenizers.Encoding`
        ids = ids.ids
    return [int(t) for t in ids]


def _bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text when asked for special tokens (usually [BOS])."""
    probe = "Hello world"
    try:
        with_special = [int(t) for t in tokenizer.encode(probe, add_special_tokens=True)]
    except TypeError:
        return []
    plain = _encode(tokenizer, probe)
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i : i + len(plain)] == plain:
            return with_special[:i]
    return []


def has_chat_template(tokenizer) -> bool:
    flag = getattr(tokenizer, "has_chat_template", None)
    if isinstance(flag, bool):
        return flag
    return getattr(tokenizer, "chat_template", None) is not None


class Encoder:
    """Encodes a string with the BOS rule and finds the tokens of a character span."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.bos = _bos_prefix(tokenizer)
        bos_token = getattr(tokenizer, "bos_token", None)
        self.bos_token = bos_token if isinstance(bos_token, str) and bos_token else None

    def ids(self, s: str) -> list[int]:
        ids = _encode(self.tok, s)
        if self.bos and not (self.bos_token and s.startswith(self.bos_token)):
            ids = self.bos + ids
        return ids

    def with_span(self, s: str, cs: int, ce: int) -> tuple[list[int], int, int]:
        """Ids of ``s`` and the token indices [a, b) holding characters [cs, ce).

        Measured by encoding the prefixes ``s[:cs]`` and ``s[:ce]``: where a token straddles a
        boundary, it counts as inside at the start and outside at the end.
        """
        ids = self.ids(s)
        a = _common_prefix(ids, self.ids(s[:cs]))
        b = _common_prefix(ids, self.ids(s[:ce]))
        return ids, a, max(a, b)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _render_record(enc: Encoder, rec: Record, use_template: bool):
    """Ids of one record and the token span [a, b) of its scored text."""
    text = rec.text
    if use_template and rec.context:
        messages = [dict(m) for m in rec.context] + [{"role": rec.role, "content": text}]
        try:
            rendered = enc.tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=False
            )
        except Exception as exc:
            raise CorpusError(
                f"record {rec.id!r}: the tokenizer's chat template failed ({exc}); "
                "fix the record's messages or turn the template off (--kld-no-chat-template)"
            ) from exc
        cs = rendered.rfind(text)
        stripped = text.strip()
        if cs < 0 and stripped:
            text, cs = stripped, rendered.rfind(stripped)
        if cs < 0:
            raise CorpusError(
                f"record {rec.id!r}: the chat template rewrote the text, so its tokens cannot be "
                "found; turn the template off for this tokenizer (--kld-no-chat-template)"
            )
        return enc.with_span(rendered, cs, cs + len(text))
    parts = [m["content"] for m in rec.context if m["content"]]
    prefix = "".join(p + "\n\n" for p in parts)
    full = prefix + text
    return enc.with_span(full, len(prefix), len(full))


def corpus_identity(spec: CorpusSpec, chunks, ranges) -> dict:
    return {
        **spec.key_dict(),
        "chunks": len(chunks),
        "tokens": int(sum(len(c) for c in chunks)),
        "scored": int(sum(e - s for s, e in ranges)),
        "token_sha256": tokens_sha256(chunks, ranges),
    }


def tokenize_corpus(spec: CorpusSpec, tokenizer) -> TokenizedCorpus:
    """Token chunks and scored ranges of ``spec`` with ``tokenizer`` (see the module doc)."""
    if not isinstance(spec, CorpusSpec):
        raise TypeError("tokenize_corpus needs a CorpusSpec: build one with corpus_spec()")
    if Path(spec.path).is_file() and sha256_file(Path(spec.path)) != spec.sha256:
        raise CorpusError(
            f"{spec.source}: the file changed since the corpus spec was made; build the spec again"
        )
    enc = Encoder(tokenizer)
    if spec.kind == "document":
        return _tokenize_document(spec, enc)
    return _tokenize_records(spec, enc)


def _tokenize_records(spec: CorpusSpec, enc: Encoder) -> TokenizedCorpus:
    records = load_records(spec.path, spec.source_format, spec.default_category)
    if spec.n_chunks is not None:
        records = records[: spec.n_chunks]
    use_template = spec.chat_template and has_chat_template(enc.tok)
    chunks, ranges, cats, names = [], [], [], []
    for rec in records:
        ids, a, b = _render_record(enc, rec, use_template)
        ids = ids[: spec.n_ctx]
        start = max(a - 1, spec.score_offset)
        end = min(b, len(ids) - 1)
        if end <= start:
            raise CorpusError(
                f"{spec.source}: record {rec.id!r} leaves no position to score with "
                f"n_ctx={spec.n_ctx} (its scored text starts at token {a}); raise n_ctx "
                "(--kld-n-ctx) or shorten the record's prompt"
            )
        chunks.append(np.asarray(ids, dtype=np.int32))
        ranges.append((int(start), int(end)))
        cats.append(rec.category)
        names.append(rec.id)
    return TokenizedCorpus(chunks, ranges, cats, corpus_identity(spec, chunks, ranges), names)


def _tokenize_document(spec: CorpusSpec, enc: Encoder) -> TokenizedCorpus:
    text = read_document(spec)
    ids = np.asarray(enc.ids(text), dtype=np.int32)
    n_ctx = spec.n_ctx
    available = len(ids) // n_ctx
    if available == 0:
        raise CorpusError(
            f"{spec.source}: the text is only {len(ids)} tokens, less than one chunk of "
            f"n_ctx={n_ctx}; use a longer text or a smaller --kld-n-ctx"
        )
    n = available if spec.n_chunks is None else min(spec.n_chunks, available)
    bos = np.asarray(enc.bos, dtype=np.int32)
    chunks, ranges = [], []
    for i in range(n):
        chunk = ids[i * n_ctx : (i + 1) * n_ctx].copy()
        if len(bos):  # llama.cpp: the first token of every chunk becomes BOS
            chunk[: len(bos)] = bos
        chunks.append(chunk)
        ranges.append((spec.score_offset, n_ctx - 1))
    cats = [spec.default_category] * n
    names = [f"chunk-{i}" for i in range(n)]
    return TokenizedCorpus(chunks, ranges, cats, corpus_identity(spec, chunks, ranges), names)
