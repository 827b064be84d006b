"""Hardening, round 2 (issue 23): results that a model, a baseline or a file cannot fake, no write
outside where it belongs, no hang and no traceback on hostile input. One test (at least) per
numbered item of the issue; each fails on the code before the fix."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pytest_kld.cache import ensure_reference
from pytest_kld.compare import compare
from pytest_kld.reference import Settings


def _padded(src, dst, *, extra: int = 64, scale: float = 3.0):
    """A copy of the tiny model ``src`` with ``extra`` more output rows (a padded vocabulary) that
    carry most of the probability mass: rows of its own head, scaled up."""
    import mlx.core as mx

    shutil.copytree(src, dst)
    weights = mx.load(str(dst / "model.safetensors"))
    head = weights["lm_head.weight"]
    weights["lm_head.weight"] = mx.concatenate([head, head[:extra] * scale])
    emb = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = mx.concatenate([emb, mx.zeros((extra, emb.shape[1]), emb.dtype)])
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = json.loads((dst / "config.json").read_text())
    config["vocab_size"] += extra
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)
    return dst


# ---------------------------------------------------------------------------------------------
# 1. mass outside the reference's vocabulary
# ---------------------------------------------------------------------------------------------


def test_mass_on_padding_rows_is_damage_and_an_argmax_there_a_disagreement(tiny_model, prose_spec, tmp_path):
    """K = the vocabulary, so the sparse record is exact: each position's KL must equal a dense
    float64 KL(reference || quant) with the quant normalised over its whole (wider) output, and
    top-1 must count an argmax among the padding rows as a disagreement."""
    import mlx.core as mx

    from pytest_kld.forward import load_model

    wide = _padded(tiny_model("llama"), tmp_path / "padded")
    cache = ensure_reference(tiny_model("llama"), prose_spec, Settings(top_k=1 << 20, chunk_tokens=0),
                             cache_dir=tmp_path / "c")
    vocab = cache.manifest["vocab_size"]
    r = compare(cache, wide)
    assert not r.is_reference
    lms = {"ref": load_model(tiny_model("llama"), "float32"), "quant": load_model(wide, "float32")}
    try:
        kl, agree = [], []
        for i in range(cache.n_chunks):
            s, e = (int(v) for v in cache.score_ranges[i])
            toks = mx.array(cache.chunk(i)[None, :e].astype(np.int32))
            lp = {k: np.array(lm.model(toks)[0, s:e].astype(mx.float32), dtype=np.float64) for k, lm in lms.items()}
            ref = lp["ref"] - np.logaddexp.reduce(lp["ref"], axis=-1, keepdims=True)
            q = lp["quant"] - np.logaddexp.reduce(lp["quant"], axis=-1, keepdims=True)  # whole output
            assert q.shape[1] == vocab + 64
            kl.append(np.sum(np.exp(ref) * (ref - q[:, :vocab]), axis=-1))
            agree.append(np.argmax(q, axis=-1) == np.argmax(ref, axis=-1))
    finally:
        for lm in lms.values():
            lm.release()
    kl, agree = np.concatenate(kl), np.concatenate(agree)
    assert (~agree).mean() > 0.2  # the padding rows win often: the case the issue describes
    np.testing.assert_allclose(r.kl, kl, rtol=2e-3, atol=2e-6)
    assert r.summary["mean"] > 0.1
    assert r.summary["top1"] == pytest.approx(agree.mean())
    # the reference itself is still exactly 0
    same = compare(cache, tiny_model("llama"))
    assert same.is_reference and np.all(same.kl == 0.0) and same.summary["top1"] == 1.0


def test_padding_mass_counts_in_drift_mode(tiny_model, tmp_path):
    """Trajectory KLD along the reference's continuation sees the padding rows' mass too, and the
    quant's own greedy continuation (which picks padding ids) leaves the reference's."""
    from pytest_kld.corpus import corpus_spec

    wide = _padded(tiny_model("llama"), tmp_path / "padded")
    cache = ensure_reference(tiny_model("llama"), corpus_spec("drift", n_chunks=3, drift_tokens=8),
                             cache_dir=tmp_path / "c")
    r = compare(cache, wide)
    assert r.summary["drift_kld"] > 0.1 and r.summary["top1"] < 0.9
    assert r.summary["drift_match_strict"] < 8


# ---------------------------------------------------------------------------------------------
# 2, 3, 7, 8: baselines
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_cache(tiny_model, tmp_path_factory):
    from pytest_kld.corpus import corpus_spec

    root = tmp_path_factory.mktemp("adv-cache")
    return ensure_reference(tiny_model("llama"), corpus_spec("short", n_chunks=4), cache_dir=root)


@pytest.fixture(scope="module")
def q4_result(short_cache, tiny_model):
    return compare(short_cache, tiny_model("llama", bits=4))


def _recorded(result, tmp_path, nodeid="t.py::test", slot="q4"):
    from pytest_kld.baselines import record

    return record(tmp_path / "b", result, nodeid, slot)


@pytest.mark.parametrize("edit", [1e6, 0.0, "nan-as-null", "string"])
def test_a_baseline_summary_that_disagrees_with_its_checksummed_data_is_refused(q4_result, tmp_path, edit):
    from pytest_kld.baselines import BaselineError, load

    path = _recorded(q4_result, tmp_path)
    doc = json.loads(path.read_text())
    doc["summary"]["mean"] = {"nan-as-null": None, "string": "0.1"}.get(edit, edit)
    doc["summary"]["p99"] = 1e6 if edit == "nan-as-null" else doc["summary"]["p99"]
    path.write_text(json.dumps(doc))
    with pytest.raises(BaselineError, match=r"summary disagrees with its per-position data \((mean|p99) ") as e:
        load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    doc["summary"]["mean"] = float("nan")  # NaN is not JSON: refused as such
    path.write_text(json.dumps(doc))
    with pytest.raises(BaselineError, match="unreadable"):
        load(path)


def test_the_verdict_uses_figures_recomputed_from_the_data_not_the_recorded_summary(q4_result, tmp_path):
    """A much worse quant against a baseline whose summary mean was made huge (or NaN) still
    fails: the relative tolerance is taken of the mean the per-position data give."""
    from pytest_kld.baselines import Baseline
    from pytest_kld.regression import judge, parse_tolerance

    base = q4_result.kl.astype(np.float32)
    now = base.astype(np.float64) * 1.5
    for forged in (1e6, float("nan")):
        b = Baseline(tmp_path / "b.json", {"summary": {"mean": forged}}, base, q4_result.chunk)
        v = judge(now, q4_result.chunk, {"mean": float(now.mean())}, b, parse_tolerance("mean:5%"))
        assert v["verdict"] == "worse", v
        assert v["figures"]["mean"]["allowed"] == pytest.approx(0.05 * base.astype(np.float64).mean(), rel=1e-9)


def test_ids_differing_only_in_replaced_characters_get_their_own_slots(tmp_path):
    from pytest_kld.baselines import slot_path

    ids = [f"tests/test_q.py::test_q[a{c}b]" for c in "/: _"]
    paths = {slot_path(tmp_path, i, "m") for i in ids}
    assert len(paths) == 4
    assert len({slot_path(tmp_path, "t.py::test", s) for s in ("a/b", "a:b", "a b", "a_b", ".a_b")}) == 5
    assert slot_path(tmp_path, "tests/test_q.py::test_q[4bit-g64]", "q4").relative_to(tmp_path).parts == (
        "tests", "test_q", "test_q[4bit-g64]", "q4.json")  # plain names stay readable


def test_a_baseline_of_another_test_is_refused(q4_result, tmp_path):
    import shutil as sh

    from pytest_kld.baselines import BaselineError, load, slot_path

    path = _recorded(q4_result, tmp_path, nodeid="t.py::test_a")
    other = slot_path(tmp_path / "b", "t.py::test_b", "q4")
    other.parent.mkdir(parents=True)
    sh.copy(path, other)
    with pytest.raises(BaselineError, match=r"recorded for the test t\.py::test_a, not t\.py::test_b"):
        load(other, "t.py::test_b")
    assert load(path, "t.py::test_a").kl.size == q4_result.kl.size


def test_two_calls_of_one_test_in_one_slot_are_an_error_naming_name(pytester, tiny_model, tmp_path):
    for side in ("a", "b"):
        shutil.copytree(tiny_model("llama", bits=8 if side == "a" else 4), tmp_path / side / "model")
    pytester.makepyfile(test_two=(
        "def test_two(assert_kld):\n"
        f"    assert_kld({str(tmp_path / 'a' / 'model')!r}, mean=100)\n"
        f"    assert_kld({str(tmp_path / 'b' / 'model')!r}, mean=100)\n"))
    args = [f"--kld-reference={tiny_model('llama')}", "--kld-n-chunks=2", f"--kld-cache-dir={tmp_path / 'c'}",
            "-p", "no:cacheprovider", f"--kld-baselines={tmp_path / 'bl'}"]
    result = pytester.runpytest_subprocess(*args, "--kld-update-baselines")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*assert_kld: test_two.py::test_two compares */a/model and */b/model under one "
                                 "baseline slot 'model'; give each call its own name=*"])
    assert len(list((tmp_path / "bl").rglob("*.json"))) == 1


def test_a_planted_link_in_a_shared_baselines_folder_is_not_followed(q4_result, tmp_path):
    from pytest_kld.baselines import BaselineError, record

    victim = tmp_path / "victim"
    victim.mkdir()
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "t").symlink_to(victim)  # kld_baselines/<test file> planted by another user
    with pytest.raises(BaselineError, match="symbolic link"):
        record(shared, q4_result, "t.py::test", "q4")
    assert list(victim.iterdir()) == []


_LOAD = ("import sys, resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 31, 1 << 31))\n"
         "from pytest_kld.baselines import load\n"
         "try:\n    load(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)\n")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_baseline_slot_that_is_a_fifo_or_a_device_neither_hangs_nor_reads_without_bound(tmp_path, kind):
    import os
    import subprocess
    import sys

    slot = tmp_path / "slot.json"
    if kind == "fifo":
        os.mkfifo(slot)
    else:
        slot.symlink_to("/dev/zero")
    try:
        p = subprocess.run([sys.executable, "-c", _LOAD, str(slot)], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading a baseline that is {kind} hangs")
    assert p.stdout.startswith("BaselineError") and "not a regular file" in p.stdout, p.stdout + p.stderr[-500:]
    assert p.stdout.count("\n") == 1


def test_baseline_data_not_a_whole_number_of_float32_is_one_line(q4_result, tmp_path):
    import base64
    import hashlib

    from pytest_kld.baselines import BaselineError, load

    path = _recorded(q4_result, tmp_path)
    doc = json.loads(path.read_text())
    data = base64.b64decode(doc["positions"]["data"])[:-1]
    doc["positions"].update(data=base64.b64encode(data).decode(), sha256=hashlib.sha256(data).hexdigest())
    path.write_text(json.dumps(doc))
    with pytest.raises(BaselineError, match="not whole float32 values"):
        load(path)


# ---------------------------------------------------------------------------------------------
# test gaps: the paired interval's width, a verdict at the tolerance's edge
# ---------------------------------------------------------------------------------------------


def test_paired_interval_is_95_percent_wide():
    """On a large synthetic sample (400 clusters) the bootstrap's 95% interval is ±1.96
    cluster-robust standard errors wide (a 90% interval would be ±1.645, 16% narrower)."""
    from pytest_kld.intervals import clustered, paired

    rng = np.random.default_rng(3)
    cluster = np.repeat(np.arange(400), 25)
    base = np.exp(np.repeat(rng.normal(0, 0.5, 400), 25) + rng.normal(-1, 0.5, cluster.size))
    now = base * np.exp(np.repeat(rng.normal(0.02, 0.05, 400), 25))
    m = paired(now, base, cluster)["mean"]
    assert (m["high"] - m["low"]) / (2 * 1.96 * m["se"]) == pytest.approx(1.0, abs=0.06)
    assert m["low"] < m["diff"] < m["high"]
    c = clustered(base, cluster)
    assert (c["ci95_high"] - c["ci95_low"]) / (2 * 1.96 * c["se_cluster"]) == pytest.approx(1.0, abs=0.06)


def test_five_point_one_percent_worse_under_mean_5_percent_fails_with_allowed_of_the_baseline():
    from pytest_kld.baselines import Baseline
    from pytest_kld.regression import judge, parse_tolerance

    rng = np.random.default_rng(0)
    cluster = np.repeat(np.arange(40), 50)
    base = np.exp(np.repeat(rng.normal(0, 0.5, 40), 50) + rng.normal(-1, 0.5, 2000)).astype(np.float32)
    now = base.astype(np.float64) * 1.051
    b = Baseline(None, {"summary": {"mean": float(base.astype(np.float64).mean())}}, base, cluster)
    v = judge(now, cluster, {"mean": float(now.mean())}, b, parse_tolerance("mean:5%"))
    f = v["figures"]["mean"]
    assert v["verdict"] == "worse" and f["status"] == "worse"
    assert f["allowed"] == pytest.approx(0.05 * base.astype(np.float64).mean(), rel=1e-12)
    within = judge(base.astype(np.float64) * 1.049, cluster, {}, b, parse_tolerance("mean:5%"))
    assert within["verdict"] == "worse within tolerance"


# ---------------------------------------------------------------------------------------------
# 5. a cache from elsewhere: every manifest field that becomes a path, a number or terminal text
# ---------------------------------------------------------------------------------------------


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "pytest_kld", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def _forged(cache, tmp_path, edit=None, text=None):
    """A copy of the cache entry with its manifest edited and re-signed (what anyone handing over
    a cache can do: the checksums are not keyed), or replaced by raw ``text``."""
    from pytest_kld.fingerprint import sha256_json

    entry = tmp_path / "entry"
    shutil.copytree(cache.path, entry)
    manifest = json.loads((entry / "manifest.json").read_text())
    if edit is not None:
        edit(manifest)
        manifest["manifest_sha256"] = sha256_json({k: v for k, v in manifest.items() if k != "manifest_sha256"})
    (entry / "manifest.json").write_text(text if text is not None else json.dumps(manifest))
    return entry


def test_export_of_a_forged_mode_writes_nothing_outside_its_folder(short_cache, tmp_path):
    entry = _forged(short_cache, tmp_path, lambda m: m["corpus"].update(mode="../escaped"))
    out = tmp_path / "out"
    p = _cli("export", entry, out)
    assert not list(tmp_path.glob("escaped*")), "export wrote outside its output folder"
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "corpus.mode" in p.stderr, p.stderr[-800:]


@pytest.mark.parametrize("field, edit, words", [
    ("ansi name", lambda m: m["reference"].update(name="ref\x1b[2J\x1b[31mOWNED"), "control characters in reference.name"),
    ("created_at", lambda m: m.update(created_at="yesterday"), "created_at"),
    ("drift_tokens", lambda m: m["corpus"].update(drift_tokens=[1]), "corpus.drift_tokens"),
    ("exec", lambda m: m["settings"].update(exec="$(rm -rf ~)"), "settings.exec"),
    ("vocab", lambda m: m.update(vocab_size=10**30), "vocab_size"),
])
def test_forged_manifest_fields_are_refused_in_one_line(short_cache, tmp_path, field, edit, words):
    from pytest_kld.errors import CacheError
    from pytest_kld.reference import ReferenceCache

    entry = _forged(short_cache, tmp_path, edit)
    with pytest.raises(CacheError) as e:
        ReferenceCache.load(entry)
    assert words in str(e.value) and "\n" not in str(e.value) and "\x1b" not in str(e.value)


@pytest.mark.parametrize("text, words", [
    ('{"deep": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested 100001 levels deep"),
    ('{"format_version": 2, "n": ' + "7" * 5000 + "}", "integer of 5000 digits"),
    ('{"format_version": 2, "x": NaN}', "NaN is not a number JSON allows"),
])
def test_hostile_manifest_json_is_one_line(short_cache, tmp_path, text, words):
    entry = _forged(short_cache, tmp_path, text=text)
    p = _cli("info", entry)
    assert p.returncode == 2 and words in p.stderr and p.stderr.count("\n") == 1, p.stderr[-800:]


# ---------------------------------------------------------------------------------------------
# 6. report targets that are not regular files
# ---------------------------------------------------------------------------------------------


def test_a_fifo_report_target_is_written_through_not_replaced(tmp_path):
    import os
    import stat
    import threading

    from pytest_kld.files import write_text

    fifo = tmp_path / "r.json"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()), daemon=True)
    reader.start()
    import time

    time.sleep(0.2)  # the reader has opened its end
    write_text(fifo, '{"ok": 1}')
    reader.join(5)
    assert got == ['{"ok": 1}'] and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    with pytest.raises(OSError):  # nobody reads: an error at once, not a hang
        write_text(fifo, "x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_directory_as_report_target_is_refused_before_the_run(tmp_path):
    from pytest_kld.errors import KldError
    from pytest_kld.run import output_paths

    (tmp_path / "d").mkdir()
    with pytest.raises(KldError, match="is a directory"):
        output_paths({"json": str(tmp_path / "d")}, prefix="--")
    p = _cli("merge", tmp_path / "none.json", "--json", tmp_path / "d")
    assert p.returncode == 2 and "--json" in p.stderr and "is a directory" in p.stderr, p.stderr[-800:]


# ---------------------------------------------------------------------------------------------
# 8, 9: bounds and one-line errors for hostile input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dest, value", [("drift_tokens", 10**6), ("ranks", 10_000), ("lock_timeout", 10**400),
                                         ("top_k", 1 << 21), ("n_ctx", 10**9)])
def test_count_options_are_bounded_and_say_so_in_help(dest, value):
    from pytest_kld.options import BY_DEST, check

    why = check(dest, value, f"--kld-{dest}")
    assert why and "at most" in why and len(why) < 120
    assert str(BY_DEST[dest].maximum) in BY_DEST[dest].help or "a week" in BY_DEST[dest].help


@pytest.mark.parametrize("line, words", [
    ('{"text": ' + "[" * 50_000 + "]" * 50_000 + "}", "nested 50001 levels deep"),
    ('{"text": "a", "id": ' + "9" * 5000 + "}", "integer of 5000 digits"),
])
def test_hostile_corpus_jsonl_is_one_line(tmp_path, line, words):
    from pytest_kld.corpus import load_records
    from pytest_kld.errors import CorpusError

    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(CorpusError, match=words) as e:
        load_records(path, "jsonl")
    assert "line 2" in str(e.value)


def test_a_fifo_dataset_is_not_reported_missing(tmp_path):
    import os

    from pytest_kld.corpus import corpus_spec
    from pytest_kld.errors import CorpusError

    os.mkfifo(tmp_path / "d.txt")
    with pytest.raises(CorpusError, match="not a regular file"):
        corpus_spec("file", dataset=str(tmp_path / "d.txt"))


@pytest.mark.parametrize("owner", ["[1, 2]", '{"pid": "x", "since": "now"}', "{" * 5000])
def test_a_lock_owner_file_that_is_not_an_object_is_no_fact(tmp_path, owner):
    from pytest_kld.locking import OwnedLock

    lock = OwnedLock(tmp_path / "entry", timeout=1)
    lock.owner.write_text(owner)
    assert lock._holder() == {}


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["results"][0].update(mean=10**400), "integer of 401 digits"),
    (lambda d: d.update(results=[1]), "results[0] is not an object"),
    (lambda d: d.update(settings=[]), "settings is not an object"),
    (lambda d: d["results"][0].update(chunks={"sum": ["a"], "count": [1]}), "results[0].chunks"),
    (lambda d: d["results"][0].update(categories={"prose": 3}), "results[0].categories.prose"),
    (lambda d: d["results"][0].update(model="q\x1b[2Jx"), "control characters in results.0.model"),
])
def test_hostile_merge_inputs_are_one_line(tmp_path, edit, words):
    doc = {"schema_version": 1, "settings": {}, "results": [
        {"model": "q", "mean": 0.1, "summary": {"mean": 0.1}, "cache": {"key": "k"},
         "chunks": {"sum": [0.1], "count": [1]}, "categories": {}}]}
    edit(doc)
    text = json.dumps(doc)
    if "10**400" in words or "401" in words:
        text = text.replace('"mean": ' + str(10**400), '"mean": 1' + "0" * 400)
    (tmp_path / "r.json").write_text(text)
    p = _cli("merge", tmp_path / "r.json")
    assert p.returncode == 2 and words in p.stderr and p.stderr.count("\n") == 1, p.stderr[-800:]


# ---------------------------------------------------------------------------------------------
# 4. identity is exact, and the reference row is the one whose KL is 0
# ---------------------------------------------------------------------------------------------


def _big_model(path, n=3 << 20):
    """A model directory with 12 MiB of float32 tensor data (more than any 4 MiB sample)."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    save_file({"w": np.random.default_rng(0).standard_normal(n).astype(np.float32)}, str(path / "model.safetensors"),
              metadata={"format": "mlx"})
    (path / "config.json").write_text('{"model_type": "llama"}')
    return path


def test_one_byte_edited_anywhere_with_its_times_put_back_is_another_model(tmp_path, monkeypatch):
    """Main's sampled fingerprint read 1,024 blocks of 4 KiB: a byte between two of them was
    not seen, and the edited model reused the reference's cache."""
    import os

    from pytest_kld import fingerprint
    from pytest_kld.fingerprint import weights_fingerprint

    a = _big_model(tmp_path / "a")
    before = weights_fingerprint(a)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    f = b / "model.safetensors"
    st = f.stat()
    with open(f, "r+b") as fh:  # between main's sampled blocks 0 (bytes ~90-4,190) and 1 (~12,390-)
        fh.seek(10_000)
        x = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([x[0] ^ 0xFF]))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    memo = tmp_path / "memo.json"
    assert weights_fingerprint(b, memo=memo) != before
    # remembered: read once, then known by (device, inode, size, mtime, ctime)
    reads = []
    real = fingerprint.sha256_file
    monkeypatch.setattr(fingerprint, "sha256_file", lambda p: reads.append(p) or real(p))
    again = weights_fingerprint(b, memo=memo)
    assert reads == [] and again == weights_fingerprint(b)
    with open(f, "r+b") as fh:  # edited once more, times put back: read again
        fh.seek(100)
        fh.write(b"\x01")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights_fingerprint(b, memo=memo) != again and len(reads) == 2  # once with memo, once without
    assert weights_fingerprint(b, full=True, memo=memo) == weights_fingerprint(b)


def test_a_hub_blob_is_known_by_its_name_without_reading_it(tmp_path, monkeypatch):
    import hashlib
    import os

    from pytest_kld import fingerprint
    from pytest_kld.fingerprint import weights_fingerprint

    local = _big_model(tmp_path / "local", n=1 << 16)
    data = (local / "model.safetensors").read_bytes()
    blobs, snap = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "c0ffee"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    os.symlink(os.path.join("..", "..", "blobs", digest), snap / "model.safetensors")
    shutil.copy(local / "config.json", snap / "config.json")
    monkeypatch.setattr(fingerprint, "sha256_file", lambda p: pytest.fail(f"{p} was read"))
    assert weights_fingerprint(snap).startswith("sha256-full:")
    monkeypatch.undo()
    assert weights_fingerprint(snap) == weights_fingerprint(local) == weights_fingerprint(snap, full=True)


def test_a_model_taken_for_the_reference_but_with_nonzero_kl_is_not_labelled_reference(short_cache, tiny_model,
                                                                                      monkeypatch):
    from pytest_kld import fingerprint

    ref_fp = short_cache.manifest["reference"]["fingerprint"]
    monkeypatch.setattr(fingerprint, "weights_fingerprint", lambda *a, **k: ref_fp)
    r = compare(short_cache, tiny_model("llama", bits=4))
    assert r.fingerprint == ref_fp and r.summary["mean"] > 0 and not r.is_reference
    assert compare(short_cache, tiny_model("llama")).is_reference


# ---------------------------------------------------------------------------------------------
# minor: a changed chat template is another cache
# ---------------------------------------------------------------------------------------------


def test_a_changed_chat_template_is_another_cache_entry(tiny_model, tmp_path):
    from pytest_kld.cache import plan_reference
    from pytest_kld.corpus import corpus_spec

    ref = tmp_path / "ref"
    shutil.copytree(tiny_model("llama"), ref)
    spec = corpus_spec("short", n_chunks=2)
    before = plan_reference(ref, spec, cache_dir=tmp_path / "c")
    config = json.loads((ref / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("<|im_start|>", "<|im_start|> ")
    (ref / "tokenizer_config.json").write_text(json.dumps(config))
    after = plan_reference(ref, spec, cache_dir=tmp_path / "c")
    assert after.key != before.key and after.entry != before.entry
    plain = corpus_spec("short", n_chunks=2, chat_template=False)
    assert plan_reference(ref, plain, cache_dir=tmp_path / "c").key == plan_reference(
        tiny_model("llama"), plain, cache_dir=tmp_path / "c2").key  # not rendered: the template does not matter


def test_a_cache_from_elsewhere_refuses_a_conflicting_top_k(short_cache):
    from pytest_kld.errors import KldError
    from pytest_kld.options import BY_DEST
    from pytest_kld.run import open_reference

    s = {o: BY_DEST[o].default for o in BY_DEST}
    s.update(reference_cache=str(short_cache.path), mode="short")
    assert open_reference(s).path == short_cache.path
    with pytest.raises(KldError, match=r"--kld-top-k=32 but the cache .* was built with 256"):
        open_reference({**s, "top_k": 32})


def test_every_recorded_baseline_is_counted(pytester, tiny_model, tmp_path):
    q = str(tiny_model("llama", bits=8))
    pytester.makepyfile(test_two=(f"def test_a(assert_kld):\n    assert_kld({q!r}, name='q', mean=100)\n"
                                  f"def test_b(assert_kld):\n    assert_kld({q!r}, name='q', mean=100)\n"))
    result = pytester.runpytest_subprocess(f"--kld-reference={tiny_model('llama')}", "--kld-n-chunks=2",
                                           f"--kld-cache-dir={tmp_path / 'c'}", "-p", "no:cacheprovider",
                                           f"--kld-baselines={tmp_path / 'bl'}", "--kld-update-baselines")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*pytest-kld: 2 baseline(s) recorded under*"])
    assert len(list((tmp_path / "bl").rglob("*.json"))) == 2
    assert ".*.tmp" in (tmp_path / "bl" / ".gitignore").read_text().splitlines()  # git add skips a killed write's


def test_a_memo_others_can_write_is_not_trusted(tmp_path):
    import os

    from pytest_kld.fingerprint import weights_fingerprint

    m = _big_model(tmp_path / "m", n=1 << 10)
    memo = tmp_path / "memo.json"
    right = weights_fingerprint(m, memo=memo)
    doc = json.loads(memo.read_text())
    doc["files"] = {k: "0" * 64 for k in doc["files"]}  # planted: the file "is" something else
    memo.write_text(json.dumps(doc))
    os.chmod(memo, 0o644)
    assert weights_fingerprint(m, memo=memo) != right  # our own memo is believed...
    memo.write_text(json.dumps(doc))
    os.chmod(memo, 0o666)
    assert weights_fingerprint(m, memo=memo) == right  # ...one anybody can write is not
    assert memo.stat().st_mode & 0o777 == 0o644  # and is replaced by one only we can write


def test_dev_stdout_as_report_target_is_written_through_and_errors_carry_one_prefix(tmp_path):
    import os

    doc = {"schema_version": 1, "settings": {}, "results": [
        {"model": "q", "mean": 0.1, "summary": {"mean": 0.1}, "cache": {"key": "k"}}]}
    (tmp_path / "r.json").write_text(json.dumps(doc))
    before = os.readlink("/dev/stdout")
    p = _cli("merge", tmp_path / "r.json", "--json", "/dev/stdout")
    assert p.returncode == 0, p.stderr[-800:]
    assert '"schema_version": 1' in p.stdout and os.readlink("/dev/stdout") == before
    p = _cli("compare", tmp_path / "a", tmp_path / "b", "--mean", "-1")
    assert p.returncode == 2 and p.stderr.startswith("pytest-kld: ") and "pytest-kld: pytest-kld:" not in p.stderr
