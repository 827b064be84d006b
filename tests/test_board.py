"""Issue 24: one leaderboard model (pytest_kld/board.py) rendered by the terminal, the Markdown, the
JSON and the chart; a figure added to the figures table alone reaches every output, the
thresholds and the baselines."""

from __future__ import annotations

import json
import re

import pytest

from pytest_kld import options
from pytest_kld.board import build
from pytest_kld.markdown import markdown
from pytest_kld.report import heading, leaderboard_lines


@pytest.fixture(scope="module")
def rows(tiny_model, prose_spec, tmp_path_factory):
    """Real rows: the llama reference against itself and three quants; the 3-bit one failed."""
    from pytest_kld.cache import ensure_reference
    from pytest_kld.compare import compare
    from pytest_kld.reference import Settings
    from pytest_kld.run import row

    cache = ensure_reference(tiny_model("llama"), prose_spec, Settings(top_k=64, chunk_tokens=64),
                             cache_dir=tmp_path_factory.mktemp("board-cache"))
    out = [row(compare(cache, tiny_model("llama")), "passed")]
    for bits in (8, 4, 3):
        out.append(row(compare(cache, tiny_model("llama", bits=bits)), "failed" if bits == 3 else "passed"))
    return out


def _split(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def _terminal(lines: list[str], headings: dict) -> tuple[list, dict, list]:
    """(order, {column key: marked labels}, [(model, above, diff, apart)]) read off the terminal's text."""
    head = _split(lines[0])
    n = next(i for i, ln in enumerate(lines) if ln.startswith("* best in column")) - 2
    body = [_split(ln) for ln in lines[2 : 2 + n]]
    marks = {headings[h]: [c[0] for c in body if c[j].endswith("*")] for j, h in enumerate(head) if h in headings}
    pairs = []
    for ln in lines[lines.index(next(x for x in lines if x.startswith("paired difference"))) + 1 :]:
        m = re.match(r"  (\S+) - (\S+): ([-+]\d\.\d+) \[.*\]  (told apart|cannot be told apart)$", ln)
        if not m:
            break
        pairs.append((m[1], m[2], m[3], m[4] == "told apart"))
    return [c[0] for c in body], marks, pairs


def _markdown(text: str, headings: dict) -> tuple[list, dict, list]:
    tables, cur = [], []
    for ln in text.splitlines() + [""]:
        if ln.startswith("|"):
            cur.append([c.strip() for c in re.split(r"(?<!\\)\|", ln.strip()[1:-1])])
        elif cur:
            tables.append(cur)
            cur = []
    board, pairs = tables[0], next(t for t in tables if t[0][:2] == ["model", "row above"])
    head = ["mean" if h.startswith("mean KL") else h for h in board[0]]
    body = board[2:]
    marks = {headings[h]: [c[1] for c in body if c[j].startswith("**")] for j, h in enumerate(head) if h in headings}
    pairs = [(c[0], c[1], c[2], c[4] == "told apart") for c in pairs[2:]]
    return [c[1] for c in body], marks, pairs


def test_the_same_run_rendered_three_ways_agrees(rows, tmp_path):
    """Order, best marks and neighbour pairs are the same in the terminal, the Markdown and the
    JSON, each rendered from the rows on its own."""
    from tiny import validate_results

    from pytest_kld.run import defaults, write_json

    board = build(rows)
    headings = {c.heading: c.key for c in board.columns}
    t_order, t_marks, t_pairs = _terminal(leaderboard_lines(rows, quant=False),
                                          {heading(c): c.key for c in board.columns})
    m_order, m_marks, m_pairs = _markdown(markdown(rows), headings)
    write_json(tmp_path / "r.json", defaults(), rows)
    doc = json.loads((tmp_path / "r.json").read_text())
    validate_results(doc)
    lb = doc["leaderboard"]
    j_pairs = [(p["model"], p["above"], f"{p['diff']:+.5f}", p["apart"]) for p in lb["pairs"]]

    assert t_order == m_order == lb["order"] == ["llama", "llama-q8-g64", "llama-q4-g64", "llama-q3-g64"]
    assert t_marks == m_marks == lb["marks"]
    assert t_marks["mean"] == ["llama-q8-g64"] and t_marks["bpw"] == ["llama-q3-g64"]  # the reference is never marked
    assert t_pairs == m_pairs == j_pairs and len(j_pairs) == 2  # q4 under q8, q3 under q4
    assert all(apart for *_, apart in j_pairs)  # 8, 4 and 3 bits are told apart on these positions
    assert lb["pareto"] == ["llama-q3-g64", "llama-q4-g64", "llama-q8-g64"]  # each better and bigger


def test_merge_reads_a_results_file_of_before_the_leaderboard(rows, tmp_path, capsys):
    """A results file without "leaderboard" is still valid and merges into the same leaderboard;
    merge keeps the per-category table when asked (or when the run asked)."""
    from tiny import validate_results

    from pytest_kld.cli import main
    from pytest_kld.run import defaults, write_json

    write_json(tmp_path / "new.json", defaults(), rows)
    doc = json.loads((tmp_path / "new.json").read_text())
    old = {k: v for k, v in doc.items() if k != "leaderboard"}
    validate_results(old)
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main(["merge", str(tmp_path / "old.json"), "--by-category", "--json", str(tmp_path / "m.json")]) == 1  # q3 failed
    assert json.loads((tmp_path / "m.json").read_text())["leaderboard"] == doc["leaderboard"]
    out = capsys.readouterr().out
    assert "mean KLD by category" in out and "FAIL" in out


def test_pareto_front_leaves_out_a_quant_both_bigger_and_worse():
    rows = [{"model": m, "summary": {"mean": mean}, "info": {"bits_per_weight": bpw}, "nonfinite": 0}
            for m, bpw, mean in (("a", 4.0, 0.4), ("b", 4.5, 0.5), ("c", 5.0, 0.3), ("d", 3.0, 2.0),
                                 ("e", 3.0, 2.5))]
    board = build(rows)
    assert [board.rows[i]["label"] for i in board.pareto] == ["d", "a", "c"]  # b: a is smaller and better


def test_chart_draws_intervals_failed_crosses_and_the_pareto_front(rows):
    pytest.importorskip("matplotlib")
    from pytest_kld.chart import chart_figure

    board = build(rows)
    ax = chart_figure(board).axes[0]
    front = next(ln for ln in ax.get_lines() if ln.get_label().startswith("Pareto"))
    assert list(front.get_xdata()) == [board.rows[i]["bpw"] for i in board.pareto]
    assert list(front.get_ydata()) == [board.rows[i]["mean"] for i in board.pareto]
    bars = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(bars) == 3  # one 95% interval per quant (the reference is not a point)
    for bar, r in zip(bars, board.rows[1:]):
        (segs,) = [c for c in bar.lines[2]]
        (x0, y0), (x1, y1) = segs.get_segments()[0]
        assert x0 == x1 == r["bpw"] and y0 == pytest.approx(r["ci95_low"]) and y1 == pytest.approx(r["ci95_high"])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "failed" in legend and "passed" in legend and any(t.startswith("Pareto") for t in legend)
    failed = [c for c in ax.collections if c.get_offsets().shape[0] == 1
              and tuple(c.get_offsets()[0]) == (board.rows[3]["bpw"], board.rows[3]["mean"])]
    assert failed and all(c.get_facecolor()[0][0] > 0.8 for c in failed)  # red, drawn as a cross


P75 = options.Figure("p75", "75th percentile of KLD", percentile=75.0, heading="P75", baseline=True)


def test_a_figure_added_to_the_table_alone_reaches_every_output(pytester, tiny_model, monkeypatch):
    """P75, one more row of options.FIGURES in this test only: computed, a leaderboard column in
    the terminal and the Markdown, in the JSON (schema-valid), an assert_kld threshold and a
    baseline figure."""
    from tiny import validate_results

    monkeypatch.setattr(options, "FIGURES", (*options.FIGURES, P75))
    pytester.makepyfile(test_q=(
        "import os\n"
        "def test_q(assert_kld):\n"
        "    assert_kld(os.environ['Q'], name='q4', p75=float(os.environ['P75']), baseline_fail='p75:50%')\n"))
    monkeypatch.setenv("Q", str(tiny_model("llama", bits=4)))
    monkeypatch.setenv("P75", "100")
    args = [f"--kld-reference={tiny_model('llama')}", "--kld-n-chunks=4", f"--kld-cache-dir={pytester.path / 'c'}",
            f"--kld-json={pytester.path / 'r.json'}", f"--kld-markdown={pytester.path / 'r.md'}",
            "-p", "no:cacheprovider"]

    result = pytester.runpytest_inprocess(*args, "--kld-update-baselines")
    result.assert_outcomes(passed=1)
    doc = json.loads((pytester.path / "r.json").read_text())
    validate_results(doc)
    (r,) = doc["results"]
    p75 = r["summary"]["p75"]
    assert r["summary"]["median"] <= p75 <= r["summary"]["p90"] and r["thresholds"]["p75"] == 100
    assert {"key": "p75", "heading": "P75", "better": "low"} in doc["leaderboard"]["columns"]
    head = next(ln for ln in result.stdout.lines if ln.startswith("model "))
    assert "P75" in _split(head)
    assert re.search(r"\| P75 \|", (pytester.path / "r.md").read_text())
    (base,) = (pytester.path / "kld_baselines").rglob("q4.json")
    assert json.loads(base.read_text())["summary"]["p75"] == p75

    result = pytester.runpytest_inprocess(*args)  # gated on its baseline by p75
    result.assert_outcomes(passed=1)
    gate = json.loads((pytester.path / "r.json").read_text())["results"][0]["baseline"]
    assert gate["verdict"] == "same" and gate["figures"]["p75"]["diff"] == 0.0

    monkeypatch.setenv("P75", str(p75 * 0.99))  # a threshold just below the observed value
    result = pytester.runpytest_inprocess(*args)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*p75: {p75:.6g} > allowed {p75 * 0.99:.6g}*FAILED"])


def test_a_plugged_section_reaches_terminal_markdown_and_json(tmp_path):
    """What a later feature (sensitivity, cards) adds to the board is printed and carried."""
    from pytest_kld.board import Section
    from pytest_kld.run import defaults, write_json

    rows = [{"model": m, "summary": {"mean": mean, "count": 10}, "info": {"bits_per_weight": b}, "outcome": "passed"}
            for m, b, mean in (("a", 4.0, 0.4), ("b", 8.0, 0.01))]
    board = build(rows)
    board.sections.append(Section("sensitivity", ["", "sensitivity: layer 3 first"], ["### Sensitivity", ""],
                                  {"layers": [3, 1]}))
    assert leaderboard_lines(board)[-1] == "sensitivity: layer 3 first"
    assert "### Sensitivity" in markdown(board)
    write_json(tmp_path / "r.json", defaults(), board)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["leaderboard"]["sections"] == {"sensitivity": {"layers": [3, 1]}}
    assert doc["leaderboard"]["order"] == ["b", "a"] and doc["results"] == rows
