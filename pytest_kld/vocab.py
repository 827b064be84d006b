"""Where the vocabulary-wide work runs: numpy on the CPU, or MLX (on the GPU where there is one).

After each forward piece, every scored row needs work over the whole vocabulary: the
log-softmax, and then either the reference's top-K and tail mass (a build) or the gathers and
the tail's log-sum-exp at the reference's top-K ids (a comparison). Only [rows, K] figures leave
this stage; the float64 reductions that make KL are :mod:`pytest_kld.divergence`'s, whichever
backend ran.

- ``numpy``: numpy reads the logits where MLX left them (a read-only view through the buffer
  protocol, no copy of the piece) and works block by block of rows (small temporaries). On a
  CPU this is the faster one (numpy's log-softmax is ~6x MLX's CPU one).
- ``mlx``: the same operations in MLX, where the logits already are; on Apple silicon they run on
  the GPU, and only [rows, K] arrays are copied back.
- ``auto`` (default): on a CPU device, numpy (measured faster there, and deterministic). With a
  GPU, at a build both run on the first piece, and MLX is kept when it is at
  least :data:`MLX_MARGIN` times faster, numpy otherwise (a near tie would let load flip it); the choice
  and both times are recorded in the cache, and every comparison against that cache uses the
  same backend, so a reference compared with itself still gives exactly 0.

The two agree within float32 rounding (tests/test_vocab.py).
"""

from __future__ import annotations

import time

import numpy as np

from .divergence import PositionStats, SparseRows, kl_from_parts, sparsify

MLX_MARGIN = 1.5  # auto keeps MLX only when it is at least this many times faster than numpy


def _mlx_logprobs(lg):
    """Float32 log-softmax of a piece's MLX logits [rows, V], in MLX (numpy's is divergence.py's,
    block by block)."""
    import mlx.core as mx

    return lg - mx.logsumexp(lg, axis=-1, keepdims=True)


def _view(lg) -> np.ndarray:
    """The evaluated MLX array ``lg`` as numpy, without a copy where the memory allows (the
    buffer protocol; only read)."""
    return np.asarray(lg)


def sparse_rows(lg, targets: np.ndarray, k: int, backend: str) -> SparseRows:
    """The reference's record of a piece (top-K ids and log-probs, tail, target) from its logits."""
    if backend != "mlx":
        return sparsify(_view(lg), targets, k, logits=True)
    import mlx.core as mx

    lp = _mlx_logprobs(lg)
    n, v = lp.shape
    k = min(int(k), int(v))
    idx = mx.argpartition(-lp, kth=k - 1, axis=-1)[:, :k] if k < v else mx.broadcast_to(mx.arange(v), (n, v))
    vals = mx.take_along_axis(lp, idx, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    idx, vals = mx.take_along_axis(idx, order, axis=-1), mx.take_along_axis(vals, order, axis=-1)
    if k < v:
        tail = mx.logsumexp(mx.put_along_axis(lp, idx, mx.array(-np.inf, lp.dtype), axis=-1), axis=-1)
    else:
        tail = mx.full((n,), -np.inf)
    t = mx.array(np.asarray(targets, dtype=np.int32))
    target = mx.take_along_axis(lp, t[:, None], axis=-1)[:, 0]
    mx.eval(idx, vals, tail, target)
    return SparseRows(ids=np.array(idx).astype(np.int64), logprobs=np.array(vals).astype(np.float32),
                      tail=np.array(tail).astype(np.float32), target=np.array(target).astype(np.float32),
                      target_ids=np.asarray(targets, dtype=np.int64))


def position_stats(ref: SparseRows, lg, backend: str) -> PositionStats:
    """KL(reference ‖ quant) and the other per-position figures of a piece from its logits."""
    if backend != "mlx":
        from .divergence import compare_rows

        return compare_rows(ref, _view(lg), logits=True)
    import mlx.core as mx

    lq = _mlx_logprobs(lg)
    ids = mx.array(ref.ids.astype(np.int32))
    q_top = mx.take_along_axis(lq, ids, axis=-1)
    q_target = mx.take_along_axis(lq, mx.array(ref.target_ids.astype(np.int32))[:, None], axis=-1)[:, 0]
    q_arg = mx.argmax(lq, axis=-1)
    finite = mx.all(mx.isfinite(lq), axis=-1)
    q_tail = mx.logsumexp(mx.put_along_axis(lq, ids, mx.array(-np.inf, lq.dtype), axis=-1), axis=-1)
    mx.eval(q_top, q_target, q_arg, finite, q_tail)
    tail = np.array(q_tail).astype(np.float64) if bool(np.any(np.isfinite(ref.tail))) else np.full(len(ref.tail), -np.inf)
    return kl_from_parts(ref, np.array(q_top).astype(np.float64), tail, np.array(q_target).astype(np.float64),
                         np.array(q_arg), np.array(finite))


def choose(lg, targets: np.ndarray, k: int, requested: str, device: str | None = None) -> tuple[str, dict]:
    """(backend, seconds each took) for a build: ``requested`` unless ``auto``, which times both
    on this piece (each run twice, the faster run counted: the first MLX run compiles) when MLX
    runs on a GPU. On a CPU device ``auto`` is numpy without timing: benchmarks/bench_vocab.py
    measured it 2.7-12x faster there, and timing a small piece on a busy machine could flip the
    choice, and with it the cache's last bits, from one build to the next."""
    if requested in ("numpy", "mlx"):
        return requested, {}
    if device is None:
        import mlx.core as mx

        device = "cpu" if mx.default_device().type == mx.DeviceType.cpu else "gpu"
    if device == "cpu":
        return "numpy", {}
    seconds = {}
    for name in ("numpy", "mlx"):
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            sparse_rows(lg, targets, k, name)
            best = min(best, time.perf_counter() - t0)
        seconds[name] = round(best, 6)
    # MLX must win clearly: a near tie would let a busy machine flip the choice (and the
    # cache's last bits) from one build to the next
    return ("mlx" if seconds["mlx"] * MLX_MARGIN < seconds["numpy"] else "numpy"), seconds
