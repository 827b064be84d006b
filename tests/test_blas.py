"""Which BLAS MLX runs on. Native code is never loaded from a path the working directory can
influence (issue 10): a ``cmeel.prefix/lib/libopenblas.so.0`` (with a matching dist-info) planted
in the working directory or next to the tests, both on sys.path under ``python -m`` and pytest, is
not loaded. The chooser (issue 22) and its run under an emulated CPU are in test_blas_choice.py."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen("PLANTED-LIBRARY-RAN", "w");
    if (f) { fputs("ran\n", f); fclose(f); }
}
void cblas_sgemm(void) {}
"""

CHILD = (
    "import sys; sys.path.insert(0, ''); sys.path.insert(0, '.');"
    "from pytest_kld.blas import prefer_system_blas; print(prefer_system_blas())"
)


@pytest.fixture
def planted_dir(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the planted library (Debian: apt-get install gcc)")
    lib = tmp_path / "cmeel.prefix" / "lib"
    lib.mkdir(parents=True)
    (tmp_path / "planted.c").write_text(PLANTED)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib / "libopenblas.so.0"), str(tmp_path / "planted.c")], check=True)
    info = tmp_path / "cmeel_openblas-9.9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cmeel-openblas\nVersion: 9.9.9\n")
    (info / "RECORD").write_text("cmeel.prefix/lib/libopenblas.so.0,,\n")
    return tmp_path


def test_the_planted_library_would_run_if_loaded(planted_dir):
    """The trap works: loading it by path runs its constructor (so the next test means something)."""
    code = f"import ctypes; ctypes.CDLL({str(planted_dir / 'cmeel.prefix/lib/libopenblas.so.0')!r})"
    subprocess.run([sys.executable, "-c", code], cwd=planted_dir, check=True)
    assert (planted_dir / "PLANTED-LIBRARY-RAN").exists()


@pytest.mark.parametrize("env", [{}, {"PYTEST_XDIST_WORKER": "gw0"}])
def test_a_library_planted_on_sys_path_is_never_loaded(planted_dir, env, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("PYTEST_KLD_BLAS", raising=False)
    p = subprocess.run([sys.executable, "-c", CHILD], cwd=planted_dir, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert not (planted_dir / "PLANTED-LIBRARY-RAN").exists(), p.stdout
    assert str(planted_dir) not in p.stdout


def test_a_relative_blas_path_is_refused(planted_dir, monkeypatch):
    monkeypatch.setenv("PYTEST_KLD_BLAS", "cmeel.prefix/lib/libopenblas.so.0")
    p = subprocess.run([sys.executable, "-c", CHILD], cwd=planted_dir, capture_output=True, text=True)
    assert not (planted_dir / "PLANTED-LIBRARY-RAN").exists()
    assert "give the library's absolute path" in p.stdout


THREADS = (
    "import ctypes; from pytest_kld.blas import bound_path, prefer_system_blas; d = prefer_system_blas();"
    "print(ctypes.CDLL(bound_path()).openblas_get_num_threads() if bound_path() else d)"
)


@pytest.mark.parametrize("worker", [None, "gw0"])
def test_an_xdist_worker_runs_one_openblas_thread(worker, monkeypatch, tmp_path):
    """Each xdist worker is already one process per core: its OpenBLAS runs one thread, so that
    spinning threads of two workers (a demo quant's GPTQ step beside a test) do not take turns on
    the cores (benchmarks/bench_threads.py: 4.1 s against 2.5 s beside such a neighbour). Outside
    xdist OpenBLAS keeps one thread per core (the fastest alone); OPENBLAS_NUM_THREADS wins."""
    import os

    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "PYTEST_XDIST_WORKER", "PYTEST_KLD_BLAS"):
        monkeypatch.delenv(var, raising=False)
    if worker:
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    p = subprocess.run([sys.executable, "-c", THREADS], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    if not p.stdout.strip().isdigit():
        pytest.skip(f"no OpenBLAS loaded here ({p.stdout.strip()}): nothing to count")
    if worker:
        assert int(p.stdout) == 1
    elif len(os.sched_getaffinity(0)) > 1:
        assert int(p.stdout) > 1, p.stdout
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    p = subprocess.run([sys.executable, "-c", THREADS], cwd=tmp_path, capture_output=True, text=True)
    assert p.stdout.strip() == "2", p.stdout
