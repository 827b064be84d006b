"""A reference cache built over MLX's distributed engine: two ring-backend ranks on this machine
(``mlx.launch --backend ring -n 2``), the reference sharded by mlx-lm (pipeline parallel for
qwen3_5; llama has no pipeline support in mlx-lm 0.32, so tensor parallel), against the
single-process build of the same cache; a rank killed mid-build and a host that cannot be
reached leave nothing trusted. Each test launches real ranks: ~10-25 s each on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pytest_kld.cache import ensure_reference
from pytest_kld.compare import compare
from pytest_kld.corpus import corpus_spec
from pytest_kld.distributed import Launch, launch_command, launch_from_settings
from pytest_kld.errors import CacheError
from pytest_kld.reference import ReferenceCache, Settings

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="mlx.launch's ring backend: POSIX only")

S = Settings(top_k=32, chunk_tokens=64, exec="float32")
TWO = Launch(ranks=2)


@pytest.fixture(scope="module")
def spec():
    return corpus_spec("short", n_chunks=3)


def _rank_pids(model: Path) -> dict[int, int]:
    """{rank: pid} of the rank programs running on ``model`` (read from /proc)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pytest_kld.shardrank" in cmd and str(model).encode() in cmd:
            rank = next((int(e[9:]) for e in env if e.startswith(b"MLX_RANK=")), None)
            if rank is not None:
                found[rank] = int(d.name)
    return found


@pytest.mark.parametrize("arch, strategy", [("llama", "tensor"), ("qwen3_5", "pipeline")])
def test_two_ranks_build_the_single_process_cache(tiny_model, spec, tmp_path, arch, strategy):
    model = tiny_model(arch)
    one = ensure_reference(model, spec, S, cache_dir=tmp_path / "one")
    heard = []
    two = ensure_reference(model, spec, S, cache_dir=tmp_path / "two", launch=TWO,
                           progress=lambda done, total: heard.append((done, total)))
    # the same key and entry name: sharding is provenance, not identity
    assert two.manifest["key"] == one.manifest["key"]
    assert two.path.relative_to(tmp_path / "two") == one.path.relative_to(tmp_path / "one")
    prov = two.manifest["distributed"]
    assert (prov["ranks"], prov["strategy"], prov["backend"], prov["hosts"]) == (2, strategy, "ring", ["127.0.0.1"])
    assert "distributed" not in one.manifest and "distributed" not in json.dumps(two.manifest["key_material"])
    # exact by construction: the token ids fed and the positions scored
    assert np.array_equal(two.tokens, one.tokens) and np.array_equal(two.score_ranges, one.score_ranges)
    # float32 rounding: tensor parallel sums partial products across ranks in another order, and a
    # rank's BLAS runs other thread counts (so other blockings) than one process: log-probs agree
    # to ~1e-5 nats, and top-K ids may swap only between log-probs that tie within that
    for name in ("topk_logprobs", "tail", "target"):
        np.testing.assert_allclose(getattr(two, name), getattr(one, name), rtol=0, atol=1e-4, err_msg=name)
    assert_same_top_k(two, one, atol=1e-4)
    assert heard[0][0] == 0 and heard[-1][0] == heard[-1][1] > 0  # rank 0's progress reached us
    # the entry is an ordinary one: it reopens, and the reference (run in one process) against
    # it reads 0 to float32 rounding
    again = ensure_reference(model, spec, S, cache_dir=tmp_path / "two", on_build=pytest.fail)
    assert again.path == two.path
    result = compare(ReferenceCache.load(two.path), model)
    assert 0.0 <= result.summary["mean"] < 1e-7 and result.summary["max"] < 1e-5


def assert_same_top_k(a, b, atol: float) -> None:
    """Row by row, the same top-K record up to float32 rounding: an id kept by one side and not
    the other sits at the cut (within ``atol`` of the other side's K-th log-prob), a shared id has
    the same log-prob within ``atol``, and such differences are rare (a wrong row differs in most)."""
    differing = 0
    for i in range(len(a.topk_ids)):
        la = dict(zip(a.topk_ids[i].tolist(), a.topk_logprobs[i].tolist()))
        lb = dict(zip(b.topk_ids[i].tolist(), b.topk_logprobs[i].tolist()))
        for t in la.keys() & lb.keys():
            assert abs(la[t] - lb[t]) <= atol, (i, t)
        for mine, other in ((la, lb), (lb, la)):
            for t in mine.keys() - other.keys():
                assert mine[t] <= min(other.values()) + atol, (i, t)
        differing += not np.array_equal(a.topk_ids[i], b.topk_ids[i])
    assert differing <= max(2, len(a.topk_ids) // 50), differing


def test_a_quant_compared_over_two_ranks_reads_as_in_one_process(tiny_model, spec, tmp_path):
    """A quant too large for one machine: the same comparison with the quant pipeline-sharded."""
    ref, q8 = tiny_model("qwen3_5"), tiny_model("qwen3_5", bits=8)
    cache = ensure_reference(ref, spec, S, cache_dir=tmp_path)
    here, there = compare(cache, q8), compare(cache, q8, launch=TWO)
    assert there.summary["mean"] > 0.01  # a real quant, not the reference
    # float32 rounding (the ranks' BLAS runs other thread counts than one process): per position
    # ~1e-4 nats at most (seen: 1.1e-4 with one OpenBLAS), the mean far closer
    for name in ("kl", "ref_target", "quant_target"):
        np.testing.assert_allclose(getattr(there, name), getattr(here, name), rtol=1e-3, atol=5e-4, err_msg=name)
    assert abs(there.summary["mean"] - here.summary["mean"]) < 1e-5
    assert np.mean(there.top1 != here.top1) < 0.01 and there.exec == here.exec == "float32"
    itself = compare(cache, ref, launch=TWO)
    assert itself.is_reference and 0.0 <= itself.summary["mean"] < 1e-7 and itself.summary["max"] < 1e-5


def test_a_rank_killed_mid_build_leaves_nothing_trusted(tiny_model, spec, tmp_path):
    model = tiny_model("qwen3_5")
    root = tmp_path / "cache"
    killed = []

    def kill_rank_1(done, total):
        if done > 0 and not killed:  # rank 0 is past its first chunk: the passes are under way
            pid = _rank_pids(model)[1]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    t0 = time.time()
    with pytest.raises(CacheError) as err:
        ensure_reference(model, spec, S, cache_dir=root, launch=TWO, progress=kill_rank_1)
    message = str(err.value)
    assert killed, "the build ended before the kill"
    assert "\n" not in message
    assert message.startswith(f"distributed build of {model} over 2 ranks (ring) failed: ")
    assert "rank 1 on 127.0.0.1 exited with code -9" in message
    assert message.endswith("no cache entry was written")
    assert time.time() - t0 < 60  # rank 0, waiting on the dead rank, was ended by mlx.launch
    # nothing left: no entry, no job directory, no temporary, no rank process
    assert [p for p in root.rglob("*") if p.is_dir() and not p.name.startswith("ref-")] == []
    assert _rank_pids(model) == {}
    # the next run builds afresh (one process) and trusts it
    builds = []
    cache = ensure_reference(model, spec, S, cache_dir=root, on_build=builds.append)
    assert len(builds) == 1 and cache.n_positions > 0


def test_a_host_that_cannot_be_reached_is_one_line(tiny_model, spec, tmp_path):
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps({"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]},
                                           {"ssh": "kld-no-such-host.invalid", "ips": ["127.0.0.1"]}]}))
    root = tmp_path / "cache"
    with pytest.raises(CacheError) as err:
        ensure_reference(tiny_model("llama"), spec, S, cache_dir=root, launch=Launch(hosts=str(hosts)))
    message = str(err.value)
    assert "\n" not in message
    assert "rank 1 on kld-no-such-host.invalid exited with code 255 (255 is ssh's" in message
    assert message.endswith("no cache entry was written")
    from pytest_kld.fingerprint import MEMO_FILE  # the reference's remembered hash may stay: it is true

    assert [p for p in root.rglob("*") if p.name != MEMO_FILE] == []


def test_launch_settings_and_command(tmp_path):
    assert launch_from_settings({"hosts": None, "ranks": 1}) is None
    assert launch_from_settings({"ranks": 2, "backend": "ring"}) == Launch(ranks=2)
    assert launch_from_settings({"hosts": "10.0.0.1,10.0.0.2", "ranks": 1}).host_names() == ["10.0.0.1", "10.0.0.2"]
    with pytest.raises(CacheError, match=r"--kld-hosts=.*missing\.json: no such hostfile"):
        launch_from_settings({"hosts": str(tmp_path / "missing.json"), "ranks": 1})
    with pytest.raises(CacheError, match="unknown distributed backend 'tcp'"):
        Launch(ranks=2, backend="tcp")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(CacheError, match="is not an mlx.launch hostfile"):
        Launch(hosts=str(bad)).host_names()
    with pytest.raises(CacheError, match="mlx.launch starts one rank per hostfile entry"):
        launch_from_settings({"hosts": str(bad), "ranks": 2})
    jaccl = tmp_path / "jaccl.json"  # as mlx.distributed_config writes it: its backend is used unless one is given
    jaccl.write_text(json.dumps({"backend": "jaccl", "hosts": [{"ssh": "mac-a", "ips": ["10.0.0.1"]},
                                                               {"ssh": "mac-b", "ips": ["10.0.0.2"]}]}))
    assert launch_from_settings({"hosts": str(jaccl)}) == Launch(hosts=str(jaccl), backend="jaccl")
    assert launch_from_settings({"hosts": str(jaccl), "backend": "ring"}).backend == "ring"
    assert Launch(hosts=str(jaccl)).provenance() == {"hosts": ["mac-a", "mac-b"], "ranks_per_host": 1, "size": 2,
                                                     "backend": "ring"}
    cmd = launch_command(Launch(ranks=2), ["--model", "m"])
    # mlx.launch of this environment, run by this interpreter; the ranks run this interpreter too
    assert cmd[0] == sys.executable and Path(cmd[1]).parent == Path(sys.executable).parent
    assert cmd[cmd.index("--python") + 1] == sys.executable
    assert cmd[cmd.index("--") + 1 :] == ["-m", "pytest_kld.shardrank", "--model", "m"]
    assert cmd[cmd.index("--backend") + 1] == "ring" and cmd[cmd.index("-n") + 1] == "2"
    assert 20000 <= int(cmd[cmd.index("--starting-port") + 1]) < 60000  # not mlx.launch's fixed default
    from_file = launch_command(Launch(hosts=str(jaccl), backend="jaccl"), [])
    assert from_file[from_file.index("--hostfile") + 1] == str(jaccl.resolve()) and "-n" not in from_file


def test_cli_build_over_two_ranks_prints_the_single_process_entry(tiny_model, tmp_path):
    model = tiny_model("llama")
    args = [str(model), "--mode", "short", "--n-chunks", "2", "--top-k", "32", "--exec", "float32",
            "--chunk-tokens", "64"]
    run = [sys.executable, "-m", "pytest_kld", "build"]
    two = subprocess.run([*run, *args, "--ranks", "2", "--cache-dir", str(tmp_path / "two")], capture_output=True,
                         text=True, timeout=120)
    assert two.returncode == 0, two.stderr
    one = subprocess.run([*run, *args, "--cache-dir", str(tmp_path / "one")], capture_output=True, text=True,
                         timeout=120)
    assert one.returncode == 0, one.stderr
    entry = Path(two.stdout.strip().splitlines()[-1])
    assert entry.relative_to(tmp_path / "two") == Path(one.stdout.strip().splitlines()[-1]).relative_to(tmp_path / "one")
    assert ReferenceCache.load(entry).manifest["distributed"]["strategy"] == "tensor"


GATE_TEST = """
def test_reference_itself(assert_kld):
    assert_kld({ref!r}, max=0.0)

def test_quant_8bit(assert_kld):
    assert_kld({q8!r}, mean=0.5)
"""


def test_pytest_builds_over_ranks_then_gates_quants_locally(pytester, tiny_model, monkeypatch):
    """``pytest --kld-reference=BIG --kld-ranks=2``: the cache built by two ranks (pipeline),
    the quants then compared in the test process against it.

    The reference against it is exactly 0 when both sides do the same arithmetic: local ranks run
    OpenBLAS at cores/ranks threads, and OpenBLAS blocks a 512-row matmul differently at 1 and 2
    threads (measured: max 1.6e-6 nats), so the pytest process is given the ranks' one thread."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    ref, q8 = tiny_model("qwen3_5"), tiny_model("qwen3_5", bits=8)
    pytester.makepyfile(test_gate=GATE_TEST.format(ref=str(ref), q8=str(q8)))
    cache_dir = pytester.path / "kld-cache"
    result = pytester.runpytest_subprocess(
        f"--kld-reference={ref}", f"--kld-cache-dir={cache_dir}", "--kld-n-chunks=3", "--kld-top-k=32",
        "--kld-exec=float32", "--kld-ranks=2", "--kld-backend=ring", "-p", "no:cacheprovider",
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*pytest-kld leaderboard*"])
    (entry,) = [p.parent for p in cache_dir.glob("ref-*/*/manifest.json")]
    assert ReferenceCache.load(entry).manifest["distributed"]["strategy"] == "pipeline"


def test_cli_compare_with_everything_sharded(tiny_model, tmp_path):
    """``pytest-kld compare REF QUANT --ranks 2 --shard-quants``: the reference built and the quant
    compared over two ranks; the same figures as one process (the JSON's mean)."""
    ref, q8 = tiny_model("qwen3_5"), tiny_model("qwen3_5", bits=8)
    args = [sys.executable, "-m", "pytest_kld", "compare", str(ref), str(q8), "--mode", "short", "--n-chunks", "2",
            "--top-k", "32", "--exec", "float32", "--chunk-tokens", "64", "--mean", "1.0"]
    two = subprocess.run([*args, "--ranks", "2", "--shard-quants", "--cache-dir", str(tmp_path / "two"),
                          "--json", str(tmp_path / "two.json")], capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr
    one = subprocess.run([*args, "--cache-dir", str(tmp_path / "one"), "--json", str(tmp_path / "one.json")],
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr

    def means(name):
        return [r["summary"]["mean"] for r in json.loads((tmp_path / name).read_text())["results"]]

    # float32 rounding: the ranks' BLAS runs other thread counts (other blockings) than one process
    assert means("two.json") == pytest.approx(means("one.json"), rel=1e-4, abs=1e-5)
    assert means("two.json")[-1] > 0.01
