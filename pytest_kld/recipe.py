"""A mixed-precision recipe from a sensitivity ranking (:mod:`pytest_kld.sensitivity`): which
groups to keep at more bits for the fewest added bits, written as mlx-lm's ``quant_predicate``,
and verified by building it with mlx-lm and comparing it on the whole corpus.

The choice is greedy by KLD saved per added bit. Each group may be raised to any width above its
lowest quantised one, up to the ranking's ``bits`` (7 skipped); each step takes the upgrade
(a group from its current width to a higher one) with the largest predicted saving per added
bit of the whole model that still fits ``target_bpw``, until none fits or the predicted mean
KLD reaches ``target_kld``. A saving measured at that width is used as it is; an unmeasured
width's is predicted from the one measured at ``bits``, taking a matrix's damage to fall as its
quantisation noise's variance, by 4 per bit (RTN: the step halves per bit):

    saving(w) = saving(bits) · (1 − 4^−(w − c)) / (1 − 4^−(bits − c)),   c = the group's lowest width

A finer group size at the group's own width (``"4g32"`` for a 4-bit g64 group: twice the scales,
half the added bits of a 5th bit) is a step too when the ranking measured it (``--group-sizes``);
it is never predicted.

Savings of several groups do not add exactly (a damaged layer's error propagates through the
others); :func:`verify` measures the built recipe, and how far off the prediction was.

The recipe reproduces the quant's own layout (its per-module widths, group sizes, modes — affine,
mxfp4, nvfp4, mxfp8 — and float matrices) with round-to-nearest quantisation from the reference,
the raised groups affine (at the quant's group size where affine takes it, else 32): a GPTQ, AWQ
or DWQ quant's calibrated weights are not what ``mlx_lm.convert`` makes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import KldError
from .groups import FLOAT, Group, added_bpw, affine_group, elevated, step, widths


class _Sizes:  # what added_bpw reads from a Layout
    def __init__(self, doc: dict):
        self.params, self.ref_dtype_bytes = doc["params"], doc["ref_dtype_bytes"]


def predicted_saving(doc: dict, group: Group, width) -> float:
    """The saving of putting ``group`` back at ``width``: measured, else scaled from ``bits`` (a
    finer group size is only ever measured: 0 when it was not)."""
    s = doc["savings"].get(group.name, {})
    if str(width) in s:
        return float(s[str(width)]["diff"])
    top = doc["bits"]
    if step(width)[1] is not None:
        return 0.0
    low = min((m.bits for m in group.modules if m.quantized), default=None)
    if str(top) not in s or low is None or top == FLOAT:
        return 0.0
    return float(s[str(top)]["diff"]) * (1 - 4.0 ** -(width - low)) / (1 - 4.0 ** -(top - low))


def plan(doc: dict, *, target_bpw: float | None = None, target_kld: float | None = None) -> dict:
    """The recipe: the groups raised, their widths, the predicted bits per weight and mean KLD."""
    if target_bpw is None and target_kld is None:
        raise KldError("a recipe needs --target-bpw or --target-kld")
    base_bpw, base_mean = float(doc["bits_per_weight"]), float(doc["base_mean"])
    if target_bpw is not None and target_bpw < base_bpw:
        raise KldError(f"--target-bpw {target_bpw}: below the quant's own {base_bpw:.3f} bits per weight; "
                       "a recipe only adds bits")
    room = math.inf if target_bpw is None else target_bpw - base_bpw
    bpw = _Sizes(doc)
    groups = [Group.from_dict(g) for g in doc["groups"]]
    chosen: dict[str, int | str] = {}
    spent = saved = 0.0
    while target_kld is None or base_mean - saved > target_kld:
        best = None
        for g in groups:
            cur = chosen.get(g.name)
            s0 = predicted_saving(doc, g, cur) if cur is not None else 0.0
            b0 = added_bpw(g, cur, bpw) if cur is not None else 0.0
            finer = {step(k)[1] for k in doc["savings"].get(g.name, {}) if "g" in k}  # finer groups measured
            for w in widths(g, doc["bits"], finer):
                if cur == FLOAT:
                    break
                ds, db = predicted_saving(doc, g, w) - s0, added_bpw(g, w, bpw) - b0
                if ds > 0 and db > 0 and spent + db <= room + 1e-12 and (best is None or ds / db > best[0]):
                    best = (ds / db, g.name, w, ds, db)
        if best is None:
            break
        _, name, w, ds, db = best
        chosen[name], spent, saved = w, spent + db, saved + ds
    by_name = {g.name: g for g in groups}
    return {
        "model": doc["model"], "direction": doc["direction"], "bits": doc["bits"],
        "quant_bpw": base_bpw, "quant_mean": base_mean,
        "predicted_bpw": base_bpw + spent, "predicted_saving": saved, "predicted_mean": base_mean - saved,
        "target_bpw": target_bpw, "target_kld": target_kld,
        "groups": [{"group": n, "width": w, "predicted_saving": predicted_saving(doc, by_name[n], w),
                    "measured_at_width": str(w) in doc["savings"].get(n, {}),
                    "added_bpw": added_bpw(by_name[n], w, bpw)} for n, w in chosen.items()],
        **_modules(groups, chosen),
    }


def plan_measured(doc: dict, remeasure, *, target_bpw: float | None = None,
                  target_kld: float | None = None) -> tuple[dict, dict]:
    """(recipe, doc): :func:`plan`, then the widths it chose below the ranking's ``bits`` measured
    (``remeasure(list of (group, width)) -> doc``, coarse to fine in width) and planned again."""
    recipe = plan(doc, target_bpw=target_bpw, target_kld=target_kld)
    guessed = [(g["group"], g["width"]) for g in recipe["groups"] if not g["measured_at_width"]]
    if guessed and doc["bits"] != FLOAT:
        doc = remeasure(guessed)
        recipe = plan(doc, target_bpw=target_bpw, target_kld=target_kld)
    return recipe, doc


def calibrated(doc: dict, recipe: dict, remeasure, joint, *, target_bpw: float | None = None,
               target_kld: float | None = None, rounds: int = 3) -> tuple[dict, dict]:
    """(recipe, doc) with ``recipe["together"]``: the chosen groups' saving measured with all of
    them put back at once on the ranking's sample (``joint(doc, list of (group, width)) -> {diff,
    se, low, high}``), which summed single savings overpredict. With ``target_kld``: while the mean
    measured that way misses the target, plan again (:func:`plan_measured`), asking the sums for
    the shortfall scaled by how far they overpredicted, at most ``rounds`` times;
    ``recipe["planned_kld"]`` is the target the last plan was made for, ``recipe["reached"]``
    whether the groups together reach ``target_kld`` on the sample."""
    base, planned = float(doc["base_mean"]), target_kld
    for i in range(rounds + 1):
        t = recipe["together"] = joint(doc, [(g["group"], g["width"]) for g in recipe["groups"]])
        if target_kld is None or base - t["diff"] <= target_kld or t["diff"] <= 0 or i == rounds:
            break
        planned = base - (base - target_kld) * recipe["predicted_saving"] / t["diff"]
        again, doc = plan_measured(doc, remeasure, target_bpw=target_bpw, target_kld=planned)
        if again["groups"] == recipe["groups"]:  # nothing more fits: the budget or the groups are spent
            break
        recipe = again
    recipe["target_kld"], recipe["planned_kld"] = target_kld, planned
    if target_kld is not None:
        recipe["reached"] = base - recipe["together"]["diff"] <= target_kld
    return recipe, doc


def _modules(groups: list[Group], chosen: dict[str, int]) -> dict:
    """``{"base": {bits, group_size, mode}, "modules": {path: params | False}}``: every matrix not
    at the base (the quant's own overrides and float matrices, and the raised groups, affine)."""
    weight: dict[tuple, int] = {}
    for g in groups:
        for m in g.modules:
            if m.quantized:
                key = (m.bits, m.group_size, m.mode)
                weight[key] = weight.get(key, 0) + m.params
    if not weight:
        raise KldError("no quantised matrices: there is no base quantisation to write a recipe for")
    base = max(weight, key=lambda k: (weight[k], -k[0]))
    modules: dict[str, object] = {}
    for g in groups:
        w = chosen.get(g.name)
        for m in g.modules:
            if w is not None and elevated(m, w):
                modules[m.path] = False if w == FLOAT else {"bits": step(w)[0], "group_size": affine_group(m, w),
                                                            "mode": "affine"}
            elif not m.quantized:
                modules[m.path] = False
            elif (m.bits, m.group_size, m.mode) != base:
                modules[m.path] = {"bits": m.bits, "group_size": m.group_size, "mode": m.mode}
    return {"base": dict(zip(("bits", "group_size", "mode"), base)), "modules": modules}


def predicate(recipe: dict):
    """The recipe as a ``quant_predicate(path, module)`` for ``mlx_lm.convert``."""
    modules = dict(recipe["modules"])
    return lambda path, module: modules.get(path, True)


def predicate_source(recipe: dict) -> str:
    """A Python module a user imports or pastes: ``quant_predicate`` and the convert call."""
    base = recipe["base"]
    lines = [
        f'"""Quant recipe for {recipe["model"]}, found by pytest-kld sensitivity: predicted '
        f'{recipe["predicted_bpw"]:.3f} bits/weight, mean {recipe["direction"]} {recipe["predicted_mean"]:.4f}.',
        "",
        "    mlx_lm.convert(hf_path=REFERENCE, mlx_path=OUT, quantize=True, q_bits=BASE['bits'],",
        "                   q_group_size=BASE['group_size'], q_mode=BASE['mode'], quant_predicate=quant_predicate)",
        '"""',
        "",
        f"BASE = {json.dumps(base)}",
        "RECIPE = {",
        *[f"    {json.dumps(p)}: {_py(v)}," for p, v in recipe["modules"].items()],
        "}",
        "",
        "",
        "def quant_predicate(path, module):",
        "    return RECIPE.get(path, True)",
        "",
    ]
    return "\n".join(lines)


def _py(v) -> str:
    return "False" if v is False else json.dumps(v)


def write(recipe: dict, stem: str | Path) -> tuple[Path, Path]:
    """``<stem>.py`` (the predicate) and ``<stem>.json`` (the recipe), written atomically."""
    from .files import write_text
    from .run import strict

    stem = Path(stem)
    py, js = stem.with_suffix(".py"), stem.with_suffix(".json")
    write_text(py, predicate_source(recipe))
    write_text(js, json.dumps(strict(recipe), indent=1, allow_nan=False))
    return py, js


def build(reference, recipe: dict, out: str | Path) -> Path:
    """Build the recipe with ``mlx_lm.convert`` from the reference into ``out`` (a new directory)."""
    import contextlib
    import io

    from .blas import prefer_system_blas

    prefer_system_blas()
    from mlx_lm import convert

    out = Path(out)
    if out.exists():
        raise KldError(f"{out} exists: give a new directory to build the recipe in")
    base = recipe["base"]
    with contextlib.redirect_stdout(io.StringIO()):
        convert(hf_path=str(reference), mlx_path=str(out), quantize=True, q_bits=base["bits"],
                q_group_size=base["group_size"], q_mode=base["mode"], quant_predicate=predicate(recipe))
    return out


def verify(cache, reference, quant, recipe: dict, out: str | Path, *, progress=None) -> dict:
    """Build the recipe, compare it and the quant on the whole cached corpus, and the paired
    saving measured against the one predicted: ``{"built", "bits_per_weight", "quant_mean",
    "recipe_mean", "measured": {diff, se, low, high}, "predicted", "off_by"}``."""
    from .compare import compare
    from .intervals import paired

    built = build(reference, recipe, out)
    mine = compare(cache, built, exec="float32", progress=progress)
    theirs = compare(cache, quant, exec="float32", progress=progress)
    measured = paired(theirs.kl, mine.kl, mine.chunk, quantiles={})["mean"]
    return {"built": str(built), "bits_per_weight": mine.info.get("bits_per_weight"),
            "positions": int(mine.kl.size), "quant_mean": theirs.summary["mean"], "recipe_mean": mine.summary["mean"],
            "measured": measured, "predicted": recipe["predicted_saving"],
            "off_by": recipe["predicted_saving"] - measured["diff"], "kl": mine.kl, "chunk": mine.chunk}
