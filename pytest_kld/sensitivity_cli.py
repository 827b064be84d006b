"""``pytest-kld sensitivity REFERENCE QUANT``: the groups whose damage matters, a recipe, its check.

    pytest-kld sensitivity REFERENCE QUANT [--bits 8] [--budget 1024] [--target-bpw B | --target-kld X]
                           [--recipe STEM] [--verify DIR] [--json F] [--markdown F] [--top N]

Ranks every group of tensors of QUANT by the mean KL(reference || quant) saved when it is put back
at ``--bits`` (:mod:`pytest_kld.sensitivity`), on ``--budget`` sampled positions of the reference
cache (built as ``compare`` builds it: ``--mode`` and the other settings apply). With a target, a
greedy recipe (:mod:`pytest_kld.recipe`): ``--recipe STEM`` writes ``STEM.py`` (a
``quant_predicate`` for ``mlx_lm.convert``) and ``STEM.json``; ``--verify DIR`` builds it there with
mlx-lm and measures it on the whole corpus against the quant, predicted against measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import KldError
from .options import SENSITIVITY_BITS, SENSITIVITY_BUDGET, add_to_argparse


def add_parser(sub) -> None:
    sp = sub.add_parser("sensitivity", help="which groups of tensors cause a quant's KLD, and a recipe that "
                        "keeps the best of them at more bits",
                        description="Rank groups of tensors by the KLD saved when put back at more bits.")
    sp.add_argument("reference", help="reference: local MLX directory or hub id (its weights are read)")
    sp.add_argument("quant", help="the quant: local MLX directory or hub id, made from the reference")
    add_to_argparse(sp)
    sp.add_argument("--bits", type=int, default=SENSITIVITY_BITS, metavar="B",
                    help=f"width a group is put back at, 2-8; 0: the reference's own dtype (default: {SENSITIVITY_BITS})")
    sp.add_argument("--budget", type=int, default=SENSITIVITY_BUDGET, metavar="N",
                    help=f"scored positions sampled across chunks and categories (default: {SENSITIVITY_BUDGET})")
    sp.add_argument("--fine-roles", type=int, default=None, metavar="K",
                    help="coarse to fine: each role across all layers first, then the layers of the K roles that "
                    "save most per added bit (default: every group of every layer)")
    sp.add_argument("--group-sizes", default="", metavar="G[,G]",
                    help="also measure each group at its own bits with these smaller group sizes (e.g. 32: a "
                    "4-bit g64 group at 4 bits g32), steps a recipe may take; one more pass per group and size "
                    "(default: none)")
    sp.add_argument("--top", type=int, default=None, metavar="N", help="print the N first groups (default: all)")
    sp.add_argument("--target-bpw", type=float, default=None, metavar="B", help="recipe: bits per weight to reach")
    sp.add_argument("--target-kld", type=float, default=None, metavar="X", help="recipe: predicted mean KLD to reach")
    sp.add_argument("--recipe", default=None, metavar="STEM", help="write the recipe to STEM.py and STEM.json")
    sp.add_argument("--verify", default=None, metavar="DIR", help="build the recipe with mlx-lm in DIR (new) and "
                    "measure it on the whole corpus")


def run(args, settings: dict, open_cache) -> int:
    """The command, given the checked settings and the function that opens the reference cache."""
    from .progress import Progress
    from .run import is_cache_dir, output_paths
    from .sensitivity import public

    if not (args.bits == 0 or 2 <= args.bits <= 8):
        raise KldError(f"--bits {args.bits}: choose 2 to 8, or 0 for the reference's own dtype")
    if args.budget < 1:
        raise KldError(f"--budget {args.budget}: must be at least 1")
    args.group_sizes = _group_sizes(args.group_sizes)
    if (args.recipe or args.verify) and args.target_bpw is None and args.target_kld is None:
        raise KldError("--recipe and --verify need --target-bpw or --target-kld")
    settings["reference"] = args.reference
    output_paths(settings, prefix="--")
    if args.recipe:  # the report written last would replace the recipe's own file
        stem = Path(args.recipe).resolve()
        for opt in ("json", "markdown"):
            if settings.get(opt) and Path(settings[opt]).resolve() in (stem.with_suffix(".json"), stem.with_suffix(".py")):
                raise KldError(f"--{opt} {settings[opt]} is a file --recipe {args.recipe} writes: give the report "
                               "another name")
    cache = open_cache(settings)
    reference = _reference_weights(args.reference, cache, is_cache_dir(args.reference))
    doc = _measure(cache, reference, args, Progress(f"sensitivity of {args.quant}"))
    report = {"sensitivity": public(doc)}
    if args.target_bpw is not None or args.target_kld is not None:
        report["recipe"] = _recipe(cache, reference, doc, args)
    for line in _text(doc, report, args.top):
        print(line)
    if settings.get("json"):
        from .files import write_text
        from .run import strict

        write_text(settings["json"], json.dumps(strict(report), indent=2, allow_nan=False))
    if settings.get("markdown"):
        from .files import write_text

        write_text(settings["markdown"], "\n".join(markdown(doc, report)) + "\n")
    return 0


def _group_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(v) for v in text.replace(",", " ").split()}))
    except ValueError:
        sizes = (0,)
    if any(g not in (32, 64) for g in sizes):
        raise KldError(f"--group-sizes {text}: give 32 or 64 (smaller than the quant's own group size, "
                       "which affine quantisation takes), comma-separated")
    return sizes


def _reference_weights(reference: str, cache, given_cache: bool) -> str:
    if not given_cache:
        return reference
    path = (cache.manifest.get("reference") or {}).get("path")
    if not path or not Path(path, "config.json").is_file():
        raise KldError(f"{reference} is a cache entry, and its reference's weights are not at {path}: sensitivity "
                       "reads them; give the reference model itself")
    return path


def _measure(cache, reference, args, progress) -> dict:
    from .sensitivity import check_budget, measure

    doc = measure(cache, reference, args.quant, bits=args.bits, budget=args.budget, fine_roles=args.fine_roles,
                  group_sizes=args.group_sizes, progress=progress,
                  notify=lambda line: print(line, file=sys.stderr, flush=True))
    check_budget(doc)
    return doc


def _recipe(cache, reference, doc, args) -> dict:
    """Plan (measuring the widths chosen below --bits, then planning again); write; verify."""
    from .progress import Progress
    from .recipe import plan_measured, verify, write
    from .sensitivity import measure

    def remeasure(extra):
        return measure(cache, reference, args.quant, bits=args.bits, budget=args.budget, extra=extra,
                       fine_roles=args.fine_roles, group_sizes=args.group_sizes,
                       progress=Progress(f"sensitivity of {args.quant} at the recipe's widths"))

    recipe, new = plan_measured(doc, remeasure, target_bpw=args.target_bpw, target_kld=args.target_kld)
    doc.update(new)
    if recipe["groups"]:  # the summed single savings checked in one pass with every group put back
        from .recipe import calibrated
        from .sensitivity import together

        def joint(current, chosen):
            return together(cache, reference, args.quant, current, chosen,
                            progress=Progress(f"the recipe's groups together on {args.quant}'s sample"),
                            notify=lambda line: print(line, file=sys.stderr, flush=True))

        recipe, new = calibrated(doc, recipe, remeasure, joint, target_bpw=args.target_bpw,
                                 target_kld=args.target_kld)
        doc.update(new)
    if args.recipe:
        py, js = write(recipe, args.recipe)
        print(f"pytest-kld: recipe written to {py} (quant_predicate) and {js}", file=sys.stderr)
    if args.verify:
        from .hub import resolve_model

        v = verify(cache, reference, resolve_model(args.quant), recipe, args.verify,
                   progress=Progress(f"verifying the recipe built in {args.verify}"))
        recipe["verified"] = {k: v[k] for k in v if k not in ("kl", "chunk")}
    return recipe


def _text(doc: dict, report: dict, top) -> list[str]:
    from .explain import table
    from .groups import spell
    from .sensitivity import finer_widths, lines, ranking

    out = lines(doc, top)
    for w in finer_widths(doc):
        out += [f"at a finer group instead ({spell(w)}; --group-sizes):"] + table(ranking(doc, w, coarse=False)[:top])
    r = report.get("recipe")
    if r:
        out.append(f"recipe (greedy by KLD saved per added bit): {r['quant_bpw']:.3f} -> {r['predicted_bpw']:.3f} "
                   f"bits/weight, predicted mean {r['quant_mean']:.5f} -> {r['predicted_mean']:.5f}")
        for g in r["groups"]:
            out.append(f"  {g['group']:<28} {spell(g['width']):>16}  saves {g['predicted_saving']:+.5f}  +{g['added_bpw']:.4f} bits/w"
                       + ("" if g["measured_at_width"] else "  (predicted from --bits)"))
        t = r.get("together")
        if t:
            out.append(f"the groups put back together, on the same {doc['positions']} positions: saving {t['diff']:+.5f} "
                       f"[{t['low']:+.5f}, {t['high']:+.5f}] (the sum of their single savings: "
                       f"{r['predicted_saving']:+.5f}; savings do not add exactly)")
        if r.get("target_kld") is not None:
            replanned = "" if r["planned_kld"] == r["target_kld"] else (
                f"; planned again on the single savings for {r['planned_kld']:.5f}, as they overpredict")
            out.append(f"target mean {r['target_kld']:.5f}: the groups together read {r['quant_mean'] - t['diff']:.5f} "
                       f"on the sample, {'reached' if r['reached'] else 'NOT reached (no more groups fit)'}{replanned}")
        v = r.get("verified")
        if v:
            m = v["measured"]
            out.append(f"verified on {v['positions']} positions: built {v['bits_per_weight']:.3f} bits/weight, mean "
                       f"{v['quant_mean']:.5f} -> {v['recipe_mean']:.5f}; saving measured {m['diff']:+.5f} "
                       f"[{m['low']:+.5f}, {m['high']:+.5f}], predicted {v['predicted']:+.5f} (off by {v['off_by']:+.5f})")
    return out


def markdown(doc: dict, report: dict) -> list[str]:
    from .explain import markdown_table, what
    from .groups import spell
    from .sensitivity import finer_widths, ranking

    out = [f"### Sensitivity of {doc['model']}", "",
           f"Mean {doc['direction']} saved by putting one group back ({what(doc['bits'])}), paired with the quant "
           f"({doc['positions']} positions, {len(doc['chunks'])} chunks).", ""] + markdown_table(ranking(doc))
    for w in finer_widths(doc):
        out += ["", f"At a finer group instead ({spell(w)}):", ""] + markdown_table(ranking(doc, w, coarse=False))
    r = report.get("recipe")
    if r:
        out += ["", f"Recipe: {r['quant_bpw']:.3f} → {r['predicted_bpw']:.3f} bits/weight, predicted mean "
                f"{r['quant_mean']:.5f} → {r['predicted_mean']:.5f}: "
                + ", ".join(f"{g['group']} at {spell(g['width'])}" for g in r["groups"])]
    return out
