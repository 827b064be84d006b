"""Sensitivity and recipes (issue 27) on tiny in-process models: a group that carries the damage
is found first, the reference as its own quant saves exactly 0, the recipe written round-trips
through mlx-lm's convert, and bad input gets one line."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
from tiny import quantize, validate_results

from pytest_kld import sensitivity
from pytest_kld.cache import ensure_reference
from pytest_kld.errors import KldError, ModelError
from pytest_kld.groups import layout
from pytest_kld.reference import Settings

# The group each architecture's damaged quant stores at 2 bits (the rest at 6).
DAMAGED = {"llama": "layers.1.mlp", "qwen3": "layers.0.self_attn", "qwen3_5": "layers.0.linear_attn",
           "qwen3_5_moe": "layers.2.experts"}


@pytest.fixture
def cache_for(tiny_model, prose_spec, tmp_path_factory):
    root = tmp_path_factory.mktemp("kld-cache")
    return lambda arch: ensure_reference(tiny_model(arch), prose_spec, Settings(top_k=256, chunk_tokens=64),
                                         cache_dir=root)


def damaged(tiny_model, tmp_path, arch, low_bits=2, rest=6):
    """A quant of ``arch`` with DAMAGED[arch] at ``low_bits`` and every other matrix at ``rest``
    (``rest=None``: left in float, so the group carries all the damage)."""
    ref = tiny_model(arch)
    paths = {m.path for g in layout(ref, ref).groups if g.name == DAMAGED[arch] for m in g.modules}
    assert paths, f"no group {DAMAGED[arch]} in {arch}"

    def predicate(path, module):
        if path in paths:
            return {"bits": low_bits, "group_size": 64, "mode": "affine"}
        return rest is not None

    return quantize(ref, tmp_path / f"{arch}-damaged", bits=rest or 8, predicate=predicate)


@pytest.mark.parametrize("arch", sorted(DAMAGED))
def test_the_damaged_group_ranks_first(arch, tiny_model, cache_for, tmp_path):
    """Every group measured (the rest at 6 bits, put back at 8); the 2-bit one saves most, its
    interval excludes 0, and its saving is most of the quant's KLD."""
    cache = cache_for(arch)
    doc = sensitivity.measure(cache, tiny_model(arch), damaged(tiny_model, tmp_path, arch), bits=8, budget=400)
    ranked = sensitivity.ranking(doc)
    assert ranked[0]["group"] == DAMAGED[arch], sensitivity.lines(doc)
    assert ranked[0]["low"] > 0
    assert ranked[0]["diff"] > 0.25 * doc["base_mean"]
    assert all(r["measured"] for r in ranked)
    assert ranked[0]["diff"] > 2 * max(abs(r["diff"]) for r in ranked[1:])
    sensitivity.check_budget(doc)


def test_only_the_damaged_group_quantised_carries_all_the_damage(tiny_model, cache_for, tmp_path):
    """Only one group quantised, everything put back in the reference's own dtype: that group
    saves the quant's whole KLD exactly (the model is then the reference); every other group,
    swapped for the same float weights, saves exactly 0."""
    cache = cache_for("llama")
    doc = sensitivity.measure(cache, tiny_model("llama"), damaged(tiny_model, tmp_path, "llama", rest=None), bits=0,
                              budget=10**6)
    ranked = sensitivity.ranking(doc)
    assert ranked[0]["group"] == DAMAGED["llama"]
    assert ranked[0]["diff"] == pytest.approx(doc["base_mean"], rel=1e-12, abs=1e-12)
    assert all(r["diff"] == 0.0 and r["measured"] for r in ranked[1:])


@pytest.mark.parametrize("arch", ["llama", "qwen3_5_moe"])
def test_the_reference_as_its_own_quant_saves_exactly_zero(arch, tiny_model, cache_for):
    cache = cache_for(arch)
    ref = tiny_model(arch)
    doc = sensitivity.measure(cache, ref, ref, bits=0, budget=300)
    assert doc["base_mean"] == 0.0
    ranked = sensitivity.ranking(doc)
    assert ranked and all(r["measured"] and r["diff"] == 0.0 and r["low"] == 0.0 == r["high"] for r in ranked)
    with pytest.raises(KldError, match=r"no quantised tensors.*--bits 0") as e:
        sensitivity.measure(cache, ref, ref, bits=8, budget=300)
    assert "\n" not in str(e.value)


def test_groups_put_back_together(tiny_model, cache_for, monkeypatch):
    """``together``: one group alone saves exactly its ranked saving (same chunks, same swap);
    every group at the reference's own weights is the reference, so the saving is the quant's
    whole mean; the result is stored with the ranking and a rerun runs nothing."""
    cache, ref, quant = cache_for("llama"), tiny_model("llama"), tiny_model("llama", bits=3)
    doc = sensitivity.measure(cache, ref, quant, budget=400)
    top = sensitivity.ranking(doc)[0]
    one = sensitivity.together(cache, ref, quant, doc, [(top["group"], 8)])
    assert {k: one[k] for k in ("diff", "se", "low", "high")} == {k: top[k] for k in ("diff", "se", "low", "high")}
    every = [(g["name"], 0) for g in doc["groups"]]
    whole = sensitivity.together(cache, ref, quant, doc, every)
    assert whole["diff"] == pytest.approx(doc["base_mean"], rel=1e-12) and whole["low"] > 0
    stored = json.loads(sensitivity.store_path(cache, doc["key"]).read_text())["together"]
    assert len(stored) == 2 and stored[", ".join(sorted(f"{g}@0" for g, _ in every))] == whole

    def no_model(*a, **k):
        raise AssertionError("a stored result is measured again")

    monkeypatch.setattr(sensitivity, "Bench", no_model)
    again = sensitivity.measure(cache, ref, quant, budget=400)
    assert sensitivity.together(cache, ref, quant, again, list(reversed(every))) == whole


def test_a_recipe_keeps_the_quants_own_mode(tiny_model, cache_for, tmp_path):
    """An mxfp4 quant (no biases, uint8 scales, group 32): its groups carry the mode, the
    recipe's base is mxfp4 at group 32 and its raised groups affine; mlx-lm builds it, the built
    config says so, and the built bits per weight are the predicted ones."""
    from pytest_kld import recipe
    from pytest_kld.quantinfo import model_info

    ref = tiny_model("llama")
    quant = quantize(ref, tmp_path / "mx", bits=4, group_size=32, mode="mxfp4")
    doc = sensitivity.measure(cache_for("llama"), ref, quant, budget=400)
    assert {m["mode"] for g in doc["groups"] for m in g["modules"] if m["quantized"]} == {"mxfp4"}
    assert sensitivity.ranking(doc)[0]["low"] > 0
    planned = recipe.plan(doc, target_bpw=model_info(quant).bits_per_weight + 0.5)
    assert planned["groups"] and planned["base"] == {"bits": 4, "group_size": 32, "mode": "mxfp4"}
    raised = {p: v for p, v in planned["modules"].items() if v}
    assert raised and all(v["mode"] == "affine" and v["bits"] > 4 for v in raised.values())
    built = recipe.build(ref, planned, tmp_path / "built")
    config = json.loads((built / "config.json").read_text())["quantization"]
    assert config["mode"] == "mxfp4" and all(config[p] == v for p, v in raised.items())
    assert model_info(built).bits_per_weight == pytest.approx(planned["predicted_bpw"], abs=1e-6)


def test_a_finer_group_size_is_a_step_measured_and_built(tiny_model, cache_for, tmp_path):
    """``group_sizes=(32,)`` on a 4-bit g64 quant: every group is also measured at "4g32", and
    its saving is the one of a model mlx-lm builds with that group at 4 bits g32 (the same KL to
    float32 rounding). A bits budget that a 5th bit of no group fits but a finer group does: the
    recipe takes "4g32" steps, mlx-lm builds it, its config says group 32, and the built bits per
    weight are the predicted ones."""
    from pytest_kld import recipe
    from pytest_kld.compare import compare
    from pytest_kld.groups import Group, added_bpw
    from pytest_kld.quantinfo import model_info

    cache, ref, quant = cache_for("llama"), tiny_model("llama"), tiny_model("llama", bits=4)
    doc = sensitivity.measure(cache, ref, quant, budget=10**6, group_sizes=(32,))
    assert all(set(doc["savings"][g["name"]]) == {"8", "4g32"} for g in doc["groups"])
    top = max(doc["groups"], key=lambda g: doc["savings"][g["name"]]["4g32"]["diff"])
    s = doc["savings"][top["name"]]["4g32"]
    assert s["measured"] and s["low"] > 0 and 0 < s["added_bpw"] < doc["savings"][top["name"]]["8"]["added_bpw"]
    paths = {m["path"] for m in top["modules"]}
    built = quantize(ref, tmp_path / "g32", bits=4, group_size=64,
                     predicate=lambda p, m: {"bits": 4, "group_size": 32, "mode": "affine"} if p in paths else True)
    assert compare(cache, built, exec="float32").summary["mean"] == pytest.approx(doc["base_mean"] - s["diff"], rel=1e-5)

    class Sizes:
        params, ref_dtype_bytes = doc["params"], doc["ref_dtype_bytes"]

    groups = [Group.from_dict(g) for g in doc["groups"]]
    fifth = min(added_bpw(g, 5, Sizes) for g in groups)
    finer = sorted(added_bpw(g, "4g32", Sizes) for g in groups)
    assert finer[0] < fifth
    planned = recipe.plan(doc, target_bpw=doc["bits_per_weight"] + min(fifth, sum(finer)) * 0.999)
    assert planned["groups"] and all(g["width"] == "4g32" and g["measured_at_width"] for g in planned["groups"])
    raised = {p: v for p, v in planned["modules"].items() if v}
    assert raised and all(v == {"bits": 4, "group_size": 32, "mode": "affine"} for v in raised.values())
    out = recipe.build(ref, planned, tmp_path / "built")
    config = json.loads((out / "config.json").read_text())["quantization"]
    assert config["group_size"] == 64 and all(config[p] == v for p, v in raised.items())
    assert model_info(out).bits_per_weight == pytest.approx(planned["predicted_bpw"], abs=1e-6)
    again = sensitivity.together(cache, ref, quant, doc, [(g["group"], g["width"]) for g in planned["groups"]])
    assert again["diff"] > 0


def test_a_kld_target_is_planned_again_until_the_groups_together_reach_it(tiny_model, cache_for):
    """``recipe.calibrated`` with ``target_kld``: when the groups put back together save half what
    their single savings sum to (a stand-in for ``together``), the first plan misses the target on
    the sample; planned again for the shortfall scaled by that factor, it reaches it. A target no
    recipe reaches ends after the rounds allowed, said as not reached."""
    from pytest_kld import recipe

    cache, ref, quant = cache_for("llama"), tiny_model("llama"), tiny_model("llama", bits=3)

    def remeasure(extra=()):
        return sensitivity.measure(cache, ref, quant, budget=400, extra=extra)

    doc, calls = remeasure(), []
    groups = {g["name"]: sensitivity.Group.from_dict(g) for g in doc["groups"]}

    def half(current, chosen):  # the sums overpredict by a factor of 2
        calls.append(list(chosen))
        return {"diff": 0.5 * sum(recipe.predicted_saving(current, groups[g], w) for g, w in chosen),
                "se": 0.0, "low": 0.0, "high": 0.0}

    base = doc["base_mean"]
    everything = recipe.plan(doc, target_kld=-1.0)["predicted_saving"]
    target = base - 0.3 * everything  # the sums must reach 0.6 of everything
    first, doc = recipe.plan_measured(doc, remeasure, target_kld=target)
    assert base - half(doc, [(g["group"], g["width"]) for g in first["groups"]])["diff"] > target  # missed
    calls.clear()
    done, _ = recipe.calibrated(doc, first, remeasure, half, target_kld=target)
    assert done["reached"] and base - done["together"]["diff"] <= target and done["target_kld"] == target
    assert done["planned_kld"] < target and len(calls) >= 2 and len(done["groups"]) > len(first["groups"])
    calls.clear()
    never, _ = recipe.calibrated(doc, first, remeasure, half, target_kld=0.0, rounds=2)
    assert never["reached"] is False and len(calls) <= 3


def test_groups_per_layer_and_role(tiny_model):
    """Tied and untied heads, MoE experts, router and shared expert apart, linear attention."""
    ref = tiny_model("qwen3_5_moe")
    names = {g.name for g in layout(ref, ref).groups}
    for layer in range(4):
        assert {f"layers.{layer}.experts", f"layers.{layer}.router", f"layers.{layer}.shared_expert"} <= names
    assert {"layers.0.linear_attn", "layers.1.self_attn", "embed_tokens", "lm_head"} <= names


def test_a_rerun_reads_the_store(tiny_model, cache_for, tmp_path, monkeypatch):
    cache = cache_for("llama")
    quant = tiny_model("llama", bits=4)
    first = sensitivity.measure(cache, tiny_model("llama"), quant, bits=8, budget=200)
    files = list(sensitivity.store_path(cache, "x").parent.glob("*.json"))
    assert len(files) == 1 and not list(files[0].parent.glob(".*.tmp"))

    def no_load(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(sensitivity, "Bench", no_load)
    again = sensitivity.measure(cache, tiny_model("llama"), quant, bits=8, budget=200)
    assert sensitivity.ranking(again) == sensitivity.ranking(first)
    with pytest.raises(AssertionError, match="measured again"):  # other settings: another entry
        sensitivity.measure(cache, tiny_model("llama"), quant, bits=6, budget=200)


def test_bad_input_one_line(tiny_model, cache_for, tmp_path):
    cache = cache_for("llama")
    with pytest.raises(ModelError, match="module layout does not match the reference") as e:
        sensitivity.measure(cache, tiny_model("llama"), tiny_model("qwen3_5", bits=4), budget=200)
    assert "\n" not in str(e.value)
    doc = sensitivity.measure(cache, tiny_model("llama"), tiny_model("llama", bits=4), bits=8, budget=1)
    with pytest.raises(KldError, match=r"1 chunk, too few to rank.*raise --budget"):
        sensitivity.check_budget(doc)
    noisy = dict(doc, chunks=[0, 1], savings={g["name"]: {"8": {"diff": 0.01, "se": 0.1, "low": -0.2, "high": 0.2,
                                                                 "added_bpw": 1.0, "measured": True}}
                                              for g in doc["groups"]})
    with pytest.raises(KldError, match=r"too few to rank: the savings' 95% intervals are ±0.2000 to ±0.2000 nats"):
        sensitivity.check_budget(noisy)


def _load_predicate(path):
    spec = importlib.util.spec_from_file_location("written_recipe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_recipe_round_trips_through_convert(tiny_model, tmp_path, prose_file, capsys):
    """``pytest-kld sensitivity REF QUANT --target-bpw B --recipe STEM --verify DIR``: the recipe
    keeps to the target, the written predicate builds (mlx-lm convert) a model whose config
    records exactly the recipe, with the bits per weight predicted, and the verification measures
    a saving whose interval excludes 0."""
    from pytest_kld.cli import main
    from pytest_kld.quantinfo import model_info

    ref, quant = tiny_model("llama"), tiny_model("llama", bits=3)
    target = model_info(quant).bits_per_weight + 0.8
    args = ["sensitivity", str(ref), str(quant), "--mode", "file", "--dataset", str(prose_file), "--n-ctx", "128",
            "--cache-dir", str(tmp_path / "c"), "--budget", "400", "--target-bpw", str(target), "--recipe",
            str(tmp_path / "rec"), "--verify", str(tmp_path / "built"), "--json", str(tmp_path / "s.json"),
            "--markdown", str(tmp_path / "s.md"), "--group-sizes", "32"]
    assert main(args[:-1] + ["16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pytest-kld: --group-sizes 16: give 32 or 64") and "\n" not in err
    clash = [v if v != str(tmp_path / "s.json") else str(tmp_path / "rec.json") for v in args]
    assert main(clash) == 2  # the report would replace the recipe's JSON
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pytest-kld: --json {tmp_path / 'rec.json'} is a file --recipe") and "\n" not in err
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "sensitivity of" in out and "verified on" in out and "the groups put back together, on the same" in out
    assert "at a finer group instead (3 bits, group 32; --group-sizes):" in out
    report = json.loads((tmp_path / "s.json").read_text())
    assert len(report["sensitivity"]["finer"]["3g32"]) == 6
    assert "At a finer group instead (3 bits, group 32):" in (tmp_path / "s.md").read_text()
    t = report["recipe"]["together"]  # the groups put back at once, on the ranking's sample
    assert t["low"] <= t["diff"] <= t["high"] and t["diff"] > 0
    recipe, ranking = report["recipe"], report["sensitivity"]["ranking"]
    assert report["sensitivity"]["direction"] == "KL(reference || quant)" and len(ranking) == 6
    assert recipe["groups"] and recipe["predicted_bpw"] <= target + 1e-9
    assert json.loads((tmp_path / "rec.json").read_text())["modules"] == recipe["modules"]
    v = recipe["verified"]
    assert v["bits_per_weight"] == pytest.approx(recipe["predicted_bpw"], abs=1e-6)
    assert v["measured"]["low"] > 0 and math.isfinite(v["off_by"])
    assert "| group |" in (tmp_path / "s.md").read_text()

    written = _load_predicate(tmp_path / "rec.py")
    again = quantize(ref, tmp_path / "again", bits=written.BASE["bits"], group_size=written.BASE["group_size"],
                     predicate=written.quant_predicate)
    config = json.loads((again / "config.json").read_text())["quantization"]
    for path, entry in recipe["modules"].items():
        assert config.get(path) == (entry or None), path
    assert {k for k, v in config.items() if isinstance(v, dict)} == {k for k, v in recipe["modules"].items() if v}
    assert model_info(again).bits_per_weight == pytest.approx(recipe["predicted_bpw"], abs=1e-6)
    assert json.loads((tmp_path / "built" / "config.json").read_text())["quantization"] == config


EXPLAIN_TEST = """
import pytest

def test_flag(assert_kld):
    assert_kld({quant!r}, mean=0.0001)

@pytest.mark.kld(explain=True)
def test_marker(assert_kld):
    assert_kld({quant!r}, mean=0.0001)

def test_passing(assert_kld):
    assert_kld({quant!r}, mean=100)
"""


def test_kld_explain_names_the_top_groups_in_a_failing_message(pytester, tiny_model):
    """--kld-explain (and the marker key): a failing assert_kld's message ends with the ranking's
    top groups; without either, the message has none; a passing test measures nothing."""
    quant = str(tiny_model("llama", bits=3))
    pytester.makepyfile(test_q=EXPLAIN_TEST.format(quant=quant))
    args = [f"--kld-reference={tiny_model('llama')}", f"--kld-cache-dir={pytester.path / 'c'}", "--kld-n-chunks=3"]
    plain = pytester.runpytest_subprocess(*args)  # only the marked test explains
    plain.assert_outcomes(failed=2, passed=1)
    out = plain.stdout.str()
    flag, marker = out.index("_ test_flag _"), out.index("_ test_marker _")
    assert flag < marker and "explain:" not in out[flag:marker] and "explain: all groups" in out[marker:]
    assert "where the damage comes from (explain)" in out  # the marked test's study reaches the leaderboard
    res = pytester.runpytest_subprocess(*args, "--kld-explain", f"--kld-json={pytester.path / 'r.json'}",
                                        f"--kld-markdown={pytester.path / 'r.md'}")
    res.assert_outcomes(failed=2, passed=1)
    doc = json.loads((pytester.path / "r.json").read_text())
    validate_results(doc)
    failed = [r for r in doc["results"] if r["outcome"] == "failed"]  # one row per model: a failure wins
    assert failed and all(r["sensitivity"]["schema_version"] == 1 and len(r["sensitivity"]["ranking"]) == 6
                          and r["sensitivity"]["direction"] == "KL(reference || quant)" for r in failed)
    assert_explain_section(doc, res.stdout.str(), (pytester.path / "r.md").read_text())
    res.stdout.fnmatch_lines(["*explain: sensitivity of * saved by putting one group back*",
                              "*explain: group * saved * 95% interval*", "*explain: all groups: pytest-kld sensitivity*"])
    # the FAILURES section only: with CI set, pytest's short summary repeats whole messages
    text = res.stdout.str().split("short test summary info")[0]
    assert sum(text.count(f"explain: {g}") for g in ("layers.", "embed_tokens", "lm_head")) == 2 * 5  # EXPLAIN_TOP each


def assert_explain_section(doc: dict, terminal: str, md: str) -> None:
    """The leaderboard's explain section agrees with the rows' studies in all three outputs: the
    JSON's top groups are each study's first ones, and the terminal and Markdown name them."""
    studies = [r["sensitivity"] for r in doc["results"] if r.get("sensitivity")]
    section = doc["leaderboard"]["sections"]["explain"]
    assert section["direction"] == "KL(reference || quant)" and studies
    assert len(section["models"]) == len(studies) and set(section["models"]) <= set(doc["leaderboard"]["order"])
    for entry in section["models"].values():
        top = [(t["group"], t["diff"], t["low"], t["high"]) for t in entry["top"]]
        assert len(top) == 5 and any(top == [(r["group"], r["diff"], r["low"], r["high"]) for r in st["ranking"][:5]]
                                     for st in studies)
    board = terminal[terminal.index("where the damage comes from (explain)"):]
    assert all(f"  {t['group']:<28} {t['diff']:>+9.5f}" in board for e in section["models"].values() for t in e["top"])
    assert "### Where the damage comes from: mean KL(reference || quant) saved" in md
    assert all(f"| {t['group']} | {t['diff']:+.5f} |" in md for e in section["models"].values() for t in e["top"])


def test_compare_explain_on_the_command_line(tiny_model, tmp_path, prose_file, capsys):
    """``pytest-kld compare REF QUANT --mean X --explain``: the failing check's message ends with
    the top groups (stderr), the row carries the study and the JSON/Markdown the section; a
    passing check measures nothing."""
    from pytest_kld.cli import main

    ref, quant = tiny_model("llama"), tiny_model("llama", bits=3)
    common = [str(ref), str(quant), "--mode", "file", "--dataset", str(prose_file), "--n-ctx", "128",
              "--cache-dir", str(tmp_path / "c"), "--explain"]
    assert main(["compare", *common, "--mean", "100", "--json", str(tmp_path / "pass.json")]) == 0
    passed = json.loads((tmp_path / "pass.json").read_text())
    assert "explain" not in passed["leaderboard"]["sections"] and not list((tmp_path / "c").rglob("*.sensitivity"))
    capsys.readouterr()
    assert main(["compare", *common, "--mean", "0.0001", "--json", str(tmp_path / "r.json"),
                 "--markdown", str(tmp_path / "r.md")]) == 1
    out, err = capsys.readouterr()
    assert "explain: sensitivity of" in err and "explain: all groups: pytest-kld sensitivity" in err
    doc = json.loads((tmp_path / "r.json").read_text())
    validate_results(doc)
    assert_explain_section(doc, out, (tmp_path / "r.md").read_text())


def test_coarse_to_fine_measures_the_layers_of_the_role_that_matters(tiny_model, cache_for, tmp_path):
    """``fine_roles=1``: roles across all layers first; then only the damaged role's layers. A
    full run later adds the other role's layers to the same store, the rest reused."""
    cache = cache_for("llama")
    ref, quant = tiny_model("llama"), damaged(tiny_model, tmp_path, "llama")
    doc = sensitivity.measure(cache, ref, quant, bits=8, budget=400, fine_roles=1)
    measured = {r["group"] for r in sensitivity.ranking(doc)}
    assert measured == {"embed_tokens", "lm_head", "self_attn (all layers)", "mlp (all layers)", "layers.0.mlp",
                        "layers.1.mlp"}
    ranked = [r["group"] for r in sensitivity.ranking(doc, coarse=False)]
    assert ranked[0] == DAMAGED["llama"]
    first = {g: dict(v) for g, v in doc["savings"].items()}
    full = sensitivity.measure(cache, ref, quant, bits=8, budget=400)
    assert {"layers.0.self_attn", "layers.1.self_attn"} <= {r["group"] for r in sensitivity.ranking(full)}
    assert all(full["savings"][g] == v for g, v in first.items())


def _synthetic_doc():
    """Two groups of one 3-bit matrix each (1024 x 1024, group 64) in a model of 4M parameters:
    ``big`` saves 0.4 at 8 bits, ``small`` (a quarter of the parameters) 0.2."""
    def group(name, params):
        return {"name": name, "role": "mlp", "layer": 0, "modules": [
            {"path": f"{name}.proj", "params": params, "n_in": 1024, "bits": 3, "group_size": 64, "quantized": True,
             "quant_bytes": params * 3 // 8 + 2 * (params // 64) * 2}]}

    saving = {"se": 0.01, "low": 0.1, "high": 0.5, "measured": True}
    return {"model": "q", "direction": "KL(reference || quant)", "bits": 8, "params": 4 * 2**20,
            "ref_dtype_bytes": 2, "bits_per_weight": 3.5, "base_mean": 1.0,
            "groups": [group("big", 2**20), group("small", 2**18)],
            "savings": {"big": {"8": {**saving, "diff": 0.4, "added_bpw": 1.25}},
                        "small": {"8": {**saving, "diff": 0.2, "added_bpw": 0.3125}}}}


def test_the_recipe_is_greedy_by_saving_per_added_bit():
    """``small`` saves more per bit; with room for one upgrade of ``big``'s size the greedy takes
    ``small`` first, and every choice keeps to the target; unmeasured widths follow 4^-bits."""
    from pytest_kld.groups import Group, added_bpw
    from pytest_kld.recipe import plan, predicted_saving

    doc = _synthetic_doc()
    small = Group.from_dict(doc["groups"][1])
    assert predicted_saving(doc, small, 8) == 0.2
    assert predicted_saving(doc, small, 4) == pytest.approx(0.2 * (1 - 4**-1) / (1 - 4**-5))
    sizes = type("S", (), {"params": doc["params"], "ref_dtype_bytes": 2})()
    assert added_bpw(small, 4, sizes) == pytest.approx(2**18 / doc["params"])  # one bit per weight of a sixteenth
    r = plan(doc, target_bpw=3.5 + 0.3125)
    assert [g["group"] for g in r["groups"]][0] == "small"
    assert r["predicted_bpw"] <= 3.5 + 0.3125 + 1e-12
    everything = plan(doc, target_bpw=10)
    assert {(g["group"], g["width"]) for g in everything["groups"]} == {("big", 8), ("small", 8)}
    assert everything["predicted_mean"] == pytest.approx(1.0 - 0.6)
    with pytest.raises(KldError, match="below the quant's own"):
        plan(doc, target_bpw=3.0)
    assert plan(doc, target_kld=0.9)["predicted_mean"] <= 0.9


def test_a_finer_group_is_taken_when_it_pays_and_left_for_more_bits():
    """``big`` measured at 3 bits g32 (0.15 for 0.125 bits/w: 1.2 per bit, between ``small``'s
    4-bit step and everything else): taken second with room for two steps and written group 32;
    with room for all, ``big`` goes on from it to 8 bits, charged 8 bits' size only once. A finer
    group never measured is never offered."""
    from pytest_kld.groups import Group, added_bpw
    from pytest_kld.recipe import plan, predicted_saving

    doc = _synthetic_doc()
    doc["savings"]["big"]["3g32"] = {"se": 0.01, "low": 0.1, "high": 0.2, "measured": True, "diff": 0.15,
                                     "added_bpw": 0.125}
    big, small = (Group.from_dict(g) for g in doc["groups"])
    sizes = type("S", (), {"params": doc["params"], "ref_dtype_bytes": 2})()
    assert added_bpw(big, "3g32", sizes) == pytest.approx(0.125)  # twice the scales and biases, 16-bit each
    assert predicted_saving(doc, small, "3g32") == 0.0
    two = plan(doc, target_bpw=3.5 + added_bpw(small, 4, sizes) + 0.125)
    assert [(g["group"], g["width"]) for g in two["groups"]] == [("small", 4), ("big", "3g32")]
    assert two["modules"]["big.proj"] == {"bits": 3, "group_size": 32, "mode": "affine"}
    assert two["predicted_saving"] == pytest.approx(0.15 + predicted_saving(doc, small, 4))
    everything = plan(doc, target_bpw=10)
    assert {(g["group"], g["width"]) for g in everything["groups"]} == {("big", 8), ("small", 8)}
    assert everything["predicted_bpw"] == pytest.approx(3.5 + 1.25 + 0.3125)
