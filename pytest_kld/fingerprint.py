"""Every hash the package computes: files, JSON, token ids, a model's weights and its tokenizer.
Identity is content, never paths or modification times, so caches travel between machines.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from .errors import ModelError
from .models import _read_header_bytes, weight_files


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


MEMO_FILE = "file-sha256.json"  # beside the reference caches: content hashes of local files already read
MEMO_ENTRIES = 4096
_HEX64 = re.compile(r"[0-9a-f]{64}")


def weights_fingerprint(path: Path, *, full: bool = False, memo: Path | None = None) -> str:
    """A fingerprint of a model's weights and config by their whole content, never paths or
    times, so a byte-identical copy (``cp -r``, a fresh hub download, a CI cache restore) keeps
    its cache and a change of any byte gets its own: ``"sha256-full:<hex>"``, SHA-256 over the
    sorted ``*.safetensors`` file names, sizes and each file's content SHA-256, and
    ``config.json``.

    Exact without being slow: a file in the hub cache is a blob named by its content's SHA-256
    (the LFS hash huggingface_hub checked on download), taken from its name; a local file is
    read in full once and its hash remembered in ``memo`` (a small JSON file, written
    atomically) by (device, inode, size, modification and change times in ns): a file written
    since, even with its modification time put back, is read again. ``full=True`` reads every
    byte now, trusting neither (and refreshes the memo); the value is the same.
    """
    path = Path(path)
    remembered = _read_memo(memo) if memo is not None and not full else {}
    learned: dict[str, str] = {}
    h = hashlib.sha256()
    h.update(b"pytest-kld weights v3 content\n")
    for f in weight_files(path):
        size = f.stat().st_size  # follows hub-cache symlinks to the blob
        _read_header_bytes(f)  # a file that is not safetensors: one line now, not at load
        h.update(f"{f.name}\0{size}\0{_file_sha256(f, full, remembered, learned)}\0".encode())
    config = path / "config.json"
    if config.is_file():
        h.update(b"config.json\0")
        h.update(config.read_bytes())
    if memo is not None and learned:
        _write_memo(memo, {**(remembered if not full else _read_memo(memo)), **learned})
    return "sha256-full:" + h.hexdigest()


def _file_sha256(f: Path, full: bool, remembered: dict, learned: dict) -> str:
    """The content SHA-256 of ``f``: a hub blob's name, a remembered hash, or every byte read."""
    real = f.resolve()
    if not full and real.parent.name == "blobs" and _HEX64.fullmatch(real.name):
        return real.name
    st = real.stat()
    stamp = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    if stamp in remembered:
        return remembered[stamp]
    learned[stamp] = sha256_file(real)
    return learned[stamp]


def _read_memo(memo: Path) -> dict:
    """The remembered hashes (stamp -> hex); nothing when the file is missing, not ours, or one
    that others can write (they could map a file to another's hash)."""
    import os

    from .files import UnreadableFile, read_json

    try:
        st = os.stat(memo)
        if (hasattr(os, "getuid") and st.st_uid != os.getuid()) or st.st_mode & 0o022:
            return {}
        doc = read_json(memo, 4 << 20)
    except (OSError, UnreadableFile):
        return {}
    files = doc.get("files") if isinstance(doc, dict) and doc.get("version") == 1 else None
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items() if isinstance(v, str) and _HEX64.fullmatch(v)}


def _write_memo(memo: Path, files: dict) -> None:
    """Best effort (a read-only cache directory still works, it only reads again next time)."""
    from .files import write_text

    keep = dict(list(files.items())[-MEMO_ENTRIES:])
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_text(memo, json.dumps({"version": 1, "files": keep}))
        memo.chmod(0o644)  # ours alone to write, whatever the file it replaced allowed
    except OSError:
        pass


def chat_template_fingerprint(path: Path) -> str | None:
    """SHA-256 of the chat template(s) a tokenizer renders prompts with (``tokenizer_config.json``'s
    ``chat_template``, ``chat_template.jinja``, ``chat_template.json``), or None without one: the
    token ids of a chat corpus depend on it, and :func:`tokenizer_fingerprint` does not see it."""
    path = Path(path)
    h, found = hashlib.sha256(b"pytest-kld chat template v1\n"), False
    config = path / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            template = None
        if template is not None:
            h.update(json.dumps(template, sort_keys=True).encode("utf-8"))
            found = True
    for name in ("chat_template.jinja", "chat_template.json"):
        if (path / name).is_file():
            h.update(f"\0{name}\0".encode() + (path / name).read_bytes())
            found = True
    return h.hexdigest() if found else None


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


