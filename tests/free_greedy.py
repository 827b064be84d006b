"""The oracle for drift mode's match lengths: the quant's free greedy generation (mlx-lm's
generate_step, a KV cache, one token per step) against the reference's cached continuation, with
the tie rule. This is what drift mode did before it read the figures from its teacher-forced pass
(issue 26); tests/test_drift.py and benchmarks/bench_drift.py compare the two.
"""

from __future__ import annotations

import numpy as np


def run(model, prompt: list[int], ref: list[int]):
    """The quant's free greedy continuation of ``prompt``, one token at a time (a generator: stop
    reading and the generation stops)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    if not ref:
        return
    for token, _ in generate_step(mx.array(prompt, dtype=mx.int32), model, max_tokens=len(ref),
                                  sampler=lambda lp: mx.argmax(lp, axis=-1)):
        yield int(token)


def follow_one(model, prompt: list[int], ref: list[int], margin: np.ndarray, tie_nats: float) -> tuple[int, int, int]:
    """(match length with ties forgiven, strict match length, ties) of one prompt by generation:
    the quant continues greedily until its pick differs from the reference's; where the
    reference's top-2 gap ``margin[t]`` is below ``tie_nats`` that is a tie, and the quant starts
    again from ``prompt + ref[:t + 1]`` (a fresh prefill); otherwise the run ends there."""
    t, ties, strict = 0, 0, None
    while t < len(ref):
        for tok in run(model, prompt + ref[:t], ref[t:]):
            if tok != ref[t]:
                break
            t += 1
        if t >= len(ref):
            break
        strict = t if strict is None else strict
        if margin[t] >= tie_nats:
            return t, strict, ties
        ties += 1
        t += 1  # a tie: back on the reference's token
    return len(ref), len(ref) if strict is None else strict, ties


def follow(model, cache, tie_nats: float) -> dict:
    """:func:`follow_one` for every prompt of a drift cache: {"match", "match_strict", "ties"}."""
    out = {k: np.zeros(cache.n_chunks, dtype=np.int64) for k in ("match", "match_strict", "ties")}
    for i in range(cache.n_chunks):
        start, end = (int(v) for v in cache.score_ranges[i])
        ids = cache.chunk(i).tolist()
        top = cache.rows(i).logprobs
        margin = top[:, 0] - top[:, 1] if top.shape[1] > 1 else np.full(end - start, np.inf)
        out["match"][i], out["match_strict"][i], out["ties"][i] = follow_one(
            model, ids[: start + 1], ids[start + 1 : end + 1], margin, tie_nats)
    return out
