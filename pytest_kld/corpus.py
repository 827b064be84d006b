"""Corpora: our prompt set, WikiText-2, a user's file → token chunks and the positions scored.

Three modes (see ``corpus_spec``):

* ``short`` (default): ~50 prompts we wrote (``pytest_kld/data/prompts.jsonl``) in six categories
  (prose, code, json, math, multilingual, chat). One prompt = one chunk, cut to ``n_ctx`` (512).
* ``long``: the WikiText-2 raw test split, tokenised once and cut into ``n_chunks`` (32) chunks of
  ``n_ctx`` (2048) tokens, the second half of each chunk scored, as llama.cpp's perplexity tool.
* ``file``: a user's ``.txt`` (one document, chunked as ``long``), ``.jsonl`` or ``.parquet``
  (one record = one chunk, as ``short``).

Conventions (the same for every mode):

* The output at position ``i`` of a chunk predicts token ``i + 1``; ``score_ranges[c] = (s, e)``
  lists the output positions ``s <= i < e`` that are scored, with ``e <= len(chunk) - 1``.
* A *record* (a prompt, a line of a .jsonl file) has an optional context (``prompt`` or the
  earlier chat ``messages``) and a ``text``. The text is what is scored: the predictions of its
  tokens and of the one token after it (with a chat template, the end-of-turn marker: when to
  stop is part of the behaviour a quantisation may change). The context is never scored.
* With a chat template (``chat_template=True`` and the tokenizer has one, and the record has a
  context), the context is the user turn and the text the assistant's reply: for an instruct
  model that is the in-distribution place to measure. Otherwise the record is plain text:
  ``context + "\\n\\n" + text``.
* No output position below ``score_offset`` (default 8) is scored in records: the first few
  predictions of a context-free text are noise. Documents score from ``n_ctx // 2`` (llama.cpp's
  ``first``) unless ``score_offset`` says otherwise.
* BOS: when the tokenizer adds one (found by encoding a probe with and without special
  tokens), records start with it unless their rendered text already does (mlx-lm's rule in
  ``generate``); documents are tokenised once with it and each chunk's first token is replaced
  by it, as llama.cpp does (the text token there is lost, in every chunk but the first).

Nothing here imports mlx: tokenizers come in as objects (an mlx-lm ``TokenizerWrapper`` or a
Hugging Face tokenizer: anything with ``encode(text, add_special_tokens=...)``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CorpusError
from .fingerprint import sha256_file
from .sources import (
    WIKITEXT_FILE,
    WIKITEXT_REPO,
    read_parquet_table,
    require_pyarrow,
    resolve_wikitext,
    wikitext_text,
)

__all__ = [
    "CorpusSpec",
    "corpus_spec",
    "load_records",
    "wikitext_text",
    "WIKITEXT_REPO",
    "WIKITEXT_FILE",
]

# Bump when any rule that changes token ids or scored positions changes: it is part of the key.
FORMAT_VERSION = 1

MODES = ("short", "long", "file", "drift")
DEFAULT_N_CTX = {"short": 512, "long": 2048, "file": 512, "drift": 512}
DEFAULT_N_CHUNKS_LONG = 32
DEFAULT_SCORE_OFFSET = 8
DEFAULT_DRIFT_TOKENS = 64  # drift mode: tokens the reference generates per prompt (pytest_kld.drift)

PROMPTS_FILE = "prompts.jsonl"
_FILE_FORMATS = {".txt": "txt", ".raw": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}


# --------------------------------------------------------------------------------------------
# The spec: cheap, no tokenizer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSpec:
    """What to tokenise and how; identifies the corpus in the reference cache's key.

    ``kind`` is ``"records"`` (one record = one chunk) or ``"document"`` (one long text cut into
    ``n_ctx`` chunks). ``path`` is where the source was found on this machine; it is not part of
    the key (moving a file does not change the corpus), ``sha256`` of its bytes is.
    """

    mode: str
    kind: str
    source: str  # for people: "bundled prompts.jsonl", "Salesforce/wikitext:<file>", a path
    path: str
    source_format: str  # "jsonl" | "parquet" | "txt" | "wikitext-parquet"
    sha256: str
    n_ctx: int
    n_chunks: int | None  # records: first n records (None: all); document: at most n chunks
    score_offset: int  # records: first output position that may be scored; document: first
    chat_template: bool  # records only (False for documents: it changes nothing there)
    default_category: str
    drift_tokens: int = 0  # drift mode: tokens the reference generates per prompt (pytest_kld.drift)

    def key_dict(self) -> dict:
        """JSON-able; everything that changes the token ids or the scored positions."""
        return {
            "corpus_format": FORMAT_VERSION,
            "mode": self.mode,
            "kind": self.kind,
            "source_format": self.source_format,
            "sha256": self.sha256,
            "n_ctx": self.n_ctx,
            "n_chunks": self.n_chunks,
            "score_offset": self.score_offset,
            "chat_template": self.chat_template,
            "category": self.default_category,
            **({"drift_tokens": self.drift_tokens} if self.mode == "drift" else {}),
        }


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        try:
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value)
            else:
                raise ValueError
        except ValueError:
            raise CorpusError(f"{name} must be an integer, got {value!r}") from None
    value = int(value)
    if value < minimum:
        raise CorpusError(f"{name} must be at least {minimum}, got {value}")
    return value


def _bundled_prompts() -> Path:
    return Path(__file__).with_name("data") / PROMPTS_FILE


def corpus_spec(
    mode: str = "short",
    *,
    dataset: str | os.PathLike | None = None,
    n_ctx: int | None = None,
    n_chunks: int | None = None,
    chat_template: bool = True,
    score_offset: int | None = None,
    category: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    drift_tokens: int | None = None,
) -> CorpusSpec:
    """Validate the settings and locate (and hash) the source; no tokenizer needed.

    * ``mode``: ``"short"`` | ``"long"`` | ``"file"``. A ``dataset`` with mode ``short`` (the
      default) means ``file``. With mode ``long``, a ``dataset`` (a ``.txt`` such as llama.cpp's
      ``wiki.test.raw``, or a WikiText-style ``.parquet``) replaces the download.
    * ``n_ctx``: tokens per chunk (default 512; 2048 in long mode).
    * ``n_chunks``: records mode: use the first n records; document: at most n chunks (default
      32 in long mode, all in file mode).
    * ``score_offset``: records: no output position below it is scored (default 8); documents:
      the first scored output position (default ``n_ctx // 2``).
    * ``category``: the category of chunks that do not name one (default "file"; "wikitext").
    * ``cache_dir`` / ``local_files_only`` (long mode): the Hugging Face hub cache to use
      (default: ``HF_HUB_CACHE``, else ``HF_HOME``/hub, read now, not at import) and whether to
      refuse the network (default: ``HF_HUB_OFFLINE``, read now). The cache is always tried
      first, so a cached copy never touches the network.
    """
    if mode not in MODES:
        raise CorpusError(f"unknown corpus mode {mode!r}: choose one of {', '.join(MODES)}")
    if dataset is not None and str(dataset) == "":
        dataset = None
    if dataset is not None and mode == "short":
        mode = "file"
    if mode == "drift":
        drift_tokens = _positive_int("drift_tokens", DEFAULT_DRIFT_TOKENS if drift_tokens is None else drift_tokens)
    if mode == "file" and dataset is None:
        raise CorpusError("corpus mode 'file' needs a dataset: pass --kld-dataset PATH")
    if not isinstance(chat_template, bool):
        raise CorpusError(f"chat_template must be true or false, got {chat_template!r}")

    n_ctx = _positive_int("n_ctx", DEFAULT_N_CTX[mode] if n_ctx is None else n_ctx, 2)
    if n_chunks is not None:
        n_chunks = _positive_int("n_chunks", n_chunks)
    elif mode == "long":
        n_chunks = DEFAULT_N_CHUNKS_LONG

    path, fmt, kind, source = _locate_source(mode, dataset, cache_dir, local_files_only)
    score_offset = _score_offset(mode, kind, n_ctx, score_offset)
    if kind == "document":
        chat_template = False
    if category is None:
        category = {"short": "prompt", "long": "wikitext", "file": "file", "drift": "prompt"}[mode]
    elif not isinstance(category, str) or not category.strip():
        raise CorpusError(f"category must be a non-empty string, got {category!r}")

    return CorpusSpec(
        mode=mode,
        kind=kind,
        source=source,
        path=str(path),
        source_format=fmt,
        sha256=sha256_file(path),
        n_ctx=n_ctx,
        n_chunks=n_chunks,
        score_offset=score_offset,
        chat_template=chat_template,
        default_category=category,
        drift_tokens=int(drift_tokens or 0) if mode == "drift" else 0,
    )


def _locate_source(mode: str, dataset, cache_dir, local_files_only) -> tuple[Path, str, str, str]:
    """(path, format, kind, source text) of the corpus: a user file, the bundled prompts, or
    WikiText-2 from the hub cache (downloaded if allowed)."""
    if dataset is not None:
        return _dataset_source(mode, Path(dataset).expanduser())
    if mode in ("short", "drift"):
        path = _bundled_prompts()
        if not path.is_file():
            raise CorpusError(
                f"{path}: the bundled prompt set is missing; reinstall pytest-kld "
                "(its package data was not installed)"
            )
        return path, "jsonl", "records", "bundled prompts.jsonl"
    require_pyarrow(f"{WIKITEXT_REPO}:{WIKITEXT_FILE}")
    path = resolve_wikitext(cache_dir, local_files_only)
    return path, "wikitext-parquet", "document", f"{WIKITEXT_REPO}:{WIKITEXT_FILE}"


def _dataset_source(mode: str, path: Path) -> tuple[Path, str, str, str]:
    if path.is_dir():
        raise CorpusError(
            f"{path}: the dataset is a directory; --kld-dataset takes one file (.txt, .jsonl or .parquet)"
        )
    fmt = _FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise CorpusError(
            f"{path}: unknown dataset type {path.suffix or '(no suffix)'!r}; "
            "use a .txt (or .raw), .jsonl or .parquet file"
        )
    if not path.is_file():
        what = "not a regular file (a FIFO or a device)" if path.exists() else "dataset file not found"
        raise CorpusError(f"{path}: {what}; check the --kld-dataset path")
    if fmt == "parquet":
        require_pyarrow(path)
    if mode == "long":
        if fmt == "jsonl":
            raise CorpusError(
                f"{path}: long mode reads one document (.txt or WikiText .parquet); "
                "use --kld-mode short (file) for a .jsonl of records"
            )
        return path.resolve(), "wikitext-parquet" if fmt == "parquet" else fmt, "document", str(path)
    if mode == "drift" and fmt == "txt":
        raise CorpusError(f"{path}: drift mode reads prompts (.jsonl or .parquet records with a prompt); "
                          "a .txt document has none")
    return path.resolve(), fmt, "document" if fmt == "txt" else "records", str(path)


def _score_offset(mode: str, kind: str, n_ctx: int, score_offset) -> int:
    """The first scored output position: records score after DEFAULT_SCORE_OFFSET tokens of
    context, documents their second half (llama.cpp's convention)."""
    smallest = 3 if kind == "document" else DEFAULT_SCORE_OFFSET + 2
    if score_offset is None and n_ctx < smallest:
        context = ("the second half of each chunk is scored" if kind == "document"
                   else f"the first {DEFAULT_SCORE_OFFSET} tokens of each record are context")
        raise CorpusError(
            f"--kld-n-ctx={n_ctx} leaves no position to score in {mode} mode ({context}): use at least {smallest}"
        )
    if score_offset is None:
        score_offset = n_ctx // 2 if kind == "document" else DEFAULT_SCORE_OFFSET
    score_offset = _positive_int("score_offset", score_offset, 0)
    if score_offset > n_ctx - 2:
        raise CorpusError(
            f"score_offset {score_offset} leaves nothing to score with n_ctx={n_ctx}: it must be at most n_ctx - 2"
        )
    return score_offset


# --------------------------------------------------------------------------------------------
# Records: the bundled prompts and users' .jsonl / .parquet files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    id: str
    category: str
    context: tuple[dict, ...]  # chat messages before the scored text ({"role", "content"})
    text: str  # scored; with a chat template the last (assistant) message
    role: str = "assistant"


def _record_from_obj(obj, where: str, default_category: str, index: int) -> Record:
    if not isinstance(obj, dict):
        raise CorpusError(f"{where}: expected a JSON object with a 'text' field")
    rid = obj.get("id")
    rid = str(index) if rid is None else str(rid)
    category = obj.get("category")
    if category is None or category == "":
        category = default_category
    if not isinstance(category, str):
        raise CorpusError(f"{where}: 'category' must be a string, got {category!r}")
    if "messages" in obj and obj["messages"] is not None:
        msgs = obj["messages"]
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in msgs
        )
        if not ok:
            raise CorpusError(
                f"{where}: 'messages' must be a non-empty list of "
                '{"role": ..., "content": "..."} objects'
            )
        last = msgs[-1]
        if not last["content"].strip():
            raise CorpusError(f"{where}: the last message (the one scored) is empty")
        context = tuple({"role": m["role"], "content": m["content"]} for m in msgs[:-1])
        return Record(rid, category, context, last["content"], last["role"])
    text = obj.get("text")
    if text is None:
        raise CorpusError(
            f"{where}: no 'text' field (keys: {', '.join(map(str, obj)) or 'none'}); "
            'each record needs "text" (or "messages")'
        )
    if not isinstance(text, str) or not text.strip():
        raise CorpusError(f"{where}: 'text' must be a non-empty string")
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise CorpusError(f"{where}: 'prompt' must be a string")
    context = ({"role": "user", "content": prompt},) if prompt and prompt.strip() else ()
    return Record(rid, category, context, text)


def load_records(path: str | os.PathLike, fmt: str, default_category: str = "file") -> list[Record]:
    """Records of a .jsonl (one JSON object a line) or .parquet (columns) file.

    Fields: ``text`` (scored, required), optional ``prompt`` (context: the user turn), ``category``
    and ``id``; or, in .jsonl, ``messages`` (chat messages; the last one is scored).
    """
    path = Path(path)
    records: list[Record] = []
    if fmt == "jsonl":
        from .files import UnreadableFile, parse_json

        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise CorpusError(f"{path}: not UTF-8 text ({exc}); save it as UTF-8") from exc
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                obj = parse_json(line)
            except UnreadableFile as exc:
                raise CorpusError(f"{where}: bad JSON ({exc})") from None
            records.append(_record_from_obj(obj, where, default_category, lineno))
    elif fmt == "parquet":
        cols = read_parquet_table(path, ("text", "prompt", "category", "id"), "text")
        for i in range(len(cols["text"])):
            obj = {k: v[i] for k, v in cols.items()}
            records.append(_record_from_obj(obj, f"{path}, row {i}", default_category, i))
    else:  # pragma: no cover - guarded by corpus_spec
        raise CorpusError(f"{path}: records are read from .jsonl or .parquet, not {fmt}")
    if not records:
        raise CorpusError(f"{path}: no records (the file is empty); add at least one text")
    return records


def read_document(spec: CorpusSpec) -> str:
    path = Path(spec.path)
    if spec.source_format == "wikitext-parquet":
        text = wikitext_text(path)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(f"{spec.source}: not UTF-8 text ({exc}); save it as UTF-8") from exc
        if text.endswith("\n"):  # llama.cpp's -f drops one trailing newline
            text = text[:-1]
    if not text.strip():
        raise CorpusError(f"{spec.source}: the text is empty; give a file with text in it")
    return text
