"""Waiting for another process's build (issue 10): a stopped builder is named and given up on
after the timeout, a live one is waited for however long; a failed first build leaves no
directory; a cache directory other users can write is refused; K beyond the vocabulary is one
entry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import pytest_kld.locking as locking
from pytest_kld.cache import ensure_reference, plan_reference
from pytest_kld.errors import CacheError
from pytest_kld.reference import Settings

S8 = Settings(top_k=8, chunk_tokens=16)

HOLDER = """
import sys, time
import pytest_kld.locking as L
L.HEARTBEAT = 0.3
lock = L.OwnedLock(sys.argv[1], timeout=600)
lock.acquire()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""


def _holder(entry, seconds):
    entry.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(entry), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


@pytest.fixture
def fast_locks(monkeypatch):
    monkeypatch.setattr(locking, "HEARTBEAT", 0.3)
    monkeypatch.setattr(locking, "POLL", 0.1)
    monkeypatch.setattr(locking, "FIRST_NOTICE", 0.3)


def test_a_stopped_builder_is_named_and_given_up_on(tiny_model, prose_spec, tmp_path, fast_locks):
    llama = tiny_model("llama")
    entry = plan_reference(llama, prose_spec, S8, cache_dir=tmp_path).entry
    holder = _holder(entry, 60)
    try:
        time.sleep(0.5)
        os.kill(holder.pid, signal.SIGSTOP)
        said = []
        t = time.time()
        with pytest.raises(CacheError) as e:
            ensure_reference(llama, prose_spec, S8, cache_dir=tmp_path, lock_timeout=2, notify=said.append)
        waited = time.time() - t
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    msg = str(e.value)
    assert "\n" not in msg and f"pid {holder.pid} on " in msg and "no sign of life" in msg
    assert "--kld-lock-timeout" in msg and str(entry) in msg
    assert 1.5 < waited < 10, waited
    assert said and f"held by pid {holder.pid}" in said[0] and "waiting for the reference cache lock" in said[0]
    # the killed holder released its lock: the next run builds
    cache = ensure_reference(llama, prose_spec, S8, cache_dir=tmp_path, lock_timeout=2)
    assert cache.n_positions > 0


def test_a_live_builder_is_waited_for_beyond_the_timeout(tiny_model, prose_spec, tmp_path, fast_locks):
    llama = tiny_model("llama")
    entry = plan_reference(llama, prose_spec, S8, cache_dir=tmp_path).entry
    holder = _holder(entry, 3)
    t = time.time()
    cache = ensure_reference(llama, prose_spec, S8, cache_dir=tmp_path, lock_timeout=1, notify=lambda s: None)
    assert time.time() - t > 2 and cache.n_positions > 0  # waited past the 1 s timeout: it was alive
    holder.wait(timeout=30)


def test_a_failed_first_build_leaves_no_directory(tiny_model, prose_spec, tmp_path, monkeypatch):
    import pytest_kld.cache as reference

    def boom(plan, **kw):
        raise CacheError("simulated failure")

    monkeypatch.setattr(reference, "_build", boom)
    with pytest.raises(CacheError):
        ensure_reference(tiny_model("llama"), prose_spec, S8, cache_dir=tmp_path / "c")
    from pytest_kld.fingerprint import MEMO_FILE  # the reference's remembered hash may stay: it is true

    assert [p for p in (tmp_path / "c").iterdir() if p.name != MEMO_FILE] == []


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX ownership")
def test_a_cache_directory_others_can_write_is_refused(tiny_model, prose_spec, tmp_path):
    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(root, 0o777)
    with pytest.raises(CacheError) as e:
        ensure_reference(tiny_model("llama"), prose_spec, S8, cache_dir=root)
    msg = str(e.value)
    assert "writable by other users (mode 0777)" in msg and "--kld-allow-shared-cache" in msg and "\n" not in msg
    cache = ensure_reference(tiny_model("llama"), prose_spec, S8, cache_dir=root, allow_shared_cache=True)
    assert cache.n_positions > 0
    os.chmod(root, 0o1777)  # sticky, like /tmp: others cannot replace what is ours
    assert ensure_reference(tiny_model("llama"), prose_spec, S8, cache_dir=root).path == cache.path


def test_k_beyond_the_vocabulary_is_one_entry(tiny_model, prose_spec, tmp_path):
    builds = []
    kw = dict(cache_dir=tmp_path, on_build=builds.append)
    a = ensure_reference(tiny_model("llama"), prose_spec, Settings(top_k=100_000, chunk_tokens=16), **kw)
    b = ensure_reference(tiny_model("llama"), prose_spec, Settings(top_k=200_000, chunk_tokens=16), **kw)
    c = ensure_reference(tiny_model("llama"), prose_spec, Settings(top_k=320, chunk_tokens=16), **kw)
    assert len(builds) == 1 and a.path == b.path == c.path and a.top_k == 320
