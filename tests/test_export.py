"""markdown.py and chart.py: the GitHub Markdown summary and the PNG chart."""

from __future__ import annotations

import re
import struct
import sys
import zlib

import pytest

from pytest_kld.board import DIRECTION, build
from pytest_kld.chart import write_chart
from pytest_kld.errors import KldError
from pytest_kld.markdown import markdown, write_markdown


def _info(name, bpw, *, label="4-bit g64", elevated=None, overrides=0, hist=None, **kw):
    return {
        "name": name,
        "label": label,
        "bits_per_weight": bpw,
        "weight_bytes": int(bpw * 1e6),
        "params": 135_000_000,
        "quantized": label != "float16",
        "mode": "affine" if label != "float16" else "none",
        "base_bits": 4 if label != "float16" else None,
        "group_size": 64 if label != "float16" else None,
        "family": "RTN uniform" if label != "float16" else "none",
        "recipe": None,
        "overrides": overrides,
        "override_bits": hist or {},
        "elevated": elevated or {},
        **kw,
    }


def _summary(mean, **kw):
    return {
        "mean": mean,
        "median": mean / 2,
        "p95": mean * 3,
        "p99": mean * 5,
        "max": mean * 20,
        "top1": 0.9,
        "count": 4600,
        **kw,
    }


@pytest.fixture
def rows():
    return [
        {
            "model": "smol-q4",
            "info": _info("smol-q4", 4.5),
            "summary": _summary(0.42, se=0.004),
            "is_reference": False,
            "passed": False,
        },
        {
            "model": "smol-ref",
            "info": _info("smol-ref", 16.0, label="float16"),
            "summary": _summary(0.0),
            "is_reference": True,
            "passed": None,
        },
        {
            "model": "smol|mixed*3_6",  # Markdown specials in a name
            "info": _info(
                "smol|mixed*3_6",
                4.34,
                label="mixed_3_6 g64",
                recipe="mixed_3_6",
                elevated={"lm_head": {"6": 1}, "mlp": {"6": 4}},
                overrides=5,
                hist={"6": 5},
                family="RTN mixed",
            ),
            "summary": _summary(0.11),
            "is_reference": False,
            "passed": True,
        },
        {
            "model": "smol-q8",
            "info": _info("smol-q8", 8.5, label="8-bit g64"),
            "summary": _summary(0.0016),
            "is_reference": False,
            "passed": None,
        },
    ]


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def split_row(line: str) -> list[str]:
    """Cells of a GitHub table row, splitting on pipes not escaped by a backslash."""
    assert line.startswith("|") and line.endswith("|"), line
    cells, cur, i = [], "", 1
    body = line[1:-1]
    while i <= len(body):
        c = body[i - 1]
        if c == "\\" and i < len(body):
            cur += c + body[i]
            i += 2
            continue
        if c == "|":
            cells.append(cur.strip())
            cur = ""
        else:
            cur += c
        i += 1
    cells.append(cur.strip())
    return cells


def tables(text: str) -> list[list[list[str]]]:
    """Every table in ``text`` (consecutive lines starting with '|'), as rows of cells, checked
    for a separator row and one column count."""
    out, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            assert len(block) >= 2, block
            header, sep, *body = [split_row(x) for x in block]
            assert all(re.fullmatch(r":?-{3,}:?", c) for c in sep), block[1]
            for r in [sep, *body]:
                assert len(r) == len(header), (header, r)
            out.append([header, *body])
            block = []
    return out


def test_markdown_is_two_valid_tables(rows, tmp_path):
    path = write_markdown(rows, tmp_path / "summary.md", {"reference": "smol-ref", "K": 256})
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"## pytest-kld: {DIRECTION}")
    assert "KL(reference \\|\\| quant)" in text  # the one label, its pipes escaped for a table
    assert "- **reference**: smol-ref" in text and "- **K**: 256" in text
    board, quant = tables(text)
    assert len(board) == 1 + len(rows) and len(quant) == 1 + len(rows)
    assert any("KL(reference \\|\\| quant)" in h for h in board[0])


def test_markdown_order_and_cells(rows):
    board, quant = tables(markdown(rows))
    h = board[0]
    col = {name: h.index(name) for name in ("model", "bits/w", "result", "top-1", "positions")}
    mean_col = next(i for i, c in enumerate(h) if c.startswith("mean"))
    models = [r[col["model"]] for r in board[1:]]
    # reference first, then mean ascending
    assert models == ["smol-ref", "smol-q8", "smol\\|mixed\\*3\\_6", "smol-q4"]
    cells = {r[col["model"]]: r for r in board[1:]}
    assert cells["smol-ref"][col["result"]] == "reference"
    assert cells["smol-q4"][col["result"]] == "❌ fail"
    assert cells["smol\\|mixed\\*3\\_6"][col["result"]] == "✅ pass"
    assert cells["smol-q8"][col["result"]] == "-"
    assert cells["smol-q4"][mean_col] == "0.42 ± 0.004"
    assert cells["smol-q8"][mean_col] == "**0.0016**"  # best mean, bold
    assert cells["smol-q4"][col["bits/w"]] == "4.500"
    assert cells["smol\\|mixed\\*3\\_6"][col["bits/w"]] == "**4.340**"  # fewest bits, bold
    assert cells["smol-ref"][col["bits/w"]] == "16.000"  # the reference is never marked
    assert cells["smol-q4"][col["top-1"]] == "90.00%"
    assert cells["smol-q4"][col["positions"]] == "4600"

    qh = quant[0]
    qcells = {r[0]: r for r in quant[1:]}
    mixed = qcells["smol\\|mixed\\*3\\_6"]
    assert mixed[qh.index("family")] == "RTN mixed (mixed\\_3\\_6)"
    assert mixed[qh.index("overrides")] == "5 (6b ×5)"
    assert mixed[qh.index("tensors elevated above base")] == "lm\\_head 6b, mlp 6b ×4"
    assert qcells["smol-q4"][qh.index("tensors elevated above base")] == "none"
    assert qcells["smol-ref"][qh.index("tensors elevated above base")] == "-"
    assert qcells["smol-ref"][qh.index("params")] == "135M"


def test_markdown_tolerates_missing_info_and_outcome_key():
    rows = [
        {"model": "a", "summary": {"mean": float("nan")}, "outcome": "failed"},
        {
            "model": "b",
            "info": {"error": "no config.json | here"},
            "summary": {},
            "outcome": "passed",
        },
        {"model": "multi\nline"},
    ]
    board, quant = tables(markdown(rows))
    res = board[0].index("result")
    got = {r[1]: r[res] for r in board[1:]}
    assert got == {"a": "❌ fail", "b": "✅ pass", "multi line": "-"}
    assert any("unreadable" in r[1] for r in quant[1:])


def test_markdown_append_for_step_summary(rows, tmp_path):
    p = tmp_path / "step_summary.md"
    p.write_text("# earlier step\n")
    write_markdown(rows, p, {}, append=True)
    write_markdown(rows[:1], p, {}, append=True)
    text = p.read_text()
    assert text.startswith("# earlier step\n")
    assert text.count(f"## pytest-kld: {DIRECTION}") == 2
    assert len(tables(text)) == 4


def test_markdown_unwritable_path_is_kld_error(rows, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(KldError, match="cannot write the Markdown summary"):
        write_markdown(rows, blocker / "sub" / "summary.md", {})


# ---------------------------------------------------------------------------------------------
# chart
# ---------------------------------------------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    w, h = struct.unpack(">II", data[16:24])
    crc = struct.unpack(">I", data[29:33])[0]
    assert zlib.crc32(data[12:29]) == crc
    return w, h


def test_chart_is_a_png_of_the_right_size(rows, tmp_path):
    pytest.importorskip("matplotlib")
    path = write_chart(rows, tmp_path / "out" / "kld.png", dpi=100)
    data = path.read_bytes()
    assert png_size(data) == (800, 500)
    assert data.rstrip(b"\0").endswith(b"IEND\xaeB`\x82")


def test_chart_has_the_points(rows, tmp_path):
    """Coloured markers: a red (failed), a green (passed) and a blue (no verdict) point."""
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    img = imread(str(write_chart(rows, tmp_path / "kld.png")))[..., :3]
    assert img.std() > 0.01  # not blank

    def has(rgb):
        r, g, b = (c / 255 for c in rgb)
        near = (
            (abs(img[..., 0] - r) < 0.05)
            & (abs(img[..., 1] - g) < 0.05)
            & (abs(img[..., 2] - b) < 0.05)
        )
        return int(near.sum())

    assert has((0xD6, 0x27, 0x28)) > 20  # failed: red
    assert has((0x2C, 0xA0, 0x2C)) > 20  # passed: green
    assert has((0x1F, 0x77, 0xB4)) > 20  # no verdict: blue
    # without the failed row there is no red marker
    img2 = imread(
        str(write_chart([r for r in rows if r["passed"] is not False], tmp_path / "b.png"))
    )
    img = img2[..., :3]
    assert has((0xD6, 0x27, 0x28)) == 0


def test_chart_positions_follow_the_data(rows, tmp_path):
    """A larger mean KLD puts its marker higher on the chart (a smaller image row index)."""
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    def marker_row(path, rgb):
        img = imread(str(path))[..., :3]
        img = img[:, : int(img.shape[1] * 0.7)]  # left of the legend (upper right)
        r, g, b = (c / 255 for c in rgb)
        ys, _ = (
            (abs(img[..., 0] - r) < 0.05)
            & (abs(img[..., 1] - g) < 0.05)
            & (abs(img[..., 2] - b) < 0.05)
        ).nonzero()
        assert len(ys) > 20
        return ys.mean()

    pair = [dict(rows[0]), dict(rows[2])]  # red q4 (0.42), green mixed (0.11)
    y_red = marker_row(write_chart(pair, tmp_path / "a.png"), (0xD6, 0x27, 0x28))
    y_green = marker_row(write_chart(pair, tmp_path / "a.png"), (0x2C, 0xA0, 0x2C))
    assert y_red < y_green  # image rows grow downwards: the larger KL sits higher


def test_chart_without_plottable_rows(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        {
            "model": "ref",
            "info": {"bits_per_weight": 16.0},
            "summary": {"mean": 0.0},
            "is_reference": True,
        }
    ]
    assert png_size(write_chart(rows, tmp_path / "empty.png").read_bytes()) == (960, 600)


def test_chart_does_not_touch_pyplot_backend(rows, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    before = matplotlib.rcParams["backend"]
    write_chart(rows, tmp_path / "kld.png")
    assert matplotlib.rcParams["backend"] == before


def test_chart_without_matplotlib_is_one_line(rows, tmp_path, monkeypatch):
    for mod in list(sys.modules):
        if mod == "matplotlib" or mod.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(KldError) as e:
        write_chart(rows, tmp_path / "kld.png")
    msg = str(e.value)
    assert "pip install 'pytest-kld[chart]'" in msg and "\n" not in msg
    assert not (tmp_path / "kld.png").exists()


def test_ordered_rows_keeps_all(rows):
    assert sorted(r["model"] for r in build(rows).rows) == sorted(r["model"] for r in rows)


def test_no_matplotlib_or_mlx_at_import():
    import subprocess

    code = (
        "import sys, pytest_kld.markdown, pytest_kld.chart, pytest_kld.models; "
        "heavy = ('matplotlib', 'mlx', 'mlx_lm', 'huggingface_hub'); "
        "bad = [m for m in heavy if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_markdown_has_the_per_category_table_the_terminal_shows():
    rows = [
        {"model": "ref", "is_reference": True, "summary": {"mean": 0.0}, "categories": {"code": {"mean": 0.0}, "prose": {"mean": 0.0}}},
        {"model": "q8", "summary": {"mean": 0.01}, "categories": {"code": {"mean": 0.02}, "prose": {"mean": 0.005}}},
        {"model": "q4", "summary": {"mean": 0.4}, "categories": {"code": {"mean": 0.01}, "prose": {"mean": 0.6}}},
        {"model": "nan", "summary": {"mean": 0.0, "nonfinite": 3}, "nonfinite": 3,
         "categories": {"code": {"mean": 0.0}, "prose": {"mean": 0.0}}},
    ]
    text = markdown(rows)
    lines = text.splitlines()
    i = next(n for n, ln in enumerate(lines) if "by corpus category" in ln)
    table = {ln.split("|")[1].strip(): ln for ln in lines[i + 2 : i + 8] if ln.startswith("| ") and "---" not in ln}
    assert "| model | code | prose |" in lines[i + 2]
    assert "**0.01**" in table["q4"] and "**0.005**" in table["q8"]  # lowest per category
    assert "**" not in table["nan"] and "**" not in table["ref"]  # broken and reference rows never best
