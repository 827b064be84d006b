"""The ``pytest-kld`` command (also ``python -m pytest_kld``): the plugin's run path without
writing a test, with the same settings (from :mod:`pytest_kld.options`) and thresholds.

    pytest-kld compare REFERENCE QUANT [QUANT ...] [--mode short] [--mean 0.1 --p99 1.0] [--json PATH]
                      [--baselines DIR [--update-baselines] [--baseline-fail mean:5%,p99:10%]] [--name NAME]
    pytest-kld REFERENCE QUANT ...          (the same: compare is the default command)
    pytest-kld build REFERENCE              (builds or opens the cache, prints where it is)
    pytest-kld info CACHE_DIR               (what a cache entry holds)
    pytest-kld export CACHE_DIR OUT_DIR     (a cache entry as a folder to copy or upload)
    pytest-kld push OUT_DIR REPO            (that folder to a hub dataset repository)
    pytest-kld merge RESULTS.json ...       (several runners' results into one leaderboard)
    pytest-kld sensitivity REFERENCE QUANT  (which tensors cause the KLD; a recipe: see sensitivity_cli)

REFERENCE is a model (local MLX directory or hub id) or a cache entry directory (then no
reference weights are read). Exit status: 0; 1 when a threshold fails or a model is broken
(NaN/inf log-probs at more than --nonfinite positions); 2 on a usage or input error (one line).
"""

from __future__ import annotations

import argparse
import json
import sys

from .options import THRESHOLD_NAMES, add_to_argparse

COMMANDS = ("compare", "build", "info", "export", "push", "merge", "sensitivity")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(
        prog="pytest-kld",
        description="KL(reference || quant) of quantised MLX models against a reference, per token.",
    )
    ap.add_argument("--version", action="version", version=f"pytest-kld {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    cmp = sub.add_parser("compare", help="compare models with the reference (the default command)",
                         description="Compare each model with the reference, print the leaderboard.")
    cmp.add_argument("reference", help="reference: local MLX directory, hub id, or a cache entry directory")
    cmp.add_argument("quants", nargs="*", help="models to compare: local MLX directories or hub ids (with "
                     "--reference-cache every positional argument is a model)")
    add_to_argparse(cmp)
    cmp.add_argument("--name", default=None, help="the name of the one model compared: its leaderboard label and "
                     "baseline slot (default: the model's short name)")
    bld = sub.add_parser("build", help="build (or open) the reference cache and print where it is")
    bld.add_argument("reference", help="reference: local MLX directory or hub id")
    add_to_argparse(bld)
    info = sub.add_parser("info", help="what a reference cache entry holds")
    info.add_argument("cache", help="a cache entry directory (manifest.json + arrays.safetensors)")
    exp = sub.add_parser("export", help="copy a cache entry, validated, into a folder to share or upload")
    exp.add_argument("cache", help="a cache entry directory (as `build` prints)")
    exp.add_argument("out", help="the folder to write (one subfolder per entry, by mode)")
    push = sub.add_parser("push", help="upload an exported folder to a hub dataset repository (huggingface_hub)")
    push.add_argument("folder", help="a folder written by `export`")
    push.add_argument("repo", help="hub dataset repository id, e.g. org/model-kld-cache")
    push.add_argument("--private", action="store_true", help="create the repository private")
    mrg = sub.add_parser("merge", help="merge results JSON of several runs on the same cache into one leaderboard")
    mrg.add_argument("results", nargs="+", help="results JSON files (--kld-json / --json)")
    mrg.add_argument("--json", default=None, help="write the merged results here")
    mrg.add_argument("--markdown", default=None, help="write the merged leaderboard as Markdown here")
    from .sensitivity_cli import add_parser

    add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "compare")
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    from .errors import KldError

    try:
        handlers = {"compare": _compare, "build": _build, "info": _info, "export": _export, "push": _push,
                    "merge": _merge, "sensitivity": _sensitivity}
        return handlers[args.command](args)
    except KldError as e:
        print(f"pytest-kld: {e}", file=sys.stderr)
        return 2


def _settings(args) -> dict:
    from .errors import KldError
    from .options import OPTIONS, check

    s = {o.dest: getattr(args, o.dest, o.default) for o in OPTIONS}
    for o in OPTIONS:
        why = check(o.dest, s[o.dest], f"--{o.name}")
        if why:
            raise KldError(why)
    return s


def _open(s: dict):
    from .blas import prefer_system_blas

    prefer_system_blas()  # before mlx is imported
    from .progress import Progress
    from .run import open_reference

    return open_reference(s, progress=Progress(f"building reference cache {s['reference']} [{s['mode']}]"),
                          notify=lambda line: print(line, file=sys.stderr, flush=True))


def _compare(args) -> int:
    import os

    from .progress import Progress
    from .regression import gate, parse_tolerance
    from .report import display_name
    from .run import baselines_dir, compare_model, output_paths, row, write_reports
    from .thresholds import evaluate, validate

    s = _settings(args)
    quants = list(args.quants)
    if s.get("reference_cache"):  # then every positional argument is a model to compare
        quants.insert(0, args.reference)
    else:
        s["reference"] = args.reference
    if not quants:
        raise _error("compare: give the reference and at least one model to compare")
    thresholds = validate({k: getattr(args, k) for k in THRESHOLD_NAMES}, "pytest-kld")
    if args.nonfinite < 0:
        raise _error(f"--nonfinite {args.nonfinite}: must be at least 0")
    if args.name is not None and len(quants) != 1:
        raise _error(f"--name {args.name!r} names one model, but {len(quants)} are compared")
    parse_tolerance(s["baseline_fail"], "--baseline-fail")
    s["baselines"] = baselines_dir(s["baselines"], os.getcwd(), bool(s["update_baselines"]))
    output_paths(s, prefix="--")  # before any work
    cache = _open(s)
    rows, failed = [], 0
    for model in quants:
        result = compare_model(cache, s, model, name=args.name, progress=Progress(f"comparing {model}"))
        slot = args.name or display_name(str(model))
        entry, gate_message = gate(s, "cli", slot, result, s["baseline_fail"])
        message = "\n".join(m for m in (evaluate(result, thresholds, None, args.nonfinite), gate_message) if m)
        if message:
            print(f"pytest-kld: {message}", file=sys.stderr)
            failed += 1
        r = row(result, "failed" if message else "passed", {**thresholds, "nonfinite": args.nonfinite})
        rows.append(dict(r, baseline=entry) if entry else r)
    from .report import header_line, leaderboard_lines
    from .run import unique_rows

    rows = unique_rows(rows)
    print(header_line(rows))
    for line in leaderboard_lines(rows, by_category=bool(s.get("by_category"))):
        print(line)
    write_reports(s, rows)
    return 1 if failed else 0


def _sensitivity(args) -> int:
    from .sensitivity_cli import run

    return run(args, _settings(args), _open)


def _build(args) -> int:
    s = _settings(args)
    s["reference"] = args.reference
    cache = _open(s)
    print(cache.path)
    return 0


def _info(args) -> int:
    from .reference import ARRAYS, ReferenceCache

    cache = ReferenceCache.load(args.cache)
    m = cache.manifest
    facts = {
        "path": str(cache.path),
        "key": m.get("key"),
        "reference": m.get("reference"),
        "settings": m.get("settings"),
        "corpus": m.get("corpus"),
        "positions": cache.n_positions,
        "chunks": cache.n_chunks,
        "vocab_size": m.get("vocab_size"),
        "bytes": (cache.path / ARRAYS).stat().st_size,
        "bytes_per_position": m.get("bytes_per_position"),
        "created_at": m.get("created_at"),
        "versions": m.get("versions"),
    }
    print(json.dumps(facts, indent=2, default=str))
    return 0


def _export(args) -> int:
    import shutil
    from pathlib import Path

    from .reference import ARRAYS, MANIFEST, ReferenceCache

    cache = ReferenceCache.load(args.cache)  # only a valid entry travels
    mode = (cache.manifest.get("corpus") or {}).get("mode") or "corpus"
    target = Path(args.out) / f"{mode}-{cache.manifest['key'][:16]}"
    target.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST, ARRAYS):
        shutil.copyfile(cache.path / name, target / name)
    ReferenceCache.load(target)  # the copy is whole
    print(target)
    return 0


def _push(args) -> int:
    """Thin on purpose: huggingface_hub's public API does the upload (not exercised here: no hub)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(args.repo, repo_type="dataset", private=args.private, exist_ok=True)
    api.upload_folder(folder_path=args.folder, repo_id=args.repo, repo_type="dataset",
                      commit_message="pytest-kld reference cache")
    print(f"pushed {args.folder} to the dataset repo {args.repo}; use it with --kld-reference-cache={args.repo}")
    return 0


def _merge(args) -> int:
    """Rows of several results files measured against the same reference cache (quants sharded
    over runners) into one leaderboard; results of another cache or settings are refused."""
    from .report import header_line, leaderboard_lines
    from .run import output_paths, unique_rows, write_reports

    output_paths({"json": args.json, "markdown": args.markdown}, prefix="--")
    docs, rows = [], []
    for path in args.results:
        try:
            doc = json.loads(open(path, encoding="utf-8").read())
        except (OSError, ValueError) as e:
            raise _error(f"{path}: not a results file ({e})") from None
        if not isinstance(doc, dict) or doc.get("schema_version") != 1 or not isinstance(doc.get("results"), list):
            raise _error(f"{path}: not a pytest-kld results file of schema version 1")
        docs.append(doc)
        rows += [dict(r, source=path) for r in doc["results"]]
    keys = {(r.get("cache") or {}).get("key") for r in rows}
    if len(keys) > 1 or None in keys:
        raise _error(f"the results were measured against different reference caches ({len(keys)} keys: "
                     "other corpus, settings, reference or tokenizer); merge only runs of one cache")
    rows = unique_rows(rows)
    print(header_line(rows))
    for line in leaderboard_lines(rows):
        print(line)
    settings = dict(docs[0].get("settings") or {}, json=args.json, markdown=args.markdown, chart=None)
    write_reports(settings, rows)
    return 1 if any(r.get("outcome") == "failed" for r in rows) else 0


def _error(message: str):
    from .errors import KldError

    return KldError(message)
