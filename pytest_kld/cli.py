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
    pytest-kld doctor                       (this machine: CPU, the BLAS chosen for MLX and why)
    pytest-kld card RESULTS.json QUANT      (the quant's figures into its model card, README.md)
    pytest-kld sensitivity REFERENCE QUANT  (which tensors cause the KLD; a recipe: see sensitivity_cli)

REFERENCE is a model (local MLX directory or hub id) or a cache entry directory (then no
reference weights are read). Exit status: 0; 1 when a threshold fails or a model is broken
(NaN/inf log-probs at more than --nonfinite positions); 2 on a usage or input error (one line).
"""

from __future__ import annotations

import argparse
import json
import sys

from .options import add_to_argparse, threshold_names

COMMANDS = ("compare", "build", "info", "export", "push", "merge", "doctor", "card", "sensitivity")


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
    sub.add_parser("doctor", help="this machine: the CPU's instruction sets, the BLAS chosen for MLX and why "
                   "others were refused")
    crd = sub.add_parser("card", help="write a quant's figures into its model card (README.md)")
    crd.add_argument("results", help="a results JSON file (--kld-json / --json) holding the quant's row")
    crd.add_argument("quant", help="the quant: a local model directory or a hub repo id (matched by weights fingerprint)")
    crd.add_argument("--out", default=None, help="directory to write README.md into (default: the quant's directory)")
    crd.add_argument("--push", nargs="?", const=True, default=None, metavar="REPO",
                     help="upload the card to this hub model repo (default: QUANT when it is a hub repo id)")
    mrg.add_argument("--by-category", action="store_true", default=None,
                     help="add mean KLD per corpus category to the leaderboard (default: as the first run was set)")
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
                    "merge": _merge, "doctor": _doctor, "card": _card, "sensitivity": _sensitivity}
        return handlers[args.command](args)
    except KldError as e:
        text = str(e)  # one prefix, even for a message that already carries it
        print(text if text.startswith("pytest-kld:") else f"pytest-kld: {text}", file=sys.stderr)
        return 2


def _settings(args) -> dict:
    """The settings of the command's flags, checked, baselines under the working directory
    (:func:`pytest_kld.step.prepare`)."""
    import os

    from .options import OPTIONS
    from .step import prepare

    return prepare({o.dest: getattr(args, o.dest, o.default) for o in OPTIONS}, prefix="--", root=os.getcwd())


def _doctor(args) -> int:
    from .blas import doctor

    print("\n".join(doctor()))
    return 0


def _open(s: dict):
    from .blas import fallback_warning, prefer_system_blas

    prefer_system_blas()  # before mlx is imported
    if fallback_warning():
        print(fallback_warning(), file=sys.stderr, flush=True)
    from .progress import Progress
    from .run import open_reference

    return open_reference(s, progress=Progress(f"building reference cache {s['reference']} [{s['mode']}]"),
                          notify=lambda line: print(line, file=sys.stderr, flush=True))


def _compare(args) -> int:
    from .progress import Progress
    from .run import collect, summary_lines, write_reports
    from .step import limits, measure

    s = _settings(args)
    quants = list(args.quants)
    if s.get("reference_cache"):  # then every positional argument is a model to compare
        quants.insert(0, args.reference)
    else:
        s["reference"] = args.reference
    if not quants:
        raise _error("compare: give the reference and at least one model to compare")
    if args.nonfinite < 0:
        raise _error(f"--nonfinite {args.nonfinite}: must be at least 0")
    checks = limits(s, {k: getattr(args, k) for k in threshold_names() if getattr(args, k) is not None},
                    nonfinite=args.nonfinite, where="pytest-kld")
    if args.name is not None and len(quants) != 1:
        raise _error(f"--name {args.name!r} names one model, but {len(quants)} are compared")
    if s.get("baselines"):
        from .board import display_name

        slots = [args.name or display_name(str(m)) for m in quants]
        if len(set(slots)) < len(slots):
            same = next(x for x in slots if slots.count(x) > 1)
            raise _error(f"two models share the baseline slot {same!r} (directories with the same last name); "
                         "compare them in separate runs with --name")
    cache = _open(s)
    rows, failed = [], 0
    for model in quants:
        m = measure(cache, s, model, checks, test="cli", name=args.name, progress=Progress(f"comparing {model}"),
                    explain_progress=Progress(f"sensitivity of {model}"))
        if m.message:
            print(f"pytest-kld: {m.message}", file=sys.stderr)
            failed += 1
        rows.append(m.row)
    board = collect(rows)
    for line in summary_lines(s, board):
        print(line)
    write_reports(s, board)
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
    mode = "".join(ch for ch in str((cache.manifest.get("corpus") or {}).get("mode")) if ch.isalnum())[:16]
    target = Path(args.out) / f"{mode or 'corpus'}-{cache.manifest['key'][:16]}"  # inside out, whatever the mode
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
    from .run import collect, output_paths, summary_lines, write_reports

    output_paths({"json": args.json, "markdown": args.markdown}, prefix="--")
    docs, rows = [], []
    for path in args.results:
        doc = _results_file(path)
        docs.append(doc)
        rows += [dict(r, source=path) for r in doc["results"]]
    keys = {(r.get("cache") or {}).get("key") for r in rows}
    if len(keys) > 1 or None in keys:
        raise _error(f"the results were measured against different reference caches ({len(keys)} keys: "
                     "other corpus, settings, reference or tokenizer); merge only runs of one cache")
    settings = dict(docs[0].get("settings") or {}, json=args.json, markdown=args.markdown, chart=None)
    board = collect(rows)
    for line in summary_lines(settings, board, by_category=args.by_category):
        print(line)
    write_reports(settings, board)
    return 1 if any(r.get("outcome") == "failed" for r in board.rows) else 0


def _card(args) -> int:
    from .card import write_card

    readme, pushed = write_card(args.results, args.quant, out=args.out, push=args.push)
    print(f"wrote {readme}" + (f" and pushed it to the hub model repo {pushed}" if pushed else ""))
    return 0


def _results_file(path: str) -> dict:
    """A results file given to ``merge``: JSON within limits (files.read_json), of schema version
    1, its results a list of objects; the fields a merge reads checked by type."""
    from .errors import KldError
    from .files import control_text, read_json

    try:
        doc = read_json(path)
    except (OSError, KldError) as e:
        raise _error(f"{path}: not a results file ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema_version") != 1 or not isinstance(doc.get("results"), list):
        raise _error(f"{path}: not a pytest-kld results file of schema version 1")
    why = _rows_problem(doc)
    where = control_text(doc)
    why = why or (f"control characters in {where}" if where else None)
    if why:
        raise _error(f"{path}: not a pytest-kld results file ({why})")
    return doc


_NUMBERS = ("mean", "se", "se_cluster", "ci95_low", "ci95_high", "median", "p95", "p99", "max", "top1", "count",
            "nonfinite", "nonfinite_share", "bpw", "size_mb", "mean_per_bit", "top_k")


def _rows_problem(doc: dict) -> str | None:
    """What in a results document's rows a merge could not read (one phrase), or None."""
    def number(v):
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))

    if not isinstance(doc.get("settings", {}), dict):
        return "settings is not an object"
    for i, r in enumerate(doc["results"]):
        if not isinstance(r, dict):
            return f"results[{i}] is not an object"
        for k in ("summary", "categories", "info", "cache", "chunks", "thresholds", "margins", "baseline", "max_at"):
            if not isinstance(r.get(k, {}), (dict, type(None))):
                return f"results[{i}].{k} is not an object"
        bad = [k for k in _NUMBERS if not number(r.get(k))]
        bad += [f"summary.{k}" for k, v in (r.get("summary") or {}).items() if not number(v)]
        bad += [f"categories.{c}" for c, v in (r.get("categories") or {}).items()
                if not isinstance(v, dict) or not all(number(x) for x in v.values())]
        chunks = r.get("chunks") or {}
        if chunks and not (isinstance(chunks.get("sum"), list) and isinstance(chunks.get("count"), list)
                           and len(chunks["sum"]) == len(chunks["count"])
                           and all(number(x) and x is not None for x in chunks["sum"] + chunks["count"])):
            bad.append("chunks")
        if bad:
            return f"results[{i}].{bad[0]} is not a number"
    return None


def _error(message: str):
    from .errors import KldError

    return KldError(message)
