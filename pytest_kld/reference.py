"""The sparse reference cache: build it once per (reference, corpus, settings), store it
atomically, validate everything on load, never trust a stale or half-written one.

Layout, below the cache directory (every name derived from a hash, so no model id or corpus name
can steer a path outside it)::

    ref-<hash of the reference's weights>/
        <mode>-<key>/            one entry per corpus + settings (several modes per reference)
            manifest.json        format, settings, identities, shapes, checksums
            arrays.safetensors   token ids, chunk bounds, scored ranges, top-K ids/log-probs,
                                 tail log-mass, the reference's log-prob of each next token
        <mode>-<key>.lock        the file lock that serialises builders and readers

An entry appears only by renaming a complete temporary directory into place, so a build killed
at any point leaves at most a ``.tmp-*`` directory, which no reader opens and the next process to
take the lock removes. A read-only cache directory still serves its complete entries.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CacheError, KldError
from .fingerprint import sha256_file, sha256_json, tokens_sha256

FORMAT_VERSION = 2  # 2: log-softmax and top-K in numpy (float32), not MLX
ARRAYS = "arrays.safetensors"
MANIFEST = "manifest.json"
REBUILD_HINT = "rerun with --kld-rebuild (or delete the directory) to rebuild it"
LOCK_TIMEOUT = 600.0  # seconds without a sign of life from a lock's holder before giving up
# Every array of an entry: (dimensions, allowed dtypes).
ARRAY_SPECS = {
    "tokens": (1, ("int32",)),
    "chunk_offsets": (1, ("int64",)),
    "score_ranges": (2, ("int32",)),
    "chunk_category": (1, ("int32",)),
    "topk_ids": (2, ("uint16", "uint32")),
    "topk_logprobs": (2, ("float32",)),
    "tail": (1, ("float32",)),
    "target": (1, ("float32",)),
}
# Manifest fields that readers rely on, with their JSON types.
MANIFEST_FIELDS = {
    "key_material": dict,
    "reference": dict,
    "settings": dict,
    "categories": list,
    "vocab_size": int,
    "tokenizer_size": int,
    "tokenizer_probe": list,
    "shapes": dict,
    "arrays_bytes": int,
    "arrays_sha256": str,
}
@dataclass(frozen=True)
class Settings:
    """What the reference pass is run with (each part of the cache key)."""

    top_k: int = 256
    chunk_tokens: int | None = 512  # forward-pass piece size; None or 0: the whole chunk at once
    exec: str = "auto"  # auto | native | float32; resolved before it enters the key

    def __post_init__(self):
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise KldError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.chunk_tokens is not None and (
            not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 0
        ):
            raise KldError(f"chunk_tokens must be a non-negative integer, got {self.chunk_tokens!r}")


def default_cache_dir() -> Path:
    """``$PYTEST_KLD_CACHE_DIR``, else the user cache directory (XDG or ~/Library/Caches)."""
    env = os.environ.get("PYTEST_KLD_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "pytest-kld"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pytest-kld"


# --------------------------------------------------------------------------------------------
# The loaded cache


@dataclass
class ReferenceCache:
    path: Path
    manifest: dict
    tokens: np.ndarray  # int32, every chunk's ids back to back
    chunk_offsets: np.ndarray  # int64 [C + 1]
    score_ranges: np.ndarray  # int32 [C, 2]: scored output positions [start, end) per chunk
    chunk_category: np.ndarray  # int32 [C] index into manifest["categories"]
    topk_ids: np.ndarray  # uint16/uint32 [N, K]
    topk_logprobs: np.ndarray  # float32 [N, K]
    tail: np.ndarray  # float32 [N] log of the mass outside the top K
    target: np.ndarray  # float32 [N] log p_ref(next token)
    row_offsets: np.ndarray = field(init=False)  # int64 [C + 1] rows of each chunk

    def __post_init__(self):
        n = (self.score_ranges[:, 1] - self.score_ranges[:, 0]).astype(np.int64)
        self.row_offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)

    @property
    def categories(self) -> list[str]:
        return list(self.manifest["categories"])

    @property
    def n_chunks(self) -> int:
        return int(self.score_ranges.shape[0])

    @property
    def n_positions(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def settings(self) -> Settings:
        s = self.manifest["settings"]
        return Settings(top_k=s["top_k"], chunk_tokens=s["chunk_tokens"], exec=s["exec"])

    def chunk(self, i: int) -> np.ndarray:
        return self.tokens[self.chunk_offsets[i] : self.chunk_offsets[i + 1]]

    def rows(self, i: int, lo: int = 0, hi: int | None = None):
        """The reference's sparse record of chunk ``i``'s scored positions (rows ``lo:hi`` of them)."""
        from .divergence import SparseRows

        n = int(self.row_offsets[i + 1] - self.row_offsets[i])
        hi = n if hi is None else hi
        a, b = self.row_offsets[i] + lo, self.row_offsets[i] + hi
        s = int(self.score_ranges[i][0])
        return SparseRows(
            ids=self.topk_ids[a:b].astype(np.int64),
            logprobs=self.topk_logprobs[a:b],
            tail=self.tail[a:b],
            target=self.target[a:b],
            target_ids=self.chunk(i)[s + lo + 1 : s + hi + 1].astype(np.int64),
        )

    def position_of(self, row: int) -> dict:
        """Where scored row ``row`` sits: chunk, position in it, the token there and the next one."""
        c = int(np.searchsorted(self.row_offsets, row, side="right") - 1)
        pos = int(self.score_ranges[c, 0] + (row - self.row_offsets[c]))
        toks = self.chunk(c)
        return {"chunk": c, "position": pos, "token": int(toks[pos]), "next_token": int(toks[pos + 1])}

    @classmethod
    def load(cls, path: str | Path, *, expect_key: str | None = None) -> ReferenceCache:
        """Load and fully validate the cache entry at ``path``; any doubt is a CacheError."""
        path = Path(path)
        mpath = path / MANIFEST
        apath = path / ARRAYS

        def bad(what: str) -> CacheError:
            return CacheError(f"reference cache {path} is not usable: {what}; {REBUILD_HINT}")

        if not mpath.is_file() or not apath.is_file():
            raise bad(f"missing {MANIFEST if not mpath.is_file() else ARRAYS}")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"{MANIFEST} does not parse ({e})") from None
        if not isinstance(manifest, dict):
            raise bad(f"{MANIFEST} is not an object")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise bad(
                f"format version {manifest.get('format_version')!r}, this pytest-kld reads {FORMAT_VERSION}"
            )
        body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
        if manifest.get("manifest_sha256") != sha256_json(body):
            raise bad(f"{MANIFEST} was edited (its checksum does not match)")
        for name, typ in MANIFEST_FIELDS.items():
            if not isinstance(manifest.get(name), typ):
                raise bad(f"{MANIFEST} has no valid {name!r}")
        for part, keys in (("settings", ("top_k", "chunk_tokens", "exec")), ("reference", ("name", "fingerprint"))):
            missing = [k for k in keys if k not in manifest[part]]
            if missing:
                raise bad(f"{MANIFEST} {part} lacks {', '.join(missing)}")
        key = manifest.get("key")
        if key != sha256_json(manifest.get("key_material")):
            raise bad("its key does not match its settings")
        if expect_key is not None and key != expect_key:
            raise bad("it was built for other settings")
        if apath.stat().st_size != manifest.get("arrays_bytes"):
            raise bad(f"{ARRAYS} has {apath.stat().st_size} bytes, expected {manifest.get('arrays_bytes')} (truncated?)")
        if sha256_file(apath) != manifest.get("arrays_sha256"):
            raise bad(f"{ARRAYS} is corrupt (checksum mismatch)")
        try:
            from safetensors.numpy import load_file

            arrays = load_file(str(apath))
        except Exception as e:  # safetensors raises its own error types
            raise bad(f"{ARRAYS} does not load ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        try:
            for name, shape in manifest["shapes"].items():
                if name not in arrays or list(arrays[name].shape) != list(shape):
                    got = None if name not in arrays else list(arrays[name].shape)
                    raise bad(f"array {name!r} has shape {got}, expected {shape}")
            _check_arrays(manifest, arrays, bad)
            _check_commitments(manifest, arrays, bad)
            _check_values(arrays, bad)
        except CacheError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            # A manifest re-signed by hand can hold anything: still one line, never a traceback.
            raise bad(f"{MANIFEST} does not describe {ARRAYS} ({type(e).__name__}: {e})") from None
        return cls(path=path, manifest=manifest, **{name: arrays[name] for name in ARRAY_SPECS})


def _check_arrays(manifest: dict, arrays: dict, bad) -> None:
    """Shapes, dtypes and cross-consistency of an entry's arrays; also catches a file that is
    internally consistent (checksums re-signed) but not what the readers expect."""
    for name, (ndim, dtypes) in ARRAY_SPECS.items():
        a = arrays.get(name)
        if a is None:
            raise bad(f"{ARRAYS} has no array {name!r}")
        if a.ndim != ndim:
            raise bad(f"array {name!r} has shape {list(a.shape)}, expected {ndim} dimension(s)")
        if a.dtype.name not in dtypes:
            raise bad(f"array {name!r} has dtype {a.dtype}, expected {' or '.join(dtypes)}")
    tokens, offsets, ranges = arrays["tokens"], arrays["chunk_offsets"], arrays["score_ranges"]
    ids, n = arrays["topk_ids"], arrays["topk_ids"].shape[0]
    c = ranges.shape[0]

    def same_shape(names, shape):
        for name in names:
            if arrays[name].shape != shape:
                raise bad(f"array {name!r} has shape {list(arrays[name].shape)}, expected {list(shape)}")

    same_shape(["score_ranges"], (c, 2))
    same_shape(["chunk_offsets"], (c + 1,))
    same_shape(["chunk_category"], (c,))
    if offsets[0] != 0 or np.any(np.diff(offsets) < 2):
        raise bad("chunk offsets are not increasing (every chunk needs at least 2 tokens)")
    if offsets[-1] != tokens.shape[0]:
        raise bad("chunk offsets do not cover the token ids")
    s, e = ranges[:, 0], ranges[:, 1]
    if np.any(s < 0) or np.any(e < s) or np.any(e > np.diff(offsets) - 1):
        raise bad("scored ranges fall outside their chunks")
    if int((e - s).astype(np.int64).sum()) != n:
        raise bad("the number of scored positions does not match the top-K arrays")
    same_shape(["topk_logprobs"], ids.shape)
    same_shape(["tail", "target"], (n,))
    if ids.shape[1] != manifest["settings"]["top_k"]:
        raise bad(f"the top-K arrays are {ids.shape[1]} wide but its settings say top_k={manifest['settings']['top_k']}")
    vocab = manifest["vocab_size"]
    if n and int(ids.max()) >= vocab:
        raise bad(f"top-K ids reach {int(ids.max())}, outside the vocabulary of {vocab}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise bad(f"token ids outside the vocabulary of {vocab}")
    cats = arrays["chunk_category"]
    if c and (int(cats.min()) < 0 or int(cats.max()) >= len(manifest["categories"])):
        raise bad("chunk categories out of range")


# Value checks: what every reference distribution satisfies. Log-probs are float32 from a
# float32 log-softmax, so a most-likely token's log-prob can round to a hair above 0.
LOGPROB_SLACK = 1e-3  # nats


def _check_commitments(manifest: dict, arrays: dict, bad) -> None:
    """Every value the manifest commits to is the arrays' own: corpus checksum and counts."""
    corpus = manifest.get("corpus")
    if not isinstance(corpus, dict):
        raise bad(f"{MANIFEST} has no valid 'corpus'")
    offsets, ranges = arrays["chunk_offsets"], arrays["score_ranges"]
    chunks = [arrays["tokens"][offsets[i] : offsets[i + 1]] for i in range(len(ranges))]
    facts = {
        "chunks": len(chunks),
        "tokens": int(arrays["tokens"].shape[0]),
        "scored": int(arrays["topk_ids"].shape[0]),
        "token_sha256": tokens_sha256(chunks, [tuple(int(v) for v in r) for r in ranges]),
    }
    for name, value in facts.items():
        if corpus.get(name) != value:
            raise bad(f"its corpus {name} is {corpus.get(name)!r} in {MANIFEST} but {value!r} in {ARRAYS}")
    if manifest.get("positions", facts["scored"]) != facts["scored"]:
        raise bad(f"{MANIFEST} says {manifest.get('positions')} positions, {ARRAYS} holds {facts['scored']}")


def _check_values(arrays: dict, bad) -> None:
    """Ranges of the reference's record: finite log-probs <= 0, sorted most probable first, a
    tail that is -inf or <= 0, and top-K plus tail summing to probability 1."""
    lp, tail, target = arrays["topk_logprobs"], arrays["tail"], arrays["target"]
    if lp.size == 0:
        return
    if not (np.all(np.isfinite(lp)) and np.all(np.isfinite(target))):
        raise bad("its log-probs hold NaN or inf")
    if float(lp.max()) > LOGPROB_SLACK or float(target.max()) > LOGPROB_SLACK:
        raise bad("its log-probs are above 0 (probabilities above 1)")
    if lp.shape[1] > 1 and float(np.diff(lp, axis=1).max()) > LOGPROB_SLACK:
        raise bad("its top-K log-probs are not sorted, most probable first")
    if np.any(np.isnan(tail)) or np.any(np.isposinf(tail)) or float(np.nanmax(tail)) > LOGPROB_SLACK:
        raise bad("its tail masses are NaN, infinite or above 1")
    from .divergence import logsumexp

    total = np.logaddexp(logsumexp(lp), tail)
    worst = float(np.abs(total).max())
    if worst > LOGPROB_SLACK:
        raise bad(f"its probabilities do not sum to 1 at some position (log of the sum {worst:.3g})")


# --------------------------------------------------------------------------------------------
# Building


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
    settings: Settings = Settings(),
    *,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    full_hash: bool = False,
) -> ReferencePlan:
    """Resolve the reference and compute its cache key, without importing mlx.

    ``full_hash`` keys the cache on a hash of the weights' full contents ("sha256-full:"), not
    the sampled one ("sha256-sample:": headers, sizes and 1,024 spread blocks per file), which
    can miss an edit of a few bytes between sampled blocks. Neither depends on paths or times.
    The two kinds are different cache entries.
    """
    import dataclasses

    from .fingerprint import tokenizer_fingerprint, weights_fingerprint
    from .forward import resolve_exec
    from .hub import resolve_model
    from .models import output_width

    path = resolve_model(reference, revision=revision)
    fp = weights_fingerprint(path, full=full_hash)
    tfp = tokenizer_fingerprint(path)
    exec_used = resolve_exec(settings.exec)
    width = output_width(path)
    if width and settings.top_k > width:  # K beyond the vocabulary keeps it all: one entry for all such K
        settings = dataclasses.replace(settings, top_k=width)
    material = _key_material(fp, tfp, corpus.key_dict(), settings, exec_used)
    key = sha256_json(material)
    entry = entry_path(Path(cache_dir) if cache_dir else default_cache_dir(), fp, corpus.mode, key)
    return ReferencePlan(str(reference), path, fp, tfp, corpus, settings, exec_used, material, key, entry, revision)


def ensure_reference(
    reference: str | os.PathLike,
    corpus,
    settings: Settings = Settings(),
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
) -> ReferenceCache:
    """Load the cache entry for this reference, corpus and settings, building it if needed.

    Serialised by a file lock, so concurrent processes build it once and all read the same bytes.
    ``rebuild`` forces a new build; ``rebuild_before`` (a UNIX time) rebuilds only an entry made
    before it, so several workers of one session asked to rebuild do it once.
    A corrupt entry raises CacheError unless a rebuild was asked for. ``full_hash``: see
    :func:`plan_reference`. A process waiting for another's build says whose lock it waits for
    (through ``notify``, default stderr) and gives up after ``lock_timeout`` seconds in which
    the holder showed no sign of life (see :mod:`pytest_kld.locking`). A cache directory that
    other users can write is refused unless ``allow_shared_cache``.
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
            _build(plan, progress=progress, trust_remote_code=trust_remote_code)
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
        _remove(stale)
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


def _build(plan: ReferencePlan, *, progress=None, trust_remote_code: bool = False) -> None:
    """Run the reference pass (:mod:`pytest_kld.refpass`) and write the entry atomically (the
    caller holds the lock)."""
    from .refpass import reference_pass

    _check_writable(plan.entry)  # before the (long) pass, not after it
    arrays, facts = reference_pass(
        plan.path, plan.corpus, top_k=plan.settings.top_k, chunk_tokens=plan.settings.chunk_tokens,
        exec_mode=plan.exec, progress=progress, trust_remote_code=trust_remote_code, name=plan.reference,
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
    _write_entry(plan.entry, arrays, manifest)


def _write_entry(entry: Path, arrays: dict, manifest: dict) -> None:
    from safetensors.numpy import save

    tmp = _tmp_name(entry)
    try:
        tmp.mkdir()
        apath = tmp / ARRAYS
        data = save(arrays)  # bytes written by Python: a full disk is an OSError with its errno
        with open(apath, "wb") as f:
            f.write(data)
        del data
        _fsync(apath)
        manifest = dict(manifest, arrays_bytes=apath.stat().st_size, arrays_sha256=sha256_file(apath))
        manifest["manifest_sha256"] = sha256_json(manifest)
        mpath = tmp / MANIFEST
        with open(mpath, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if entry.exists():
            old = entry.parent / f".tmp-{entry.name}-old-{uuid.uuid4().hex[:8]}"
            os.rename(entry, old)
            os.rename(tmp, entry)
            _remove(old)
        else:
            os.rename(tmp, entry)
        _fsync_dir(entry.parent)
    except OSError as e:
        _remove(tmp)
        raise _write_error(entry.parent, e) from None
    except BaseException:
        _remove(tmp)
        raise


def _tmp_name(entry: Path) -> Path:
    return entry.parent / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _check_writable(entry: Path) -> None:
    """Fail now, in one line, if the entry's directory does not take new files."""
    probe = _tmp_name(entry)
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise _write_error(entry.parent, e) from None


def _write_error(where: Path, e: OSError) -> CacheError:
    full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    todo = "free some space" if full else "make it writable"
    return CacheError(
        f"cannot write the reference cache in {where}: {e.strerror or e}; "
        f"{todo} or choose another directory with --kld-cache-dir"
    )


def _remove(path: Path) -> None:
    """Remove a file or a directory tree; whatever cannot be removed stays (never trusted)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:
        pass
