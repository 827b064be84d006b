"""Reading corpus sources that need more than open(): WikiText-2 from the hub cache (fetched once
if allowed, a failure remembered for the process) and parquet tables (pyarrow, optional).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CorpusError

WIKITEXT_REPO = "Salesforce/wikitext"
WIKITEXT_FILE = "wikitext-2-raw-v1/test-00000-of-00001.parquet"
WIKITEXT_FETCH = (
    "hf download Salesforce/wikitext --repo-type dataset --include 'wikitext-2-raw-v1/test-*'"
)


def require_pyarrow(path) -> None:
    import importlib.util

    if importlib.util.find_spec("pyarrow") is None:
        raise CorpusError(
            f"reading {path} needs pyarrow, which is not installed: "
            "pip install 'pytest-kld[parquet]' (or pip install pyarrow)"
        )


# Failed WikiText resolutions of this process, by (cache, offline): a second test asking for long
# mode fails at once with the same line instead of trying the hub again (~23 s offline).
_WIKITEXT_FAILED: dict = {}


def resolve_wikitext(cache_dir=None, local_files_only: bool | None = None) -> Path:
    """Path of the WikiText-2 raw test parquet: from the cache, else (if allowed) downloaded."""
    from .hub import hub_cache_dir, hub_offline

    cache = str(Path(cache_dir).expanduser() if cache_dir is not None else hub_cache_dir())
    offline = hub_offline() if local_files_only is None else bool(local_files_only)
    failed = _WIKITEXT_FAILED.get((cache, offline))
    if failed is not None:
        raise CorpusError(str(failed))
    try:
        return _fetch_wikitext(cache, offline)
    except CorpusError as e:
        _WIKITEXT_FAILED[(cache, offline)] = e
        raise


def _fetch_wikitext(cache: str, offline: bool) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    kwargs = dict(repo_id=WIKITEXT_REPO, repo_type="dataset", filename=WIKITEXT_FILE)
    try:  # the cache first: no network when it is there
        return Path(hf_hub_download(**kwargs, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    where = cache
    if offline:
        raise CorpusError(
            f"WikiText-2 ({WIKITEXT_REPO}:{WIKITEXT_FILE}) is not in {where} and the hub is "
            f"offline: on a machine with network run `{WIKITEXT_FETCH}` (and copy that cache "
            "here), or pass --kld-dataset wiki.test.raw"
        )
    try:
        return Path(hf_hub_download(**kwargs, cache_dir=cache))
    except Exception as exc:  # network, auth, disk: all end in the same advice
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = first if len(first) <= 160 else first[:157] + "..."
        raise CorpusError(
            f"could not download WikiText-2 ({WIKITEXT_REPO}:{WIKITEXT_FILE}) into {where}: "
            f"{first}; run `{WIKITEXT_FETCH}` on a machine with network, or pass "
            "--kld-dataset wiki.test.raw"
        ) from exc


def read_parquet_table(path: Path, columns_wanted: tuple[str, ...], required: str):
    require_pyarrow(path)
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:
        raise CorpusError(f"{path}: not a readable parquet file ({exc}); check the file") from exc
    if required not in schema.names:
        raise CorpusError(
            f"{path}: no {required!r} column (columns: {', '.join(schema.names) or 'none'}); "
            f"add a {required!r} column of strings"
        )
    cols = [c for c in columns_wanted if c in schema.names]
    try:
        table = pq.read_table(path, columns=cols)
    except Exception as exc:
        raise CorpusError(f"{path}: could not read parquet ({exc}); check the file") from exc
    return {c: table.column(c).to_pylist() for c in cols}


def wikitext_text(path: str | os.PathLike) -> str:
    """The text of a WikiText parquet (``text`` rows), as llama.cpp reads ``wiki.test.raw``.

    The Hugging Face conversion made one row per line of the original file and turned each
    blank line (in the raw file a single space and a newline) into an empty row; every other row
    keeps its newline. We undo that (empty row → ``" \\n"``) and concatenate, which rebuilds
    ``wiki.test.raw``; then drop one trailing newline, as llama.cpp's ``-f`` does.
    (Plain ``"".join(rows)`` would drop the blank lines between paragraphs and headings.)
    """
    path = Path(path)
    rows = read_parquet_table(path, ("text",), "text")["text"]
    text = "".join(" \n" if not r else r for r in rows if r is not None)
    return text[:-1] if text.endswith("\n") else text
