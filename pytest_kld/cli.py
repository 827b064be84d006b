"""The command line: the same comparison as the plugin, without writing a test.

    python -m pytest_kld REFERENCE QUANT [QUANT ...] [--mode short] [--top-k 256] [--json PATH]

Builds (or loads) the reference cache, compares each quant in turn (one model in memory at a
time) and prints the leaderboard. Exit status: 0; 1 when a model is broken (NaN or inf
log-probs at more than --nonfinite positions); 2 on a usage or input error (one line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pytest_kld",
        description="KL(reference || quant) of quantised MLX models against a reference, per token.",
    )
    ap.add_argument("reference", help="reference model: local MLX directory or hub id")
    ap.add_argument("quants", nargs="+", help="models to compare: local MLX directories or hub ids")
    ap.add_argument("--mode", default="short", choices=("short", "long", "file"))
    ap.add_argument("--dataset", default=None, help="corpus file for --mode file (.txt, .jsonl, .parquet)")
    ap.add_argument("--top-k", type=int, default=256)
    ap.add_argument("--n-ctx", type=int, default=None)
    ap.add_argument("--n-chunks", type=int, default=None)
    ap.add_argument("--chunk-tokens", type=int, default=512)
    ap.add_argument("--exec", default="auto", choices=("auto", "native", "float32"))
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--lock-timeout", type=int, default=600,
                    help="seconds to wait for another process's build once it shows no sign of life (default: 600)")
    ap.add_argument("--allow-shared-cache", action="store_true",
                    help="use a cache directory that other users can write (they could plant entries)")
    ap.add_argument("--no-chat-template", action="store_true")
    ap.add_argument("--by-category", action="store_true")
    ap.add_argument("--json", default=None, help="write every result (no per-position arrays) here")
    ap.add_argument("--nonfinite", type=int, default=0, metavar="N",
                    help="positions with NaN or inf log-probs a model may have before it fails (default: 0)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json:  # fail now, not after every comparison has run
        parent = os.path.dirname(os.path.abspath(os.path.expanduser(args.json)))
        if not os.path.isdir(parent):
            print(f"pytest-kld: --json {args.json}: directory {parent} does not exist", file=sys.stderr)
            return 2
    if args.nonfinite < 0:
        print(f"pytest-kld: --nonfinite {args.nonfinite}: must be at least 0", file=sys.stderr)
        return 2
    from .blas import prefer_system_blas

    prefer_system_blas()  # before mlx is imported
    from .compare import compare
    from .corpus import corpus_spec
    from .errors import KldError
    from .files import write_text
    from .plugin import _jsonable, _strict, nonfinite_line
    from .reference import Settings, ensure_reference
    from .report import header_line, leaderboard_lines, result_row

    def progress(done: int, total: int) -> None:
        end = "\n" if done >= total else "\r"
        print(f"pytest-kld: reference pass {done}/{total} tokens", end=end, file=sys.stderr, flush=True)

    try:
        spec = corpus_spec(
            args.mode, dataset=args.dataset, n_ctx=args.n_ctx, n_chunks=args.n_chunks,
            chat_template=not args.no_chat_template,
        )
        settings = Settings(top_k=args.top_k, chunk_tokens=args.chunk_tokens, exec=args.exec)
        cache = ensure_reference(args.reference, spec, settings, cache_dir=args.cache_dir,
                                 rebuild=args.rebuild, progress=progress, lock_timeout=args.lock_timeout,
                                 allow_shared_cache=args.allow_shared_cache)
        rows, failed = [], 0
        for model in args.quants:
            print(f"pytest-kld: comparing {model}", file=sys.stderr, flush=True)
            result = compare(cache, model)
            line = nonfinite_line(result, args.nonfinite)
            if line:
                print(f"pytest-kld: {result.model} is broken: {line}", file=sys.stderr)
                failed += 1
            rows.append(result_row(result, "failed" if line else "passed"))
    except KldError as e:
        print(f"pytest-kld: {e}", file=sys.stderr)
        return 2
    print(header_line(rows))
    for line in leaderboard_lines(rows, by_category=args.by_category):
        print(line)
    if args.json:
        doc = {"direction": "KL(reference || quant)", "results": rows}
        text = json.dumps(_strict(json.loads(json.dumps(doc, default=_jsonable))), indent=2, allow_nan=False)
        write_text(args.json, text)
    return 1 if failed else 0
