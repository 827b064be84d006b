"""A quant's figures where its users read them: the model card (``README.md``) of the quant.

    results JSON ─► the quant's row (matched by weights fingerprint) and its neighbours
                 ─► a Markdown section between markers + ``model-index`` eval results ─► README.md

Matching: the quant's directory (or the hub snapshot of a repo id) is fingerprinted as the run
did (:func:`pytest_kld.fingerprint.weights_fingerprint`: content SHA-256 of every file), and
the one row with that fingerprint is the quant's. Content, not paths: a moved, renamed or freshly
downloaded copy of the same bytes matches; a rebuilt quant (other bytes, other figures) does not.
README.md itself is not part of the fingerprint, so writing the card never changes the match.

The card: the author's text outside :data:`START`/:data:`END` stays byte for byte (a rerun
replaces the section, a first run appends it); the front matter goes through huggingface_hub's
card API (``ModelCard``, ``ModelCardData``, ``EvalResult``): the author's keys and values are kept
(in their order; formatting is huggingface_hub's YAML dump, so comments in the front matter do not
survive), other tools' eval results are kept, and pytest-kld's own (``source.name: pytest-kld``)
are replaced by this run's. Nothing is written when the results file, the row or the card is
wrong: one line says what.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from .errors import KldError

START = "<!-- pytest-kld card: start (written by `pytest-kld card`; a rerun replaces this section) -->"
END = "<!-- pytest-kld card: end -->"
CHART_NAME = "pytest-kld-chart.png"
SOURCE_NAME = "pytest-kld"
SOURCE_URL = "https://github.com/pytest-kld/pytest-kld"
SCHEMA_VERSION = 1  # of the results JSON this reads (run.RESULTS_SCHEMA_VERSION)
CORPORA = {  # mode -> (dataset_type, dataset_config, dataset_split, description)
    "short": ("pytest-kld/prompts", None, None, "pytest-kld's bundled prompt set"),
    "drift": ("pytest-kld/prompts", "drift", None, "pytest-kld's bundled prompts, the quant's own continuations"),
    "long": ("wikitext", "wikitext-2-raw-v1", "test", "WikiText-2 (raw, test split)"),
}


class CardError(KldError):
    """A results file, quant or card that cannot make a card: nothing was written."""


# ---------------------------------------------------------------------------------------------
# the results file and the quant's row
# ---------------------------------------------------------------------------------------------


def load_results(path) -> dict:
    """The results document at ``path``, of the schema version this reads (one line otherwise)."""
    from .files import read_json

    try:
        doc = read_json(path)  # the guarded reader: size, depth and number limits, one line
    except (OSError, KldError) as e:
        raise CardError(f"{path}: not a readable results file ({e}); write one with --kld-json or --json") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise CardError(f"{path}: not a pytest-kld results file (no results list)")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise CardError(f"{path}: results of schema version {doc.get('schema_version')!r}; this pytest-kld reads "
                        f"version {SCHEMA_VERSION}: rerun the comparison with this version")
    return doc


def match_row(doc: dict, quant_dir: Path, where: str) -> dict:
    """The one non-reference row whose weights fingerprint is ``quant_dir``'s."""
    from .fingerprint import weights_fingerprint

    try:
        mine = weights_fingerprint(quant_dir)
    except (OSError, KldError) as e:
        raise CardError(f"{where}: cannot fingerprint its weights ({e})") from None
    found = [r for r in doc["results"] if str(r.get("fingerprint") or "") == mine]
    refs = {(r.get("cache") or {}).get("reference_fingerprint") for r in doc["results"]}
    if any(r.get("is_reference") for r in found) or mine in refs:
        raise CardError(f"{where} is the reference of this run (KL 0 by construction): give a quant")
    if not found:
        names = ", ".join(str(r.get("model")) for r in doc["results"]) or "none"
        raise CardError(f"{where}: no row of the results has its weights fingerprint {mine[:28]}… "
                        f"(rows: {names}); compare this exact quant first")
    if len(found) > 1:
        settings = "; ".join(f"mode {r.get('mode')} K {r.get('top_k')} exec {r.get('exec')}" for r in found)
        raise CardError(f"{where}: {len(found)} rows match ({settings}); give a results file of one setting")
    return found[0]


def run_rows(doc: dict, row: dict) -> list[dict]:
    """The quants measured on the same reference cache as ``row``, best mean first."""
    from .report import ordered_rows

    key = (row.get("cache") or {}).get("key")
    return ordered_rows(r for r in doc["results"]
                        if not r.get("is_reference") and (r.get("cache") or {}).get("key") == key)


# ---------------------------------------------------------------------------------------------
# what was measured against what
# ---------------------------------------------------------------------------------------------


def _local(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") != 1


def provenance(doc: dict, row: dict) -> dict:
    """Reference, corpus, K, exec, tool: what someone needs to reproduce or compare the figures."""
    from .report import display_name

    s, cache = doc.get("settings") or {}, row.get("cache") or {}
    ref = str(row.get("reference") or s.get("reference") or "?")
    mode = row.get("mode") or s.get("mode")
    dtype, config, split, text = CORPORA.get(mode, (None, None, None, None))
    if dtype is None:  # a file corpus: its name; its content is pinned by the token checksum
        name = os.path.basename(str(s.get("dataset") or "corpus"))
        dtype, text = f"file:{name}", f"the file {name}"
    return {
        "reference": display_name(ref) if _local(ref) else ref,
        "reference_is_local": _local(ref),
        "reference_revision": None if _local(ref) else s.get("revision"),
        "reference_fingerprint": cache.get("reference_fingerprint"),
        "mode": mode, "dataset_type": dtype, "dataset_config": config, "dataset_split": split,
        "corpus": text, "n_ctx": s.get("n_ctx"), "n_chunks": s.get("n_chunks"),
        "corpus_sha256": cache.get("corpus_sha256"), "positions": row.get("count"),
        "top_k": row.get("top_k"), "exec": row.get("exec"), "version": doc.get("version"),
        "created": doc.get("created"),
    }


# ---------------------------------------------------------------------------------------------
# the Markdown section
# ---------------------------------------------------------------------------------------------


def _f(v, fmt: str) -> str:
    return fmt.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def section(doc: dict, row: dict, *, chart: str | None = None) -> str:
    """The card's Markdown section, markers included: the quant's row and its neighbours of the
    same run, the paired difference from the row above, and the provenance."""
    from .regression import neighbour_text, neighbours
    from .report import DIRECTION, ci_text

    rows = run_rows(doc, row)
    i = next(j for j, r in enumerate(rows) if r is row)
    lo, hi = max(0, i - 1), min(len(rows), i + 2)
    pairs = neighbours(rows)
    p = provenance(doc, row)
    out = [START, "", "## KL divergence from the reference (pytest-kld)", "",
           f"{DIRECTION} in nats per scored token position, weighted by the reference's probabilities: "
           f"0 is the reference itself, lower is closer. This model (**bold**) and its neighbours by mean "
           f"KLD among the {len(rows)} quants measured in the same run.", "",
           "| model | bits/weight | mean KLD | 95% CI | P99 | top-1 agreement | vs row above |",
           "|:---|---:|---:|---:|---:|---:|---:|"]
    for j in range(lo, hi):
        r = rows[j]
        d = pairs.get(j)
        cells = [r.get("model"), _f(r.get("bpw"), "{:.3f}"), _f(r.get("mean"), "{:.5f}"), ci_text(r) or "-",
                 _f(r.get("p99"), "{:.4f}"), _f(r.get("top1"), "{:.2%}"),
                 neighbour_text(d, rows[j - 1].get("mean")) if d else ""]
        cells = [_cell(c) for c in cells]
        if j == i:
            cells = [f"**{c}**" if c else c for c in cells]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "vs row above: the paired difference of mean KLD over the same positions, ≈ when its 95% "
            "interval (chunks resampled) holds 0.", ""]
    out += [f"- {k}: {v}" for k, v in _facts(p, row).items()]
    if chart:
        out += ["", f"![mean KLD against bits per weight, every quant of the run]({chart})"]
    return "\n".join([*out, "", END]) + "\n"


def _facts(p: dict, row: dict) -> dict:
    ref = f"`{p['reference']}`" + (f" @ `{p['reference_revision']}`" if p["reference_revision"] else "")
    ref += " (a local directory)" if p["reference_is_local"] else ""
    corpus = f"{p['corpus']} (mode `{p['mode']}`"
    corpus += "".join(f", {k} {p[k]}" for k in ("n_ctx", "n_chunks") if p.get(k))
    corpus += f"), {p['positions']} positions scored, token checksum sha256 `{p['corpus_sha256']}`"
    return {
        "reference": f"{ref}, weights fingerprint `{p['reference_fingerprint']}`",
        "corpus": corpus,
        "K (reference log-probs kept per position)": p["top_k"],
        "exec": f"`{p['exec']}`",
        "this model's weights fingerprint": f"`{row.get('fingerprint')}`",
        **({"non-finite positions": f"{row['nonfinite']}: NaN or inf log-probs, left out of every figure; "
            "the model is broken"} if row.get("nonfinite") else {}),
        "measured with": f"pytest-kld {p['version']}, {p['created']}",
    }


def splice(text: str, block: str) -> str:
    """``text`` with its marked section replaced by ``block``, or ``block`` appended after a
    blank line; everything outside the markers byte for byte. Line endings follow ``text``."""
    nl = "\r\n" if "\r\n" in text else "\n"
    block = block.replace("\n", nl)
    starts, ends = text.count(START), text.count(END)
    if starts == ends == 0:
        sep = "" if not text else (nl if text.endswith(("\n", "\r")) else nl + nl)
        return text + sep + block
    a, b = text.find(START), text.find(END)
    if starts != 1 or ends != 1 or b < a:
        raise CardError(f"the card has {starts} start and {ends} end markers of a pytest-kld section (out of "
                        "order or repeated): leave one pair, or remove both to append a new section")
    b += len(END)
    if text.startswith(nl, b):
        b += len(nl)
    return text[:a] + block + text[b:]


# ---------------------------------------------------------------------------------------------
# the front matter: model-index through huggingface_hub
# ---------------------------------------------------------------------------------------------


def eval_results(doc: dict, row: dict) -> list:
    """huggingface_hub ``EvalResult``\\ s of the row: mean KLD (with its interval), P99, top-1
    agreement, bits per weight; the reference, corpus, K, exec and tool in each one's args."""
    from huggingface_hub import EvalResult

    from .report import DIRECTION

    p = provenance(doc, row)
    args = {"direction": DIRECTION, "reference": p["reference"], "reference_revision": p["reference_revision"],
            "reference_fingerprint": p["reference_fingerprint"], "top_k": p["top_k"], "exec": p["exec"],
            "tool": f"pytest-kld {p['version']}"}
    args = {k: v for k, v in args.items() if v is not None}
    dataset = {"dataset_type": p["dataset_type"], "dataset_config": p["dataset_config"],
               "dataset_split": p["dataset_split"], "dataset_name": f"{p['corpus']} ({p['positions']} positions)",
               "dataset_args": {k: p[k] for k in ("mode", "n_ctx", "n_chunks", "corpus_sha256") if p.get(k)}}
    ci = [row.get("ci95_low"), row.get("ci95_high")]
    figures = [
        ("kl_divergence", f"mean {DIRECTION} (nats, lower is better)", row.get("mean"),
         dict(args, ci95=ci) if all(isinstance(v, (int, float)) for v in ci) else args),
        ("kl_divergence_p99", f"P99 of {DIRECTION} (nats, lower is better)", row.get("p99"), args),
        ("top1_agreement", "top-1 agreement with the reference (share of positions, higher is better)",
         row.get("top1"), args),
        ("bits_per_weight", "bits per weight", row.get("bpw"), None),
    ]
    return [EvalResult(task_type="text-generation", task_name="KL divergence from the reference",
                       metric_type=t, metric_name=name, metric_value=v, metric_args=a,
                       source_name=SOURCE_NAME, source_url=SOURCE_URL, **dataset)
            for t, name, v, a in figures if isinstance(v, (int, float)) and math.isfinite(v)]


def updated_card(text: str, block: str, results: list, model_name: str, where: str) -> str:
    """The card ``text`` with the section spliced in and ``results`` as pytest-kld's eval results."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    nl = "\r\n" if "\r\n" in text else "\n"
    if not REGEX_YAML_BLOCK.search(text):  # no front matter yet: an empty one, the text after it as it was
        text = f"---{nl}{nl}---{nl}" + text
    try:
        card = ModelCard(text)
    except Exception as e:  # yaml's errors, not a mapping, a model-index huggingface_hub refuses
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CardError(f"{where}: its front matter does not parse ({type(e).__name__}: {first}); "
                        "fix the YAML between the --- lines, nothing was written") from None
    card.text = splice(card.text, block)
    kept = [r for r in (card.data.eval_results or []) if r.source_name != SOURCE_NAME]
    card.data.eval_results = kept + results
    card.data.model_name = card.data.model_name or model_name
    return str(card)


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------


def write_card(results_path, quant: str, *, out=None, push: str | bool | None = None) -> tuple[Path, str | None]:
    """``pytest-kld card``: write the card of ``quant`` (a local model directory or a hub repo id)
    from ``results_path`` into ``out``/README.md (default: the quant's directory), the chart beside
    it; with ``push`` (a hub model repo id, or True: ``quant``'s), upload both. Returns (the README
    written, the repo pushed to or None)."""
    from .hub import hub_offline, resolve_model

    local = Path(os.path.expanduser(quant))
    if push is True:
        if local.is_dir():
            raise CardError(f"--push: {quant} is a local directory; name the hub model repo: --push ORG/NAME")
        push = quant
    if push:
        _can_push(push)
    doc = load_results(results_path)
    if local.is_dir():
        model_dir, card_in = local, local / "README.md"
    else:
        model_dir = resolve_model(quant)
        card_in = _hub_readme(quant, hub_offline())
        if out is None and not push:
            raise CardError(f"{quant} is a hub repo: give --out DIR for its card (or --push to upload it)")
    row = match_row(doc, model_dir, quant)
    try:
        text = card_in.read_bytes().decode("utf-8") if card_in and card_in.is_file() else ""
    except (OSError, UnicodeDecodeError) as e:
        raise CardError(f"{card_in}: cannot read the card ({e})") from None
    chart = (doc.get("settings") or {}).get("chart")
    chart = Path(chart) if chart and Path(chart).is_file() else None
    block = section(doc, row, chart=CHART_NAME if chart else None)
    name = quant if not local.is_dir() else local.resolve().name
    content = updated_card(text, block, eval_results(doc, row), name, str(card_in or quant))
    target = Path(out) if out is not None else (local if local.is_dir() else Path(tempfile.mkdtemp(prefix="kld-card-")))
    return _save(target, content, chart, push), push or None


def _save(target: Path, content: str, chart: Path | None, push: str | None) -> Path:
    from .files import write_bytes, write_text

    if not target.is_dir():
        raise CardError(f"--out {target}: not a directory; create it first")
    readme = target / "README.md"
    try:
        if chart and chart.resolve() != (target / CHART_NAME).resolve():
            write_bytes(target / CHART_NAME, chart.read_bytes())
        write_text(readme, content)
    except OSError as e:
        raise CardError(f"{readme}: cannot write the card ({e})") from None
    if push:
        push_card(push, readme, target / CHART_NAME if chart else None)
    return readme


def _hub_readme(repo: str, offline: bool) -> Path | None:
    """The hub repo's README.md (from the hub cache first), or None when it has none."""
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    from .hub import hub_cache_dir

    try:
        return Path(huggingface_hub.hf_hub_download(repo, "README.md", cache_dir=str(hub_cache_dir()),
                                                    local_files_only=offline))
    except EntryNotFoundError:
        return None
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CardError(f"{repo}: cannot fetch its README.md ({type(e).__name__}: {first})") from None


def _can_push(repo: str) -> None:
    """Before any work: offline or without a token a push cannot happen."""
    import huggingface_hub

    from .hub import hub_offline

    if hub_offline():
        raise CardError(f"--push {repo}: HF_HUB_OFFLINE is set, nothing is uploaded offline; unset it to push, "
                        "or drop --push to write the card locally")
    if not huggingface_hub.get_token():
        raise CardError(f"--push {repo}: no hub token; log in with `hf auth login` or set HF_TOKEN")


def push_card(repo: str, readme: Path, chart: Path | None) -> None:
    """One commit to the model repo through huggingface_hub's public API: README.md and the chart."""
    from huggingface_hub import CommitOperationAdd, HfApi

    ops = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(readme))]
    if chart is not None:
        ops.append(CommitOperationAdd(path_in_repo=CHART_NAME, path_or_fileobj=str(chart)))
    try:
        HfApi().create_commit(repo, operations=ops, repo_type="model",
                              commit_message="pytest-kld: KL divergence from the reference on the model card")
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CardError(f"--push {repo}: the upload failed ({type(e).__name__}: {first}); the card is at "
                        f"{readme}") from None
