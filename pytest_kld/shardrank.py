"""One rank of a reference build sharded over MLX's distributed engine.

Started by ``mlx.launch`` (never by hand; :mod:`pytest_kld.distributed` builds the command)::

    mlx.launch --backend ring -n 2 --python PYTHON -- -m pytest_kld.shardrank --model DIR ...

Every rank loads its part of the reference with mlx-lm's ``sharded_load``: pipeline parallel
(consecutive layers per rank) where the model implements it, else tensor parallel (``shard``),
else one clear error. The forward passes are collective: every rank runs exactly the same
sequence of them (the same pieces, evaluated the same way), and each gets the full logits.
Rank 0 alone tokenises the corpus or reads the cache (it hands the ids to the other ranks through
an ``all_sum``), does the vocabulary-wide work with the single-process code
(:func:`pytest_kld.refpass.reference_pass` for a build, ``compare.run_passes`` for a comparison) and
writes its arrays into the job directory its parent made; for a build the parent validates them
and writes the cache entry under its lock (:mod:`pytest_kld.cache`).

Protocol with the parent, over ``mlx.launch``'s relayed output: ``PROGRESS done total`` lines on
stdout; ``FAILED rank N: message`` on stderr (exit 2) for an error the user can act on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from .distributed import ARRAYS, FAILED, JOB, PROGRESS, RESULT
from .errors import KldError, ModelError

INDEX = "model.safetensors.index.json"


def strategy_of(path: Path, size: int, *, trust_remote_code: bool = False) -> str:
    """``pipeline`` or ``tensor``: how mlx-lm can shard the model at ``path`` over ``size``
    ranks (its classes, read lazily: no weights are loaded), preferring pipeline. One line if
    it cannot."""
    from mlx_lm.utils import load_model

    model, config = load_model(Path(path), lazy=True, strict=False, trust_remote_code=trust_remote_code)
    if hasattr(model, "model") and hasattr(model.model, "pipeline"):
        if not (Path(path) / INDEX).is_file():
            raise ModelError(
                f"{path}: pipeline sharding reads {INDEX}, which this model directory lacks; "
                "re-save it with mlx_lm.convert (or mlx_lm.utils.save_model), which writes one"
            )
        return "pipeline"
    if hasattr(model, "shard"):
        # mlx-lm splits attention heads evenly over the ranks without checking that they divide
        text = config.get("text_config", config)
        for what in ("num_attention_heads", "num_key_value_heads"):
            n = text.get(what)
            if isinstance(n, int) and n % size:
                raise ModelError(
                    f"{path}: mlx-lm shards {getattr(model, 'model_type', 'this model')!r} tensor-parallel only "
                    f"(no pipeline support), and its {n} {what.replace('num_', '').replace('_', ' ')} do not "
                    f"divide over {size} ranks; use a rank count that divides them"
                )
        return "tensor"
    raise ModelError(
        f"{path}: model type {getattr(model, 'model_type', type(model).__name__)!r} cannot be sharded by "
        "mlx-lm (neither pipeline nor tensor parallel); build its cache on one machine"
    )


def sharded_model(path, exec_mode: str, *, group, trust_remote_code: bool = False):
    """(LoadedModel, strategy) of this rank's part of the model, for ``exec_mode`` as
    :func:`pytest_kld.forward.load_model` prepares it. Collective: every rank calls it."""
    import mlx.core as mx
    from mlx_lm.utils import sharded_load

    from .forward import LoadedModel, cast_float32, check_config, dequantize_to_float32, one_line, output_split
    from .models import check_weight_files

    path = Path(path)
    check_config(path, trust_remote_code)
    check_weight_files(path)
    strategy = strategy_of(path, group.size(), trust_remote_code=trust_remote_code)
    groups = {"pipeline_group": group} if strategy == "pipeline" else {"tensor_group": group}
    try:
        model, tokenizer = sharded_load(str(path), **groups, tokenizer_config={"trust_remote_code": trust_remote_code},
                                        trust_remote_code=trust_remote_code)
    except (ValueError, AssertionError) as e:  # e.g. more ranks than layers, heads not divisible
        raise ModelError(f"{path}: mlx-lm cannot shard this model {strategy}-parallel over "
                         f"{group.size()} ranks ({one_line(e)})") from None
    if exec_mode == "float32":
        dequantize_to_float32(model)
        cast_float32(model)
    mx.eval(model.parameters())
    # Whether logits are computed at scored rows only (forward.scored_logits) is decided by a
    # probe through the model, a collective pass: run it now, on every rank, and keep the split
    # only if every rank found it exact, so all ranks take the same path through every pass.
    split = output_split(model) or False
    agreed = mx.distributed.all_sum(mx.array(1 if split else 0, dtype=mx.int32), group=group, stream=mx.cpu)
    model._pytest_kld_split = split if int(agreed.item()) == group.size() else False
    return LoadedModel(model, tokenizer, path, exec_mode), strategy


def broadcast_ids(group, chunks=None, ranges=None):
    """Rank 0's token chunks and scored ranges on every rank ((chunks, ranges) as rank 0 gave
    them), through two ``all_sum`` of int32 vectors (the other ranks add zeros)."""
    import mlx.core as mx

    if chunks is not None:
        flat = np.concatenate([[len(chunks)], [len(c) for c in chunks], np.ravel(ranges).astype(np.int64),
                               *[np.asarray(c, np.int64) for c in chunks]]).astype(np.int32)
    n = mx.distributed.all_sum(mx.array([0 if chunks is None else flat.size], dtype=mx.int32), group=group,
                               stream=mx.cpu)
    size = int(n.item())
    mine = mx.array(flat) if chunks is not None else mx.zeros((size,), dtype=mx.int32)
    out = np.array(mx.distributed.all_sum(mine, group=group, stream=mx.cpu)).astype(np.int64)
    c = int(out[0])
    lengths = out[1 : 1 + c]
    pairs = out[1 + c : 1 + 3 * c].reshape(c, 2)
    starts = 1 + 3 * c + np.concatenate([[0], np.cumsum(lengths)])
    got = [out[starts[i] : starts[i + 1]].astype(np.int32) for i in range(c)]
    return got, [(int(s), int(e)) for s, e in pairs]


def lead(args, group) -> None:
    """Rank 0: the single-process code on a sharded model (the reference pass, or a comparison
    with a cache); its arrays and facts into the job directory (the facts last, by rename:
    their presence means the arrays are whole)."""
    work = Path(args.workdir)
    try:
        job = json.loads((work / JOB).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        job = None
    if not isinstance(job, dict) or job.get("token") != args.token:
        raise KldError(
            f"rank 0 runs on {os.uname().nodename}, which does not hold the build's job directory {work}: "
            "rank 0 must run on the machine that builds the cache (list it first in the hosts)"
        )
    used = {}

    def load(path, exec_mode, *, trust_remote_code=False):
        lm, used["strategy"] = sharded_model(path, exec_mode, group=group, trust_remote_code=trust_remote_code)
        return lm

    def progress(done, total):
        print(f"{PROGRESS} {done} {total}", flush=True)

    def share(chunks, ranges):
        broadcast_ids(group, chunks, ranges)

    hooks = {"progress": progress, "trust_remote_code": args.trust_remote_code, "load": load, "share": share}
    arrays, facts = (_build if job["task"] == "build" else _compare)(args, job, hooks)
    from safetensors.numpy import save_file

    save_file(arrays, str(work / ARRAYS))
    facts["distributed"] = {"ranks": group.size(), "strategy": used["strategy"], "backend": args.backend}
    tmp = work / (RESULT + ".tmp")
    tmp.write_text(json.dumps(facts), encoding="utf-8")
    os.replace(tmp, work / RESULT)


def _build(args, job: dict, hooks: dict) -> tuple[dict, dict]:
    from .corpus import CorpusSpec
    from .refpass import reference_pass

    return reference_pass(Path(args.model), CorpusSpec(**job["corpus"]), top_k=int(job["top_k"]),
                          chunk_tokens=args.chunk_tokens, exec_mode=args.exec, name=job["name"], **hooks)


def _compare(args, job: dict, hooks: dict) -> tuple[dict, dict]:
    """The per-position figures of the model against the cache entry ``job["cache"]``."""
    from .compare import run_passes
    from .reference import ReferenceCache

    cache = ReferenceCache.load(job["cache"], expect_key=job["key"])
    parts, exec_used, _ = run_passes(cache, Path(args.model), job["name"], args.exec, args.chunk_tokens,
                            hooks["trust_remote_code"], hooks["progress"], load=hooks["load"], share=hooks["share"])
    arrays = {name: np.concatenate([getattr(p, name) for p in parts]) if parts else np.zeros(0)
              for name in ("kl", "ref_target", "quant_target")}
    arrays["top1"] = (np.concatenate([p.top1 for p in parts]) if parts else np.zeros(0)).astype(np.uint8)
    return arrays, {"exec": exec_used}


def follow(args, group) -> None:
    """Ranks 1..N-1: the same load and the same forward passes as rank 0, nothing kept."""
    from .forward import iter_corpus_logprobs, logits_width

    lm, _ = sharded_model(Path(args.model), args.exec, group=group, trust_remote_code=args.trust_remote_code)
    chunks, ranges = broadcast_ids(group)
    vocab = logits_width(lm.model)
    for _ in iter_corpus_logprobs(lm.model, chunks, ranges, chunk_tokens=args.chunk_tokens, vocab=vocab,
                                  logprobs=False):
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pytest_kld.shardrank",
                                 description="one rank of a sharded reference build (started by mlx.launch)")
    ap.add_argument("--model", required=True, help="the reference's model directory (the same path on every host)")
    ap.add_argument("--exec", required=True, choices=("native", "float32"))
    ap.add_argument("--chunk-tokens", type=int, default=0)
    ap.add_argument("--backend", default="ring")
    ap.add_argument("--trust-remote-code", action="store_true")
    ap.add_argument("--workdir", required=True, help="rank 0: the job directory its parent made")
    ap.add_argument("--token", required=True, help="rank 0: the job's token (proves it is the parent's machine)")
    args = ap.parse_args(argv)
    args.chunk_tokens = args.chunk_tokens or None
    from .blas import prefer_system_blas

    prefer_system_blas()
    import mlx.core as mx

    # mlx.launch's jaccl-ring is the jaccl backend told (by the environment) to use a ring
    group = mx.distributed.init(backend="jaccl" if args.backend == "jaccl-ring" else args.backend, strict=True)
    rank = group.rank()
    try:
        (lead if rank == 0 else follow)(args, group)
    except KldError as e:
        print(f"{FAILED} rank {rank}: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
