"""The sparse reference cache entry: its format, its validation on load, its atomic write.
(Which entry, and building it under a lock: :mod:`pytest_kld.cache`.)

An entry is a directory (every name derived from a hash, so no model id or corpus name can steer
a path outside the cache directory)::

    <mode>-<key>/
        manifest.json        format, settings, identities, shapes, checksums
        arrays.safetensors   token ids, chunk bounds, scored ranges, top-K ids/log-probs,
                             tail log-mass, the reference's log-prob of each next token

An entry appears only by renaming a complete temporary directory into place, so a build killed
at any point leaves at most a ``.tmp-*`` directory, which no reader opens and the next process to
take the lock removes. A read-only cache directory still serves its complete entries.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CacheError, KldError
from .fingerprint import sha256_file, sha256_json, tokens_sha256

FORMAT_VERSION = 2  # 2: log-softmax and top-K in numpy (float32), not MLX
ARRAYS = "arrays.safetensors"
MANIFEST = "manifest.json"
REBUILD_HINT = "rerun with --kld-rebuild (or delete the directory) to rebuild it"
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
        from .files import UnreadableFile, read_json

        try:
            manifest = read_json(mpath, MANIFEST_BYTES)
        except (OSError, UnreadableFile) as e:
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
        why = _foreign_fields(manifest)
        if why:
            raise bad(f"{MANIFEST} {why}")
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


MANIFEST_BYTES = 64 << 20
MAX_COUNT = 1 << 40  # any count or size in a manifest; a larger one is not a cache's
# Manifest fields that become a path, a number or a choice: (dotted name, allowed values or a
# (type, low, high) range). A cache from elsewhere is untrusted input: anything else is refused.
_FIELDS = (
    ("corpus.mode", ("short", "long", "file", "drift")),
    ("settings.exec", ("native", "float32")),
    ("settings.vocab_backend", ("numpy", "mlx", None)),
    ("settings.top_k", (int, 1, 1 << 20)),
    ("settings.chunk_tokens", (int, 0, 1 << 20)),
    ("corpus.drift_tokens", (int, 0, 4096)),
    ("vocab_size", (int, 1, 1 << 24)),
    ("tokenizer_size", (int, 1, 1 << 24)),
    ("arrays_bytes", (int, 0, MAX_COUNT)),
    ("positions", (int, 0, MAX_COUNT)),
    ("created_at", (float, 0, 1e11)),
    ("build_seconds", (float, 0, 1e9)),
)


def _foreign_fields(manifest: dict) -> str | None:
    """Why a manifest's fields cannot be a build's (one phrase), or None: a mode, exec or backend
    outside its choices, the corpus mode not the key's, a number of the wrong type or range, a
    token id that is not one, or text holding control characters (ANSI escapes for a terminal)."""
    for dotted, allowed in _FIELDS:
        value, present = manifest, True
        for part in dotted.split("."):
            present = isinstance(value, dict) and part in value
            value = value.get(part) if present else None
        if present and isinstance(allowed[0], type):
            kind, low, high = allowed
            number = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
            if not number or not low <= value <= high:
                return f"has {dotted} = {_shown(value)}, not {'a number' if kind is float else 'an integer'} in {low}..{high}"
        elif present and value not in allowed:
            return f"has {dotted} = {_shown(value)}, not one of {', '.join(str(a) for a in allowed if a)}"
    corpus, keyed = manifest.get("corpus"), manifest["key_material"].get("corpus")
    if not isinstance(corpus, dict) or not isinstance(keyed, dict) or corpus.get("mode") != keyed.get("mode"):
        return "has a corpus mode that is not its key's"
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < MAX_COUNT for t in manifest["tokenizer_probe"]):
        return "has a tokenizer_probe that is not a list of token ids"
    from .files import control_text
    bad_text = control_text(manifest)
    return f"holds control characters in {bad_text} (text for a terminal)" if bad_text else None


def _shown(value) -> str:
    text = "".join(c if c.isprintable() else "?" for c in repr(value))
    return text if len(text) <= 40 else text[:36] + "..."


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
# Writing an entry (the caller holds the lock: pytest_kld.cache)


def _write_entry(entry: Path, arrays: dict, manifest: dict, *, check=None) -> None:
    """Write the entry into a temporary directory beside it, then rename it into place.
    ``check(tmp)``, when given, validates the written directory before the rename (and raises
    to keep it out)."""
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
        if check is not None:
            check(tmp)
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
