"""Issue 7: the full-content fingerprint (--kld-full-hash), the per-model quantisation table, the
leaderboard's marks and mean/bit, the chart's labels, on tiny models quantised by mlx_lm.convert
and compared for real."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from tiny import embed_head_8, routers_float_shared8_linear6

from pytest_kld.cache import ensure_reference, plan_reference
from pytest_kld.chart import chart_figure
from pytest_kld.compare import compare
from pytest_kld.fingerprint import weights_fingerprint
from pytest_kld.markdown import markdown
from pytest_kld.reference import Settings
from pytest_kld.report import (
    category_lines,
    leaderboard_lines,
    quant_lines,
)

SETTINGS = Settings(top_k=64, chunk_tokens=64)


# ---------------------------------------------------------------------------------------------
# --kld-full-hash: the API
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def ref_copy(tiny_model, tmp_path):
    dst = tmp_path / "llama-copy"
    shutil.copytree(tiny_model("llama"), dst)
    return dst


def edit_weights_keep_size_and_mtime(model_dir) -> None:
    """Change one byte of tensor data (not the header) and put the file's times back."""
    f = model_dir / "model.safetensors"
    st = f.stat()
    header_len = int.from_bytes(f.read_bytes()[:8], "little")
    offset = 8 + header_len + (st.st_size - 8 - header_len) // 2
    with open(f, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x01]))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns


def test_full_hash_is_the_same_identity_read_again(ref_copy, prose_spec, tmp_path):
    """Issue 23: one exact identity. --kld-full-hash re-reads every byte (trusting no remembered
    hash) and gives the same fingerprint, so the same cache entry."""
    fast = plan_reference(ref_copy, prose_spec, SETTINGS, cache_dir=tmp_path / "c")
    full = plan_reference(ref_copy, prose_spec, SETTINGS, cache_dir=tmp_path / "c", full_hash=True)
    assert fast.fingerprint.startswith("sha256-full:") and full.fingerprint == fast.fingerprint
    assert fast.key == full.key and full.key_material["reference_fingerprint"] == full.fingerprint

    cache = ensure_reference(ref_copy, prose_spec, SETTINGS, cache_dir=tmp_path / "c", full_hash=True)
    assert cache.path == full.entry
    assert cache.manifest["reference"]["fingerprint"] == weights_fingerprint(ref_copy, full=True)
    for kind in (None, False, True):
        r = compare(cache, ref_copy, full_hash=kind)
        assert r.fingerprint == cache.manifest["reference"]["fingerprint"] and r.is_reference


def test_a_same_size_edit_with_its_mtime_restored_gets_its_own_entry(ref_copy, prose_spec, tmp_path):
    """Fingerprints read content, never times: an edit of tensor data that keeps the size, the
    header and the mtime is a new cache entry (the remembered hash is keyed by the change time
    too, which an edit always moves), with and without --kld-full-hash."""
    builds = []
    kw = dict(cache_dir=tmp_path / "c", on_build=builds.append)
    before_sample = ensure_reference(ref_copy, prose_spec, SETTINGS, **kw)
    before_full = ensure_reference(ref_copy, prose_spec, SETTINGS, full_hash=True, **kw)
    assert len(builds) == 1 and before_full.path == before_sample.path

    edit_weights_keep_size_and_mtime(ref_copy)
    after_sample = ensure_reference(ref_copy, prose_spec, SETTINGS, **kw)
    after_full = ensure_reference(ref_copy, prose_spec, SETTINGS, full_hash=True, **kw)
    assert len(builds) == 2  # rebuilt once for the edited weights
    assert after_sample.manifest["key"] != before_sample.manifest["key"]
    assert after_full.manifest["key"] != before_full.manifest["key"]


def test_two_models_alike_in_all_but_their_numbers_never_share_a_cache(tiny_model, prose_spec, tmp_path):
    """Issue 10: same config, tensor names, shapes, file size and modification time, other
    tensor data (a re-quantisation): two cache entries, and the other model is not taken for
    the reference."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_model("llama"), a)
    shutil.copytree(tiny_model("llama"), b)
    fa, fb = a / "model.safetensors", b / "model.safetensors"
    data = bytearray(fb.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    for i in range(start, len(data), 2):  # the lowest mantissa bit of every value: all change a little
        data[i] ^= 1
    fb.write_bytes(bytes(data))
    assert fa.stat().st_size == fb.stat().st_size
    assert fa.read_bytes()[: 8 + int.from_bytes(fa.read_bytes()[:8], "little")] == fb.read_bytes()[
        : 8 + int.from_bytes(fb.read_bytes()[:8], "little")]  # identical headers
    t = fa.stat().st_mtime_ns
    for f in (fa, fb):
        os.utime(f, ns=(t, t))
    builds = []
    kw = dict(cache_dir=tmp_path / "c", on_build=builds.append)
    ca = ensure_reference(a, prose_spec, SETTINGS, **kw)
    cb = ensure_reference(b, prose_spec, SETTINGS, **kw)
    assert len(builds) == 2 and ca.path != cb.path
    r = compare(ca, b)
    assert not r.is_reference and r.summary["mean"] > 0 and r.reference["path"] == str(a)


def test_a_copy_with_new_times_elsewhere_reuses_the_cache(ref_copy, prose_spec, tmp_path):
    """Issue 12's first requirement: the same bytes in another directory with other mtimes
    (cp -r, a fresh download, a CI cache restore) hit the same entry; nothing is rebuilt."""
    builds = []
    kw = dict(cache_dir=tmp_path / "c", on_build=builds.append)
    first = ensure_reference(ref_copy, prose_spec, SETTINGS, **kw)
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(ref_copy, moved, copy_function=shutil.copyfile)  # new mtimes
    for f in moved.iterdir():
        os.utime(f, ns=(10**18, 10**18))
    again = ensure_reference(moved, prose_spec, SETTINGS, **kw)
    assert len(builds) == 1 and again.path == first.path


# ---------------------------------------------------------------------------------------------
# --kld-full-hash, --kld-json and --help through pytester
# ---------------------------------------------------------------------------------------------

PYTESTER_TEST = """
import pytest

@pytest.mark.parametrize("model", {paths!r}, ids={ids!r})
def test_compare(kld_compare, model):
    kld_compare(model)
"""


@pytest.fixture(scope="module")
def llama_models(tiny_model):
    return {"ref": str(tiny_model("llama")), "q8": str(tiny_model("llama", bits=8)),
            "q4": str(tiny_model("llama", bits=4))}


def _run(pytester, models, *args):
    out = pytester.path / "kld.json"
    names = ["ref", "q8", "q4"]
    pytester.makepyfile(PYTESTER_TEST.format(paths=[models[n] for n in names], ids=names))
    result = pytester.runpytest(
        f"--kld-reference={models['ref']}", f"--kld-cache-dir={pytester.path / 'cache'}",
        "--kld-n-chunks=2", f"--kld-json={out}", "-p", "no:cacheprovider", *args,
    )
    result.assert_outcomes(passed=3)
    return result, json.loads(out.read_text())


def _manifests(pytester) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((pytester.path / "cache").rglob("manifest.json"))]


def test_full_hash_option_and_ini_key_reach_json_rows_and_manifest(pytester, llama_models):
    _, fast = _run(pytester, llama_models)
    assert len(fast["results"]) == 3
    assert all(r["fingerprint"].startswith("sha256-full:") for r in fast["results"])
    assert fast["settings"]["full_hash"] is False

    _, full = _run(pytester, llama_models, "--kld-full-hash")
    assert full["settings"]["full_hash"] is True
    by = {r["model"]: r for r in full["results"]}
    for name, r in by.items():
        assert r["fingerprint"] == weights_fingerprint(r["path"], full=True), name
        # every row carries the model's ModelInfo
        assert r["info"]["weight_bytes"] > 0 and r["info"]["params"] > 0 and "elevated" in r["info"], name
    assert by["llama"]["is_reference"] and not by["llama-q8-g64"]["is_reference"]
    assert by["llama-q4-g64"]["info"]["base_bits"] == 4 and by["llama"]["info"]["quantized"] is False
    kinds = sorted(m["reference"]["fingerprint"].split(":")[0] for m in _manifests(pytester))
    assert kinds == ["sha256-full"]  # one identity: the same cache entry, read again

    pytester.makeini("[pytest]\nkld_full_hash = true\n")
    _, ini = _run(pytester, llama_models)
    assert all(r["fingerprint"].startswith("sha256-full:") for r in ini["results"])
    assert len(_manifests(pytester)) == 1  # the entry was reused, not rebuilt


def test_help_lists_full_hash_with_its_ini_key(pytester, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    out = pytester.runpytest("--help").stdout.str()
    flat = " ".join(out.split())
    assert re.search(r"--kld-full-hash (?:(?! --kld-).)*sha256-full(?:(?! --kld-).)*\(default: off\); ini: kld_full_hash", flat)
    assert re.search(r"^  kld_full_hash \(bool\):", out, re.M)


# ---------------------------------------------------------------------------------------------
# The per-model quantisation table and the leaderboard, on real comparisons
# ---------------------------------------------------------------------------------------------




# name: (arch, quantize kwargs)
QUANTS = {
    "llama-q8": ("llama", dict(bits=8)),
    "llama-q4": ("llama", dict(bits=4)),
    "llama-q3": ("llama", dict(bits=3)),
    "llama-m36": ("llama", dict(bits=4, predicate="mixed_3_6")),
    "llama-eh8": ("llama", dict(bits=4, predicate=embed_head_8)),
    "qwen35-lin6": ("qwen3_5", dict(bits=4, predicate=routers_float_shared8_linear6)),
    "moe-q4": ("qwen3_5_moe", dict(bits=4)),
    "moe-m36": ("qwen3_5_moe", dict(bits=3, predicate="mixed_3_6")),
    "moe-custom": ("qwen3_5_moe", dict(bits=4, predicate=routers_float_shared8_linear6)),
}


@pytest.fixture(scope="module")
def rows(tiny_model, prose_file, tmp_path_factory):
    """Leaderboard rows of real comparisons: each arch's reference against itself and its quants
    (3 chunks of 128 tokens: the metadata is the point here, not the KLD's precision)."""
    from tiny import quantize

    from pytest_kld.corpus import corpus_spec
    from pytest_kld.run import row

    spec = corpus_spec("file", dataset=str(prose_file), n_ctx=128, n_chunks=3)

    root = tmp_path_factory.mktemp("leaderboard-quants")
    cache_dir = tmp_path_factory.mktemp("leaderboard-cache")
    out = []
    for arch in ("llama", "qwen3_5", "qwen3_5_moe"):
        cache = ensure_reference(tiny_model(arch), spec, SETTINGS, cache_dir=cache_dir)
        out.append(row(compare(cache, tiny_model(arch)), "passed"))
        for name, (a, kw) in QUANTS.items():
            if a == arch:
                path = quantize(tiny_model(arch), root / name, group_size=64, **kw)
                out.append(row(compare(cache, path), "passed"))
    return out


def by_arch(rows, arch):
    return [r for r in rows if r["reference"].endswith(arch)]


def table_line(lines, name) -> list[str]:
    """The quantisation table's line of ``name`` (and its wrapped continuation lines), joined."""
    start = lines.index(next(ln for ln in lines if ln.startswith("quantisation (read from")))
    out, found = [], False
    for ln in lines[start + 3 :]:
        if not ln:
            break
        if ln.split()[0] == name:
            out, found = [ln], True
        elif found and ln.startswith(" "):
            out.append(ln.strip())
        elif found:
            break
    assert found, f"{name} not in the quantisation table:\n" + "\n".join(lines[start:])
    return out


QUANT_TABLE = {
    # name: (family, mode, base, overrides, elevated)
    "llama": ("none", "float16", "-", "0", "-"),
    "llama-q8": ("RTN uniform", "affine", "8b g64", "0", "none"),
    "llama-q3": ("RTN uniform", "affine", "3b g64", "0", "none"),
    # mixed_3_6 on 2 layers: lm_head, and v_proj and down_proj of layer 0 only, at 6 bits
    "llama-m36": ("RTN mixed (mixed_3_6)", "affine", "3b g64", "3 (6b ×3)",
                  "lm_head 6b, self_attn 6b, mlp 6b"),
    # MoE under mixed_3_6: down_proj of the experts and of the shared expert in layers 2 and 3
    "moe-m36": ("RTN mixed (mixed_3_6)", "affine", "3b g64", "6 (6b ×6)",
                "lm_head 6b, self_attn 6b, shared_expert 6b ×2, experts 6b ×2"),
    "llama-eh8": ("RTN mixed", "affine", "4b g64", "2 (8b ×2)", "embed_tokens 8b, lm_head 8b"),
    # 2 linear-attention layers x 5 projections
    "qwen35-lin6": ("RTN mixed", "affine", "4b g64", "10 (6b ×10)", "linear_attn 6b ×10"),
    # qwen3_5_moe's own quant_predicate: 4 layers x (mlp.gate, shared_expert_gate) at 8 bits
    "moe-q4": ("RTN mixed", "affine", "4b g64", "8 (8b ×8)", "router 8b ×8"),
    # routers left float16 (8), shared experts 8-bit (4 x 3), linear attention 6-bit (2 x 5)
    "moe-custom": ("RTN mixed", "affine", "4b g64", "30 (6b ×10, 8b ×12, 16b float ×8)",
                   "linear_attn 6b ×10, router 16b float ×8, shared_expert 8b ×12"),
}


@pytest.mark.parametrize("name", sorted(QUANT_TABLE))
def test_quantisation_table_exact(rows, name):
    lines = leaderboard_lines(rows)
    got = table_line(lines, name)
    cells = re.split(r"\s{2,}", got[0].strip())
    family, mode, base, overrides, elevated = QUANT_TABLE[name]
    assert cells[1:5] == [family, mode, base, overrides], got
    assert " ".join([", ".join(cells[5:]), *got[1:]]).replace(", ", ",").replace(",", ", ") == elevated


def test_quantisation_table_fits_120_columns(rows):
    lines = quant_lines(rows, width=120)
    assert all(len(ln) <= 120 for ln in lines), max(lines, key=len)
    # the elevated column wraps under itself, never inside an item
    cont = [ln for ln in lines if ln.startswith(" ")]
    assert cont, "\n".join(lines)
    col = next(ln for ln in lines if "elevated above base" in ln).index("elevated above base")
    assert all(len(ln) - len(ln.lstrip()) == col for ln in cont)
    assert "shared_expert 8b ×12" in "\n".join(lines)


def test_one_line_per_model_even_under_several_settings(rows):
    twice = [*rows, {**rows[1], "top_k": 9, "model": rows[1]["model"] + " [K=9]"}]
    lines = quant_lines(twice)
    assert sum(1 for ln in lines if ln.split()[:1] == [rows[1]["model"]]) == 1


def _cells(line: str) -> list[str]:
    return line.split()


def test_leaderboard_marks_and_mean_per_bit(rows):
    """On real llama comparisons: mean/bit = mean / bits per weight; the best of each column is
    marked among the quants only (the reference's 0 KLD and 100% top-1 would win otherwise)."""
    llama = by_arch(rows, "llama")
    lines = leaderboard_lines(llama, quant=False)
    head = _cells(lines[0])
    assert head[:10] == ["model", "size", "MB", "bits/w", "mean", "95%", "CI", "vs", "above", "mean/bit"]
    table = {c[0]: c for c in map(_cells, lines[2 : 2 + len(llama)])}
    # columns after the name: size, bpw, mean, 95% CI, vs above, mean/bit, median, p95, p99, max, top1, result
    ref = table["llama"]
    assert not any(c.endswith("*") for c in ref), ref
    assert ref[-1] == "reference" and float(ref[3]) == 0.0 and ref[11] == "100.00%"
    by = {r["model"]: r for r in llama}
    for name, r in by.items():
        if r["is_reference"]:
            continue
        assert r["mean_per_bit"] == pytest.approx(r["mean"] / r["info"]["bits_per_weight"], rel=1e-12)
        assert float(table[name][6].rstrip("*")) == pytest.approx(r["mean_per_bit"], abs=6e-6)
        low, high = (float(x) for x in table[name][4].split("-"))
        assert low <= r["mean"] <= high  # the clustered 95% interval of the mean
    quants = [r for r in llama if not r["is_reference"]]
    for col, key, pick in ((3, "mean", min), (6, "mean_per_bit", min), (11, "top1", max),
                           (2, "bpw", min), (1, "size_mb", min), (10, "max", min)):
        best = pick(quants, key=lambda r: r[key])["model"]
        marked = [n for n, c in table.items() if c[col].endswith("*")]
        assert marked == [best], (key, marked, best)
    # the 8-bit quant has the lowest KLD, the 3-bit one the fewest bits
    assert table["llama-q8"][3].endswith("*") and table["llama-q3"][2].endswith("*")
    # sorted: reference first, then by mean
    order = [c[0] for c in map(_cells, lines[2 : 2 + len(llama)])]
    assert order[0] == "llama"
    assert order[1:] == [r["model"] for r in sorted(quants, key=lambda r: r["mean"])]


def test_nothing_marked_without_two_quants(rows):
    llama = by_arch(rows, "llama")
    one = [r for r in llama if r["is_reference"] or r["model"] == "llama-q4"]
    lines = leaderboard_lines(one, quant=False)
    assert not any("*" in ln for ln in lines[2:4])


def test_category_table_aligned_with_best_marked():
    rows = [
        {"model": "ref", "is_reference": True, "categories": {"multilingual": {"mean": 0.0}, "code": {"mean": 0.0}}},
        {"model": "q8", "categories": {"multilingual": {"mean": 0.0027}, "code": {"mean": 0.0012}}},
        {"model": "q4", "categories": {"multilingual": {"mean": 0.7}, "code": {"mean": 0.3}}},
    ]
    lines = category_lines(rows)
    head = lines[2]
    ends = [m.end() for m in re.finditer(r"\S+", head)][1:]
    for ln in lines[3:]:
        assert [m.end() for m in re.finditer(r"\S+", ln)][1:] == ends, (head, ln)  # right-aligned
    assert _cells(lines[4]) == ["q8", "0.00120*", "0.00270*"]
    assert "*" not in lines[3]  # the reference's zeros are not marked


def test_markdown_on_real_rows(rows):
    text = markdown(rows)
    board = [ln for ln in text.splitlines() if ln.startswith("| ")][: 1 + len(rows)]
    head = [c.strip() for c in re.split(r"(?<!\\)\|", board[0].strip("|"))]
    assert "mean/bit" in head
    body = {c[1]: c for c in ([x.strip() for x in re.split(r"(?<!\\)\|", ln.strip("|"))] for ln in board[1:])}
    mpb = head.index("mean/bit")
    for r in rows:
        cells = body[r["model"].replace("_", "\\_")]
        cell = cells[mpb]
        if r["is_reference"]:
            assert "**" not in "".join(cells)  # the reference is never bold
        else:
            assert float(cell.strip("*")) == pytest.approx(r["mean"] / r["info"]["bits_per_weight"], rel=1e-3)
    assert "linear\\_attn 6b ×10, router 16b float ×8, shared\\_expert 8b ×12" in text


# ---------------------------------------------------------------------------------------------
# The chart: labels readable
# ---------------------------------------------------------------------------------------------

# The demo's measured leaderboard (SmolLM2-135M, short mode, 784 positions): bits/w, mean KLD.
DEMO = {
    "reference": (16.0, 0.0),
    "8bit-g64": (8.502, 0.00158),
    "6bit-g64": (6.502, 0.02362),
    "4bit-g32": (5.003, 0.31007),
    "mixed_4_6": (4.710, 0.33601),
    "gptq-4bit-g64": (4.924, 0.38998),
    "4bit-g64": (4.503, 0.43457),
    "mixed_3_6": (3.814, 1.58351),
    "3bit-g64": (3.503, 2.06049),
}


def _demo_rows():
    return [
        {"model": n, "info": {"bits_per_weight": b}, "summary": {"mean": m, "count": 784},
         "is_reference": n == "reference", "outcome": "passed", "reference": "/x/reference", "top_k": 256}
        for n, (b, m) in DEMO.items()
    ]


def test_chart_labels_do_not_overlap_points_or_each_other():
    pytest.importorskip("matplotlib")
    fig = chart_figure(_demo_rows())
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    labels = {t.get_text(): t.get_window_extent(renderer) for t in ax.texts if t.get_text() in DEMO}
    assert set(labels) == set(DEMO) - {"reference"}  # the reference is not a point...
    notes = [t.get_text() for t in ax.texts if t.get_text() not in DEMO]
    assert any('the reference "reference", 16.00 bits/w' in n for n in notes)  # ...but named
    axes_box = ax.get_window_extent(renderer)
    points = {n: ax.transData.transform(DEMO[n]) for n in labels}
    r = 4 * fig.dpi / 72
    names = sorted(labels)
    for i, a in enumerate(names):
        box = labels[a]
        assert axes_box.x0 <= box.x0 and box.x1 <= axes_box.x1 and axes_box.y0 <= box.y0 and box.y1 <= axes_box.y1, a
        for b in names[i + 1 :]:
            assert not box.overlaps(labels[b]), (a, b)
        for b, (x, y) in points.items():
            if b != a:
                assert not (box.x0 - r < x < box.x1 + r and box.y0 - r < y < box.y1 + r), (a, "covers", b)
    assert "KL(reference || quant)" in ax.get_title() and "lower is better" in ax.get_ylabel()
    assert ax.get_yscale() == "log"
