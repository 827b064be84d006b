"""Baselines: a quant's result recorded beside the tests, to gate its next build against.

One JSON file per slot — a test and a model in it (``name=`` or the model's short name) — under
the baselines directory (``--kld-baselines``, default ``<rootdir>/kld_baselines``):

    kld_baselines/<test file without .py>/<test name>/<slot>.json

Small, diffable and safe to commit (plain JSON, nothing executable): the summary, the settings, the reference cache's
identity (its key and the key's material: reference weights, tokenizer, corpus, K, chunking,
exec), the quant's fingerprint, the per-chunk means, and, last, the per-position KL as base64 of
little-endian float32 (what the paired test of mean and P99 needs; 4 bytes a position). Written
with :func:`pytest_kld.files.write_text` (exclusive temporary, atomic replace).

A baseline of another reference cache is refused, never compared: :func:`foreign` names what
differs. The verdict against a baseline lives in :mod:`pytest_kld.regression`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import KldError

if TYPE_CHECKING:
    import numpy as np

BASELINE_VERSION = 1
DEFAULT_DIR = "kld_baselines"
UPDATE_HINT = "record it with --kld-update-baselines (command line: --update-baselines)"


class BaselineError(KldError):
    """A baseline that is missing, unreadable or of another reference cache."""


@dataclass
class Baseline:
    path: Path
    doc: dict
    kl: np.ndarray  # float32 [N] per-position KL(reference || quant) of the baseline quant
    cluster: np.ndarray  # int [N] chunk index of each position

    figures: dict | None = None  # mean, percentiles and max recomputed from ``kl``: what a check uses

    @property
    def summary(self) -> dict:
        """The recorded summary with every KL figure taken from the per-position data."""
        if self.figures is None:
            import numpy as np

            from .stats import summarize

            full = summarize(np.asarray(self.kl, dtype=np.float64))
            self.figures = {k: full[k] for k in CHECKED if k in full}
        return {**(self.doc.get("summary") or {}), **self.figures}


def slot_path(directory, nodeid: str, slot: str) -> Path:
    """``<directory>/<test file without .py>/<test name>/<slot>.json``; every part made safe as a
    file name (no separators, no ``..``), long parts shortened with a hash."""
    file_part, _, test_part = str(nodeid).partition("::")
    dirs = [_safe(p) for p in file_part.removesuffix(".py").replace("\\", "/").split("/") if p not in ("", ".", "..")]
    tests = [_safe(p) for p in test_part.split("::") if p]
    return Path(directory).joinpath(*dirs, *tests, _safe(slot) + ".json")


def _safe(part: str) -> str:
    """``part`` as a file name; one whose characters had to change (``a/b``, ``a:b``, ``a b``
    would all read ``a_b``) or that is long gets a hash of the original, so two names never meet
    in one file."""
    text = re.sub(r"[^A-Za-z0-9._\-\[\]=+,@]", "_", str(part)).strip(".") or "_"
    digest = hashlib.sha256(str(part).encode()).hexdigest()
    if len(text) > 100:
        text = text[:80] + "-" + digest[:12]
    elif text != str(part):
        text = f"{text}-{digest[:8]}"
    return text


def document(result, nodeid: str, slot: str) -> dict:
    """The baseline document of a comparison (a KldResult with its per-position arrays)."""
    import numpy as np

    from . import __version__

    kl = np.asarray(result.kl, dtype=np.float32)
    counts = np.bincount(np.asarray(result.chunk), minlength=int(result.chunk.max()) + 1 if kl.size else 0)
    sums = np.bincount(np.asarray(result.chunk), weights=np.asarray(result.kl, dtype=np.float64),
                       minlength=counts.size)
    info = result.info or {}
    cache = result.settings.get("cache") or {}
    summary_keys = ("mean", "se", "se_cluster", "ci95_low", "ci95_high", "median", "p90", "p95", "p99",
                    "p99_ci95_low", "p99_ci95_high", "p99_9", "max", "top1", "count", "nonfinite", "clusters")
    data = kl.astype("<f4").tobytes()
    return {
        "pytest_kld_baseline": BASELINE_VERSION,
        "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "direction": "KL(reference || quant)",
        "test": nodeid,
        "slot": slot,
        "model": {"name": result.model, "path": result.path, "fingerprint": result.fingerprint, "exec": result.exec,
                  "bits_per_weight": info.get("bits_per_weight"), "weight_bytes": info.get("weight_bytes")},
        "cache": {"key": cache.get("key"), "key_material": cache.get("key_material"),
                  "reference": result.reference.get("name"), "positions": int(kl.size)},
        "summary": {k: _finite(result.summary.get(k)) for k in summary_keys if k in result.summary},
        "chunks": {"count": [int(c) for c in counts],
                   "mean": [round(float(s / c), 6) if c else None for s, c in zip(sums, counts)]},
        "positions": {"dtype": "float32", "order": "little", "encoding": "base64",
                      "sha256": hashlib.sha256(data).hexdigest(), "data": base64.b64encode(data).decode("ascii")},
    }


def _finite(v):
    import numpy as np

    return float(v) if isinstance(v, (int, float, np.floating)) and np.isfinite(v) else (
        v if isinstance(v, int) else None)


def record(directory, result, nodeid: str, slot: str) -> Path:
    """Write the baseline of ``result`` for the slot (atomically); its path. A broken model
    (NaN/inf positions) is never recorded."""
    from .files import write_text

    if int(result.summary.get("nonfinite") or 0):
        raise BaselineError(f"{result.model} has NaN or inf log-probs at {result.summary['nonfinite']} positions: "
                            "a broken model is not recorded as a baseline")
    path = slot_path(directory, nodeid, slot)
    try:
        make_dirs(Path(directory), path.parent)
        write_text(path, json.dumps(document(result, nodeid, slot), indent=1, allow_nan=False) + "\n")
    except OSError as e:
        raise BaselineError(f"could not write the baseline {path}: {e.strerror or e}") from None
    return path


MAX_BYTES = 256 << 20  # a baseline file is read up to this size (about 50 million positions)
CHECKED = ("mean", "median", "p90", "p95", "p99", "p99_9", "max")  # recomputed from the positions


def make_dirs(root: Path, directory: Path) -> None:
    """``mkdir -p`` of ``directory`` below ``root`` that follows no symbolic link: a link planted
    at any level (another user's, in a shared baselines folder) is an error, not a way into the
    directory it points to; a sub-folder is created for this user only to write (0755)."""
    import os

    from .files import write_text

    root.mkdir(parents=True, exist_ok=True)
    if not (root / ".gitignore").exists():  # a killed write's temporary is never committed
        write_text(root / ".gitignore", "# pytest-kld: temporaries of an interrupted write\n.*.tmp\n")
    here = root
    for part in directory.relative_to(root).parts:
        here = here / part
        try:
            os.mkdir(here, 0o755)
        except FileExistsError:
            pass
        if here.is_symlink() or not here.is_dir():
            raise OSError(f"{here} is a symbolic link or not a directory; remove it")


def load(path, nodeid: str | None = None) -> Baseline:
    """Read and check a baseline file (a regular file, at most :data:`MAX_BYTES`, JSON within
    limits); one line naming the file for anything wrong with it. Every KL figure a check uses is
    recomputed from the checksummed per-position data, and a recorded summary that disagrees is
    refused. ``nodeid``: the test it must have been recorded for."""
    import numpy as np

    from .files import UnreadableFile, read_json
    from .stats import summarize

    path = Path(path)

    def bad(why: str) -> BaselineError:
        return BaselineError(f"baseline {path}: {why}; {UPDATE_HINT} to replace it")

    try:
        doc = read_json(path, MAX_BYTES)
    except FileNotFoundError:
        raise
    except UnreadableFile as e:
        raise bad(f"unreadable ({e})") from None
    if not isinstance(doc, dict) or doc.get("pytest_kld_baseline") != BASELINE_VERSION:
        raise bad(f"not a pytest-kld baseline of version {BASELINE_VERSION}")
    if nodeid is not None and doc.get("test") != nodeid:
        raise bad(f"recorded for the test {_short(doc.get('test'))}, not {nodeid}")
    try:
        pos, counts = doc["positions"], [int(c) for c in doc["chunks"]["count"]]
        data = base64.b64decode(pos["data"], validate=True)
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"incomplete ({type(e).__name__}: {e})") from None
    if hashlib.sha256(data).hexdigest() != pos.get("sha256"):
        raise bad("its per-position data do not match their sha256 (edited or truncated)")
    if len(data) % 4 or any(c < 0 for c in counts):
        raise bad(f"{len(data)} bytes of per-position data, not whole float32 values")
    kl = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if kl.size != sum(counts) or kl.size != (doc.get("cache") or {}).get("positions"):
        raise bad(f"{kl.size} positions, but its chunks count {sum(counts)}")
    if not np.all(np.isfinite(kl)) or np.any(kl < 0):
        raise bad("per-position KL values that are negative or not finite")
    full = summarize(kl.astype(np.float64))
    figures = {k: full[k] for k in CHECKED if k in full}
    why = _disagreement(doc.get("summary"), figures, kl.size)
    if why:
        raise bad(f"its summary disagrees with its per-position data ({why})")
    return Baseline(path, doc, kl, np.repeat(np.arange(len(counts)), counts), figures)


def _disagreement(summary, figures: dict, count: int) -> str | None:
    """Why a recorded summary does not describe the recorded positions, or None. The summary was
    computed from float64 values that were stored as float32: equal to about 1e-7 relative."""
    if not isinstance(summary, dict):
        return "no summary"
    if summary.get("count", count) != count:
        return f"count {_short(summary.get('count'))}, {count} positions"
    for name, value in figures.items():
        said = summary.get(name)
        if said is None:
            continue
        if not isinstance(said, (int, float)) or isinstance(said, bool) or not math.isclose(
                said, value, rel_tol=1e-5, abs_tol=1e-9):
            return f"{name} {_short(said)}, recomputed {value:.6g}"
    return None


# What a cache key is made of, in words: a difference names the first of these that differs.
_MATERIAL_WORDS = (
    ("reference_fingerprint", "reference weights"),
    ("tokenizer_fingerprint", "tokenizer"),
    ("corpus.sha256", "corpus text"),
    ("corpus.mode", "corpus mode"),
    ("corpus.n_ctx", "n_ctx"),
    ("corpus.n_chunks", "number of chunks"),
    ("corpus.chat_template", "chat template"),
    ("top_k", "top_k"),
    ("chunk_tokens", "chunk_tokens"),
    ("exec", "reference exec"),
)


def foreign(baseline: Baseline, result) -> str | None:
    """Why the baseline was not recorded against the result's reference cache (one phrase
    naming what differs, with both values), or None when it was."""
    now = result.settings.get("cache") or {}
    then = baseline.doc.get("cache") or {}
    if then.get("key") and then.get("key") == now.get("key"):
        return None
    a, b = then.get("key_material") or {}, now.get("key_material") or {}
    for dotted, words in _MATERIAL_WORDS:
        old, new = _get(a, dotted), _get(b, dotted)
        if old != new:
            return f"{words} differs (baseline {_short(old)}, now {_short(new)})"
    for key in sorted(set(_flat(a)) | set(_flat(b))):
        if _flat(a).get(key) != _flat(b).get(key):
            return f"cache setting {key} differs (baseline {_short(_flat(a).get(key))}, now {_short(_flat(b).get(key))})"
    return f"reference cache key differs (baseline {_short(then.get('key'))}, now {_short(now.get('key'))})"


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v) -> str:
    text = str(v)
    return text if len(text) <= 28 else text[:24] + "…"
