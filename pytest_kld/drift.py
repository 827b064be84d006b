"""Generation drift: how long a quant's own greedy continuation stays with the reference's.

Prefill KLD scores text the reference did not write. Drift mode (``--kld-mode=drift``) scores
what the models *generate*:

- **The reference's trajectory** (once, in the reference cache, as one more mode): each prompt
  (the short corpus's user turns through the chat template, with the generation prompt) is
  continued greedily by the reference for ``--kld-drift-tokens`` tokens (default 64; fewer when it
  ends with an end-of-sequence token), with mlx-lm's ``generate_step`` and a KV cache. The
  prompt + continuation is then an ordinary cache chunk whose scored positions are the
  continuation's: the reference's top-K record at every generated step, the same format,
  validation and lock as any other mode.
- **Trajectory KLD**: KL(reference ‖ quant) at each step along the reference's continuation,
  teacher-forced: the ordinary comparison of that chunk (one forward pass, the same numerics as
  prefill), reported by step bucket (early/middle/late thirds of the drift length).
- **Match length**: the quant continues each prompt greedily on its own (``generate_step``); the
  match length is the number of tokens before its first pick that differs from the reference's
  (the whole continuation when none does). **Ties**: where the reference's own top-2 log-probs
  at that step lie within :data:`TIE_NATS`, the reference was torn, and a differing pick there
  is a tie, not a divergence: the quant is put back on the reference's token and goes on. The
  headline (``drift_match``) counts ties as matches; ``drift_match_strict`` stops at the first
  differing pick of any kind. Both, and the number of ties, are reported.
"""

from __future__ import annotations

import math

import numpy as np

TIE_NATS = 1e-3  # reference top-2 log-probs closer than this: a differing greedy pick is a tie
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


def reference_corpus(model, tokenizer, spec, progress=None):
    """The drift corpus: each prompt with the reference's greedy continuation as one chunk, the
    continuation's positions scored (a :class:`~pytest_kld.tokens.TokenizedCorpus`)."""
    from .tokens import TokenizedCorpus, corpus_identity

    eos = set(getattr(tokenizer, "eos_token_ids", None) or [])
    prompts = prompt_ids(spec, tokenizer)
    chunks, ranges, cats, names = [], [], [], []
    for i, (ids, cat, name) in enumerate(prompts):
        cont = greedy(model, ids, spec.drift_tokens, eos)
        chunks.append(np.asarray(ids + cont, dtype=np.int32))
        ranges.append((len(ids) - 1, len(ids) - 1 + len(cont)))
        cats.append(cat)
        names.append(name)
        if progress is not None:
            progress(i + 1, len(prompts))
    return TokenizedCorpus(chunks, ranges, cats, corpus_identity(spec, chunks, ranges), names)


def follow(model, cache, progress=None) -> dict:
    """The quant's own greedy continuation of every drift prompt against the reference's:
    ``{"match", "match_strict", "ties", "length"}`` (int arrays, one per prompt)."""
    n = cache.n_chunks
    out = {k: np.zeros(n, dtype=np.int64) for k in ("match", "match_strict", "ties", "length")}
    for i in range(n):
        chunk = cache.chunk(i).tolist()
        start, end = (int(v) for v in cache.score_ranges[i])
        prompt, ref = chunk[: start + 1], chunk[start + 1 : end + 1]
        top = cache.rows(i).logprobs
        margin = top[:, 0] - top[:, 1] if top.shape[1] > 1 else np.full(len(ref), np.inf)
        out["length"][i] = len(ref)
        out["match"][i], out["match_strict"][i], out["ties"][i] = _follow_one(model, prompt, ref, margin)
        if progress is not None:
            progress(i + 1, n)
    return out


def _follow_one(model, prompt: list[int], ref: list[int], margin: np.ndarray) -> tuple[int, int, int]:
    """(match length with ties forgiven, strict match length, ties) of one prompt."""
    t, ties, strict = 0, 0, None
    while t < len(ref):
        mine = greedy(model, prompt + ref[:t], len(ref) - t)
        same = 0
        while same < len(mine) and mine[same] == ref[t + same]:
            same += 1
        t += same
        if t >= len(ref):
            break
        strict = t if strict is None else strict
        if margin[t] >= TIE_NATS:
            return t, strict, ties
        ties += 1
        t += 1  # a tie: back on the reference's token
    return len(ref), len(ref) if strict is None else strict, ties


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
    return out


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
    return [*out, ""]
