"""The hub and local models: resolve a local path or a hub id to a directory of files.

One hub-environment policy for the whole package. huggingface_hub computes its cache directory
(``constants.HF_HUB_CACHE``) and its offline flag (``constants.HF_HUB_OFFLINE``) once, when it is
first imported. pytest often imports it (through mlx_lm or another plugin) before a test or
``monkeypatch`` sets the environment, so :func:`resolve_model` and the WikiText download read the
environment themselves at call time and pass ``cache_dir=`` and ``local_files_only=``
explicitly. The cache directory follows huggingface_hub's own precedence: ``HF_HUB_CACHE``,
then the legacy ``HUGGINGFACE_HUB_CACHE``, then ``$HF_HOME/hub``, then
``$XDG_CACHE_HOME/huggingface/hub``, then ``~/.cache/huggingface/hub``; offline is
``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelError

# Files a model needs to be loaded by mlx_lm and tokenised: weights, configs, tokenizer.
HUB_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]

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
    import huggingface_hub

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
    except Exception as e:
        error = _hub_error(e, repo_id, revision, cache, local_files_only, offline_env)
        if error is None:
            raise
        raise error from None
    path = Path(snapshot)
    if not (path / "config.json").is_file():
        raise ModelError(
            f"hub repo {at} has no config.json at {path}: it is not a model repo mlx_lm can load"
        )
    return path


def _hub_error(e: Exception, repo_id: str, revision, cache, local_files_only: bool, offline_env: bool):
    """The one-line ModelError for a failed snapshot_download, or None for an error that is not
    the hub's (re-raised as it is)."""
    from huggingface_hub.utils import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id}@{revision}" if revision else repo_id
    fetch = _how_to_fetch(repo_id, revision)
    if isinstance(e, HFValidationError):
        return ModelError(f"{repo_id!r} is neither an existing directory nor a valid hub id ({_first_line(e)}); "
                          "check the spelling")
    if isinstance(e, LocalEntryNotFoundError):  # also IncompleteSnapshotError: cache partial, hub not asked
        if local_files_only:
            why = "HF_HUB_OFFLINE is set" if offline_env else "local_files_only=True"
            unset = "; or unset HF_HUB_OFFLINE" if offline_env else ""
            return ModelError(f"model {at} is not in the hub cache {cache} and {why}: {fetch}{unset}")
        return ModelError(f"model {at} could not be downloaded and is not in the hub cache {cache} "
                          f"({_first_line(e)}): {fetch}")
    if isinstance(e, GatedRepoError):
        return ModelError(f"model {at} is gated: accept its licence on the hub and log in (`hf auth login` "
                          "or HF_TOKEN), then retry")
    if isinstance(e, RepositoryNotFoundError):
        return ModelError(f"model {at} not found on the hub (or private: log in with `hf auth login` or set "
                          "HF_TOKEN); check the id, or give a local model directory")
    if isinstance(e, RevisionNotFoundError):
        return ModelError(f"revision {revision!r} not found in hub model {repo_id}: check the branch, tag or commit")
    # HfHubHTTPError and network failures are OSErrors; httpx transport errors are not
    if isinstance(e, (OSError, ValueError)) or type(e).__module__.split(".")[0] in ("httpx", "httpx2", "huggingface_hub"):
        return ModelError(f"model {at} could not be fetched ({type(e).__name__}: {_first_line(e)}): {fetch}")
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def resolve_cache_repo(repo_id: str, *, revision: str | None = None) -> Path:
    """The local snapshot of a hub dataset repository holding exported reference caches
    (``manifest.json`` + ``arrays.safetensors`` per entry), from the hub cache first; offline
    (``HF_HUB_OFFLINE``) it must be there. Every failure is one line."""
    import huggingface_hub

    offline = hub_offline()
    cache = hub_cache_dir()
    try:
        return Path(huggingface_hub.snapshot_download(
            repo_id, repo_type="dataset", revision=revision, cache_dir=str(cache),
            allow_patterns=["*manifest.json", "*arrays.safetensors"], local_files_only=offline,
        ))
    except Exception as e:
        error = _hub_error(e, repo_id, revision, cache, offline, offline)
        if error is None:
            raise
        raise ModelError(str(error).replace("model ", "reference cache repo ", 1)) from None
