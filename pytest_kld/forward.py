"""Forward passes: load a model for an execution precision, run token chunks through it with
mlx-lm's KV cache, and hand back float32 log-probs of the scored positions only.

Execution precision ("exec"):
- ``native``: the model as saved (fp16/bf16, MLX's quantised kernels). Right on Apple silicon and
  GPUs, where those kernels are fast.
- ``float32``: every floating parameter cast to float32 and every quantised layer dequantised
  exactly to float32 (scales and biases widened first, so no rounding is added). On a CPU MLX's
  quantised kernels are unusably slow; this gives the same function ~25x faster.
- ``auto``: native where Metal or CUDA is available, float32 otherwise.
Every result records the exec actually used.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .divergence import log_softmax
from .options import EXEC_MODES


def resolve_exec(exec_mode: str) -> str:
    """``auto`` → ``native`` on Metal/CUDA, ``float32`` on a CPU; other values are checked."""
    if exec_mode not in EXEC_MODES:
        from .errors import KldError

        raise KldError(f"unknown exec mode {exec_mode!r}: choose one of {', '.join(EXEC_MODES)}")
    if exec_mode != "auto":
        return exec_mode
    from .blas import prefer_system_blas

    prefer_system_blas()
    import mlx.core as mx

    gpu = mx.metal.is_available()
    if not gpu:
        try:
            gpu = bool(mx.cuda.is_available())
        except AttributeError:
            gpu = False
    return "native" if gpu else "float32"


def dequantize_to_float32(model) -> int:
    """Replace each quantised layer of ``model`` by an exact float32 dense one; return the count."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    def widen(a):
        if a is None or not mx.issubdtype(a.dtype, mx.floating):
            return a
        return a.astype(mx.float32)

    replaced = []
    for name, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            kind = "linear"
        elif isinstance(module, nn.QuantizedEmbedding):
            kind = "embedding"
        elif isinstance(module, QuantizedSwitchLinear):
            kind = "switch"
        else:
            continue
        kwargs = {}
        gs = getattr(module, "global_scale", None)
        if gs is not None:
            kwargs["global_scale"] = gs
        weight = mx.dequantize(
            module.weight,
            widen(module.scales),
            widen(module.get("biases")),
            module.group_size,
            module.bits,
            module.mode,
            dtype=mx.float32,
            **kwargs,
        )
        has_bias = "bias" in module
        if kind == "linear":
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
        elif kind == "embedding":
            new = nn.Embedding(weight.shape[0], weight.shape[1])
        else:
            new = SwitchLinear(weight.shape[2], weight.shape[1], weight.shape[0], bias=has_bias)
        new.weight = weight
        if has_bias:
            new.bias = module.bias.astype(mx.float32)
        replaced.append((name, new))
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    return len(replaced)


def cast_float32(model) -> None:
    import mlx.core as mx
    from mlx.utils import tree_map

    model.update(
        tree_map(
            lambda v: v.astype(mx.float32)
            if isinstance(v, mx.array) and mx.issubdtype(v.dtype, mx.floating)
            else v,
            model.parameters(),
        )
    )


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    path: Path
    exec: str

    def release(self) -> None:
        """Drop the weights so the next model loads into free memory."""
        import mlx.core as mx

        self.model = None
        gc.collect()
        mx.clear_cache()


def load_model(path: Path, exec_mode: str = "auto", *, trust_remote_code: bool = False) -> LoadedModel:
    """Load the MLX model directory ``path`` (already resolved) for ``exec_mode``."""
    from .blas import prefer_system_blas

    prefer_system_blas()
    import mlx.core as mx
    from mlx_lm.utils import load

    from .errors import ModelError
    from .models import check_weight_files

    exec_used = resolve_exec(exec_mode)
    check_config(Path(path), trust_remote_code)
    check_weight_files(Path(path))
    try:
        model, tokenizer = load(
            str(path),
            tokenizer_config={"trust_remote_code": trust_remote_code},
            trust_remote_code=trust_remote_code,
            lazy=True,  # read when evaluated below: widened to float32 tensor by tensor, not all twice
        )
    except ValueError as e:
        msg = one_line(e)
        if "not supported" in msg or "Model type" in msg:
            raise ModelError(
                f"{path}: unsupported model architecture ({msg}); "
                "pytest-kld runs the architectures that mlx-lm supports"
            ) from None
        raise ModelError(f"{path}: mlx-lm could not load this model: {msg}") from None
    except FileNotFoundError as e:
        raise ModelError(f"{path}: not a loadable MLX model ({e})") from None
    except (KeyError, TypeError, AttributeError, OSError) as e:  # a config.json mlx-lm cannot use
        msg = one_line(e)
        raise ModelError(
            f"{path}: mlx-lm could not build this model from its files ({type(e).__name__}: {msg}); "
            "check config.json, the weights and the tokenizer files"
        ) from None
    if exec_used == "float32":
        dequantize_to_float32(model)
        cast_float32(model)
    try:
        mx.eval(model.parameters())
    except (RuntimeError, ValueError, OSError) as e:  # the weights are read here (lazy load)
        raise ModelError(f"{path}: loading the model's weights failed ({one_line(e)}); check its weight files "
                         "(re-download or re-convert it) and the free memory") from None
    mx.clear_cache()  # buffers of the loading steps, not kept beside the model
    return LoadedModel(model, tokenizer, Path(path), exec_used)


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's whole message on one line (several libraries spread theirs over lines)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_config(path: Path, trust_remote_code: bool) -> None:
    """One-line errors for a config.json that cannot describe a model, and for custom model code
    that was not asked for (before mlx-lm reads anything)."""
    import json

    from .errors import ModelError

    cfg_file = path / "config.json"
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} is not a model directory (no config.json)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{cfg_file} is not valid JSON ({e}); re-download or re-convert the model") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelError(
            f"{cfg_file} has no model_type: {path} is not a language model that mlx-lm can load"
        )
    code = config.get("model_file")
    if code is not None and not trust_remote_code:
        raise ModelError(
            f"{path}: its config.json names custom model code ({code!r}), which is not run unless "
            "asked: pass --kld-trust-remote-code (trust_remote_code=True) only if you trust this model"
        )


def _cache_arrays(cache) -> list:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return [a for _, a in tree_flatten([c.state for c in cache]) if isinstance(a, mx.array)]


def scored_logits(model) -> Callable:
    """A function ``(piece_ids, cache, lo, hi) -> logits`` that runs a forward piece with the KV
    cache and returns the logits of its rows [lo, hi) only.

    Only scored positions need logits; every position's hidden state still feeds the KV cache.
    mlx-lm's causal LMs compute ``head(body(ids, cache))``, with the head ``lm_head`` or the tied
    embedding's ``as_linear``; applying the head to the scored rows alone skips the output layer
    elsewhere (about a fifth of SmolLM2's compute per token). The split is checked once per
    model on a short probe against the model's own ``__call__`` (to float32 rounding: a matmul
    over fewer rows may take another BLAS kernel): a family whose call does more (logit
    soft-capping, scaling) or is laid out otherwise keeps the full call.
    """
    split = getattr(model, "_pytest_kld_split", None)
    if split is None:
        split = output_split(model) or False
        model._pytest_kld_split = split
    if not split:
        return lambda ids, cache, lo, hi: model(ids, cache=cache).squeeze(0)[lo:hi]
    body, head = split
    # squeeze, not [0]: MLX's integer index gathers a copy of the piece's logits; squeeze is a view
    return lambda ids, cache, lo, hi: head(body(ids, cache=cache)[:, lo:hi]).squeeze(0)


def output_split(model):
    """(body, head) with head(body(ids)) == model(ids) exactly on a probe, else None."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    inner = getattr(model, "language_model", model)
    body, args = getattr(inner, "model", None), getattr(inner, "args", None)
    if body is None or args is None or getattr(inner, "sharding_group", None) is not None:
        return None
    if getattr(args, "tie_word_embeddings", False) and hasattr(body, "embed_tokens"):
        head = body.embed_tokens.as_linear
    elif hasattr(inner, "lm_head"):
        head = inner.lm_head
    else:
        return None
    probe = mx.array([[0, 1, 2, 3]], dtype=mx.int32)
    try:
        full = model(probe, cache=make_prompt_cache(model))[:, 1:3]
        part = head(body(probe, cache=make_prompt_cache(model))[:, 1:3])
        # equal up to float32 rounding: BLAS kernels may sum in another order for fewer rows
        same = full.shape == part.shape and bool(mx.allclose(full, part, rtol=1e-4, atol=1e-5).item())
    except Exception:  # a layout we do not know: the model's own call is always right
        return None
    return (body, head) if same else None


def iter_chunk_logprobs(
    model,
    tokens: np.ndarray,
    start: int,
    end: int,
    *,
    chunk_tokens: int | None = None,
    vocab: int | None = None,
    raw: bool = False,
    logprobs: bool = True,
) -> Iterator[tuple[int, np.ndarray]]:
    """Run ``tokens`` (one chunk) through ``model`` in pieces of ``chunk_tokens`` with a KV cache.

    Yields (offset, log-probs) per piece: float32 numpy arrays [rows, V] of the scored output
    positions in that piece, ``offset`` counted from ``start``. Together they cover output
    positions [start, end): the distributions over the token that follows each of those
    positions. The log-softmax is over the first ``vocab`` logits (the reference's vocabulary).

    Logits are computed at scored rows only (:func:`scored_logits`). Each piece is started with
    ``mx.async_eval`` before the previous piece's log-probs are handed out, so the caller's
    vocabulary-wide work on piece i (numpy, which releases the GIL) overlaps the forward pass of
    piece i + 1 (on a GPU: :func:`overlap`); memory then holds two pieces' logits, never a whole
    chunk's (1 GB at 1,024 positions of a 248k vocabulary). Without overlap each piece is handed
    out as soon as it is computed and dropped before the next: one piece's logits at a time, if
    the caller lets go of it too (``del`` it before asking for the next). ``raw``: yield the
    piece's float32 MLX logits instead, for :mod:`pytest_kld.vocab` to do the vocabulary-wide
    work where it chose.

    ``logprobs=False`` runs the same forward passes, evaluated the same way, and yields
    (offset, None): a rank of a sharded model that takes part in every pass but leaves the
    vocabulary-wide work to rank 0 (:mod:`pytest_kld.shardrank`).
    """
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    n = int(tokens.shape[0])
    step = n if not chunk_tokens or chunk_tokens <= 0 else int(chunk_tokens)
    cache = make_prompt_cache(model)
    forward = scored_logits(model)
    ahead = overlap()
    evaluate = mx.async_eval if ahead else mx.eval
    ids = mx.array(tokens.astype(np.int32))[None]
    pending = None  # (offset, logits being computed) of the previous scored piece
    for s in range(0, min(n, end), step):
        e = min(n, s + step)
        lo, hi = max(start, s), min(end, e)
        if lo < hi:
            lg = forward(ids[:, s:e], cache, lo - s, hi - s)
            lg = (lg if vocab is None else lg[:, :vocab]).astype(mx.float32)
            evaluate(lg)
        else:  # nothing scored here: only the cache matters (the call updates it, lazily)
            forward(ids[:, s:e], cache, 0, 0)
            evaluate(*_cache_arrays(cache))
        if pending is not None:
            yield _yield(pending, raw, logprobs)
        pending = [lo - start, lg] if lo < hi else None
        lg = None
        if not ahead and pending is not None:  # nothing to overlap: one piece's logits alive at a time
            yield _yield(pending, raw, logprobs)
            pending = None
    if pending is not None:
        yield _yield(pending, raw, logprobs)


def _yield(pending, raw: bool, logprobs: bool):
    """A finished piece as the caller asked: log-probs, the raw MLX logits, or (offset, None)."""
    if not logprobs:
        return pending[0], None
    return (pending[0], pending[1]) if raw else _to_logprobs(pending)


def overlap() -> bool:
    """Whether piece i + 1's forward pass runs while piece i's log-probs are processed: on a GPU
    (the forward pass there leaves the CPU free for numpy), not on a CPU, where both compete for
    the same cores (measured: benchmarks/bench_perf.py). ``PYTEST_KLD_OVERLAP=0/1`` decides."""
    import os

    import mlx.core as mx

    choice = os.environ.get("PYTEST_KLD_OVERLAP", "").strip()
    if choice in ("0", "1"):
        return choice == "1"
    return mx.default_device().type != mx.cpu


def _to_logprobs(pending: list) -> tuple[int, np.ndarray]:
    """(offset, float32 numpy log-probs) of a computed piece, dropping the MLX copy first."""
    lp = np.array(pending.pop())
    return pending[0], log_softmax(lp)


def chunk_logprobs(model, tokens, start, end, *, chunk_tokens=None, vocab=None) -> np.ndarray:
    """All of :func:`iter_chunk_logprobs` as one float32 array [end - start, V]."""
    pieces = [lp for _, lp in iter_chunk_logprobs(model, tokens, start, end, chunk_tokens=chunk_tokens, vocab=vocab)]
    if not pieces:
        return np.zeros((0, vocab or 0), dtype=np.float32)
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)


def iter_corpus_logprobs(
    model,
    chunks: Sequence[np.ndarray],
    score_ranges: Sequence[tuple[int, int]],
    *,
    chunk_tokens: int | None = None,
    vocab: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    raw: bool = False,
    logprobs: bool = True,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (chunk index, row offset within the chunk's scored rows, float32 log-probs) for
    every forward piece of every chunk (see :func:`iter_chunk_logprobs`).

    ``progress(done, total)`` hears the tokens run so far: (0, total) first, then after each chunk.
    """
    total = int(sum(int(e) for _, e in score_ranges))
    done = 0
    if progress is not None:
        progress(0, total)
    for i, (toks, (s, e)) in enumerate(zip(chunks, score_ranges)):
        # Only the tokens up to the last scored output are needed.
        for row, lp in iter_chunk_logprobs(model, toks[:e], s, e, chunk_tokens=chunk_tokens, vocab=vocab,
                                           logprobs=logprobs, raw=raw):
            yield i, row, lp
            del lp  # not held while the next piece is computed
        done += int(e)
        if progress is not None:
            progress(done, total)


def logits_width(model) -> int:
    """The model's output width, read from one forward step (padding rows included)."""
    import mlx.core as mx

    return int(model(mx.array([[0]], dtype=mx.int32)).shape[-1])
