"""Issue 24: every default and choice list lives in options.py (the settings table, the choice
lists beside it, the figures table) and is read from there; the README's options table says the
same; no module imports another's private name."""

from __future__ import annotations

import ast
import json
import re
from importlib.resources import files
from pathlib import Path

import pytest

from pytest_kld import options
from pytest_kld.options import BY_DEST, OPTIONS, default

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted((ROOT / "pytest_kld").glob("*.py"))


def test_modules_read_their_defaults_from_the_table(monkeypatch):
    from pytest_kld import cache, corpus, distributed, forward
    from pytest_kld.corpus import corpus_spec
    from pytest_kld.reference import Settings

    s = Settings()
    assert (s.top_k, s.chunk_tokens, s.exec) == (default("top_k"), default("chunk_tokens"), default("exec"))
    assert cache.LOCK_TIMEOUT == default("lock_timeout")
    assert corpus.MODES is options.MODES and BY_DEST["mode"].choices == options.MODES
    assert forward.EXEC_MODES is options.EXEC_MODES and BY_DEST["exec"].choices == options.EXEC_MODES
    assert distributed.DIST_BACKENDS is options.DIST_BACKENDS and BY_DEST["backend"].choices == options.DIST_BACKENDS
    assert BY_DEST["vocab_backend"].choices == options.VOCAB_BACKENDS
    assert corpus_spec("drift").drift_tokens == default("drift_tokens")
    monkeypatch.setitem(options.N_CTX, "short", 300)  # read when a spec is made, not copied at import
    assert corpus_spec("short").n_ctx == 300


def _literals(path: Path):
    """Module-level constants of ``path`` that are literal tuples, lists or dicts: (name, value)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, (ast.Tuple, ast.List, ast.Dict)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            try:
                yield getattr(target, "id", "?"), ast.literal_eval(node.value)
            except ValueError:
                continue


def test_no_module_restates_a_choice_list_or_a_default_table():
    tables = [options.MODES, options.N_CTX, options.EXEC_MODES, options.VOCAB_BACKENDS, options.DIST_BACKENDS,
              *(o.choices for o in OPTIONS if o.choices), options.percentiles(),
              {k: q / 100 for k, q in options.percentiles().items()}]
    found = [(p.name, name) for p in MODULES if p.name != "options.py" for name, v in _literals(p)
             if any(v == t or (isinstance(v, (tuple, list)) and tuple(v) == tuple(t)) for t in tables)]
    assert not found, f"restated outside options.py: {found}"


def test_the_results_schema_knows_the_tables_choices():
    schema = json.loads(files("pytest_kld").joinpath("data/results.schema.json").read_text())
    row = schema["$defs"]["row"]["properties"]
    assert row["mode"]["enum"] == [*options.MODES, None]
    assert row["exec"]["enum"] == [m for m in options.EXEC_MODES if m != "auto"]  # as resolved
    assert row["vocab_backend"]["enum"] == [b for b in options.VOCAB_BACKENDS if b != "auto"]
    backend = row["cache"]["properties"]["vocab_backend"]["properties"]
    assert backend["requested"]["enum"] == list(options.VOCAB_BACKENDS)


def test_one_percentile_table():
    """stats computes, and a baseline tolerance may name, exactly the figures table's percentiles."""
    import numpy as np

    from pytest_kld import regression, stats
    from pytest_kld.regression import parse_tolerance

    assert not hasattr(stats, "PERCENTILES") and not hasattr(regression, "QUANTILES")
    s = stats.summarize(np.linspace(0.0, 1.0, 1001))
    for name, q in options.percentiles().items():
        assert s[name] == pytest.approx(q / 100, abs=1e-12), name
    assert set(parse_tolerance(",".join(f"{k}:1%" for k in options.baseline_figures()))) == set(options.baseline_figures())
    assert set(options.percentiles()) | {"mean"} == set(options.baseline_figures())


def _readme_options() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("| option | default | meaning |"):]
    section = section[: section.index("\n\n")]
    out = {}
    for line in section.splitlines()[2:]:
        flag, dflt = (c.strip() for c in re.split(r"(?<!\\)\|", line.strip("|"))[:2])
        out[re.match(r"`--kld-([a-z-]+)", flag)[1]] = dflt.strip("`")
    return out


def test_readme_options_table_matches_the_table():
    readme = _readme_options()
    assert set(readme) == {o.name for o in OPTIONS}, (set(readme) ^ {o.name for o in OPTIONS})
    for o in OPTIONS:
        got = readme[o.name]
        if o.kind is bool:
            assert got == "off", o.name
        elif o.default is not None:
            assert got == str(o.default), (o.name, got)
    assert readme["n-ctx"] == " / ".join(str(n) for n in dict.fromkeys((options.N_CTX["short"], options.N_CTX["long"])))
    assert readme["n-chunks"].endswith(f"/ {options.N_CHUNKS_LONG}")


def test_no_private_name_is_imported_across_modules():
    found = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("pytest_kld")):
                found += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found
