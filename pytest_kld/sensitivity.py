"""Where a quant's damage comes from: for each group of tensors (:mod:`pytest_kld.groups`), the
KL(reference ‖ quant) saved by putting that group back at more bits, everything else as the quant
has it, measured on a sample of the cached positions and paired with the unmodified quant.

How it is measured:

- The quant is loaded once, in ``float32`` exec (every quantised matrix dequantised exactly,
  :mod:`pytest_kld.forward`). A group is "put back" by reading its matrices from the reference's
  safetensors (one tensor at a time, ``safe_open``), re-quantising them at ``w`` bits (affine, the
  quant's group size; ``w = 0``: the reference's own weights) and dequantising them exactly, so
  the model computes what a quant built with mlx-lm at those widths computes; the weights are
  swapped in place (``load_weights(pairs, strict=False)``) and swapped back after the pass. One
  model in memory, plus one group of the reference's weights.
- A group of layer ``L`` leaves layers ``0..L-1`` as they were: its pass starts at layer ``L``
  from their outputs recorded in the quant's own pass (:mod:`pytest_kld.replay`; bit for bit the
  same KL, checked once per model, else every pass runs the whole model).
- The positions: whole chunks drawn round-robin over the corpus categories (seeded), until
  ``budget`` scored positions are reached. Every pass runs the same chunks.
- The saving of a group is ``mean KL(quant) − mean KL(quant with the group put back)`` over those
  positions; its 95% interval is the paired cluster bootstrap of :func:`pytest_kld.intervals.paired`
  (chunks resampled). A group with nothing below the width (already stored at ``w`` bits or more,
  or in float) saves exactly 0 by construction and is not run.

Results are stored beside the reference cache entry (``<entry>.sensitivity/<key>.json``, written
atomically), keyed by the cache, the quant's weights fingerprint and the settings: a rerun is
instant, and a recipe's extra widths add to the same file.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from .errors import KldError
from .explain import table, what
from .groups import FLOAT, Group, added_bpw, affine_group, elevated, finer, layout, step, width_key
from .options import SENSITIVITY_BITS, SENSITIVITY_BUDGET

FORMAT = 1
DIRECTION = "KL(reference || quant)"


def sample_chunks(cache, budget: int, seed: int = 0) -> list[int]:
    """Chunk indices, drawn round-robin over categories in a seeded order, until their scored
    positions reach ``budget`` (all chunks when the corpus has fewer)."""
    rng = np.random.default_rng(seed)
    cats = np.asarray(cache.chunk_category)
    queues = {int(c): [int(i) for i in rng.permutation(np.flatnonzero(cats == c))] for c in np.unique(cats)}
    rows = np.diff(cache.row_offsets)
    chosen, n = [], 0
    while n < budget and any(queues.values()):
        for c in sorted(queues):
            if queues[c] and n < budget:
                i = queues[c].pop(0)
                chosen.append(i)
                n += int(rows[i])
    return sorted(chosen)


class Bench:
    """A quant loaded once (float32 exec) and the KL of the sampled positions, with or without
    one group of the reference's weights put back."""

    def __init__(self, cache, reference: Path, quant: Path, name: str, chunk_ids: list[int], *,
                 trust_remote_code: bool = False):
        from .compare import check_tokenizer
        from .forward import load_model

        self.cache, self.reference, self.chunk_ids, self.name = cache, Path(reference), list(chunk_ids), name
        self.replay, self.starts, self.costs = None, {}, None
        self.lm = load_model(quant, "float32", trust_remote_code=trust_remote_code)
        try:
            check_tokenizer(cache, self.lm.tokenizer, name)
        except Exception:
            self.lm.release()
            raise
        self.modules = dict(self.lm.model.named_modules())
        self.files = _tensor_files(self.reference)
        self.ends = [int(cache.score_ranges[i][1]) for i in self.chunk_ids]
        self.tokens = sum(self.ends)

    def plan(self, groups: dict[str, Group]) -> None:
        """Set up the replay of the layers before each of ``groups`` (:mod:`pytest_kld.replay`):
        ``self.starts`` maps a group to the layer its pass starts at (absent: the whole model)."""
        from . import replay
        from .forward import scored_logits

        scored_logits(self.lm.model)  # its probe runs now, not through the layers being recorded
        layers, self.starts = replay.plan(self.lm.model, {g: [m.path for m in grp.modules] for g, grp in groups.items()})
        if layers is not None and self.starts and replay.enabled():
            self.replay = replay.Replay(layers, self.starts.values(), self.tokens)
            per = [replay.weights(layer) for layer in layers]
            self.costs = (per, max(0, replay.weights(self.lm.model) - sum(per)))

    def share(self, i: int, start: int | None) -> float:
        """The share of the whole model that chunk ``i``'s pass from layer ``start`` runs, by
        weight elements (1 when it runs every layer)."""
        r, ct, e = self.replay, self.cache.settings.chunk_tokens, self.ends[self.chunk_ids.index(i)]
        if r is None or not r.on or not start or (i not in r.states if r.recorded else bool(ct) and e > ct):
            return 1.0
        per, rest = self.costs
        return (sum(per[start:]) + rest) / max(1, sum(per) + rest)

    def work(self, start: int | None = None) -> int:
        """Whole-model tokens a pass from layer ``start`` is worth. The progress counts these, so
        its rate and ETA hold while replayed passes run a part of the model."""
        return round(sum(e * self.share(i, start) for i, e in zip(self.chunk_ids, self.ends)))

    def base(self, progress=None, notify=None) -> np.ndarray:
        """The quant's own KL, recording the layers' inputs; then the replay's safety net: at
        the deepest layer, nothing swapped, the same KL bit for bit, or no replay."""
        kl = self.kl(progress)
        r = self.replay
        if r is not None:
            r.recorded = True
            if r.states and not np.array_equal(kl, self.kl(start=r.deepest)):
                r.off("replaying the layers before a group does not reproduce the quant's own pass bit for bit")
            if r.why and notify:
                notify(f"pytest-kld: sensitivity of {self.name}: every group runs the whole model ({r.why})")
        return kl

    def kl(self, progress=None, start: int | None = None) -> np.ndarray:
        """float64 KL(reference ‖ model) at the sampled positions, chunk by chunk; ``start``: the
        layers before it replayed from the base pass where recorded."""
        from .forward import iter_chunk_logprobs
        from .vocab import position_stats

        c, ct, r = self.cache, self.cache.settings.chunk_tokens, self.replay
        vocab = int(c.manifest["vocab_size"])
        ranges = [tuple(int(v) for v in c.score_ranges[i]) for i in self.chunk_ids]
        out, done, total = [], 0.0, self.work(start)
        if progress is not None:
            progress(0, total)
        for i, (s, e) in zip(self.chunk_ids, ranges):
            with r.around(i, start, single=not ct or e <= ct, tokens=e) if r is not None else nullcontext():
                for row, lg in iter_chunk_logprobs(self.lm.model, c.chunk(i)[:e], s, e, chunk_tokens=ct, vocab=vocab,
                                                   raw=True):
                    out.append(position_stats(c.rows(i, row, row + int(lg.shape[0])), lg, "numpy").kl)
                    del lg
            done += e * self.share(i, start)
            if progress is not None:
                progress(round(done), total)
        return np.concatenate(out) if out else np.zeros(0)

    def cluster(self) -> np.ndarray:
        rows = np.diff(self.cache.row_offsets)
        return np.concatenate([np.full(int(rows[i]), i, dtype=np.int32) for i in self.chunk_ids])

    def swap(self, group: Group, width) -> list:
        """Put ``group`` back at ``width`` (bits, or ``"<bits>g<size>"``: :func:`pytest_kld.groups.step`);
        returns what undoes it (:meth:`restore`)."""
        import mlx.core as mx

        pairs, old = [], []
        for m in group.modules:
            if not elevated(m, width):
                continue
            w = self._reference_weight(m.path + ".weight")
            if width != FLOAT:
                gs, b = affine_group(m, width), step(width)[0]
                wq, scales, biases = mx.quantize(w, gs, b)
                w = mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), gs, b,
                                  dtype=mx.float32)
            pairs.append((m.path + ".weight", w.astype(mx.float32)))
            old.append((m.path + ".weight", self.modules[m.path].weight))
        self.lm.model.load_weights(pairs, strict=False)
        mx.eval([w for _, w in pairs])
        return old

    def restore(self, old: list) -> None:
        self.lm.model.load_weights(old, strict=False)

    def _reference_weight(self, name: str):
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="mlx") as f:
            return f.get_tensor(name)

    def release(self) -> None:
        self.lm.release()


def _tensor_files(path: Path) -> dict[str, Path]:
    from .models import read_safetensors_header, weight_files

    return {k: f for f in weight_files(path) for k in read_safetensors_header(f) if k != "__metadata__"}


def store_path(cache, key: str) -> Path:
    """Where the results of one (quant, settings) live: beside the cache entry."""
    return Path(cache.path).parent / f"{Path(cache.path).name}.sensitivity" / f"{key[:32]}.json"


def settings_key(cache, quant: Path, bits: int, budget: int, seed: int) -> tuple[str, dict]:
    from .fingerprint import sha256_json, weights_fingerprint

    material = {"format": FORMAT, "cache_key": cache.manifest.get("key"), "quant": weights_fingerprint(quant),
                "bits": int(bits), "budget": int(budget), "seed": int(seed), "exec": "float32",
                "chunk_tokens": cache.settings.chunk_tokens}
    return sha256_json(material), material


def _load_stored(path: Path, key: str) -> dict | None:
    """The stored document of ``key``, or None (absent, unreadable, another key: measured anew)."""
    from .files import read_json

    try:
        doc = read_json(path)
    except (OSError, ValueError, KldError):
        return None
    return doc if isinstance(doc, dict) and doc.get("key") == key and doc.get("format") == FORMAT else None


def _save(path: Path, doc: dict, notify) -> None:
    from .files import write_text
    from .run import strict

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(strict(doc), indent=1, allow_nan=False))
    except OSError as e:  # a read-only cache: the results are still printed, just not kept
        if notify:
            notify(f"pytest-kld: sensitivity results not stored ({path.parent}: {e.strerror or e})")


def measure(cache, reference, quant, *, name: str | None = None, bits: int = SENSITIVITY_BITS, budget: int = SENSITIVITY_BUDGET, seed: int = 0,
            fine_roles: int | None = None, extra: list[tuple[str, int]] = (), group_sizes=(), progress=None,
            notify=None, trust_remote_code: bool = False) -> dict:
    """The sensitivity document of ``quant``: every group's saving at ``bits`` (0: the reference's
    own dtype), plus the ``extra`` (group name, width) pairs; read from the store when there.
    ``group_sizes`` (e.g. ``(32,)``): each group also at its lowest width with each of those group
    sizes smaller than its own (``"4g32"``: :func:`pytest_kld.groups.finer`), a step a recipe may take.

    ``fine_roles=k``: coarse to fine. First each role across all layers as one group (and the
    embedding and head), then the layers of the ``k`` roles that save most per added bit; the
    other roles' layers are not measured (a later run without it adds them to the same store)."""
    from .hub import resolve_model

    reference, quant = resolve_model(reference), resolve_model(quant)
    lay = layout(reference, quant)
    if not lay.quantized and bits != FLOAT:
        raise KldError(f"{quant}: no quantised tensors, so nothing is stored below --bits {bits}; give a quantised "
                       "model, or --bits 0 to put back the reference's own weights")
    key, material = settings_key(cache, quant, bits, budget, seed)
    where = store_path(cache, key)
    doc = _load_stored(where, key) or _new_doc(cache, reference, quant, name or quant.name, lay, key, material,
                                                 bits, budget, seed)
    groups = {g["name"]: Group.from_dict(g) for g in doc["groups"] + doc["coarse"]}
    first = [g["name"] for g in doc["coarse"] + doc["groups"] if g["layer"] is None]
    planned = {g["name"] for g in doc["groups"]}  # what a recipe chooses from (not the roles across all layers)
    stages = [first, None] if fine_roles is not None else [None]
    ran = False
    for stage in stages:
        names = stage if stage is not None else [g["name"] for g in doc["groups"]]
        if stage is None and fine_roles is not None:
            names = [g["name"] for g in doc["groups"] if g["layer"] is None or g["role"] in _top_roles(doc, fine_roles)]
        todo = [(g, bits) for g in names] + [(g, w) for g in names if g in planned for w in finer(groups[g], group_sizes)]
        todo += [(g, width_key(w)) for g, w in extra] if stage is None else []
        todo = [(g, w) for g, w in dict.fromkeys(todo) if str(w) not in doc["savings"].get(g, {})]
        if todo:
            _run(doc, cache, reference, quant, groups, todo, lay, progress, notify, trust_remote_code)
            _save(where, doc, notify)
            ran = True
    if not ran and notify:
        notify(f"pytest-kld: sensitivity of {doc['model']} reused ({where})")
    return doc


def _new_doc(cache, reference, quant, name, lay, key, material, bits, budget, seed) -> dict:
    from .quantinfo import model_info

    chunk_ids = sample_chunks(cache, budget, seed)
    coarse = {}
    for g in lay.groups:
        if g.layer is not None:
            coarse.setdefault(g.role, Group(f"{g.role} (all layers)", g.role, None)).modules.extend(g.modules)
    return {"format": FORMAT, "key": key, "key_material": material, "direction": DIRECTION, "model": name,
            "path": str(quant), "reference": str(reference), "bits": int(bits), "budget": int(budget),
            "seed": int(seed), "chunks": chunk_ids, "positions": int(sum(np.diff(cache.row_offsets)[chunk_ids])),
            "params": lay.params, "ref_dtype_bytes": lay.ref_dtype_bytes,
            "bits_per_weight": model_info(quant).bits_per_weight, "tied": lay.tied,
            "groups": [g.to_dict() for g in lay.groups], "coarse": [g.to_dict() for g in coarse.values()],
            "savings": {}, "seconds": 0.0}


def _top_roles(doc: dict, k: int) -> set[str]:
    """The ``k`` roles whose all-layers group saves most per added bit (a positive saving)."""
    rows = [r for r in ranking(doc, coarse=True) if r["coarse"] and r["diff"] > 0]
    rows.sort(key=lambda r: -(r["per_bit"] if not math.isnan(r["per_bit"]) else 0.0))
    return {r["role"] for r in rows[:k]}


def _run(doc, cache, reference, quant, groups, todo, lay, progress, notify, trust_remote_code) -> None:
    from .intervals import paired

    t0 = time.time()
    bench = Bench(cache, reference, quant, doc["model"], doc["chunks"], trust_remote_code=trust_remote_code)
    try:
        runs = [(g, w) for g, w in todo if any(elevated(m, w) for m in groups[g].modules)]
        bench.plan({g: groups[g] for g, _ in runs})
        done = [0, 0]  # whole-model tokens run, and to run (:meth:`Bench.work`)

        def tick(d, _t):
            if progress is not None and (d or not done[0]):
                progress(done[0] + d, done[1])

        done[1] = bench.work() + sum(bench.work(bench.starts.get(g)) for g, _ in runs)
        base = bench.base(tick, notify)
        done[0] = bench.work()
        done[1] = done[0] + sum(bench.work(bench.starts.get(g)) for g, _ in runs)  # recorded or not, now known
        cluster = bench.cluster()
        doc["base_mean"] = float(np.mean(base)) if base.size else math.nan
        for g, w in todo:
            entry = {"added_bpw": added_bpw(groups[g], w, lay), "diff": 0.0, "se": 0.0, "low": 0.0, "high": 0.0,
                     "measured": (g, w) in runs}
            if entry["measured"]:
                old = bench.swap(groups[g], w)
                try:
                    kl = bench.kl(tick, bench.starts.get(g))
                finally:
                    bench.restore(old)
                done[0] += bench.work(bench.starts.get(g))
                entry.update(paired(base, kl, cluster, quantiles={})["mean"])  # base − elevated: the saving
            doc["savings"].setdefault(g, {})[str(w)] = entry
    finally:
        bench.release()
    doc["seconds"] = float(doc.get("seconds", 0.0)) + time.time() - t0


def together(cache, reference, quant, doc: dict, chosen, *, progress=None, notify=None,
             trust_remote_code: bool = False) -> dict:
    """The saving of putting every ``(group, width)`` of ``chosen`` back at once, on the
    document's sample, paired with the unmodified quant (``{diff, se, low, high}``): what a
    recipe's summed single savings predict, measured in one pass. Kept in the document
    (``doc["together"]``, by the set chosen) and stored with it: a rerun is instant."""
    from .hub import resolve_model
    from .intervals import paired

    chosen = sorted(((str(g), width_key(w)) for g, w in chosen), key=str)
    key = ", ".join(f"{g}@{w}" for g, w in chosen)
    kept = doc.setdefault("together", {})
    if key in kept:
        return kept[key]
    groups = {g["name"]: Group.from_dict(g) for g in doc["groups"] + doc["coarse"]}
    t0 = time.time()
    bench = Bench(cache, resolve_model(reference), resolve_model(quant), doc["model"], doc["chunks"],
                  trust_remote_code=trust_remote_code)
    try:
        def tick(offset):
            return None if progress is None else lambda d, _t: (d or not offset) and progress(offset + d, 2 * bench.tokens)

        base, olds = bench.kl(tick(0)), []
        try:
            for g, w in chosen:
                olds.append(bench.swap(groups[g], w))
            kl = bench.kl(tick(bench.tokens))
        finally:
            for old in reversed(olds):
                bench.restore(old)
        kept[key] = paired(base, kl, bench.cluster(), quantiles={})["mean"]
    finally:
        bench.release()
    doc["seconds"] = float(doc.get("seconds", 0.0)) + time.time() - t0
    _save(store_path(cache, doc["key"]), doc, notify)
    return kept[key]


def ranking(doc: dict, width: int | None = None, *, coarse: bool = True) -> list[dict]:
    """Groups measured at ``width`` (default: the document's bits) by saving, largest first: name,
    role, layer, saving (diff, se, low, high), added bits/weight, saving per added bit, and
    whether the group is a role across all layers (``coarse``, included unless asked not to)."""
    w = str(doc["bits"] if width is None else width)
    rows = []
    for g in doc["groups"] + (doc.get("coarse", []) if coarse else []):
        s = doc["savings"].get(g["name"], {}).get(w)
        if s is None:
            continue
        per_bit = s["diff"] / s["added_bpw"] if s["added_bpw"] > 0 else math.nan
        rows.append({"group": g["name"], "role": g["role"], "layer": g["layer"], **s, "per_bit": per_bit,
                     "coarse": g in doc.get("coarse", [])})
    return sorted(rows, key=lambda r: -r["diff"])


def check_budget(doc: dict) -> None:
    """A KldError when the sample cannot rank: fewer than two chunks, or savings that are not
    exactly 0 yet none whose 95% interval excludes 0."""
    rows = ranking(doc)
    n, chunks = doc["positions"], len(doc["chunks"])
    if chunks < 2:
        raise KldError(f"--budget {doc['budget']}: {n} positions in {chunks} chunk, too few to rank (an interval "
                       "needs at least two chunks); raise --budget")
    measured = [r for r in rows if r["measured"]]
    if any(r["diff"] != 0 for r in measured) and not any(r["low"] > 0 or r["high"] < 0 for r in measured):
        widths = [(r["high"] - r["low"]) / 2 for r in measured]
        raise KldError(f"--budget {doc['budget']}: {n} positions in {chunks} chunks are too few to rank: the "
                       f"savings' 95% intervals are ±{min(widths):.4f} to ±{max(widths):.4f} nats wide, the largest "
                       f"saving {max(r['diff'] for r in measured):.4f}, and none excludes 0; raise --budget")


def lines(doc: dict, top: int | None = None) -> list[str]:
    """The ranking as a plain-text table (the terminal's and the assertion message's)."""
    return [f"sensitivity of {doc['model']}: mean {DIRECTION} saved by putting one group back ({what(doc['bits'])}); "
            f"{doc['positions']} positions in {len(doc['chunks'])} chunks, quant mean "
            f"{doc.get('base_mean', math.nan):.5f}"] + table(ranking(doc)[:top])


def public(doc: dict) -> dict:
    """The versioned ``sensitivity`` object of the results JSON (and of the command's --json)."""
    keys = ("direction", "model", "path", "reference", "bits", "budget", "seed", "positions", "chunks",
            "bits_per_weight", "base_mean")
    out = {"schema_version": 1, **{k: doc.get(k) for k in keys}, "ranking": ranking(doc)}
    if finer_widths(doc):
        out["finer"] = {w: ranking(doc, w, coarse=False) for w in finer_widths(doc)}
    return out


def finer_widths(doc: dict) -> list[str]:
    """The finer-group widths measured (``--group-sizes``: ``"4g32"``…), in order."""
    return sorted({w for s in doc["savings"].values() for w in s if "g" in w})


def explain(cache, quant, *, top: int, bits: int, budget: int, progress=None) -> tuple[str, dict | None]:
    """(lines for a failing assertion's message, the :func:`public` object): the top groups of
    ``quant``, or a line saying why they cannot be measured and None (never raises a KldError:
    the failure stands without it)."""
    reference = (cache.manifest.get("reference") or {}).get("path")
    try:
        if not reference or not Path(reference, "config.json").is_file():
            raise KldError(f"the reference's weights are not at {reference} (a cache made elsewhere)")
        doc = measure(cache, reference, quant, bits=bits, budget=budget, progress=progress)
    except KldError as e:
        return f"explain: no sensitivity ranking: {e}", None
    text = "\n".join(["explain: " + line for line in lines(doc, top)]
                     + [f"explain: all groups: pytest-kld sensitivity {reference} {quant} --budget {budget}"])
    return text, public(doc)
