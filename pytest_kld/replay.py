"""Replaying the layers before a swapped group (:mod:`pytest_kld.sensitivity`).

Putting back the group of layer ``L`` changes nothing in layers ``0..L-1``: in that group's pass
they compute exactly what they computed in the quant's own (base) pass. So the base pass records
the input hidden state of the layers that passes will start at, chunk by chunk, and a group's
pass puts stand-ins in the model's list of layers for ``0..L-1``: layers ``0..L-2`` hand their
input through, layer ``L-1`` hands out the recorded input of layer ``L``. Only layers ``L..`` and
the output head run (the embedding too, which is cheap). Groups of no layer (the embedding, the
head, a role across all layers) and groups of layer 0 run the whole model.

Exact, not approximately so:

- The stand-ins take the real layers' places in the list the model's own loop reads, found by
  walking a group's module paths (``model.layers.12.mlp.down_proj``,
  ``language_model.model.layers.0.linear_attn.…``: the first python list on the way), and
  forward attribute reads to the real layer (a loop may read ``layer.is_linear``). The real
  layers are put back after every chunk, so weights are only ever swapped in the real model.
- A stand-in does not update its layer's cache, and mlx-lm builds the masks from some layers'
  caches before any layer runs. For a chunk run as one forward call the caches are empty then,
  in the base pass and in a replay alike. A chunk longer than ``chunk_tokens`` takes several
  calls, whose later masks would come from caches the stand-ins left empty: such a chunk is not
  recorded and runs every layer, in every pass (the default ``n_ctx`` and ``chunk_tokens`` are
  both 512, so every chunk is one call).
- A model whose loop does not call each recorded layer exactly once per call (another list, a
  layer run twice) records nothing usable: every pass runs the whole model.
- The safety net, once per model after the base pass: a replay at the deepest layer, nothing
  swapped, must give the base pass's KL bit for bit; if not, every pass runs the whole model.
- Memory: the first chunk recorded gives the bytes per token (layers kept × hidden × 4 bytes in
  float32 exec); when the whole sample would take more than ``MAX_BYTES`` (2 GiB), nothing is
  kept and every pass runs the whole model.

``PYTEST_KLD_REPLAY=0`` turns it off (every pass the whole model: for comparisons).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

MAX_BYTES = 2 << 30


def enabled() -> bool:
    """Whether passes may replay (``PYTEST_KLD_REPLAY=0``: no)."""
    return os.environ.get("PYTEST_KLD_REPLAY", "").strip() != "0"


def weights(module) -> int:
    """The elements of ``module``'s matrices, a quantised one counted unpacked: roughly what a
    token costs in it (a mixture of experts counted whole). Only the progress uses it."""
    n = 0
    for _, m in module.named_modules():
        w = m.get("weight")
        if w is not None and w.ndim >= 2:
            n += int(w.size) * (32 // int(m.bits) if "scales" in m and getattr(m, "bits", 0) else 1)
    return n


def find_layer(model, path: str) -> tuple[list, int] | None:
    """(the python list that the module ``path`` goes through, the index it takes there), or None
    when the path meets no list (the embedding, the head) or does not resolve."""
    obj = model
    for part in path.split("."):
        if isinstance(obj, list):
            return (obj, int(part)) if part.isdigit() and int(part) < len(obj) else None
        obj = obj[part] if isinstance(obj, dict) and part in obj else getattr(obj, part, None)
        if obj is None:
            return None
    return None


def plan(model, groups: dict[str, list[str]]) -> tuple[list | None, dict[str, int]]:
    """The list of layers most groups lie in, and the layer each group of it starts at (its
    first; only groups past layer 0 whose module paths all lie in that one list)."""
    lists: dict[int, tuple[list, dict[str, int]]] = {}
    for name, paths in groups.items():
        hits = [find_layer(model, p) for p in paths]
        if not hits or None in hits or any(h[0] is not hits[0][0] for h in hits):
            continue
        start = min(h[1] for h in hits)
        if start > 0:
            lists.setdefault(id(hits[0][0]), (hits[0][0], {}))[1][name] = start
    if not lists:
        return None, {}
    return max(lists.values(), key=lambda v: len(v[1]))


class _Stand:
    """A stand-in for a layer: attribute reads go to the real one."""

    def __init__(self, real, i: int, what):
        self._real, self._i, self._what = real, i, what

    def __getattr__(self, name):
        if name in ("_real", "_i", "_what"):  # not set yet: no endless recursion
            raise AttributeError(name)
        return getattr(self._real, name)


class _Tap(_Stand):
    """Runs the real layer, keeping its input (``_what``: the chunk's record; a second call of
    the same layer marks it unusable)."""

    def __call__(self, h, *args, **kwargs):
        self._what[self._i] = None if self._i in self._what else h
        return self._real(h, *args, **kwargs)


class _Skip(_Stand):
    """Hands its input through, or (the last layer skipped) the recorded input of the next."""

    def __call__(self, h, *args, **kwargs):
        return h if self._what is None else self._what


class Replay:
    """The recorded layer inputs of one model's base pass, per chunk, and the stand-ins of a
    replay. ``starts``: the layers passes will start at; ``tokens``: the sample's tokens."""

    def __init__(self, layers: list, starts, tokens: int):
        self.layers, self.tokens = layers, int(tokens)
        self.deepest = len(layers) - 1
        self.keep = sorted(set(starts) | {self.deepest})
        self.states: dict = {}
        self.on, self.recorded, self.why = True, False, None
        self.replayed = 0  # chunk passes run on stand-ins

    def off(self, why: str) -> None:
        """Every pass from now on runs the whole model; ``why`` says why."""
        self.on, self.states, self.why = False, {}, why

    @contextmanager
    def around(self, key, start: int | None, *, single: bool, tokens: int):
        """Around one chunk's forward calls. ``start=None`` before the base pass has been
        recorded: record this chunk (one forward call, ``single``). An int ``start``: replay the
        layers before it, when this chunk was recorded. Otherwise: the whole model."""
        stands, record = {}, None
        if self.on and start is None and not self.recorded and single:
            record = {}
            stands = {i: _Tap(self.layers[i], i, record) for i in self.keep}
        elif self.on and start and key in self.states:
            state = self.states[key][start]
            stands = {i: _Skip(self.layers[i], i, state if i == start - 1 else None) for i in range(start)}
            self.replayed += 1
        real = {i: self.layers[i] for i in stands}
        try:
            for i, s in stands.items():
                self.layers[i] = s
            yield
        finally:
            for i, r in real.items():
                self.layers[i] = r
        if record is not None:
            self._keep(key, record, tokens)

    def _keep(self, key, record: dict, tokens: int) -> None:
        import mlx.core as mx

        if sorted(record) != self.keep or any(v is None for v in record.values()):
            self.off("the model's loop does not call each of its layers once per forward call")
            return
        mx.eval(list(record.values()))  # computed in the pass already: kept, not recomputed
        if not self.states:
            per_token = sum(int(v.nbytes) for v in record.values()) / max(1, int(tokens))
            if per_token * self.tokens > MAX_BYTES:
                self.off(f"the layers' inputs would take {per_token * self.tokens / 2**30:.1f} GiB "
                         f"(more than {MAX_BYTES / 2**30:.1f})")
                return
        self.states[key] = record
