"""Models: resolve a local path or hub id, fingerprint weights and tokenizer, describe a quant.

Everything here reads files only (config.json, safetensors headers, tokenizer files). Nothing
imports mlx or mlx_lm, so describing a 55 GB model costs a few kilobytes of reads.

Hub cache location
------------------
huggingface_hub computes its cache directory (``constants.HF_HUB_CACHE``) and its offline flag
(``constants.HF_HUB_OFFLINE``) once, when it is first imported. pytest often imports it (through
mlx_lm or another plugin) before a test or ``monkeypatch`` sets the environment, so
:func:`resolve_model` reads the environment itself at call time and passes ``cache_dir=`` and
``local_files_only=`` explicitly. The cache directory follows huggingface_hub's own precedence:
``HF_HUB_CACHE``, then the legacy ``HUGGINGFACE_HUB_CACHE``, then ``$HF_HOME/hub``, then
``$XDG_CACHE_HOME/huggingface/hub``, then ``~/.cache/huggingface/hub``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from .errors import ModelError

# Files a model needs to be loaded by mlx_lm and tokenised: weights, configs, tokenizer.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]

_TRUE = {"1", "on", "yes", "true"}


# ---------------------------------------------------------------------------------------------
# resolution
# ---------------------------------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """The huggingface_hub cache directory, from the environment as it is now (see module doc)."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        d = env["HF_HUB_CACHE"]
    elif env.get("HUGGINGFACE_HUB_CACHE"):
        d = env["HUGGINGFACE_HUB_CACHE"]
    else:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
            "huggingface",
        )
        d = os.path.join(os.path.expandvars(os.path.expanduser(home)), "hub")
    return Path(os.path.expandvars(os.path.expanduser(d)))


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def _looks_like_path(name: str) -> bool:
    """A string the user meant as a filesystem path rather than a hub id ``org/name``."""
    if name.startswith((".", "/", "~")) or "\\" in name or os.path.isabs(name):
        return True
    parts = name.split("/")
    if len(parts) > 2:  # org/name/sub is never a hub id
        return True
    if len(parts) == 2 and parts[0] and Path(parts[0]).is_dir():
        return True  # "models/foo" where ./models exists: a path with a missing tail
    return False


def resolve_model(
    name: str | os.PathLike,
    *,
    revision: str | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """Return the local directory of a model given as a directory or a hub repo id.

    A local directory must hold ``config.json``. A string that looks like a path but does not
    exist is an error (never sent to the hub). Anything else is a hub repo id, fetched (or found
    in the cache) with ``huggingface_hub.snapshot_download`` restricted to weights, configs and
    tokenizer files. ``local_files_only`` defaults to True when ``HF_HUB_OFFLINE`` is set.
    Every failure is a one-line :class:`ModelError`.
    """
    text = os.fspath(name)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    if not text.strip():
        raise ModelError("empty model name: give a local model directory or a hub id org/name")
    local = Path(os.path.expanduser(text))
    if local.exists():
        if not local.is_dir():
            raise ModelError(
                f"{text} is not a model directory (a file): give the directory holding config.json"
            )
        if not (local / "config.json").is_file():
            raise ModelError(
                f"{text} is not a model directory (no config.json): point at the directory "
                "that holds config.json and the *.safetensors weights"
            )
        return local.resolve()
    if isinstance(name, os.PathLike) or _looks_like_path(text):
        raise ModelError(
            f"model path not found: {text} (resolved to {local.absolute()}); check the path, "
            "or give a hub id as org/name"
        )
    return _resolve_hub(text, revision=revision, local_files_only=local_files_only)


def _how_to_fetch(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (
        f"fetch it on a machine with network with `hf download {repo_id}{rev}` "
        f"(or `huggingface-cli download {repo_id}{rev}`) into {hub_cache_dir()}"
    )


def _resolve_hub(repo_id: str, *, revision: str | None, local_files_only: bool | None) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub.utils import (
            GatedRepoError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ModelError(
            f"cannot resolve hub id {repo_id}: huggingface_hub is not importable ({e}); "
            "pip install huggingface_hub, or give a local model directory"
        ) from None

    offline_env = hub_offline()
    if local_files_only is None:
        local_files_only = offline_env
    at = f"{repo_id}@{revision}" if revision else repo_id
    cache = hub_cache_dir()
    try:
        snapshot = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=str(cache),
            allow_patterns=HUB_ALLOW_PATTERNS,
            local_files_only=local_files_only,
        )
    except HFValidationError as e:
        raise ModelError(
            f"{repo_id!r} is neither an existing directory nor a valid hub id ({_first_line(e)}); "
            "check the spelling"
        ) from None
    except LocalEntryNotFoundError as e:
        # Also IncompleteSnapshotError (a subclass): cache partial and the hub not consulted.
        if local_files_only:
            why = "HF_HUB_OFFLINE is set" if offline_env else "local_files_only=True"
            unset = "; or unset HF_HUB_OFFLINE" if offline_env else ""
            raise ModelError(
                f"model {at} is not in the hub cache {cache} and {why}: "
                f"{_how_to_fetch(repo_id, revision)}{unset}"
            ) from None
        raise ModelError(
            f"model {at} could not be downloaded and is not in the hub cache {cache} "
            f"({_first_line(e)}): {_how_to_fetch(repo_id, revision)}"
        ) from None
    except GatedRepoError:
        raise ModelError(
            f"model {at} is gated: accept its licence on the hub and log in (`hf auth login` "
            "or HF_TOKEN), then retry"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"model {at} not found on the hub (or private: log in with `hf auth login` or set "
            "HF_TOKEN); check the id, or give a local model directory"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(
            f"revision {revision!r} not found in hub model {repo_id}: check the branch, tag or "
            "commit"
        ) from None
    except (OSError, ValueError) as e:  # HfHubHTTPError is an OSError; network failures too
        raise ModelError(
            f"model {at} could not be fetched ({type(e).__name__}: {_first_line(e)}): "
            f"{_how_to_fetch(repo_id, revision)}"
        ) from None
    except Exception as e:  # httpx2 transport errors (not OSError) on a broken network
        if type(e).__module__.split(".")[0] not in ("httpx", "httpx2", "huggingface_hub"):
            raise
        raise ModelError(
            f"model {at} could not be fetched ({type(e).__name__}: {_first_line(e)}): "
            f"{_how_to_fetch(repo_id, revision)}"
        ) from None
    path = Path(snapshot)
    if not (path / "config.json").is_file():
        raise ModelError(
            f"hub repo {at} has no config.json at {path}: it is not a model repo mlx_lm can load"
        )
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# safetensors headers
# ---------------------------------------------------------------------------------------------


def weight_files(path: Path) -> list[Path]:
    """The ``*.safetensors`` files of a model directory, sorted by name; error if there are none."""
    path = Path(path)
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if not files:
        raise ModelError(
            f"no *.safetensors weights in {path}: mlx_lm needs safetensors weights "
            "(convert the model with mlx_lm.convert)"
        )
    return files


def _read_header_bytes(file: Path) -> bytes:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{file} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise ModelError(
                f"{file} is not a valid safetensors file (header length {n} exceeds the file); "
                "re-download or re-convert it"
            )
        data = f.read(n)
    return data


def read_safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file: ``{name: {dtype, shape, data_offsets}, ...}``.

    Reads the 8-byte little-endian header length and the header; no tensor data. The
    ``__metadata__`` entry, if present, is kept.
    """
    file = Path(file)
    data = _read_header_bytes(file)
    try:
        header = json.loads(data)
    except ValueError:
        raise ModelError(
            f"{file} has a corrupt safetensors header (not JSON); re-download or re-convert it"
        ) from None
    if not isinstance(header, dict):
        raise ModelError(f"{file} has a corrupt safetensors header (not a JSON object)")
    return header


# ---------------------------------------------------------------------------------------------
# fingerprints
# ---------------------------------------------------------------------------------------------


def weights_fingerprint(path: Path, *, full: bool = False) -> str:
    """A fingerprint of a model's weights and config.

    ``full=False`` (returns ``"sha256-fast:<hex>"``): SHA-256 over the sorted ``*.safetensors``
    file names, their sizes, their JSON headers (names, dtypes, shapes, offsets; no tensor data),
    the newest weight file's ``mtime_ns``, and ``config.json``'s bytes. Cheap on any size of model;
    it changes when a file is rewritten (mtime), so a copy made without preserving times differs.

    ``full=True`` (returns ``"sha256-full:<hex>"``): SHA-256 over the sorted file names, sizes
    and full contents (streamed) and ``config.json``; no times, so equal for identical copies.
    """
    path = Path(path)
    files = weight_files(path)
    h = hashlib.sha256()
    h.update(b"pytest-kld weights v1 full\n" if full else b"pytest-kld weights v1 fast\n")
    newest = 0
    for f in files:
        st = f.stat()  # follows hub-cache symlinks to the blob
        newest = max(newest, st.st_mtime_ns)
        h.update(f"{f.name}\0{st.st_size}\0".encode())
        if full:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
        else:
            header = _read_header_bytes(f)
            h.update(struct.pack("<Q", len(header)))
            h.update(header)
    if not full:
        h.update(f"mtime_ns\0{newest}\0".encode())
    config = path / "config.json"
    if config.is_file():
        h.update(b"config.json\0")
        h.update(config.read_bytes())
    return ("sha256-full:" if full else "sha256-fast:") + h.hexdigest()


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
        blob = json.dumps({"vocab": pairs, "added": added}, ensure_ascii=False, separators=(",", ":"))
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
