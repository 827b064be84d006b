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

    @property
    def summary(self) -> dict:
        return self.doc.get("summary") or {}


def slot_path(directory, nodeid: str, slot: str) -> Path:
    """``<directory>/<test file without .py>/<test name>/<slot>.json``; every part made safe as a
    file name (no separators, no ``..``), long parts shortened with a hash."""
    file_part, _, test_part = str(nodeid).partition("::")
    dirs = [_safe(p) for p in file_part.removesuffix(".py").replace("\\", "/").split("/") if p not in ("", ".", "..")]
    tests = [_safe(p) for p in test_part.split("::") if p]
    return Path(directory).joinpath(*dirs, *tests, _safe(slot) + ".json")


def _safe(part: str) -> str:
    text = re.sub(r"[^A-Za-z0-9._\-\[\]=+,@]", "_", str(part)).strip(".") or "_"
    if len(text) > 100:
        text = text[:80] + "-" + hashlib.sha256(str(part).encode()).hexdigest()[:12]
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
    from . import options

    summary_keys += tuple(f.name for f in options.FIGURES if f.name not in summary_keys)  # a figure added there
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
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(document(result, nodeid, slot), indent=1, allow_nan=False) + "\n")
    except OSError as e:
        raise BaselineError(f"could not write the baseline {path}: {e.strerror or e}") from None
    return path


def load(path) -> Baseline:
    """Read and check a baseline file; one line naming the file for anything wrong with it."""
    import numpy as np

    path = Path(path)

    def bad(why: str) -> BaselineError:
        return BaselineError(f"baseline {path}: {why}; {UPDATE_HINT} to replace it")

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise bad(f"unreadable ({e})") from None
    if not isinstance(doc, dict) or doc.get("pytest_kld_baseline") != BASELINE_VERSION:
        raise bad(f"not a pytest-kld baseline of version {BASELINE_VERSION}")
    try:
        pos, counts = doc["positions"], [int(c) for c in doc["chunks"]["count"]]
        data = base64.b64decode(pos["data"], validate=True)
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"incomplete ({type(e).__name__}: {e})") from None
    if hashlib.sha256(data).hexdigest() != pos.get("sha256"):
        raise bad("its per-position data do not match their sha256 (edited or truncated)")
    kl = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if kl.size != sum(counts) or kl.size != (doc.get("cache") or {}).get("positions"):
        raise bad(f"{kl.size} positions, but its chunks count {sum(counts)}")
    if not np.all(np.isfinite(kl)) or np.any(kl < 0):
        raise bad("per-position KL values that are negative or not finite")
    return Baseline(path, doc, kl, np.repeat(np.arange(len(counts)), counts))


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
