"""Generation drift: how long a quant's own greedy continuation stays with the reference's.

Prefill KLD scores text the reference did not write. Drift mode (``--kld-mode=drift``) scores
what the models *generate*:

- **The reference's trajectory** (once, in the reference cache, as one more mode): each prompt
  (the short corpus's user turns through the chat template, with the generation prompt) is
  continued greedily by the reference for ``--kld-drift-tokens`` tokens (default 64; fewer when it
  ends with an end-of-sequence token): all prompts at once, batched (mlx-lm's ``BatchGenerator``),
  token for token what mlx-lm's unbatched ``generate_step`` gives (:func:`continuations`). The
  prompt + continuation is then an ordinary cache chunk whose scored positions are the
  continuation's: the reference's top-K record at every generated step, the same format,
  validation and lock as any other mode.
- **Trajectory KLD**: KL(reference ‖ quant) at each step along the reference's continuation,
  teacher-forced: the ordinary comparison of that chunk (one forward pass, the same numerics as
  prefill), reported by step bucket (early/middle/late thirds of the drift length).
- **Match length**: the number of tokens the quant's own greedy continuation keeps before its
  first pick that differs from the reference's (the whole continuation when none does). **Ties**:
  where the reference's own top-2 log-probs at that step lie within :data:`TIE_NATS`, the
  reference was torn, and a differing pick there is a tie, not a divergence: the quant is put back
  on the reference's token and goes on. The headline (``drift_match``) counts ties as matches;
  ``drift_match_strict`` stops at the first differing pick of any kind. Both, and the number of
  ties, are reported.

Why match lengths need no generation: up to its first non-tie difference the quant's greedy path
*is* the reference's, and after a forgiven tie it is put back on it; so at every step that counts
the quant's context is ``prompt + reference continuation[:t]``, the teacher-forced context of the
trajectory-KLD pass. Its greedy pick there is the argmax of that pass's logits at step t, over
the quant's whole output (:func:`greedy_picks`), and :func:`follow` reads all three figures from
them. The one difference from free generation is float rounding between an incremental KV-cache
pass and a chunked one: where the quant's own top-2 lie within :data:`NEAR_NATS` a free run could
pick the other one; such steps are counted (``drift_near_ties``), not hidden.
"""

from __future__ import annotations

import math

import numpy as np

TIE_NATS = 1e-3  # reference top-2 log-probs closer than this: a differing greedy pick is a tie
# A model's own top-2 closer than this: float rounding between two ways of computing the same step
# (incremental vs chunked, batched vs alone) could swap them. Measured in float32 on SmolLM2-135M:
# a log-prob differs by at most 2.0e-4 nats incremental vs chunked, 7.6e-5 incremental vs batched
# (benchmarks/bench_drift.py), so a top-2 gap by at most twice that.
NEAR_NATS = 1e-3
BUCKETS = ("early", "middle", "late")


def prompt_ids(spec, tokenizer) -> list[tuple[list[int], str, str]]:
    """(prompt ids, category, record id) of each record: the user turn(s) through the chat
    template with the generation prompt, else the plain prompt text."""
    from .corpus import load_records
    from .tokens import Encoder, has_chat_template

    enc = Encoder(tokenizer)
    records = load_records(spec.path, spec.source_format, spec.default_category)
    if spec.n_chunks is not None:
        records = records[: spec.n_chunks]
    out = []
    for rec in records:
        turns = [dict(m) for m in rec.context] or [{"role": "user", "content": rec.text}]
        if spec.chat_template and has_chat_template(tokenizer):
            text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        else:
            text = "".join(m["content"] + "\n\n" for m in turns if m["content"])
        out.append((enc.ids(text), rec.category, rec.id))
    return out


def greedy(model, prompt: list[int], max_tokens: int, eos: set[int] | None = None) -> list[int]:
    """The model's greedy continuation of ``prompt`` (mlx-lm's generate_step, KV cache), up to
    ``max_tokens`` tokens, ending after an end-of-sequence token."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    out: list[int] = []
    if max_tokens <= 0:
        return out
    for token, _ in generate_step(mx.array(prompt, dtype=mx.int32), model, max_tokens=max_tokens,
                                  sampler=lambda lp: mx.argmax(lp, axis=-1)):
        out.append(int(token))
        if eos and out[-1] in eos:
            break
    return out


def continuations(model, prompts: list[list[int]], max_tokens: int, eos: set[int] | None = None, *,
                  batched: bool = True, progress=None) -> tuple[list[list[int]], int]:
    """(each prompt's greedy continuation, how many were generated alone): :func:`greedy`'s
    tokens, exactly, for every prompt.

    ``batched``: all prompts through mlx-lm's ``BatchGenerator`` (greedy, per-prompt stop at an
    end-of-sequence token), then every prompt whose batched run met a step with its top-2 within
    :data:`NEAR_NATS` generated again alone with :func:`greedy`. Batched and alone the same step
    differs by float rounding only (right padding, masks, another matmul shape; measured far below
    NEAR_NATS in float32), and rounding can only swap two picks that close: elsewhere the two
    paths pick the same token at every step. Half-precision logits round far coarser: callers batch
    only in float32 (:func:`reference_corpus`). ``progress(done, total)`` hears finished prompts.
    """
    if max_tokens <= 0 or not prompts:
        return [[] for _ in prompts], 0
    if not batched:
        out = []
        for i, p in enumerate(prompts):
            out.append(greedy(model, p, max_tokens, eos))
            if progress is not None:
                progress(i + 1, len(prompts))
        return out, len(prompts)
    tokens, margins = _batched(model, prompts, max_tokens, eos, progress)
    alone = [i for i, m in enumerate(margins) if m < NEAR_NATS]
    for i in alone:
        tokens[i] = greedy(model, prompts[i], max_tokens, eos)
    return tokens, len(alone)


def _batched(model, prompts, max_tokens: int, eos, progress) -> tuple[list[list[int]], list[float]]:
    """(tokens, the smallest top-2 log-prob gap met) of each prompt's batched greedy continuation;
    the end-of-sequence token that stops one is kept, as :func:`greedy` keeps it."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, stop_tokens=[[t] for t in sorted(eos or ())] or None)
    try:
        uids = gen.insert([list(map(int, p)) for p in prompts], [int(max_tokens)] * len(prompts))
        row = {u: i for i, u in enumerate(uids)}
        tokens: list[list[int]] = [[] for _ in prompts]
        margins = [math.inf] * len(prompts)
        done = 0
        while responses := gen.next_generated():
            for r in responses:
                i = row[r.uid]
                tokens[i].append(int(r.token))
                top2 = np.partition(np.asarray(r.logprobs, dtype=np.float32), -2)[-2:]
                margins[i] = min(margins[i], float(top2[1] - top2[0]))
                if r.finish_reason is not None:
                    done += 1
                    if progress is not None:
                        progress(done, len(prompts))
    finally:
        gen.close()
    return tokens, margins


def reference_corpus(model, tokenizer, spec, progress=None, *, batched: bool = True):
    """The drift corpus: each prompt with the reference's greedy continuation as one chunk, the
    continuation's positions scored (a :class:`~pytest_kld.tokens.TokenizedCorpus`).
    ``batched``: generate all prompts at once (:func:`continuations`; the caller passes False for
    half-precision execution, where batching is not token-exact)."""
    from .tokens import TokenizedCorpus, corpus_identity

    eos = set(getattr(tokenizer, "eos_token_ids", None) or [])
    prompts = prompt_ids(spec, tokenizer)
    conts, _ = continuations(model, [ids for ids, _, _ in prompts], spec.drift_tokens, eos,
                             batched=batched, progress=progress)
    chunks = [np.asarray(ids + cont, dtype=np.int32) for (ids, _, _), cont in zip(prompts, conts)]
    ranges = [(len(ids) - 1, len(ids) - 1 + len(cont)) for (ids, _, _), cont in zip(prompts, conts)]
    return TokenizedCorpus(chunks, ranges, [c for _, c, _ in prompts], corpus_identity(spec, chunks, ranges),
                           [n for _, _, n in prompts])


def greedy_picks(lg) -> tuple[np.ndarray, np.ndarray]:
    """(argmax, gap between the two largest) of each row of a piece's logits [rows, W], over the
    model's whole output width W: the greedy pick at each step, and how close it was. numpy, on a
    view of the logits, block by block of rows (MLX's topk took ~10x longer on a CPU)."""
    from .divergence import ROW_BLOCK

    x = np.asarray(lg)
    n = x.shape[0]
    arg, gap = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float32)
    for lo in range(0, n, ROW_BLOCK):
        block = x[lo : lo + ROW_BLOCK]
        rows = np.arange(block.shape[0])
        arg[lo : lo + ROW_BLOCK] = a = np.argmax(block, axis=-1)
        rest = np.array(block, dtype=np.float32)  # a copy of one block: the view is only read
        rest[rows, a] = -np.inf
        gap[lo : lo + ROW_BLOCK] = block[rows, a] - rest.max(axis=-1)
    return arg, gap


def follow(cache, picks: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """The quant's greedy run against the reference's continuation of every drift prompt, read from
    its teacher-forced picks (:func:`greedy_picks` of each comparison piece, in cache row order):
    ``{"match", "match_strict", "ties", "near", "length"}`` (int arrays, one per prompt)."""
    arg = np.concatenate([a for a, _ in picks]) if picks else np.zeros(0, np.int64)
    gap = np.concatenate([g for _, g in picks]) if picks else np.zeros(0, np.float32)
    n = cache.n_chunks
    if arg.shape[0] != cache.n_positions:
        raise ValueError(f"{arg.shape[0]} picks for {cache.n_positions} cached positions")
    out = {k: np.zeros(n, dtype=np.int64) for k in ("match", "match_strict", "ties", "near", "length")}
    for i in range(n):
        rows = slice(int(cache.row_offsets[i]), int(cache.row_offsets[i + 1]))
        start, end = (int(v) for v in cache.score_ranges[i])
        ref = cache.chunk(i)[start + 1 : end + 1]
        top = cache.rows(i).logprobs
        margin = top[:, 0] - top[:, 1] if top.shape[1] > 1 else np.full(len(ref), np.inf)
        out["length"][i] = len(ref)
        figures = match_one(arg[rows], ref, margin, gap[rows])
        out["match"][i], out["match_strict"][i], out["ties"][i], out["near"][i] = figures
    return out


def match_one(picks: np.ndarray, ref: np.ndarray, ref_margin: np.ndarray,
              pick_gap: np.ndarray) -> tuple[int, int, int, int]:
    """(match length with ties forgiven, strict match length, ties, quant near-ties) of one prompt.

    ``picks[t]``: the quant's greedy pick after ``prompt + ref[:t]``; ``ref_margin[t]``: the
    reference's top-2 gap there; ``pick_gap[t]``: the quant's. The run goes on while it picks
    ``ref[t]`` or the reference was torn (a tie, margin below :data:`TIE_NATS`); it stops at the
    first other difference. Near-ties: steps the run looked at whose quant top-2 gap is below
    :data:`NEAR_NATS` (there a free greedy run could have picked the other of the two)."""
    length = len(ref)
    differ = np.flatnonzero(np.asarray(picks) != np.asarray(ref))
    strict = int(differ[0]) if differ.size else length
    stops = differ[np.asarray(ref_margin)[differ] >= TIE_NATS]
    match = int(stops[0]) if stops.size else length
    ties = int(np.sum(differ < match))
    near = int(np.sum(np.asarray(pick_gap)[: min(match + 1, length)] < NEAR_NATS))
    return match, strict, ties, near


def summarize(kl: np.ndarray, cache, followed: dict, drift_tokens: int) -> dict:
    """The drift figures of one comparison: match lengths (headline with ties forgiven, and
    strict), the share of prompts matched to the end, tie count, and mean trajectory
    KL(reference ‖ quant) overall and by step bucket (thirds of ``drift_tokens``)."""
    match, strict, length = followed["match"], followed["match_strict"], followed["length"]
    steps = np.concatenate([np.arange(int(e) - int(s)) for s, e in cache.score_ranges]) if cache.n_chunks else np.zeros(0)
    kl = np.asarray(kl, dtype=np.float64)
    out = {
        "drift_tokens": int(drift_tokens),
        "drift_prompts": int(len(match)),
        "drift_match": float(np.mean(match)) if len(match) else math.nan,
        "drift_match_median": float(np.median(match)) if len(match) else math.nan,
        "drift_match_strict": float(np.mean(strict)) if len(strict) else math.nan,
        "drift_full_share": float(np.mean(match == length)) if len(match) else math.nan,
        "drift_full_share_strict": float(np.mean(strict == length)) if len(match) else math.nan,
        "drift_ties": int(np.sum(followed["ties"])),
        # steps where the quant's own top-2 were within float rounding (NEAR_NATS): a free greedy run
        # could have picked the other; the figures above took the teacher-forced pass's pick
        "drift_near_ties": int(np.sum(followed.get("near", 0))),
        "drift_kld": float(np.mean(kl[np.isfinite(kl)])) if np.any(np.isfinite(kl)) else math.nan,
        "drift_tie_nats": TIE_NATS,
    }
    edges = np.linspace(0, drift_tokens, len(BUCKETS) + 1)
    for b, name in enumerate(BUCKETS):
        sel = (steps >= edges[b]) & (steps < edges[b + 1]) & np.isfinite(kl)
        out[f"drift_kld_{name}"] = float(np.mean(kl[sel])) if np.any(sel) else math.nan
    return out


COLUMNS = (("drift_match", "match", "{:.1f}"), ("drift_match_median", "median", "{:.0f}"),
           ("drift_full_share", "to end", "{:.0%}"), ("drift_match_strict", "strict", "{:.1f}"),
           ("drift_ties", "ties", "{}"), ("drift_kld_early", "KLD early", "{:.4f}"),
           ("drift_kld_middle", "middle", "{:.4f}"), ("drift_kld_late", "late", "{:.4f}"))


def lines(rows: list[dict]) -> list[str]:
    """The leaderboard's generation-drift section (rows measured in drift mode), or nothing."""
    drift = [r for r in rows if (r.get("summary") or {}).get("drift_match") is not None]
    if not drift:
        return []
    n = (drift[0].get("summary") or {}).get("drift_tokens")
    table = [["model", *(h for _, h, _ in COLUMNS)]]
    for r in drift:
        s = r["summary"]
        table.append([str(r.get("model"))] + [_fmt(f, s.get(k)) for k, _, f in COLUMNS])
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    out = ["", f"generation drift: greedy, up to {n} tokens per prompt; match = tokens before the quant's own "
               f"continuation first leaves the reference's (ties forgiven: reference top-2 within {TIE_NATS:g} nats; "
               "strict: not); KLD: KL(reference || quant) along the reference's continuation, by thirds"]
    for t in table:
        out.append("  ".join([t[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(t[1:], widths[1:])]))
    return out + _near_note(drift)


def _near_note(drift: list[dict]) -> list[str]:
    """A line naming the quants whose greedy picks were near-ties (nothing when none were)."""
    near = [f"{r.get('model')} {r['summary']['drift_near_ties']}" for r in drift
            if (r["summary"].get("drift_near_ties") or 0) > 0]
    if not near:
        return []
    return [f"near-ties (the quant's own top-2 within {NEAR_NATS:g} nats, where a free greedy run could pick "
            f"the other; matches read from the teacher-forced pass): {', '.join(near)}"]


def _fmt(fmt: str, v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v)


def markdown_lines(rows: list[dict]) -> list[str]:
    """The generation-drift table for the Markdown summary, or nothing."""
    drift = [r for r in rows if (r.get("summary") or {}).get("drift_match") is not None]
    if not drift:
        return []
    n = (drift[0].get("summary") or {}).get("drift_tokens")
    out = [f"**Generation drift** (greedy, up to {n} tokens per prompt; match: tokens before the quant's own "
           f"continuation leaves the reference's, ties within {TIE_NATS:g} nats forgiven; strict: not; "
           "KLD: KL(reference \\|\\| quant) along the reference's continuation)", "",
           "| model | " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|:---|" + "---:|" * len(COLUMNS)]
    for r in drift:
        s = r["summary"]
        name = str(r.get("model")).replace("|", "\\|")
        out.append(f"| {name} | " + " | ".join(_fmt(f, s.get(k)) for k, _, f in COLUMNS) + " |")
    note = [line.replace("|", "\\|") for line in _near_note(drift)]
    return [*out, "", *([*note, ""] if note else [])]
