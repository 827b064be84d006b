"""The BLAS chooser (issue 22): a library is bound only after its build configuration was checked
against the CPU the process runs on; a single-target build for instruction sets the CPU lacks is
refused with a line saying so, and with nothing usable MLX keeps its bundled BLAS, with one line
saying how much slower and the command that fixes it. Never a SIGILL."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest

from pytest_kld import blas

SKYLAKEX = "OpenBLAS 0.3.31 NO_AFFINITY SKYLAKEX MAX_THREADS=4"
DYNAMIC = "OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH NO_AFFINITY Zen MAX_THREADS=64"
HASWELL_ONLY = "OpenBLAS 0.3.26 HASWELL MAX_THREADS=64"
# An AMD EPYC Zen 3 (AVX2, FMA, no AVX-512), as /proc/cpuinfo names the flags.
ZEN3 = frozenset("pni ssse3 fma sse4_1 sse4_2 avx f16c sse2 bmi1 avx2 bmi2".split())
SKX = ZEN3 | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def probe_from(configs: dict):
    def probe(path):
        c = configs[path]
        if isinstance(c, Exception):
            raise c
        return c

    return probe


def test_a_skylakex_build_is_refused_on_a_cpu_without_avx512f_and_a_dynamic_arch_build_taken():
    cands = [("cmeel-openblas wheel", "/w/cmeel.so"), ("system", "/usr/lib/dyn.so")]
    c = blas.choose(cands, "x86_64", ZEN3, 2, probe=probe_from({"/w/cmeel.so": SKYLAKEX, "/usr/lib/dyn.so": DYNAMIC}))
    assert c.path == "/usr/lib/dyn.so"
    assert c.warning is None
    line = c.line()
    assert line.startswith(DYNAMIC) and "(system /usr/lib/dyn.so)" in line
    assert ("refused: cmeel-openblas wheel /w/cmeel.so: built for SKYLAKEX only, which needs "
            "avx512bw avx512cd avx512dq avx512f avx512vl: this CPU lacks them") in line


def test_the_same_skylakex_build_is_taken_on_an_avx512_cpu():
    c = blas.choose([("w", "/w/cmeel.so")], "x86_64", SKX, 2, probe=probe_from({"/w/cmeel.so": SKYLAKEX}))
    assert c.path == "/w/cmeel.so" and not c.refused


@pytest.mark.parametrize("config, arch, feats, ok", [
    (DYNAMIC, "x86_64", frozenset(), True),  # DYNAMIC_ARCH picks its own kernels
    (HASWELL_ONLY, "x86_64", ZEN3, True),
    (HASWELL_ONLY, "x86_64", ZEN3 - {"avx2"}, False),
    ("OpenBLAS 0.3.31 SAPPHIRERAPIDS MAX_THREADS=64", "x86_64", SKX, False),  # no AMX, no bf16
    ("OpenBLAS 0.3.31 ARMV8 MAX_THREADS=64", "aarch64", frozenset({"asimd"}), True),
    ("OpenBLAS 0.3.31 NEOVERSEV1 MAX_THREADS=64", "aarch64", frozenset({"asimd", "asimddp"}), False),  # no SVE
    ("OpenBLAS 0.3.31 NEOVERSEV1 MAX_THREADS=64", "aarch64", frozenset({"asimd", "sve"}), True),
    ("OpenBLAS 0.3.99 FUTURECORE MAX_THREADS=64", "x86_64", SKX, False),  # unknown target: refused
])
def test_fits(config, arch, feats, ok):
    why = blas.fits(config, arch, feats)
    assert (why is None) == ok, why


def test_nothing_usable_leaves_mlx_on_its_bundled_blas_with_one_line_that_says_the_cost_and_the_fix():
    cands = [("cmeel-openblas wheel", "/w/cmeel.so"), ("system", "/s/broken.so")]
    configs = {"/w/cmeel.so": SKYLAKEX, "/s/broken.so": OSError("/s/broken.so: libgfortran.so.5: cannot open shared object file")}
    c = blas.choose(cands, "x86_64", ZEN3, 2, probe=probe_from(configs))
    assert c.path is None and c.desc == "mlx bundled"
    assert "\n" not in c.warning
    assert "bundled reference BLAS, ~30x slower" in c.warning
    assert "built for SKYLAKEX only" in c.warning and "libgfortran.so.5" in c.warning
    assert c.warning.endswith("fix: sudo apt-get install libgfortran5, or sudo apt-get install libopenblas0-pthread")


def test_a_build_whose_thread_cap_is_below_the_usable_cores_gives_way_to_one_that_covers_them():
    capped = "OpenBLAS 0.3.31 DYNAMIC_ARCH Zen MAX_THREADS=4"
    cands = [("w", "/w/capped.so"), ("system", "/s/dyn.so")]
    c = blas.choose(cands, "x86_64", ZEN3, 16, probe=probe_from({"/w/capped.so": capped, "/s/dyn.so": DYNAMIC}))
    assert c.path == "/s/dyn.so"
    assert "capped at 4 threads, 16 usable" in c.line()
    c = blas.choose(cands, "x86_64", ZEN3, 2, probe=probe_from({"/w/capped.so": capped, "/s/dyn.so": DYNAMIC}))
    assert c.path == "/w/capped.so" and not c.refused


def test_the_cpu_is_read_from_cpuid_and_agrees_with_the_kernel_on_the_avx_family():
    if blas.machine() != "x86_64":
        pytest.skip("cpuid is an x86-64 instruction; this is " + blas.machine())
    got = blas._x86_cpuid_features()
    if got is None:
        pytest.skip("this system forbids writable+executable mappings: /proc/cpuinfo is read instead")
    kernel = blas._proc_cpuinfo_features()
    for flag in ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl"):
        assert (flag in got) == (flag in kernel), flag


# --------------------------------------------------------------------------- an emulated CPU

CHILD = r"""
import sys
from pytest_kld.blas import fallback_warning, prefer_system_blas
print("BLAS:", prefer_system_blas(), flush=True)
if fallback_warning():
    print(fallback_warning(), flush=True)
if sys.argv[1] == "matmul":
    import mlx.core as mx
    a = mx.ones((64, 64))
    print("matmul", float((a @ a).sum()), flush=True)
else:
    from pytest_kld.compare import compare
    from pytest_kld.reference import ReferenceCache
    r = compare(ReferenceCache.load(sys.argv[1]), sys.argv[2])
    print("mean KLD", r.summary["mean"], "positions", r.summary["count"], flush=True)
"""

DIRECT = r"""
import ctypes, sys
ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)  # bound without looking, as before issue 22
import mlx.core as mx
a = mx.ones((64, 64))
print(float((a @ a).sum()))
"""


def _wheel_lib(name: str) -> str | None:
    return next((p for src, p in blas._wheel_libraries() if src.startswith(name)), None)


@pytest.fixture(scope="module")
def qemu():
    if platform.machine() != "x86_64":
        pytest.skip("the emulated CPU is an x86-64 one (qemu-x86_64 -cpu Haswell)")
    q = shutil.which("qemu-x86_64")
    if q is None:
        pytest.skip("qemu-user is not installed (Debian: apt-get install qemu-user; .ci/run installs it)")
    return q


def _emulated(qemu, script: str, *args, env_extra=None, cwd=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_KLD_BLAS", "LD_PRELOAD", "PYTEST_XDIST_WORKER")}
    env.update(env_extra or {})
    return subprocess.run([qemu, "-cpu", "Haswell", sys.executable, "-c", script, *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_under_an_emulated_avx2_cpu_an_avx512_only_openblas_bound_blindly_dies_with_sigill(qemu, tmp_path):
    """The trap is real whatever CPU runs the tests: qemu's Haswell has no AVX-512."""
    lib = _wheel_lib("cmeel-openblas")
    if lib is None:
        pytest.skip("the cmeel-openblas wheel (an AVX-512-only build, in the test extra on x86-64) is not installed")
    if blas.build_config(lib).split()[3:4] != ["SKYLAKEX"]:
        pytest.skip(f"this cmeel-openblas is not the SKYLAKEX-only build: {blas.build_config(lib)}")
    p = _emulated(qemu, DIRECT, lib, cwd=tmp_path)
    assert p.returncode == -4, (p.returncode, p.stdout, p.stderr[-2000:])  # SIGILL


def test_under_an_emulated_avx2_cpu_the_chooser_runs_a_tiny_comparison_and_names_its_blas(
        qemu, tiny_model, prose_spec, tmp_path):
    """Whatever is installed, the process goes through the chooser, compares a tiny quant with a
    reference cache (built here, natively: emulation is slow) and exits 0, naming its BLAS."""
    from pytest_kld.cache import ensure_reference
    from pytest_kld.reference import Settings

    cache = ensure_reference(tiny_model("llama"), prose_spec, Settings(top_k=16), cache_dir=tmp_path / "cache")
    p = _emulated(qemu, CHILD, str(cache.path), str(tiny_model("llama", bits=4)), cwd=tmp_path)
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr[-3000:])
    blas_line = next(line for line in p.stdout.splitlines() if line.startswith("BLAS: "))
    assert "OpenBLAS" in blas_line or "mlx bundled" in blas_line, blas_line
    if "DYNAMIC_ARCH" in blas_line:
        assert "Haswell" in blas_line  # the kernels picked for the emulated CPU, not the host's
    mean = float(p.stdout.split("mean KLD", 1)[1].split()[0])
    assert 0 < mean < 10


def test_under_an_emulated_avx2_cpu_the_avx512_only_build_is_refused_and_mlx_still_runs(qemu, tmp_path):
    """The library that dies when bound blindly (above), named by PYTEST_KLD_BLAS: refused in the
    BLAS line, MLX keeps its bundled BLAS with the one-line warning, and a matmul runs."""
    lib = _wheel_lib("cmeel-openblas")
    if lib is None or "SKYLAKEX" not in (blas.build_config(lib) or ""):
        pytest.skip("the SKYLAKEX-only cmeel-openblas wheel (test extra on x86-64) is not installed")
    p = _emulated(qemu, CHILD, "matmul", env_extra={"PYTEST_KLD_BLAS": lib}, cwd=tmp_path)
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr[-3000:])
    assert p.stdout.startswith(f"BLAS: mlx bundled; refused: PYTEST_KLD_BLAS {lib}: built for SKYLAKEX only, "
                               "which needs avx512bw avx512cd avx512dq avx512f avx512vl")
    assert "~30x slower" in p.stdout and "fix: " in p.stdout
    assert "matmul 262144.0" in p.stdout


def test_the_cli_doctor_names_the_cpu_the_candidates_and_the_choice(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_KLD_BLAS"}
    p = subprocess.run([sys.executable, "-m", "pytest_kld", "doctor"], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith(f"cpu: {blas.machine()}")
    assert lines[1].startswith("blas: ")
    assert any(w in lines[1] for w in ("OpenBLAS", "mlx bundled", "platform default")), lines[1]
