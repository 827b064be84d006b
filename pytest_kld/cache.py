"""Opening or building a reference cache: its key, its entry's place, the lock, the build.

The key is a hash of everything the cache's content depends on — the reference's weights and
tokenizer (by content), the corpus, K, the forward-piece size and the exec mode — and nothing
else (no paths, no times), so an entry is reused wherever the same reference bytes live. The
entry itself (format, validation, atomic write) is :mod:`pytest_kld.reference`'s; the pass that
fills it is :mod:`pytest_kld.refpass`'s.

Layout, below the cache directory (every name derived from a hash)::

    ref-<hash of the reference's fingerprint>/
        <mode>-<key>/          one entry per corpus + settings (several modes per reference)
        <mode>-<key>.lock      the file lock that serialises builders
        <mode>-<key>.owner     who holds it, with a heartbeat (pytest_kld.locking)
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import reference as store
from .errors import CacheError
from .fingerprint import sha256_json
from .reference import FORMAT_VERSION, ReferenceCache, Settings, default_cache_dir

DEFAULT_SETTINGS = Settings()
LOCK_TIMEOUT = 600.0  # seconds without a sign of life from a lock's holder before giving up



def _key_material(ref_fp: str, tok_fp: str, corpus_key: dict, settings: Settings, exec_used: str) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "reference_fingerprint": ref_fp,
        "tokenizer_fingerprint": tok_fp,
        "corpus": corpus_key,
        "top_k": settings.top_k,
        "chunk_tokens": settings.chunk_tokens or 0,
        "exec": exec_used,
    }


def entry_path(cache_dir: Path, ref_fp: str, mode: str, key: str) -> Path:
    safe_mode = "".join(ch for ch in mode if ch.isalnum())[:16] or "corpus"
    return Path(cache_dir) / f"ref-{hashlib.sha256(ref_fp.encode()).hexdigest()[:16]}" / f"{safe_mode}-{key[:24]}"


@dataclass
class ReferencePlan:
    """Everything known about a reference cache entry before it is built or loaded."""

    reference: str
    path: Path  # the resolved model directory
    fingerprint: str
    tokenizer_fingerprint: str
    corpus: object  # CorpusSpec
    settings: Settings
    exec: str
    key_material: dict
    key: str
    entry: Path
    revision: str | None = None


def plan_reference(
    reference: str | os.PathLike,
    corpus,
    settings: Settings = DEFAULT_SETTINGS,
    *,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    full_hash: bool = False,
) -> ReferencePlan:
    """Resolve the reference and compute its cache key, without importing mlx.

    The reference is known by the exact content of its weights (``"sha256-full:"``,
    :func:`pytest_kld.fingerprint.weights_fingerprint`): hub blobs by their names, local files
    read once and remembered in the cache directory. ``full_hash`` reads every byte now, trusting
    neither (the same value).
    """
    import dataclasses

    from .fingerprint import tokenizer_fingerprint, weights_fingerprint
    from .forward import resolve_exec
    from .hub import resolve_model
    from .models import output_width

    path = resolve_model(reference, revision=revision)
    from .fingerprint import MEMO_FILE

    fp = weights_fingerprint(path, full=full_hash, memo=Path(cache_dir or default_cache_dir()) / MEMO_FILE)
    tfp = tokenizer_fingerprint(path)
    exec_used = resolve_exec(settings.exec)
    width = output_width(path)
    if width and settings.top_k > width:  # K beyond the vocabulary keeps it all: one entry for all such K
        settings = dataclasses.replace(settings, top_k=width)
    material = _key_material(fp, tfp, corpus.key_dict(), settings, exec_used)
    if getattr(corpus, "chat_template", False):  # prompts rendered through it: their token ids depend on it
        from .fingerprint import chat_template_fingerprint

        material["chat_template_sha256"] = chat_template_fingerprint(path)
    key = sha256_json(material)
    entry = entry_path(Path(cache_dir) if cache_dir else default_cache_dir(), fp, corpus.mode, key)
    return ReferencePlan(str(reference), path, fp, tfp, corpus, settings, exec_used, material, key, entry, revision)


def ensure_reference(
    reference: str | os.PathLike,
    corpus,
    settings: Settings = DEFAULT_SETTINGS,
    *,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    rebuild: bool = False,
    rebuild_before: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    trust_remote_code: bool = False,
    on_build: Callable[[ReferencePlan], None] | None = None,
    full_hash: bool = False,
    lock_timeout: float = LOCK_TIMEOUT,
    allow_shared_cache: bool = False,
    notify: Callable[[str], None] | None = None,
    vocab_backend: str = "auto",
    launch=None,
) -> ReferenceCache:
    """Load the cache entry for this reference, corpus and settings, building it if needed.
    ``vocab_backend`` (auto, numpy, mlx) is where a build does its vocabulary-wide work
    (:mod:`pytest_kld.vocab`); the choice is recorded in the entry, not in its key.

    Serialised by a file lock, so concurrent processes build it once and all read the same bytes.
    ``rebuild`` forces a new build; ``rebuild_before`` (a UNIX time) rebuilds only an entry made
    before it, so several workers of one session asked to rebuild do it once.
    A corrupt entry raises CacheError unless a rebuild was asked for. ``full_hash``: see
    :func:`plan_reference`. A process waiting for another's build says whose lock it waits for
    (through ``notify``, default stderr) and gives up after ``lock_timeout`` seconds in which
    the holder showed no sign of life (see :mod:`pytest_kld.locking`). A cache directory that
    other users can write is refused unless ``allow_shared_cache``. ``launch`` (a
    :class:`pytest_kld.distributed.Launch`) builds over MLX's distributed engine, the reference
    sharded over its ranks: the same key, lock, format and entry.
    """
    from .locking import OwnedLock

    plan = plan_reference(
        reference, corpus, settings, cache_dir=cache_dir, revision=revision, full_hash=full_hash
    )
    entry = plan.entry
    created = not entry.parent.exists()
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        check_private(entry.parent, allow_shared_cache)
        lock = OwnedLock(entry, timeout=lock_timeout, notify=notify)
        lock.acquire()
    except OSError as e:
        if (
            e.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
            and entry.is_dir()
            and not rebuild
            and rebuild_before is None
        ):
            # A read-only cache (a shared or CI mount): nobody builds there, so a complete
            # entry is read without the lock; entries only ever appear whole, by rename.
            return ReferenceCache.load(entry, expect_key=plan.key)
        raise CacheError(
            f"cannot use the reference cache directory {entry.parent}: {e.strerror or e}; "
            "make it writable or choose another with --kld-cache-dir"
        ) from None
    try:
        cache = _load_current(plan, rebuild, rebuild_before)
        if cache is not None:
            return cache
        if on_build is not None:
            on_build(plan)
        try:
            _build(plan, progress=progress, trust_remote_code=trust_remote_code, vocab_backend=vocab_backend,
                   launch=launch)
        except BaseException:
            if created:  # a failed first build leaves no empty directory behind
                lock.discard()
            raise
        return ReferenceCache.load(entry, expect_key=plan.key)
    finally:
        lock.release()


def _load_current(plan: ReferencePlan, rebuild: bool, rebuild_before: float | None):
    """The entry if it is there, valid and recent enough; None when it must be built (the
    caller holds the lock). Debris of killed builds is removed first."""
    entry = plan.entry
    for stale in entry.parent.glob(f".tmp-{entry.name}-*"):  # never read, removed here
        store._remove(stale)
    if not entry.exists() or rebuild:
        return None
    try:
        cache = ReferenceCache.load(entry, expect_key=plan.key)
    except CacheError:
        if rebuild_before is None:
            raise
        return None
    if rebuild_before is not None and cache.manifest.get("created_at", 0) < rebuild_before:
        return None
    return cache


def check_private(directory: Path, allow_shared: bool = False) -> None:
    """Refuse a cache directory (and the cache root above it) that users other than this one
    (or root) could write: anyone who can write there can plant an entry that a later run
    trusts. ``allow_shared`` accepts it (a runner cache shared on purpose)."""
    if allow_shared or not hasattr(os, "getuid"):
        return
    me = os.getuid()
    for d in (Path(directory), Path(directory).parent):
        st = d.stat()
        if st.st_uid not in (me, 0):
            why = f"is owned by another user (uid {st.st_uid})"
        elif st.st_mode & 0o022 and not st.st_mode & 0o1000:
            why = f"is writable by other users (mode {st.st_mode & 0o7777:04o})"
        else:
            continue
        raise CacheError(
            f"reference cache directory {d} {why}: anyone who can write there can plant a cache entry; "
            "use a private directory (--kld-cache-dir) or pass --kld-allow-shared-cache if you trust them"
        )


def _build(plan: ReferencePlan, *, progress=None, trust_remote_code: bool = False, vocab_backend: str = "auto",
           launch=None) -> None:
    """Run the reference pass (:mod:`pytest_kld.refpass`, or over ranks:
    :mod:`pytest_kld.distributed`) and write the entry atomically (the caller holds the lock).
    A distributed build's entry is validated before it is renamed into place."""
    from .refpass import reference_pass

    store._check_writable(plan.entry)  # before the (long) pass, not after it
    check = None
    if launch is not None:
        from .distributed import sharded_pass

        arrays, facts = sharded_pass(plan, launch, progress=progress, trust_remote_code=trust_remote_code)

        def check(tmp):
            ReferenceCache.load(tmp, expect_key=plan.key)
    else:
        arrays, facts = reference_pass(
            plan.path, plan.corpus, top_k=plan.settings.top_k, chunk_tokens=plan.settings.chunk_tokens,
            exec_mode=plan.exec, progress=progress, trust_remote_code=trust_remote_code, name=plan.reference,
            vocab_backend=vocab_backend,
        )
    manifest = {
        "format_version": FORMAT_VERSION,
        "key": plan.key,
        "key_material": plan.key_material,
        "created_at": time.time(),
        "reference": {
            "name": plan.reference,
            "path": str(plan.path),
            "revision": plan.revision,
            "fingerprint": plan.fingerprint,
            "tokenizer_fingerprint": plan.tokenizer_fingerprint,
        },
        **facts,
        "shapes": {name: list(a.shape) for name, a in arrays.items()},
    }
    store._write_entry(plan.entry, arrays, manifest, check=check)




def settings_conflict(cache: ReferenceCache, s: dict) -> str | None:
    """Why settings the user chose (a mode or K other than the defaults) disagree with a cache
    made elsewhere, which decides them (one phrase), or None."""
    from .options import BY_DEST

    have = {"mode": (cache.manifest.get("corpus") or {}).get("mode"), "top_k": cache.manifest["settings"]["top_k"]}
    for dest, value in have.items():
        asked = s.get(dest)
        if asked is not None and asked != BY_DEST[dest].default and asked != value:
            if dest == "top_k" and value == cache.manifest.get("vocab_size") and int(asked) >= value:
                continue  # K beyond the vocabulary keeps all of it: the same entry
            return f"--kld-{dest.replace('_', '-')}={asked} but the cache {cache.path} was built with {value}"
    return None
