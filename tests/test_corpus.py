"""Corpus: prompt set, WikiText-2 (offline, through the real huggingface_hub), user files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from tiny import write_tokenizer

from pytest_kld import corpus as C
from pytest_kld.corpus import CorpusSpec, corpus_spec
from pytest_kld.errors import CorpusError
from pytest_kld.sources import WIKITEXT_FILE, WIKITEXT_REPO, wikitext_text
from pytest_kld.tokens import tokenize_corpus

# --------------------------------------------------------------------------------------------
# tokenizers: the tiny byte-level one (one token per UTF-8 byte), and a variant that adds BOS
# --------------------------------------------------------------------------------------------


# A strict template, like Gemma's or Mistral's: user/assistant alternation only, content trimmed.
STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | trim + '<|im_end|>\\n' }}"
    "{% endfor %}"
)


def _make_tokenizer(
    path: Path, *, bos: bool = False, template: bool = True, merges: int = 0, strict=False
) -> Path:
    write_tokenizer(path, merges=merges)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    if strict:
        cfg["chat_template"] = STRICT_TEMPLATE
    if bos:
        from tokenizers import Tokenizer, processors

        t = Tokenizer.from_file(str(path / "tokenizer.json"))
        bos_id = t.token_to_id("<|endoftext|>")
        t.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A",
            pair="<|endoftext|> $A <|endoftext|> $B",
            special_tokens=[("<|endoftext|>", bos_id)],
        )
        t.save(str(path / "tokenizer.json"))
        cfg["bos_token"] = "<|endoftext|>"
    if not template:
        cfg.pop("chat_template")
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(_make_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tok_bos(tmp_path_factory):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(_make_tokenizer(tmp_path_factory.mktemp("tokbos"), bos=True))


@pytest.fixture(scope="module")
def tok_plain(tmp_path_factory):
    """No chat template."""
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(_make_tokenizer(tmp_path_factory.mktemp("tokplain"), template=False))


@pytest.fixture(scope="module")
def tok_merges(tmp_path_factory):
    """Merged tokens ("th", "the", "an", ...): token boundaries no longer one per byte."""
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(_make_tokenizer(tmp_path_factory.mktemp("tokm"), merges=6))


@pytest.fixture(scope="module")
def tok_strict(tmp_path_factory):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(_make_tokenizer(tmp_path_factory.mktemp("toks"), strict=True))


def ids_of(tok, s: str) -> list[int]:
    return list(tok.encode(s, add_special_tokens=False))


def check_ranges(tc, n_ctx):
    assert len(tc.chunks) == len(tc.score_ranges) == len(tc.categories) == len(tc.names)
    for c, (s, e) in zip(tc.chunks, tc.score_ranges):
        assert isinstance(c, np.ndarray) and c.dtype == np.int32 and c.ndim == 1
        assert len(c) <= n_ctx
        assert 0 <= s < e <= len(c) - 1
    ident = tc.identity
    assert ident["chunks"] == len(tc.chunks)
    assert ident["tokens"] == sum(len(c) for c in tc.chunks) == tc.n_tokens
    assert ident["scored"] == sum(e - s for s, e in tc.score_ranges) == tc.n_scored
    json.dumps(ident)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------------------------
# short mode: our prompt set
# --------------------------------------------------------------------------------------------


def test_prompt_set_content():
    records = C.load_records(C._bundled_prompts(), "jsonl")
    assert 45 <= len(records) <= 60
    assert len({r.id for r in records}) == len(records)
    cats = {}
    for r in records:
        cats.setdefault(r.category, []).append(r)
        n = len(r.text.encode())  # "a few hundred characters" (CJK: 3 bytes each)
        assert 250 <= n <= 1100, (r.id, n)
        assert r.context, f"{r.id} has no prompt: the chat template would have no user turn"
    assert set(cats) == {"prose", "code", "json", "math", "multilingual", "chat"}
    assert all(len(v) >= 6 for v in cats.values()), {k: len(v) for k, v in cats.items()}
    # The file is ordered round-robin by category, so the first n prompts cover them all.
    assert {r.category for r in records[:6]} == set(cats)
    # Several languages and scripts really present (not transliterated).
    text = "".join(r.text for r in cats["multilingual"])
    scripts = {
        "CJK": "CJK UNIFIED",
        "Hiragana": "HIRAGANA",
        "Hangul": "HANGUL",
        "Cyrillic": "CYRILLIC",
        "Arabic": "ARABIC",
        "Devanagari": "DEVANAGARI",
        "Greek": "GREEK",
    }
    names = [unicodedata.name(ch, "") for ch in text]
    for script, prefix in scripts.items():
        assert sum(n.startswith(prefix) for n in names) >= 40, script
    for word in ("maraîchers", "Sauerteig", "Dormir", "茶", "四季", "баня", "القراءة", "मानसून"):
        assert word in text
    # Code in several languages, and JSON that parses.
    code = " ".join(r.text for r in cats["code"])
    for fence in ("```python", "```rust", "```javascript", "```sql", "```bash", "```c\n", "```go"):
        assert fence in code
    parsed = 0
    for r in cats["json"]:
        try:
            json.loads(r.text)
            parsed += 1
        except json.JSONDecodeError:
            pass
    assert parsed >= 4
    # Multi-turn chats are there too (messages, last one scored).
    assert any(len(r.context) >= 3 for r in cats["chat"])


def test_package_data_is_shipped():
    from importlib.resources import files

    assert (files("pytest_kld") / "data" / "prompts.jsonl").is_file()
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'pytest_kld = ["data/*"]' in pyproject


def test_short_mode_with_chat_template(tok):
    spec = corpus_spec()
    assert spec.mode == "short" and spec.kind == "records" and spec.n_ctx == 512
    tc = tokenize_corpus(spec, tok)
    check_ranges(tc, 512)
    records = C.load_records(C._bundled_prompts(), "jsonl")
    assert len(tc.chunks) == len(records)
    assert len(set(tc.categories)) >= 6
    assert tc.names == [r.id for r in records]
    im_start, im_end = ids_of(tok, "<|im_start|>")[0], ids_of(tok, "<|im_end|>")[0]
    for c, (s, e), rec in zip(tc.chunks, tc.score_ranges, records):
        assert c[0] == im_start  # the template, not the raw text, opens the chunk
        head = tok.decode(c[: s + 1].tolist())
        assert head.endswith("<|im_start|>assistant\n"), head[-40:]
        assert rec.context[-1]["content"] in head  # the prompt is the context...
        body = ids_of(tok, rec.text)
        assert list(c[s + 1 : s + 1 + 20]) == body[:20]  # ...the reply is what is scored
        if e == len(c) - 1 and len(c) == 512:
            continue  # truncated at n_ctx
        assert c[e] == im_end  # the last scored output predicts the end of the turn


def test_short_mode_counts(tok):
    """The byte-level tokenizer: one token per UTF-8 byte, so counts are predictable."""
    big = tokenize_corpus(corpus_spec(n_ctx=4096), tok)
    check_ranges(big, 4096)
    records = C.load_records(C._bundled_prompts(), "jsonl")
    text_bytes = sum(len(r.text.encode()) for r in records)
    # every byte of every reply is predicted, plus its end-of-turn token
    assert big.n_scored == text_bytes + len(records)
    assert 15_000 < big.n_tokens < 40_000
    # cut at the default n_ctx=512
    short = tokenize_corpus(corpus_spec(), tok)
    assert [len(c) for c in short.chunks] == [min(len(c), 512) for c in big.chunks]
    assert short.n_scored < big.n_scored
    # n_chunks: the first n prompts, all categories among them
    few = tokenize_corpus(corpus_spec(n_chunks=6), tok)
    assert len(few.chunks) == 6 and len(set(few.categories)) == 6


def test_short_mode_without_chat_template(tok):
    tc = tokenize_corpus(corpus_spec(chat_template=False), tok)
    check_ranges(tc, 512)
    records = C.load_records(C._bundled_prompts(), "jsonl")
    specials = set(ids_of(tok, "<|im_start|><|im_end|><|endoftext|>"))
    for c, (s, e), rec in zip(tc.chunks, tc.score_ranges, records):
        assert not specials & set(c.tolist())
        context = "".join(m["content"] + "\n\n" for m in rec.context)
        expected = ids_of(tok, context + rec.text)[:512]
        assert c.tolist() == expected
        assert s == len(ids_of(tok, context)) - 1  # predicts the first byte of the reply
        assert e == len(c) - 1


def test_tokenizer_without_template_gives_plain_text(tok, tok_plain):
    with_flag = tokenize_corpus(corpus_spec(n_chunks=5), tok_plain)
    plain = tokenize_corpus(corpus_spec(n_chunks=5, chat_template=False), tok)
    assert [c.tolist() for c in with_flag.chunks] == [c.tolist() for c in plain.chunks]
    assert with_flag.score_ranges == plain.score_ranges


def test_hf_tokenizer_directly(tok):
    """A Hugging Face tokenizer (not mlx-lm's wrapper) gives the same ids."""
    spec = corpus_spec(n_chunks=8)
    a = tokenize_corpus(spec, tok)
    b = tokenize_corpus(spec, tok._tokenizer)
    assert [c.tolist() for c in a.chunks] == [c.tolist() for c in b.chunks]
    assert a.identity == b.identity


def test_exact_positions_of_one_record(tmp_path, tok):
    f = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "Hi", "text": "abcdefghij"}])
    # plain: "Hi\n\nabcdefghij", 14 bytes; the reply starts at token 4
    tc = tokenize_corpus(corpus_spec(dataset=f, chat_template=False), tok)
    assert len(tc.chunks[0]) == 14
    assert tc.score_ranges == [(8, 13)]  # score_offset 8 is later than 4 - 1
    tc = tokenize_corpus(corpus_spec(dataset=f, chat_template=False, score_offset=0), tok)
    assert tc.score_ranges == [(3, 13)]  # output 3 ("\n") predicts "a"
    # template: <|im_start|> "user\nHi" <|im_end|> "\n" <|im_start|> "assistant\n" = 21 tokens,
    # then 10 reply bytes (21..30), <|im_end|> at 31, "\n" at 32
    tc = tokenize_corpus(corpus_spec(dataset=f), tok)
    c = tc.chunks[0]
    assert len(c) == 33
    assert tc.score_ranges == [(20, 31)]
    assert c[31] == ids_of(tok, "<|im_end|>")[0]
    assert tc.categories == ["file"] and tc.names == ["1"]


def test_bos_rules(tmp_path, tok_bos):
    bos = ids_of(tok_bos, "<|endoftext|>")[0]
    f = write_jsonl(tmp_path / "r.jsonl", [{"text": "x" * 30, "category": "mine", "id": "a"}])
    tc = tokenize_corpus(corpus_spec(dataset=f), tok_bos)
    assert tc.chunks[0][0] == bos and len(tc.chunks[0]) == 31
    assert tc.score_ranges == [(8, 30)] and tc.categories == ["mine"] and tc.names == ["a"]
    # a chat template that does not write BOS itself: BOS is added (mlx-lm's rule)
    tc = tokenize_corpus(corpus_spec(n_chunks=2), tok_bos)
    assert all(c[0] == bos for c in tc.chunks)
    assert int(np.sum(tc.chunks[0] == bos)) == 1


# --------------------------------------------------------------------------------------------
# documents: .txt files and long mode
# --------------------------------------------------------------------------------------------

TEXT = "".join(f"Line {i:03d} of a known text, for exact counts.\n" for i in range(40))


def test_txt_document_exact_chunks(tmp_path, tok):
    f = tmp_path / "doc.txt"
    f.write_text(TEXT)
    data = TEXT[:-1].encode()  # one trailing newline dropped, as llama.cpp's -f does
    assert len(data) == 40 * 44 - 1 == 1759
    spec = corpus_spec(dataset=f, n_ctx=64)
    assert spec.mode == "file" and spec.kind == "document" and spec.n_chunks is None
    tc = tokenize_corpus(spec, tok)
    check_ranges(tc, 64)
    assert len(tc.chunks) == 1759 // 64 == 27
    assert tc.score_ranges == [(32, 63)] * 27  # llama.cpp: first = n_ctx/2 .. n_ctx-2
    assert tc.n_scored == 27 * 31
    ids = ids_of(tok, TEXT[:-1])
    assert len(ids) == len(data)  # one token per byte
    for i, c in enumerate(tc.chunks):
        assert c.tolist() == ids[i * 64 : (i + 1) * 64]
    assert set(tc.categories) == {"file"}
    tc = tokenize_corpus(corpus_spec(dataset=f, n_ctx=64, n_chunks=4, score_offset=10), tok)
    assert len(tc.chunks) == 4 and tc.score_ranges == [(10, 63)] * 4
    tc = tokenize_corpus(corpus_spec(dataset=f, n_ctx=100, n_chunks=500), tok)
    assert len(tc.chunks) == 17  # as many as there are


def test_long_mode_on_local_text_with_bos(tmp_path, tok_bos):
    """Long mode from a local wiki.test.raw: BOS once, then it replaces each chunk's first token."""
    f = tmp_path / "wiki.test.raw"
    f.write_text(TEXT)
    bos = ids_of(tok_bos, "<|endoftext|>")[0]
    spec = corpus_spec("long", dataset=f, n_ctx=128, n_chunks=3)
    assert spec.kind == "document" and spec.score_offset == 64
    tc = tokenize_corpus(spec, tok_bos)
    ids = [bos] + ids_of(tok_bos, TEXT[:-1])
    assert len(tc.chunks) == 3
    for i, c in enumerate(tc.chunks):
        want = ids[i * 128 : (i + 1) * 128]
        want[0] = bos
        assert c.tolist() == want
    assert tc.score_ranges == [(64, 127)] * 3
    assert tc.categories == ["wikitext"] * 3


# WikiText in the layout of the Hugging Face parquet: one row a line, blank lines as "".
WIKI_ROWS = [
    "",
    " = Test Article = \n",
    "",
    " The first paragraph of a small test article , with WikiText 's spacing . \n",
    " It has a second line of text for good measure . \n",
    "",
    " = = Section = = \n",
    "",
] + [f" Sentence number {i} of the section , repeated to make it long . \n" for i in range(30)]
WIKI_RAW = "".join(r if r else " \n" for r in WIKI_ROWS)[:-1]


def lay_out_hub_cache(root: Path, rows, commit="0123456789abcdef0123456789abcdef01234567") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = root / "datasets--Salesforce--wikitext"
    target = repo / "snapshots" / commit / WIKITEXT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": rows}), target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return target


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))  # read by corpus_spec at call time
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def test_wikitext_offline_through_huggingface_hub(hub_cache, tok):
    target = lay_out_hub_cache(hub_cache, WIKI_ROWS)
    spec = corpus_spec("long", n_ctx=256)
    assert Path(spec.path) == target  # found by huggingface_hub in our cache, offline
    assert spec.n_chunks == 32 and spec.score_offset == 128
    assert spec.source == f"{WIKITEXT_REPO}:{WIKITEXT_FILE}"
    assert wikitext_text(target) == WIKI_RAW
    assert WIKI_RAW.startswith(" \n = Test Article = \n \n The first")
    tc = tokenize_corpus(spec, tok)
    check_ranges(tc, 256)
    n = len(WIKI_RAW.encode()) // 256
    assert len(tc.chunks) == n >= 8
    joined = [t for c in tc.chunks for t in c.tolist()]
    assert joined == ids_of(tok, WIKI_RAW)[: n * 256]
    assert tc.score_ranges == [(128, 255)] * n and set(tc.categories) == {"wikitext"}
    assert tc.identity["scored"] == n * 127
    # defaults: up to 32 chunks of 2048; this text has room for one
    tc = tokenize_corpus(corpus_spec("long"), tok)
    assert [len(c) for c in tc.chunks] == [2048] and tc.score_ranges == [(1024, 2047)]
    with pytest.raises(CorpusError, match="less than one chunk") as err:
        tokenize_corpus(corpus_spec("long", n_ctx=4096), tok)
    one_line(err.value)


def test_wikitext_explicit_cache_dir_and_key(tmp_path, monkeypatch, tok):
    pytest.importorskip("pyarrow")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "nowhere"))
    root = tmp_path / "cache"
    lay_out_hub_cache(root, WIKI_ROWS)
    a = corpus_spec("long", cache_dir=root, local_files_only=True, n_ctx=256)
    b = corpus_spec("long", cache_dir=root, local_files_only=True, n_ctx=256, chat_template=False)
    assert a.key_dict() == b.key_dict()  # the chat template does not apply to documents
    # a new revision of the data → a new key
    lay_out_hub_cache(root, WIKI_ROWS[:-1], commit="f" * 40)
    c = corpus_spec("long", cache_dir=root, local_files_only=True, n_ctx=256)
    assert c.key_dict() != a.key_dict()
    assert c.key_dict()["sha256"] != a.key_dict()["sha256"]


def test_wikitext_missing_offline_is_one_clear_line(hub_cache):
    with pytest.raises(CorpusError) as err:
        corpus_spec("long")
    msg = one_line(err.value)
    assert "hf download Salesforce/wikitext --repo-type dataset" in msg
    assert "wikitext-2-raw-v1/test-*" in msg and str(hub_cache) in msg and "offline" in msg


def test_parquet_needs_pyarrow(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a)
    )
    f = tmp_path / "d.parquet"
    f.write_bytes(b"PAR1")
    with pytest.raises(CorpusError, match=r"pytest-kld\[parquet\]") as err:
        corpus_spec(dataset=f)
    one_line(err.value)
    with pytest.raises(CorpusError, match=r"pytest-kld\[parquet\]"):
        corpus_spec("long", local_files_only=True)


# --------------------------------------------------------------------------------------------
# user records: .jsonl and .parquet
# --------------------------------------------------------------------------------------------


def test_user_jsonl_records(tmp_path, tok):
    rows = [
        {"id": "r1", "category": "legal", "text": "The tenant shall keep the premises clean."},
        {"text": "No category, no id, just text long enough to be scored."},
        {
            "category": "support",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Reset my password?"},
                {"role": "assistant", "content": "Use the link on the sign-in page."},
            ],
        },
    ]
    f = write_jsonl(tmp_path / "mine.jsonl", rows)
    f.write_text(f.read_text() + "\n   \n")  # blank lines are skipped
    tc = tokenize_corpus(corpus_spec(dataset=f), tok)
    check_ranges(tc, 512)
    assert tc.categories == ["legal", "file", "support"]
    assert tc.names == ["r1", "2", "3"]
    assert tc.chunks[0].tolist() == ids_of(tok, rows[0]["text"])  # no context: plain text
    head = tok.decode(tc.chunks[2][: tc.score_ranges[2][0] + 1].tolist())
    assert head.startswith("<|im_start|>system\nBe brief.") and head.endswith("assistant\n")
    tc = tokenize_corpus(corpus_spec(dataset=f, category="mine"), tok)
    assert tc.categories == ["legal", "mine", "support"]


def test_user_parquet_records(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    texts = ["First parquet record, long enough.", "Second parquet record, also long."]
    pq.write_table(pa.table({"text": texts, "category": ["a", None]}), f)
    tc = tokenize_corpus(corpus_spec(dataset=f), tok)
    assert [c.tolist() for c in tc.chunks] == [ids_of(tok, t) for t in texts]
    assert tc.categories == ["a", "file"] and tc.score_ranges == [(8, 33), (8, 32)]


# --------------------------------------------------------------------------------------------
# the key
# --------------------------------------------------------------------------------------------


def test_key_dict(tmp_path):
    base = corpus_spec().key_dict()
    assert corpus_spec().key_dict() == base  # equal specs, equal dicts
    assert json.loads(json.dumps(base)) == base
    assert len(base["sha256"]) == 64
    for change in (
        dict(n_ctx=256),
        dict(n_chunks=10),
        dict(chat_template=False),
        dict(score_offset=4),
    ):
        assert corpus_spec(**change).key_dict() != base, change
    # defaults spelled out give the same key
    assert corpus_spec("short", n_ctx=512, score_offset=8, chat_template=True).key_dict() == base

    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "some text here, long enough"}])
    k1 = corpus_spec(dataset=f).key_dict()
    assert k1 != base and k1["mode"] == "file"
    # the same bytes elsewhere, under another name: the same corpus
    g = tmp_path / "sub" / "b.jsonl"
    g.parent.mkdir()
    shutil.copy(f, g)
    assert corpus_spec(dataset=g).key_dict() == k1
    # changed data: a new key
    write_jsonl(f, [{"text": "some text here, long enough!"}])
    assert corpus_spec(dataset=f).key_dict() != k1
    assert corpus_spec(dataset=f, category="x").key_dict() != corpus_spec(dataset=f).key_dict()


def test_identity_tracks_the_tokenizer(tok, tok_bos):
    spec = corpus_spec(n_chunks=3)
    a, b = tokenize_corpus(spec, tok), tokenize_corpus(spec, tok_bos)
    assert a.identity["token_sha256"] != b.identity["token_sha256"]
    assert {k: v for k, v in a.identity.items() if k in spec.key_dict()} == spec.key_dict()
    assert tokenize_corpus(spec, tok).identity == a.identity


def test_spec_is_frozen_and_cheap():
    spec = corpus_spec()
    assert isinstance(spec, CorpusSpec)
    with pytest.raises(AttributeError):
        spec.n_ctx = 3  # type: ignore[misc]
    code = "import sys, pytest_kld.corpus as c; c.corpus_spec(); print('mlx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_file_changed_after_spec(tmp_path, tok):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "some text here, long enough"}])
    spec = corpus_spec(dataset=f)
    write_jsonl(f, [{"text": "other text"}])
    with pytest.raises(CorpusError, match="changed since"):
        tokenize_corpus(spec, tok)


# --------------------------------------------------------------------------------------------
# errors: one line, naming the file (and line) and what to do
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("", "no records"),
        ("\n\n", "no records"),
        ('{"text": "ok, fine"}\n{"text": "broken\n', r"line 2: bad JSON"),
        ('{"text": "ok, fine"}\n\n{"body": "no text"}\n', r"line 3: no 'text' field.*body"),
        ('{"text": ""}\n', "line 1: 'text' must be a non-empty string"),
        ('{"text": 5}\n', "line 1: 'text' must be a non-empty string"),
        ('[1, 2]\n', "line 1: expected a JSON object"),
        ('{"messages": [{"role": "user"}]}\n', "line 1: 'messages' must be"),
        ('{"text": "fine text", "category": 3}\n', "line 1: 'category' must be a string"),
    ],
)
def test_bad_jsonl(tmp_path, tok, content, pattern):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(CorpusError, match=pattern) as err:
        tokenize_corpus(corpus_spec(dataset=f), tok)
    assert str(f) in one_line(err.value)


def test_bad_files_and_settings(tmp_path, tok):
    cases = [
        (dict(dataset=tmp_path / "missing.jsonl"), "not found"),
        (dict(dataset=tmp_path / "x.csv"), "unknown dataset type '.csv'"),
        (dict(mode="file"), "needs a dataset"),
        (dict(mode="medium"), "unknown corpus mode 'medium'"),
        (dict(n_ctx=1), "n_ctx must be at least 2"),
        (dict(n_ctx="many"), "n_ctx must be an integer"),
        (dict(n_chunks=0), "n_chunks must be at least 1"),
        (dict(score_offset=-1), "score_offset must be at least 0"),
        (dict(n_ctx=64, score_offset=63), "at most n_ctx - 2"),
        (dict(chat_template="yes"), "chat_template must be true or false"),
        (dict(category=""), "category must be a non-empty string"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(CorpusError, match=pattern) as err:
            corpus_spec(**kwargs)
        one_line(err.value)
    assert corpus_spec(n_ctx="128").n_ctx == 128  # ini values arrive as strings

    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(CorpusError, match="empty") as err:
        tokenize_corpus(corpus_spec(dataset=empty), tok)
    assert str(empty) in one_line(err.value)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(CorpusError, match="only 9 tokens, less than one chunk of n_ctx=512"):
        tokenize_corpus(corpus_spec(dataset=short), tok)
    j = write_jsonl(tmp_path / "j.jsonl", [{"text": "x"}])
    with pytest.raises(CorpusError, match="long mode reads one document"):
        corpus_spec("long", dataset=j)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 400)
    with pytest.raises(CorpusError, match="not UTF-8") as err:
        tokenize_corpus(corpus_spec(dataset=latin), tok)
    one_line(err.value)


def test_no_room_to_score(tmp_path, tok):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "A long question " * 8, "text": "Answer."}])
    with pytest.raises(CorpusError, match="record '1' leaves no position to score") as err:
        tokenize_corpus(corpus_spec(dataset=f, n_ctx=64), tok)
    assert "--kld-n-ctx" in one_line(err.value)


def test_bad_parquet(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"body": ["x"]}), f)
    with pytest.raises(CorpusError, match="no 'text' column.*body") as err:
        tokenize_corpus(corpus_spec(dataset=f), tok)
    assert str(f) in one_line(err.value)
    g = tmp_path / "junk.parquet"
    g.write_bytes(b"not parquet at all")
    with pytest.raises(CorpusError, match="not a readable parquet file") as err:
        tokenize_corpus(corpus_spec(dataset=g), tok)
    assert str(g) in one_line(err.value)
    h = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), h)
    with pytest.raises(CorpusError, match="no records"):
        tokenize_corpus(corpus_spec(dataset=h), tok)


def test_wikitext_download_path(tmp_path, monkeypatch):
    """Not cached and online: one download into the cache we name; failures → one line."""
    pytest.importorskip("pyarrow")
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    staged = lay_out_hub_cache(tmp_path / "elsewhere", WIKI_ROWS)
    calls = []

    def fake_download(**kw):
        calls.append(kw)
        if kw.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        return str(staged)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    spec = corpus_spec("long")
    assert Path(spec.path) == staged
    assert [c.get("local_files_only", False) for c in calls] == [True, False]
    assert all(c["cache_dir"] == str(tmp_path / "home" / "hub") for c in calls)  # HF_HOME, now
    assert calls[0]["repo_id"] == "Salesforce/wikitext" and calls[0]["repo_type"] == "dataset"

    def failing(**kw):
        if kw.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        raise ConnectionError("Name or service not known\nmore detail")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing)
    with pytest.raises(CorpusError, match="could not download WikiText-2.*Name or service") as err:
        corpus_spec("long")
    assert "hf download Salesforce/wikitext" in one_line(err.value)


def test_bundled_chats_suit_strict_templates(tok_strict, tmp_path):
    """Only user/assistant turns, alternating from the user: Gemma- or Mistral-style templates
    (which refuse a system turn) render every bundled prompt."""
    for r in C.load_records(C._bundled_prompts(), "jsonl"):
        roles = [m["role"] for m in r.context] + [r.role]
        assert roles == ["user", "assistant"] * (len(roles) // 2), r.id
    tc = tokenize_corpus(corpus_spec(n_ctx=4096), tok_strict)
    check_ranges(tc, 4096)
    records = C.load_records(C._bundled_prompts(), "jsonl")
    for c, (s, e), rec in zip(tc.chunks, tc.score_ranges, records):
        assert tok_strict.decode(c[s + 1 : e].tolist()) == rec.text.strip()
    # a user's record with a system turn: one line, naming the record and the way out
    f = write_jsonl(
        tmp_path / "sys.jsonl",
        [
            {
                "id": "s1",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello there, how can I help?"},
                ],
            }
        ],
    )
    with pytest.raises(CorpusError, match="record 's1'.*roles must alternate") as err:
        tokenize_corpus(corpus_spec(dataset=f), tok_strict)
    assert "--kld-no-chat-template" in one_line(err.value)
    assert tokenize_corpus(corpus_spec(dataset=f, chat_template=False), tok_strict).chunks


def test_merged_tokens_spans(tok_merges):
    """With merges, the scored span still starts at the reply's first token and ends with the
    end-of-turn prediction; without the template, at the first token after the blank line."""
    records = C.load_records(C._bundled_prompts(), "jsonl")
    im_end = ids_of(tok_merges, "<|im_end|>")[0]
    tc = tokenize_corpus(corpus_spec(n_ctx=4096), tok_merges)
    for c, (s, e), rec in zip(tc.chunks, tc.score_ranges, records):
        assert c[s + 1 : e].tolist() == ids_of(tok_merges, rec.text)
        assert c[e] == im_end
    plain = tokenize_corpus(corpus_spec(n_ctx=4096, chat_template=False), tok_merges)
    for c, (s, _), rec in zip(plain.chunks, plain.score_ranges, records):
        assert c[s + 1 :].tolist() == ids_of(tok_merges, rec.text)


def test_with_a_tiny_model_loaded_by_mlx_lm(tmp_path):
    """The tokenizer exactly as the engine gets it: ``mlx_lm.load`` on a tiny model dir."""
    import mlx_lm
    from tiny import build_model

    path = build_model(tmp_path / "tiny", "qwen3")
    _, tok = mlx_lm.load(str(path))
    tc = tokenize_corpus(corpus_spec(n_chunks=6), tok)
    check_ranges(tc, 512)
    assert len(set(tc.categories)) == 6
