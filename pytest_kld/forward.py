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

EXEC_MODES = ("auto", "native", "float32")


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
    config: dict
    path: Path
    exec: str
    n_dequantized: int = 0

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

    exec_used = resolve_exec(exec_mode)
    _check_config(Path(path), trust_remote_code)
    try:
        model, tokenizer, config = load(
            str(path),
            tokenizer_config={"trust_remote_code": trust_remote_code},
            return_config=True,
            trust_remote_code=trust_remote_code,
        )
    except ValueError as e:
        msg = _one_line(e)
        if "not supported" in msg or "Model type" in msg:
            raise ModelError(
                f"{path}: unsupported model architecture ({msg}); "
                "pytest-kld runs the architectures that mlx-lm supports"
            ) from None
        raise ModelError(f"{path}: mlx-lm could not load this model: {msg}") from None
    except FileNotFoundError as e:
        raise ModelError(f"{path}: not a loadable MLX model ({e})") from None
    except (KeyError, TypeError, AttributeError, OSError) as e:  # a config.json mlx-lm cannot use
        msg = _one_line(e)
        raise ModelError(
            f"{path}: mlx-lm could not build this model from its files ({type(e).__name__}: {msg}); "
            "check config.json, the weights and the tokenizer files"
        ) from None
    n_deq = 0
    if exec_used == "float32":
        n_deq = dequantize_to_float32(model)
        cast_float32(model)
    mx.eval(model.parameters())
    return LoadedModel(model, tokenizer, config, Path(path), exec_used, n_deq)


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's whole message on one line (several libraries spread theirs over lines)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_config(path: Path, trust_remote_code: bool) -> None:
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


def iter_chunk_logprobs(
    model,
    tokens: np.ndarray,
    start: int,
    end: int,
    *,
    chunk_tokens: int | None = None,
    vocab: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Run ``tokens`` (one chunk) through ``model`` in pieces of ``chunk_tokens`` with a KV cache.

    Yields (offset, log-probs) per piece: float32 numpy arrays [rows, V] of the scored output
    positions in that piece, ``offset`` counted from ``start``. Together they cover output
    positions [start, end): the distributions over the token that follows each of those
    positions. The log-softmax is over the first ``vocab`` logits (the reference's vocabulary).
    Memory holds one piece's logits at a time, not a whole chunk's (1 GB at 1,024 positions of a
    248k vocabulary).

    The vocabulary-wide work after the forward pass (log-softmax here, top-K and tails in
    divergence.py) runs in numpy: on a CPU, MLX's elementwise exp and argpartition over
    [n, V] are 5-10x slower than numpy's (benchmarks/bench_pipeline.py).
    """
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    n = int(tokens.shape[0])
    step = n if not chunk_tokens or chunk_tokens <= 0 else int(chunk_tokens)
    cache = make_prompt_cache(model)
    ids = mx.array(tokens.astype(np.int32))[None]
    for s in range(0, n, step):
        e = min(n, s + step)
        logits = model(ids[:, s:e], cache=cache)[0]
        lo, hi = max(start, s), min(end, e)
        if lo < hi:
            lg = logits[lo - s : hi - s]
            if vocab is not None:
                lg = lg[:, :vocab]
            yield lo - start, log_softmax(np.array(lg.astype(mx.float32)))
        else:
            mx.eval(logits[-1:], *_cache_arrays(cache))
        if e >= end:
            break


def chunk_logprobs(model, tokens, start, end, *, chunk_tokens=None, vocab=None) -> np.ndarray:
    """All of :func:`iter_chunk_logprobs` as one float32 array [end - start, V]."""
    pieces = [lp for _, lp in iter_chunk_logprobs(model, tokens, start, end, chunk_tokens=chunk_tokens, vocab=vocab)]
    if not pieces:
        return np.zeros((0, vocab or 0), dtype=np.float32)
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)


def logsumexp(a: np.ndarray) -> np.ndarray:
    """log Σ exp over the last axis, float32, stable; -inf for a row that is all -inf."""
    m = np.max(a, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, np.float32(0))
    with np.errstate(divide="ignore"):
        return (np.log(np.sum(np.exp(a - m), axis=-1, keepdims=True)) + m)[..., 0]


def log_softmax(lg: np.ndarray) -> np.ndarray:
    """Float32 log-softmax over the last axis, in place on ``lg`` (a fresh copy of the logits)."""
    lg -= logsumexp(lg)[..., None]
    return lg


def iter_corpus_logprobs(
    model,
    chunks: Sequence[np.ndarray],
    score_ranges: Sequence[tuple[int, int]],
    *,
    chunk_tokens: int | None = None,
    vocab: int | None = None,
    progress: Callable[[int, int], None] | None = None,
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
        for row, lp in iter_chunk_logprobs(model, toks[:e], s, e, chunk_tokens=chunk_tokens, vocab=vocab):
            yield i, row, lp
        done += int(e)
        if progress is not None:
            progress(done, total)


def logits_width(model) -> int:
    """The model's output width, read from one forward step (padding rows included)."""
    import mlx.core as mx

    return int(model(mx.array([[0]], dtype=mx.int32)).shape[-1])
