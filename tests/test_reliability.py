"""Issue 6: reliability. Nothing lost, nothing stale, one clear line for each problem.

Concurrent builders, SIGKILLed builds, corrupt and internally consistent but wrong caches, stale
settings, bad models and thresholds, read-only and full disks, and the security rules (no
pickle, no remote code unless asked, cache paths from hashes). Child processes run a small helper
module written next to the test's temporary files (see ``HELPER``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import PROSE

from pytest_kld.cache import ensure_reference, entry_path, plan_reference
from pytest_kld.compare import compare
from pytest_kld.corpus import corpus_spec
from pytest_kld.errors import CacheError, KldError, ModelError, ThresholdError, TokenizerMismatch
from pytest_kld.fingerprint import sha256_file, sha256_json
from pytest_kld.reference import ARRAYS, MANIFEST, ReferenceCache, Settings

PKG = Path(__file__).resolve().parents[1] / "pytest_kld"
S8 = Settings(top_k=8, chunk_tokens=16)
NAMES = ("tokens", "chunk_offsets", "score_ranges", "chunk_category", "topk_ids", "topk_logprobs", "tail", "target")

# The child processes' side, importable by the subprocess runs (written to a temporary directory).
HELPER = r'''
import hashlib, json, os, sys, time
from pathlib import Path

import numpy as np
import pytest_kld.cache as C
import pytest_kld.reference as R

NAMES = %(names)r


def digest(cache):
    h = hashlib.sha256()
    for n in NAMES:
        a = np.ascontiguousarray(getattr(cache, n))
        h.update(f"{n}{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def tree(root):
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def count_builds(log):
    """Append this process's id to ``log`` each time it starts a build."""
    orig = C._build

    def counted(plan, **kw):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return orig(plan, **kw)

    C._build = counted


def barrier(ready, go, timeout=150):
    Path(ready, str(os.getpid())).touch()
    t = time.time()
    while not os.path.exists(go) and time.time() - t < timeout:
        time.sleep(0.01)


def report(cache, out, who):
    line = json.dumps({"who": who, "pid": os.getpid(), "digest": digest(cache),
                       "path": str(cache.path), "created_at": cache.manifest["created_at"]})
    with open(out, "a") as f:
        f.write(line + "\n")


def say(word):
    sys.stdout.write(word + "\n")
    sys.stdout.flush()


def main():
    cfg = json.loads(sys.argv[1])
    from pytest_kld.corpus import corpus_spec

    spec = corpus_spec("file", dataset=cfg["corpus"], n_ctx=cfg["n_ctx"])
    settings = R.Settings(top_k=cfg["top_k"], chunk_tokens=cfg["chunk_tokens"])
    from pytest_kld.blas import prefer_system_blas

    prefer_system_blas()  # as the plugin does: the same BLAS, so the same bytes, as the test process
    import mlx.core, mlx_lm.utils  # noqa: F401  (imported before anyone meets at the lock)

    if cfg["job"] == "concurrent":
        count_builds(cfg["log"])
        barrier(cfg["ready"], cfg["go"])
        cache = C.ensure_reference(cfg["model"], spec, settings, cache_dir=cfg["cache"])
        report(cache, cfg["out"], "python")
    elif cfg["job"] == "kill":
        write, fsync, rename = R._write_entry, R._fsync, os.rename

        def slow_write(entry, arrays, manifest, **kw):
            say("writing")
            write(entry, arrays, manifest, **kw)

        # Widen the write phase so that kills land inside it: after the arrays, around renames.
        def slow_fsync(path):
            time.sleep(cfg["pause"])
            fsync(path)

        def slow_rename(a, b):
            say("renaming")
            time.sleep(cfg["pause"])
            rename(a, b)

        R._write_entry, R._fsync, os.rename = slow_write, slow_fsync, slow_rename
        say("start")
        C.ensure_reference(cfg["model"], spec, settings, cache_dir=cfg["cache"], rebuild=cfg["rebuild"])
        say("done")
        time.sleep(60)  # wait for the kill
    elif cfg["job"] == "fs":
        import resource, signal, subprocess

        res = {}

        def attempt(name, cache_dir, **kw):
            builds = []
            t = time.time()
            try:
                cache = C.ensure_reference(cfg["model"], spec, settings, cache_dir=cache_dir,
                                           on_build=builds.append, **kw)
                out = {"ok": True, "digest": digest(cache)}
            except Exception as e:
                out = {"ok": False, "type": type(e).__name__, "error": str(e)}
            out.update(builds=len(builds), seconds=time.time() - t, tree=tree(cache_dir))
            res[name] = out

        def mount(*args):
            p = subprocess.run(["mount", *args], capture_output=True, text=True)
            return None if p.returncode == 0 else (p.stderr.strip() or f"mount exited {p.returncode}")

        def ro(d):
            return mount("--bind", d, d) or mount("-o", "remount,bind,ro", d)

        d = cfg["dirs"]
        if cfg["mounts"]:
            for name in ("ro_empty", "ro_prebuilt"):
                err = ro(d[name])
                if err:
                    res[name] = {"skip": err}
                else:
                    attempt(name, d[name])
            if "skip" not in res["ro_prebuilt"]:
                attempt("ro_prebuilt_rebuild", d["ro_prebuilt"], rebuild=True)
            err = mount("-t", "tmpfs", "-o", "size=16k", "tmpfs", d["tmpfs_full"])
            if err:
                res["tmpfs_full"] = {"skip": err}
            else:
                attempt("tmpfs_full", d["tmpfs_full"])
                attempt("tmpfs_full_again", d["tmpfs_full"])
        # Last: the limit stays for the rest of this process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, hard))
        attempt("fsize", d["fsize"])
        say(json.dumps(res))


if __name__ == "__main__":
    main()
''' % {"names": NAMES}


# --------------------------------------------------------------------------------------------
# helpers


def one_line(msg: str, *must: str) -> str:
    """The message is one line and mentions each of ``must`` (a file, a model, an option)."""
    assert "\n" not in msg and "\r" not in msg, msg
    for word in must:
        assert word in msg, f"{word!r} not in {msg!r}"
    return msg


def digest(cache) -> str:
    h = hashlib.sha256()
    for n in NAMES:
        a = np.ascontiguousarray(getattr(cache, n))
        h.update(f"{n}{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


def leftovers(root: Path) -> list[str]:
    """Half-written things: temporary directories, or entry directories without both files."""
    bad = [p for p in tree(root) if ".tmp-" in p]
    for m in Path(root).glob("ref-*/*"):
        if m.is_dir() and not ((m / MANIFEST).is_file() and (m / ARRAYS).is_file()):
            bad.append(str(m.relative_to(root)))
    return bad


def child_env() -> dict:
    # pytest's own variables stay behind (PYTEST_XDIST_WORKER, PYTEST_CURRENT_TEST...); a user's
    # PYTEST_KLD_* settings (PYTEST_KLD_BLAS among them) reach the child as they reach the plugin.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") or k.startswith("PYTEST_KLD_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@pytest.fixture(scope="module")
def helper(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("helper")
    (d / "kldchild.py").write_text(HELPER)
    return d


@pytest.fixture(scope="module")
def llama(tiny_model) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def pristine(llama, prose_spec, tmp_path_factory):
    """A cache directory with one valid entry (K=8), and its digest; copy before damaging."""
    root = tmp_path_factory.mktemp("pristine")
    cache = ensure_reference(llama, prose_spec, S8, cache_dir=root)
    return root, cache.path.relative_to(root), digest(cache)


@pytest.fixture
def fresh(pristine, tmp_path):
    """A private copy of the pristine cache directory: (root, entry path, digest)."""
    root, rel, dig = pristine
    dst = tmp_path / "cache"
    shutil.copytree(root, dst)
    return dst, dst / rel, dig


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)  # copy2: times preserved
    return dst


def edit_weights(model: Path, name: str, fn) -> None:
    """Rewrite ``model``'s safetensors with ``fn(array) -> array`` applied to tensor ``name``."""
    import mlx.core as mx

    (file,) = sorted(model.glob("*.safetensors"))
    w = mx.load(str(file))
    w[name] = fn(w[name])
    mx.save_safetensors(str(file), w, metadata={"format": "mlx"})


# --------------------------------------------------------------------------------------------
# 1. Concurrency: 2 python processes + `pytest -n 4` + a plain `pytest`, started together


CONFTEST = """
import os, sys
import pytest
sys.path.insert(0, {helper!r})
import kldchild
kldchild.count_builds({log!r})


@pytest.fixture(autouse=True, scope="session")
def _meet():
    kldchild.barrier({ready!r}, {go!r})
"""

TEST_READ = """
import os
import pytest
import kldchild


@pytest.mark.parametrize("i", range(4))
def test_read(i, kld_reference):
    kldchild.report(kld_reference, {out!r}, os.environ.get("PYTEST_XDIST_WORKER", "pytest"))
"""


def test_concurrent_builders_build_once_and_read_identical_bytes(helper, llama, prose_file, tmp_path):
    cache, ready, proj = tmp_path / "cache", tmp_path / "ready", tmp_path / "proj"
    ready.mkdir()
    proj.mkdir()
    log, out, go = tmp_path / "builds.log", tmp_path / "reads.jsonl", tmp_path / "go"
    (proj / "conftest.py").write_text(CONFTEST.format(helper=str(helper), log=str(log), ready=str(ready), go=str(go)))
    (proj / "test_read.py").write_text(TEST_READ.format(out=str(out)))
    cfg = dict(job="concurrent", model=str(llama), corpus=str(prose_file), n_ctx=128, top_k=8,
               chunk_tokens=16, cache=str(cache), log=str(log), ready=str(ready), go=str(go), out=str(out))
    opts = [f"--kld-reference={llama}", f"--kld-dataset={prose_file}", "--kld-n-ctx=128", "--kld-top-k=8",
            "--kld-chunk-tokens=16", f"--kld-cache-dir={cache}", "-p", "no:cacheprovider", "-q"]
    cmds = [
        [sys.executable, str(helper / "kldchild.py"), json.dumps(cfg)],
        [sys.executable, str(helper / "kldchild.py"), json.dumps(cfg)],
        [sys.executable, "-m", "pytest", "-n", "4", *opts],
        [sys.executable, "-m", "pytest", *opts],
    ]
    expected_ready = 2 + 4 + 1  # the python processes, the four xdist workers, the plain run
    procs = [subprocess.Popen(c, cwd=proj, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    try:
        t = time.time()
        while len(list(ready.iterdir())) < expected_ready and time.time() - t < 150:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
        n_ready = len(list(ready.iterdir()))
        go.touch()  # everybody reaches ensure_reference within a few milliseconds
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, o in zip(procs, outputs):
        assert p.returncode == 0, o[-3000:]
    assert n_ready == expected_ready, outputs
    builders = log.read_text().split()
    assert len(builders) == 1, f"built {len(builders)} times by {builders}"
    reads = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(reads) == 2 + 4 + 4
    assert Counter(r["who"] for r in reads)["python"] == 2
    assert len({r["pid"] for r in reads}) == 2 + 4 + 1
    assert len({r["digest"] for r in reads}) == 1
    assert len({(r["path"], r["created_at"]) for r in reads}) == 1
    mine = ReferenceCache.load(reads[0]["path"])
    assert digest(mine) == reads[0]["digest"]
    assert leftovers(cache) == []


# --------------------------------------------------------------------------------------------
# 2. SIGKILL at random points, ten times


def test_sigkill_at_random_points_never_leaves_a_partial_cache(helper, llama, tmp_path, record_property):
    corpus = tmp_path / "big.txt"
    corpus.write_text(PROSE * 2, encoding="utf-8")  # ~70 chunks of 64 tokens: a ~0.6 s build
    spec = corpus_spec("file", dataset=str(corpus), n_ctx=64)
    base = tmp_path / "baseline"
    t = time.time()
    want = digest(ensure_reference(llama, spec, S8, cache_dir=base))
    build_seconds = time.time() - t
    root = tmp_path / "cache"
    plan = plan_reference(llama, spec, S8, cache_dir=root)
    rng = random.Random(6)
    landed, complete_tmps = Counter(), 0
    for i in range(10):
        rebuild = i >= 6  # the last four kill a rebuild that replaces a valid entry
        if rebuild:
            ensure_reference(llama, spec, S8, cache_dir=root)
        else:
            shutil.rmtree(plan.entry, ignore_errors=True)
        anchor = "writing" if i % 2 else "start"
        delay = rng.uniform(0, 0.5) if anchor == "writing" else rng.uniform(0, build_seconds)
        cfg = dict(job="kill", model=str(llama), corpus=str(corpus), n_ctx=64, top_k=8, chunk_tokens=16,
                   cache=str(root), rebuild=rebuild, pause=0.12)
        proc = subprocess.Popen([sys.executable, str(helper / "kldchild.py"), json.dumps(cfg)],
                                env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = []
        try:
            while anchor not in seen:
                line = proc.stdout.readline()
                assert line, f"child ended before {anchor!r}: {proc.stderr.read()[-2000:]}"
                seen.append(line.strip())
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        seen += proc.stdout.read().split()
        proc.stdout.close()
        proc.stderr.close()
        phase = ("after the build" if "done" in seen else "around a rename" if "renaming" in seen
                 else "while writing" if "writing" in seen else "during the pass")
        landed[phase] += 1
        # Whatever sits at the entry's path is complete; a kill before the rename leaves none, and
        # a killed rebuild loses the old entry only between its two renames.
        existed = plan.entry.exists()
        if existed:
            assert digest(ReferenceCache.load(plan.entry, expect_key=plan.key)) == want
        else:
            assert phase != "after the build" and (not rebuild or phase == "around a rename"), (i, phase)
        complete_tmps += sum((p / MANIFEST).is_file() for p in plan.entry.parent.glob(".tmp-*"))
        # The next run builds exactly when there is no entry, never from a .tmp-* directory, and
        # leaves no .tmp-* behind.
        builds = []
        again = ensure_reference(llama, spec, S8, cache_dir=root, on_build=builds.append)
        assert len(builds) == (0 if existed else 1), (i, phase)
        assert digest(again) == want
        assert leftovers(root) == [], (i, phase)
    record_property("kills", dict(landed))
    print(f"SIGKILL landed: {dict(landed)}; complete-looking .tmp dirs ignored: {complete_tmps}")
    assert sum(landed.values()) == 10
    assert landed["during the pass"] >= 2 and landed["while writing"] + landed["around a rename"] >= 3, landed


# --------------------------------------------------------------------------------------------
# 3. Damaged caches: corrupt files, and internally consistent but wrong ones (manifest re-signed)


def _resign(entry: Path, arrays_fn=None, manifest_fn=None) -> None:
    """Rewrite an entry with its checksums, sizes, shapes and self-checksum made to match."""
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(entry / ARRAYS))
    if arrays_fn:
        arrays_fn(arrays)
    save_file(arrays, str(entry / ARRAYS))
    m = json.loads((entry / MANIFEST).read_text())
    m["shapes"] = {k: list(v.shape) for k, v in arrays.items()}
    if manifest_fn:
        manifest_fn(m)
    m["arrays_bytes"] = (entry / ARRAYS).stat().st_size
    m["arrays_sha256"] = sha256_file(entry / ARRAYS)
    m.pop("manifest_sha256", None)
    m["manifest_sha256"] = sha256_json(m)
    (entry / MANIFEST).write_text(json.dumps(m))


def _flip(name: str, where):
    def damage(entry):
        p = entry / name
        b = bytearray(p.read_bytes())
        b[where(len(b))] ^= 0x20
        p.write_bytes(bytes(b))

    return damage


def _arrays(fn):
    return lambda entry: _resign(entry, arrays_fn=fn)


def _manifest(fn):
    return lambda entry: _resign(entry, manifest_fn=fn)


def _set(d, k, v):
    d[k] = v


def _pop(d, k):
    d.pop(k)


DAMAGE = {
    # Corrupt files (checksums catch them).
    "arrays truncated to 0 bytes": (lambda e: (e / ARRAYS).write_bytes(b""), "truncated"),
    "arrays cut in the header": (lambda e: (e / ARRAYS).write_bytes((e / ARRAYS).read_bytes()[:40]), "truncated"),
    "byte flipped in the arrays header": (_flip(ARRAYS, lambda n: 20), "checksum"),
    "byte flipped in the middle": (_flip(ARRAYS, lambda n: n // 2), "checksum"),
    "manifest truncated": (lambda e: (e / MANIFEST).write_text((e / MANIFEST).read_text()[:50]), "does not parse"),
    "manifest value edited": (lambda e: (e / MANIFEST).write_text((e / MANIFEST).read_text().replace('"top_k": 8', '"top_k": 9')), "edited"),
    "manifest self-checksum removed": (lambda e: (e / MANIFEST).write_text(json.dumps({k: v for k, v in json.loads((e / MANIFEST).read_text()).items() if k != "manifest_sha256"})), "edited"),
    "manifest not an object": (lambda e: (e / MANIFEST).write_text("[1, 2]"), "not an object"),
    "manifest missing": (lambda e: (e / MANIFEST).unlink(), "missing"),
    "entry is a file": (lambda e: (shutil.rmtree(e), e.write_text("x")), "missing"),
    # Internally consistent but wrong: shapes, sizes and checksums re-signed to match.
    "wrong shape: log-probs K-1 wide": (_arrays(lambda a: _set(a, "topk_logprobs", a["topk_logprobs"][:, :-1].copy())), "shape"),
    "wrong shape: tail one short": (_arrays(lambda a: _set(a, "tail", a["tail"][:-1].copy())), "shape"),
    "wrong shape: target one long": (_arrays(lambda a: _set(a, "target", np.concatenate([a["target"], a["target"][:1]]))), "shape"),
    "wrong shape: ids one row more": (_arrays(lambda a: _set(a, "topk_ids", np.concatenate([a["topk_ids"], a["topk_ids"][:1]]))), "scored positions"),
    "wrong shape: K differs from settings": (_arrays(lambda a: (_set(a, "topk_ids", a["topk_ids"][:, :-1].copy()), _set(a, "topk_logprobs", a["topk_logprobs"][:, :-1].copy()))), "top_k"),
    "wrong shape: tokens one short": (_arrays(lambda a: _set(a, "tokens", a["tokens"][:-1].copy())), "token ids"),
    "wrong shape: score ranges flat": (_arrays(lambda a: _set(a, "score_ranges", a["score_ranges"].reshape(-1).copy())), "shape"),
    "wrong shape: categories one short": (_arrays(lambda a: _set(a, "chunk_category", a["chunk_category"][:-1].copy())), "shape"),
    "array missing": (_arrays(lambda a: _pop(a, "target")), "target"),
    "wrong dtype: float16 log-probs": (_arrays(lambda a: _set(a, "topk_logprobs", a["topk_logprobs"].astype(np.float16))), "dtype"),
    "ids outside the vocabulary": (_arrays(lambda a: a["topk_ids"].__setitem__((0, 0), 320)), "vocabulary"),
    "chunk offsets not increasing": (_arrays(lambda a: a["chunk_offsets"].__setitem__(1, a["chunk_offsets"][2] + 1)), "chunk"),
    # Foreign or impossible values, every checksum re-signed (issue 10): still refused.
    "tokens of another corpus": (_arrays(lambda a: _set(a, "tokens", (a["tokens"] + 1) % 300)), "token_sha256"),
    "manifest's positions count edited": (_manifest(lambda m: _set(m, "positions", m["positions"] + 1)), "positions"),
    "NaN log-prob": (_arrays(lambda a: a["topk_logprobs"].__setitem__((3, 0), np.nan)), "NaN or inf"),
    "positive log-prob": (_arrays(lambda a: a["topk_logprobs"].__setitem__((3, 0), 0.5)), "above 0"),
    "NaN target": (_arrays(lambda a: a["target"].__setitem__(2, np.nan)), "NaN or inf"),
    "infinite tail": (_arrays(lambda a: a["tail"].__setitem__(1, np.inf)), "tail"),
    "log-probs not sorted": (_arrays(lambda a: a["topk_logprobs"].__setitem__(4, a["topk_logprobs"][4][::-1].copy())), "sorted"),
    "probabilities not summing to 1": (_arrays(lambda a: a["topk_logprobs"].__setitem__(5, a["topk_logprobs"][5] - 1.0)), "sum to 1"),
    "manifest re-signed without vocab_size": (_manifest(lambda m: _pop(m, "vocab_size")), "vocab_size"),
    "manifest re-signed without tokenizer probe": (_manifest(lambda m: _pop(m, "tokenizer_probe")), "tokenizer_probe"),
    "manifest re-signed with shapes a string": (_manifest(lambda m: _set(m, "shapes", "x")), "shapes"),
    "manifest re-signed with no categories": (_manifest(lambda m: _set(m, "categories", [])), "categor"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_cache_detected_in_one_line(case, fresh, llama, prose_spec):
    root, entry, want = fresh
    damage, words = DAMAGE[case]
    damage(entry)
    for attempt in (
        lambda: ReferenceCache.load(entry),
        lambda: ensure_reference(llama, prose_spec, S8, cache_dir=root),
    ):
        with pytest.raises(CacheError) as e:
            attempt()
        one_line(str(e.value), str(entry), words, "--kld-rebuild")
    # The option named rebuilds it, with the same content as before the damage.
    again = ensure_reference(llama, prose_spec, S8, cache_dir=root, rebuild=True)
    assert digest(again) == want and leftovers(root) == []


def test_entry_under_another_key_is_not_reused(fresh, llama, prose_spec):
    """A valid entry copied (or left) where other settings' entry belongs is refused, not used."""
    root, entry, _ = fresh
    other = plan_reference(llama, prose_spec, Settings(top_k=16, chunk_tokens=16), cache_dir=root).entry
    shutil.copytree(entry, other)
    with pytest.raises(CacheError) as e:
        ensure_reference(llama, prose_spec, Settings(top_k=16, chunk_tokens=16), cache_dir=root)
    one_line(str(e.value), str(other), "other settings", "--kld-rebuild")


# --------------------------------------------------------------------------------------------
# 4. Stale settings: never the old entry


def test_changed_settings_never_reuse_the_old_entry(llama, prose_file, tmp_path):
    root = tmp_path / "cache"
    model = copy_model(llama, tmp_path / "ref")
    base_spec = corpus_spec("file", dataset=str(prose_file), n_ctx=128)
    builds: list = []
    first = ensure_reference(model, base_spec, S8, cache_dir=root, on_build=builds.append)
    seen = {first.path: digest(first)}

    other_text = tmp_path / "other.txt"
    other_text.write_text(PROSE.replace("river", "rivet", 1), encoding="utf-8")

    def weights_value():
        edit_weights(model, "model.layers.0.mlp.down_proj.weight", lambda w: w.at[0, 0].add(0.5))

    def weights_touched():
        st = next(model.glob("*.safetensors"))
        os.utime(st, ns=(st.stat().st_atime_ns, st.stat().st_mtime_ns + 10**9))

    def config_edit():
        cfg = json.loads((model / "config.json").read_text())
        cfg["rms_norm_eps"] = 2e-5
        (model / "config.json").write_text(json.dumps(cfg))

    def tokenizer_swap():
        from tiny import write_tokenizer

        write_tokenizer(model, merges=2)

    changes = [
        ("top_k 8 -> 16", lambda: None, base_spec, Settings(top_k=16, chunk_tokens=16)),
        ("chunk_tokens 16 -> 32", lambda: None, base_spec, Settings(top_k=8, chunk_tokens=32)),
        ("exec float32 -> native", lambda: None, base_spec, Settings(top_k=8, chunk_tokens=16, exec="native")),
        ("n_ctx 128 -> 96", lambda: None, corpus_spec("file", dataset=str(prose_file), n_ctx=96), S8),
        ("corpus text, one letter", lambda: None, corpus_spec("file", dataset=str(other_text), n_ctx=128), S8),
        ("weights: one value changed", weights_value, base_spec, S8),
        ("config.json edited", config_edit, base_spec, S8),
        ("tokenizer replaced", tokenizer_swap, base_spec, S8),
    ]
    for what, change, spec, settings in changes:
        change()
        before = len(builds)
        cache = ensure_reference(model, spec, settings, cache_dir=root, on_build=builds.append)
        assert len(builds) == before + 1, f"{what}: the old entry was reused"
        assert cache.path not in seen, what
        seen[cache.path] = digest(cache)
    # Only times changed: the same bytes keep their entry (fingerprints read content, not mtimes).
    weights_touched()
    before = len(builds)
    cache = ensure_reference(model, base_spec, S8, cache_dir=root, on_build=builds.append)
    assert len(builds) == before and cache.path in seen
    # Reusing is still right when nothing changed: the last settings load without a build.
    ensure_reference(model, base_spec, S8, cache_dir=root, on_build=builds.append)
    assert len(builds) == 1 + len(changes)


# --------------------------------------------------------------------------------------------
# 5. Bad models, tokenizers, logits, thresholds and settings: one line each


@pytest.fixture(scope="module")
def nan_models(llama, tmp_path_factory):
    """Copies of the tiny llama with NaN in one embedding row, and with +inf in its output head."""
    from tokenizers import Tokenizer

    d = tmp_path_factory.mktemp("nan-models")
    nan = copy_model(llama, d / "nan-embed")
    token = Tokenizer.from_file(str(llama / "tokenizer.json")).encode("{").ids[0]
    edit_weights(nan, "model.embed_tokens.weight", lambda w: w.at[token].multiply(float("nan")))
    inf = copy_model(llama, d / "inf-head")
    edit_weights(inf, "lm_head.weight", lambda w: w.at[5].add(float("inf")))
    return nan, inf, token


def test_nan_and_inf_in_quant_logits_counted_not_crashing(nan_models, pristine, prose_spec):
    root, rel, _ = pristine
    cache = ReferenceCache.load(root / rel)
    nan, inf, token = nan_models
    r = compare(cache, nan)
    # A NaN input poisons every later position of its chunk (causal attention), and also the
    # earlier ones of its forward piece (masked attention weights are 0, but 0 * NaN is NaN).
    expected, ct = 0, cache.settings.chunk_tokens
    for i in range(cache.n_chunks):
        s, e = (int(v) for v in cache.score_ranges[i])
        bad = np.flatnonzero(cache.chunk(i)[:e] == token)
        piece_end = np.minimum(e, (np.arange(s, e) // ct + 1) * ct)
        expected += int(np.sum(bad.size and piece_end > bad.min()))
    assert 0 < expected < cache.n_positions
    assert r.summary["nonfinite"] == expected
    assert r.summary["count"] + r.summary["nonfinite"] == cache.n_positions
    assert np.isfinite(r.summary["mean"]) and np.all(r.kl[np.isfinite(r.kl)] >= -1e-6)
    assert np.isnan(r.kl).sum() == expected
    r = compare(cache, inf)
    assert r.summary["nonfinite"] == cache.n_positions and r.summary["count"] == 0
    assert np.isnan(r.summary["mean"]) and r.max_at is None


def test_nan_in_the_reference_refused_and_nothing_written(nan_models, prose_spec, tmp_path):
    nan, _, _ = nan_models
    with pytest.raises(KldError) as e:
        ensure_reference(nan, prose_spec, S8, cache_dir=tmp_path)
    one_line(str(e.value), str(nan), "NaN")
    assert leftovers(tmp_path) == [] and not [p for p in tmp_path.glob("ref-*/*") if p.is_dir()]


def _not_a_model(tmp_path: Path, llama: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(llama / "config.json", no_weights / "config.json")
    no_type = copy_model(llama, tmp_path / "no-model-type")
    (no_type / "config.json").write_text(json.dumps({"hidden_size": 64}))
    bad_json = copy_model(llama, tmp_path / "bad-config")
    (bad_json / "config.json").write_text("{oops")
    no_tok = copy_model(llama, tmp_path / "no-tokenizer")
    (no_tok / "tokenizer.json").unlink()
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"\0" * 16)
    return {
        "empty directory": (empty, "config.json"),
        "directory of other files": (junk, "config.json"),
        "config.json but no weights": (no_weights, "safetensors"),
        "config.json without model_type": (no_type, "model_type"),
        "config.json not JSON": (bad_json, "config.json"),
        "no tokenizer": (no_tok, "no tokenizer in"),
        "a file, not a directory": (a_file, "directory"),
    }


def test_model_errors_one_line(llama, prose_spec, pristine, tmp_path, monkeypatch):
    cases = {
        "path missing": (tmp_path / "no" / "such-model", "not found"),
        "relative path missing": ("./models/absent", "not found"),
        **_not_a_model(tmp_path, llama),
    }
    unsupported = copy_model(llama, tmp_path / "unsupported")
    cfg = json.loads((unsupported / "config.json").read_text())
    cfg["model_type"] = "made_up_arch"
    (unsupported / "config.json").write_text(json.dumps(cfg))
    cases["unsupported architecture"] = (unsupported, "unsupported model architecture")
    # A hub id that is not in the (empty) hub cache, with the hub offline: no network call.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cases["hub id not available offline"] = ("pytest-kld-test/absent-model", "hf download")
    root, rel, _ = pristine
    cache = ReferenceCache.load(root / rel)
    cache_dir = tmp_path / "cache"
    for model, words in cases.values():
        for attempt in (
            lambda model=model: ensure_reference(model, prose_spec, S8, cache_dir=cache_dir),
            lambda model=model: compare(cache, model),
        ):
            with pytest.raises(ModelError) as e:
                attempt()
            one_line(str(e.value), str(model), words)
    assert leftovers(cache_dir) == [] if cache_dir.exists() else True


def test_tokenizer_mismatch_one_line(pristine, tmp_path):
    from tiny import build_model

    root, rel, _ = pristine
    cache = ReferenceCache.load(root / rel)
    for merges, extra in ((6, False), (0, True)):  # other ids for the same text; one token more
        other = build_model(tmp_path / f"tok-{merges}-{extra}", "llama", tokenizer_merges=merges)
        if extra:
            tj = json.loads((other / "tokenizer.json").read_text())
            tj["added_tokens"].append({**tj["added_tokens"][-1], "id": 259, "content": "<|extra|>"})
            (other / "tokenizer.json").write_text(json.dumps(tj))
        with pytest.raises(TokenizerMismatch) as e:
            compare(cache, other)
        one_line(str(e.value), str(other), "tokenizer mismatch", cache.manifest["reference"]["name"],
                 "260 tokens" if extra else "other token ids")


def test_nonsensical_thresholds_and_settings_one_line(llama, prose_file, tmp_path):
    from pytest_kld.thresholds import validate as validate_thresholds

    bad = [
        ({"mean": -0.1}, "negative"),
        ({"p99": -1}, "negative"),
        ({"meen": 0.1}, "unknown threshold 'meen'"),
        ({"p100": 0.1}, "unknown threshold"),
        ({"mean": float("nan")}, "finite"),
        ({"max": float("inf")}, "finite"),
        ({"mean": "0.1"}, "finite number"),
        ({"mean": True}, "finite number"),
        ({"top1": 1.5}, "at most 1"),
        ({"top1": -0.5}, "negative"),
    ]
    for limits, words in bad:
        with pytest.raises(ThresholdError) as e:
            validate_thresholds(limits)
        one_line(str(e.value), "assert_kld", next(iter(limits)) if "unknown" not in words else "", words)
    assert validate_thresholds({"mean": 0, "top1": 1, "p99": None}) == {"mean": 0.0, "top1": 1.0}
    settings = [
        (lambda: Settings(top_k=0), "top_k"),
        (lambda: Settings(top_k=-3), "top_k"),
        (lambda: Settings(top_k=2.5), "top_k"),
        (lambda: Settings(chunk_tokens=-1), "chunk_tokens"),
        (lambda: ensure_reference(llama, corpus_spec("file", dataset=str(prose_file), n_ctx=128), Settings(exec="gpu"), cache_dir=tmp_path), "exec"),
        (lambda: corpus_spec("file", dataset=str(prose_file), n_ctx=0), "n_ctx"),
        (lambda: corpus_spec("file", dataset=str(prose_file), n_ctx=-5), "n_ctx"),
        (lambda: corpus_spec("medium"), "mode"),
        (lambda: corpus_spec("file", dataset=str(tmp_path / "absent.txt")), "absent.txt"),
    ]
    for make, words in settings:
        with pytest.raises(KldError) as e:
            make()
        one_line(str(e.value), words)


# --------------------------------------------------------------------------------------------
# 6. Read-only cache directory, full disk: a clear error, nothing half-written


def _can_unshare() -> str | None:
    """None if this process may make a private mount namespace and mount in it, else why not."""
    if not sys.platform.startswith("linux") or not shutil.which("unshare") or not shutil.which("mount"):
        return "needs Linux with unshare(1) and mount(8)"
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, text=True)
    if p.returncode != 0:
        return f"no private mount namespace here ({p.stderr.strip() or p.returncode}); needs CAP_SYS_ADMIN"
    return None


@pytest.fixture(scope="module")
def fs_results(helper, llama, prose_file, pristine, tmp_path_factory):
    """Run the read-only / full-disk scenarios in one child process, in a private mount namespace
    when allowed (mounts vanish with the process), else only the RLIMIT_FSIZE one."""
    d = tmp_path_factory.mktemp("fs")
    dirs = {name: d / name for name in ("ro_empty", "ro_prebuilt", "tmpfs_full", "fsize")}
    for p in dirs.values():
        p.mkdir()
    shutil.rmtree(dirs["ro_prebuilt"])
    shutil.copytree(pristine[0], dirs["ro_prebuilt"])
    why_not = _can_unshare()
    cfg = dict(job="fs", model=str(llama), corpus=str(prose_file), n_ctx=128, top_k=8, chunk_tokens=16,
               dirs={k: str(v) for k, v in dirs.items()}, mounts=why_not is None)
    cmd = [sys.executable, str(helper / "kldchild.py"), json.dumps(cfg)]
    if why_not is None:
        cmd = ["unshare", "-m", "--propagation", "private", *cmd]
    p = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    return res, dirs, why_not


def _scenario(fs_results, name):
    res, dirs, why_not = fs_results
    if why_not is not None:
        pytest.skip(f"real read-only and tmpfs mounts: {why_not} (the monkeypatched tests below cover the code path)")
    r = res[name]
    if "skip" in r:
        pytest.skip(f"mount refused: {r['skip']}")
    return r, dirs


def test_read_only_cache_dir_refused_in_one_line(fs_results):
    r, dirs = _scenario(fs_results, "ro_empty")
    assert not r["ok"] and r["type"] == "CacheError", r
    one_line(r["error"], str(dirs["ro_empty"]), "Read-only file system", "--kld-cache-dir")
    assert r["builds"] == 0 and r["tree"] == []


def test_read_only_cache_dir_with_a_valid_entry_still_serves_it(fs_results, pristine):
    r, dirs = _scenario(fs_results, "ro_prebuilt")
    assert r["ok"] and r["digest"] == pristine[2] and r["builds"] == 0, r
    r = fs_results[0]["ro_prebuilt_rebuild"]  # a rebuild cannot happen there: said in one line
    assert not r["ok"] and r["type"] == "CacheError", r
    one_line(r["error"], str(dirs["ro_prebuilt"]), "Read-only file system", "--kld-cache-dir")
    assert r["tree"] == tree(pristine[0])


def test_disk_full_tmpfs_leaves_nothing_half_written(fs_results):
    r, dirs = _scenario(fs_results, "tmpfs_full")
    for name in ("tmpfs_full", "tmpfs_full_again"):  # and again: the second run is not fooled
        r = fs_results[0][name]
        assert not r["ok"] and r["type"] == "CacheError", r
        one_line(r["error"], str(dirs["tmpfs_full"]), "No space left on device", "free some space", "--kld-cache-dir")
        assert r["builds"] == 1
        assert all(p.endswith(".lock") or re.fullmatch(r"ref-[0-9a-f]{16}", p) for p in r["tree"]), r["tree"]


def test_file_size_limit_efbig_leaves_nothing_half_written(fs_results):
    res, dirs, _ = fs_results
    r = res["fsize"]
    assert not r["ok"] and r["type"] == "CacheError", r
    one_line(r["error"], str(dirs["fsize"]), "File too large", "--kld-cache-dir")
    assert all(p.endswith(".lock") or re.fullmatch(r"ref-[0-9a-f]{16}", p) for p in r["tree"]), r["tree"]


def test_immutable_cache_dir_refused_before_the_pass(fresh, llama, prose_spec, monkeypatch):
    """chattr +i (root cannot write there either): refused before the model runs; the old entry
    is untouched and still served."""
    root, entry, want = fresh
    if os.geteuid() != 0 or not shutil.which("chattr"):
        pytest.skip("chattr +i needs root and chattr(1)")
    before = tree(root)
    p = subprocess.run(["chattr", "+i", str(entry.parent)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"chattr +i refused here: {p.stderr.strip()}")
    import pytest_kld.forward

    def no_pass(*a, **k):
        raise AssertionError("the reference pass ran although the cache cannot be written")

    try:
        monkeypatch.setattr(pytest_kld.forward, "load_model", no_pass)
        with pytest.raises(CacheError) as e:
            ensure_reference(llama, prose_spec, S8, cache_dir=root, rebuild=True)
        assert tree(root) == before
    finally:
        subprocess.run(["chattr", "-i", str(entry.parent)], check=True)
    one_line(str(e.value), str(entry.parent), "not permitted", "writable", "--kld-cache-dir")
    monkeypatch.undo()
    assert digest(ensure_reference(llama, prose_spec, S8, cache_dir=root)) == want


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EIO], ids=["ENOSPC", "EDQUOT", "EIO"])
def test_write_failure_keeps_the_old_entry(err, fresh, llama, prose_spec, monkeypatch):
    """Everywhere (no privileges needed): the write fails at fsync (where NFS reports a full
    disk). One line, no .tmp-* left, and the previous valid entry is still there and served."""
    import pytest_kld.reference as ref

    root, entry, want = fresh
    before = tree(root)

    def failing(path):
        raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(ref, "_fsync", failing)
    with pytest.raises(CacheError) as e:
        ensure_reference(llama, prose_spec, S8, cache_dir=root, rebuild=True)
    one_line(str(e.value), str(entry.parent), os.strerror(err), "--kld-cache-dir")
    if err in (errno.ENOSPC, errno.EDQUOT):
        assert "free some space" in str(e.value)
    assert tree(root) == before and leftovers(root) == []
    monkeypatch.undo()
    assert digest(ensure_reference(llama, prose_spec, S8, cache_dir=root)) == want


def test_unwritable_cache_dir_monkeypatched(llama, prose_spec, tmp_path, monkeypatch):
    """Everywhere: EACCES creating the cache directory (chmod does not stop root)."""
    cache_dir = tmp_path / "denied"
    real = os.mkdir

    def denied(path, *a, **k):
        if str(path).startswith(str(cache_dir)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", denied)
    with pytest.raises(CacheError) as e:
        ensure_reference(llama, prose_spec, S8, cache_dir=cache_dir)
    one_line(str(e.value), str(cache_dir), "Permission denied", "--kld-cache-dir")
    assert not cache_dir.exists()


# --------------------------------------------------------------------------------------------
# 7. Security


def _code_lines():
    for f in sorted(PKG.rglob("*.py")):
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            code = re.sub(r"(['\"]).*?\1", "''", line).split("#", 1)[0]  # no strings, no comments
            if code.strip():
                yield f"{f.name}:{n}", code


def test_no_pickle_loads_anywhere():
    hits = []
    for where, code in _code_lines():
        if re.search(r"\b(pickle|cPickle|dill|joblib|shelve|marshal)\b", code):
            hits.append((where, code))
        if re.search(r"allow_pickle\s*=\s*True|torch\.load\(|yaml\.load\(|(?<![\w.])(eval|exec)\(", code):
            hits.append((where, code))
        if re.search(r"\bnp\.load\(|\bnumpy\.load\(", code) and "allow_pickle=False" not in code:
            hits.append((where, code))
        if re.search(r"trust_remote_code\s*=\s*True", code):
            hits.append((where, code))
    assert hits == []
    # The cache loader reads safetensors and JSON only.
    src = (PKG / "reference.py").read_text()
    assert "safetensors.numpy import load_file" in src and "np.load" not in src


def test_trust_remote_code_defaults_off():
    import inspect

    from pytest_kld.forward import load_model
    from pytest_kld.options import BY_DEST

    for fn in (ensure_reference, compare, load_model):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn
    assert BY_DEST["trust_remote_code"].kind is bool and BY_DEST["trust_remote_code"].default is False


def test_custom_model_code_refused_unless_asked(llama, pristine, prose_spec, tmp_path):
    model = copy_model(llama, tmp_path / "custom-code")
    marker = tmp_path / "EXECUTED"
    (model / "custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from mlx_lm.models.llama import Model, ModelArgs\n"
    )
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_file"] = "custom.py"
    (model / "config.json").write_text(json.dumps(cfg))
    cache = ReferenceCache.load(pristine[0] / pristine[1])
    for attempt in (
        lambda: ensure_reference(model, prose_spec, S8, cache_dir=tmp_path / "c"),
        lambda: compare(cache, model),
    ):
        with pytest.raises(ModelError) as e:
            attempt()
        one_line(str(e.value), str(model), "custom.py", "--kld-trust-remote-code")
        assert not marker.exists()
    r = compare(cache, model, trust_remote_code=True)  # when asked, it runs (and matches llama)
    assert marker.exists() and r.summary["mean"] < 1e-6


def test_cache_paths_come_from_hashes(tmp_path, llama, prose_spec):
    root = (tmp_path / "cache").resolve()
    hostile = ["../../etc", "..", "/etc/passwd", "a/../../b", "..\\..\\win", "~root", "x" * 5000, "\0", ""]
    for fp in hostile:
        for mode in hostile + ["short"]:
            p = entry_path(root, fp, mode, "f" * 64)
            assert p.resolve().parent.parent == root, (fp, mode, p)
            assert re.fullmatch(r"ref-[0-9a-f]{16}", p.parent.name) and re.fullmatch(r"[A-Za-z0-9]{1,16}-f{24}", p.name)
    # Model names that try to climb out are paths that do not exist: refused, nothing created.
    for name in ("../../etc", "../" * 8 + "tmp", "/", "/etc"):
        with pytest.raises(ModelError) as e:
            ensure_reference(name, prose_spec, S8, cache_dir=root)
        one_line(str(e.value), name)
    assert not root.exists()
    # A real entry's path: every component below the cache directory is a hash.
    cache = ensure_reference(llama, prose_spec, S8, cache_dir=root)
    rel = cache.path.relative_to(root)
    assert re.fullmatch(r"ref-[0-9a-f]{16}/file-[0-9a-f]{24}", str(rel)), rel
