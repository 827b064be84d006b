"""The one run path, used by the pytest plugin and the command line alike:

    settings ─► corpus spec ─► reference cache (opened or built) ─► comparison ─► row ─► reports

Settings are a plain dict keyed by :data:`pytest_kld.options.OPTIONS` dests (``top_k``,
``mode``...), already validated. Heavy modules (mlx, numpy) are imported inside the functions.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .errors import KldError
from .options import OPTIONS

RESULTS_SCHEMA_VERSION = 1


def defaults() -> dict:
    """Every setting at its default."""
    return {o.dest: o.default for o in OPTIONS}


def corpus_for(s: dict):
    from .corpus import corpus_spec

    return corpus_spec(
        s["mode"],
        dataset=s.get("dataset"),
        n_ctx=s.get("n_ctx"),
        n_chunks=s.get("n_chunks"),
        chat_template=not s.get("no_chat_template"),
        drift_tokens=s.get("drift_tokens") if s["mode"] == "drift" else None,
    )


def is_cache_dir(reference) -> bool:
    """A reference given as a cache entry directory (its manifest and arrays), not a model."""
    p = Path(os.fspath(reference)).expanduser()
    return (p / "manifest.json").is_file() and (p / "arrays.safetensors").is_file()


def open_reference(
    s: dict,
    *,
    progress: Callable[[int, int], None] | None = None,
    notify: Callable[[str], None] | None = None,
    rebuild_before: float | None = None,
):
    """The reference cache for settings ``s``: an entry directory as given, else the cache of
    the reference model, built if needed. Says when an existing cache is reused."""
    from .cache import ensure_reference
    from .distributed import launch_from_settings
    from .reference import ReferenceCache, Settings

    if s.get("reference_cache") or is_cache_dir(s["reference"]):
        from .cache import settings_conflict

        cache = ReferenceCache.load(travelling_cache(s.get("reference_cache") or s["reference"], s["mode"]))
        why = settings_conflict(cache, s)
        if why:
            raise KldError(f"{why}; drop the option or give a cache built with it")
        _say_reused(cache, notify)
        return cache
    built: list = []
    cache = ensure_reference(
        s["reference"],
        corpus_for(s),
        Settings(top_k=int(s["top_k"]), chunk_tokens=int(s["chunk_tokens"]), exec=s["exec"]),
        cache_dir=s.get("cache_dir"),
        revision=s.get("revision"),
        rebuild=bool(s.get("rebuild")) and rebuild_before is None,
        rebuild_before=rebuild_before,
        progress=progress,
        trust_remote_code=bool(s.get("trust_remote_code")),
        on_build=built.append,
        full_hash=bool(s.get("full_hash")),
        lock_timeout=float(s["lock_timeout"]),
        allow_shared_cache=bool(s.get("allow_shared_cache")),
        notify=notify,
        vocab_backend=s.get("vocab_backend") or "auto",
        launch=launch_from_settings(s),
    )
    if not built:
        _say_reused(cache, notify)
    return cache


def travelling_cache(where: str, mode: str) -> Path:
    """The entry directory of a cache made elsewhere: ``where`` is an entry, a directory of
    exported entries (one per mode), or a hub dataset repo (``REPO`` or ``REPO@REVISION``,
    through the hub cache). With several entries, the one of ``mode``."""
    local = Path(os.path.expanduser(str(where)))
    if not local.exists():
        from .hub import resolve_cache_repo

        repo, _, revision = str(where).partition("@")
        local = resolve_cache_repo(repo, revision=revision or None)
    if is_cache_dir(local):
        return local
    entries = sorted(p.parent for p in local.glob("*/manifest.json") if is_cache_dir(p.parent))
    modes = {p: _entry_mode(p) for p in entries}
    matching = [p for p in entries if modes[p] == mode]
    if len(matching) == 1:
        return matching[0]
    if not entries:
        raise KldError(f"{where}: no reference cache entry (manifest.json + arrays.safetensors) found there; "
                       "export one with `pytest-kld export`")
    have = ", ".join(f"{p.name} ({modes[p]})" for p in entries)
    raise KldError(f"{where}: {'no' if not matching else 'more than one'} entry for mode {mode!r} (has: {have}); "
                   "point --kld-reference-cache at one entry")


def _entry_mode(entry: Path) -> str | None:
    from .files import read_json

    try:
        return (read_json(entry / "manifest.json", 64 << 20).get("corpus") or {}).get("mode")
    except (OSError, KldError, AttributeError):
        return None


def _say_reused(cache, notify) -> None:
    if notify is None:
        return
    created = cache.manifest.get("created_at")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(created)) if created else "at an unknown time"
    notify(f"pytest-kld: reference cache reused: built {when}, {cache.n_positions} positions ({cache.path})")


def compare_model(cache, s: dict, model, *, name=None, exec=None, revision=None, progress=None):
    """Compare ``model`` with the cache under settings ``s`` (a KldResult)."""
    from .compare import compare
    from .distributed import launch_from_settings

    return compare(
        cache,
        model,
        exec=exec or (None if s["exec"] == "auto" else s["exec"]),
        chunk_tokens=int(s["chunk_tokens"]),
        name=name,
        revision=revision,
        trust_remote_code=bool(s.get("trust_remote_code")),
        full_hash=bool(s.get("full_hash")),
        progress=progress,
        launch=launch_from_settings(s) if s.get("shard_quants") else None,
    )


def row(result, outcome: str | None = None, thresholds: dict | None = None) -> dict:
    """The plain, JSON-able leaderboard row of a result."""
    from .report import result_row

    r = json.loads(json.dumps(result_row(result, outcome), default=_jsonable))
    ref, corpus = result.reference, result.settings.get("corpus") or {}
    r["blas"] = result.settings.get("blas")  # the BLAS this comparison ran on (pytest_kld/blas.py)
    r["cache"] = {  # which reference cache: a baseline or a merge refuses rows of another
        **(result.settings.get("cache") or {}),
        "reference_fingerprint": ref.get("fingerprint"),
        "tokenizer_fingerprint": ref.get("tokenizer_fingerprint"),
        "corpus_sha256": corpus.get("token_sha256"),
    }
    if result.kl is not None and result.chunk is not None:
        r["chunks"] = chunk_sums(result.kl, result.chunk)
    if thresholds:
        r["thresholds"] = thresholds
        r["margins"] = margins(r, thresholds)
    return r


def chunk_sums(kl, chunk) -> dict:
    """``{"sum": [...], "count": [...]}`` of the finite per-position KL by chunk: what a paired
    comparison of two rows' means needs (:func:`pytest_kld.regression.neighbours`)."""
    import numpy as np

    kl, chunk = np.asarray(kl, dtype=np.float64), np.asarray(chunk)
    ok = np.isfinite(kl)
    g = int(chunk.max()) + 1 if chunk.size else 0
    return {"sum": np.bincount(chunk[ok], weights=kl[ok], minlength=g).tolist(),
            "count": np.bincount(chunk[ok], minlength=g).tolist()}


def margins(r: dict, thresholds: dict) -> dict:
    """How far each figure is inside its threshold (negative: over it): allowed - observed for
    upper bounds, observed - allowed for top1 and positions for nonfinite."""
    from .options import THRESHOLDS

    bound = {t.name: t.bound for t in THRESHOLDS}
    out = {}
    for key, allowed in thresholds.items():
        got = r.get("nonfinite") if key == "nonfinite" else (r.get("summary") or {}).get(key)
        if isinstance(got, (int, float)) and math.isfinite(got):
            out[key] = got - allowed if bound.get(key) == "lower" else allowed - got
    return out


def unique_rows(rows: list[dict]) -> list[dict]:
    """One row per (model, reference, mode, K, exec); a failed outcome wins over a pass. Stable
    order whatever order the rows arrived in (xdist completes tests in any order)."""
    out: dict = {}
    for r in rows:
        key = (r.get("path"), r.get("reference"), r.get("mode"), r.get("top_k"), r.get("exec"))
        if key not in out or r.get("outcome") == "failed":
            out[key] = r
    return sorted(out.values(), key=lambda r: tuple(str(v) for v in (r.get("model"), r.get("path"), r.get("mode"),
                                                                       r.get("top_k"), r.get("exec"))))


def baselines_dir(given, root, update: bool) -> str | None:
    """The baselines directory a run uses, absolute, or None when baselines are off: ``given``
    (relative to ``root``), else ``<root>/kld_baselines`` when it exists or is to be written."""
    from .baselines import DEFAULT_DIR

    if given:
        return str((Path(root) / os.path.expanduser(str(given))).resolve())
    default = Path(root) / DEFAULT_DIR
    return str(default.resolve()) if update or default.is_dir() else None


def output_paths(s: dict, prefix: str = "--kld-") -> None:
    """Fail now, not after an hour of comparisons, when a report's directory does not exist."""
    from .files import check_target

    for name in ("json", "markdown", "chart"):
        why = check_target(s[name]) if s.get(name) else None
        if why:
            raise KldError(f"{prefix}{name} {s[name]}: {why}")


def write_reports(s: dict, rows: list[dict]) -> None:
    """The JSON results (always, when asked: CI that reads it finds the settings), and with rows
    the Markdown summary and the chart. GitHub's step summary collects; anything else is replaced."""
    if s.get("json"):
        write_json(s["json"], s, rows)
    if rows and (s.get("markdown") or s.get("chart")):
        from . import chart, markdown
        from .report import header_fields

        if s.get("markdown"):
            append = os.environ.get("GITHUB_STEP_SUMMARY") == s["markdown"]
            markdown.write_markdown(rows, s["markdown"], header_fields(rows), append=append)
        if s.get("chart"):
            chart.write_chart(rows, s["chart"])


def write_json(path: str, s: dict, rows: list[dict]) -> None:
    """The versioned results document, strict JSON (NaN and inf become null), written atomically."""
    from . import __version__
    from .files import write_text

    doc = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "tool": "pytest-kld",
        "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": _git_commit(),
        "direction": "KL(reference || quant)",
        "settings": dict(s),
        "versions": _versions(),
        "python": sys.version.split()[0],
        "platform": sys.platform,
        "results": rows,
    }
    text = json.dumps(strict(json.loads(json.dumps(doc, default=_jsonable))), indent=2, allow_nan=False)
    write_text(path, text)


def _git_commit() -> str | None:
    """The commit of the repository the run starts in (the quants' recipes), if it is one."""
    import subprocess

    try:
        p = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    out = p.stdout.strip()
    return out if p.returncode == 0 and len(out) == 40 else None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("pytest-kld", "mlx", "mlx-lm", "numpy", "pytest", "huggingface_hub"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    from .blas import prefer_system_blas

    out["blas"] = prefer_system_blas()  # the library chosen and why others were refused
    return out


def _jsonable(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def strict(x):
    """``x`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: strict(v) for k, v in x.items()}
    if isinstance(x, list):
        return [strict(v) for v in x]
    return x
