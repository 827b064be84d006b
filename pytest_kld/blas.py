"""Use the system's OpenBLAS for MLX's float32 matmuls on a Linux CPU.

The Linux ``mlx[cpu]`` wheel bundles a reference BLAS that runs sgemm at ~8 GFLOPS on our 2-core
machines. Loading an optimised OpenBLAS into the process's global symbol scope *before* mlx is
first imported makes MLX's BLAS calls resolve to it: ~90 GFLOPS, the same results up to float32
rounding (measured by ``benchmarks/bench_blas.py``). It is the same effect as
``LD_PRELOAD=.../libopenblas.so.0``, without asking the user to set it.

Where it comes from: the ``cmeel-openblas`` wheel from PyPI (a dependency on Linux: OpenBLAS
built as a plain shared library), else a system OpenBLAS (Debian's ``libopenblas0-pthread``).

``PYTEST_KLD_BLAS``: ``auto`` (default: the first OpenBLAS found, Linux only), ``bundled``
(leave MLX's own BLAS), or the path of a BLAS library to load. Nothing happens when mlx was
already imported (binding then would be partial) or on macOS (MLX uses Accelerate/Metal).
Under pytest-xdist each worker's OpenBLAS runs one thread unless OPENBLAS_NUM_THREADS is set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_STATE: dict = {}


def _wheel_openblas() -> list[str]:
    """OpenBLAS from the cmeel-openblas wheel, in any directory on sys.path."""
    out = []
    for entry in sys.path:
        lib = os.path.join(entry or ".", "cmeel.prefix", "lib", "libopenblas.so.0")
        if os.path.exists(lib):
            out.append(lib)
    return out


def _preloaded() -> str | None:
    for lib in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
        if "blas" in os.path.basename(lib):
            return lib
    return None


def prefer_system_blas() -> str:
    """Load an optimised BLAS for MLX if we may; return a description of the BLAS in use."""
    if "blas" in _STATE:
        return _STATE["blas"]
    choice = os.environ.get("PYTEST_KLD_BLAS", "auto").strip() or "auto"
    pre = _preloaded()
    if pre:
        desc = f"LD_PRELOAD {pre}"
    elif not sys.platform.startswith("linux"):
        desc = "platform default"
    elif choice == "bundled":
        desc = "mlx bundled"
    elif "mlx.core" in sys.modules:
        desc = "mlx bundled (mlx was imported before pytest-kld could load OpenBLAS)"
    else:
        paths = (
            [choice]
            if choice != "auto"
            else [*_wheel_openblas(), *CANDIDATES, ctypes.util.find_library("openblas")]
        )
        desc = "mlx bundled (no OpenBLAS found: pip install cmeel-openblas)"
        if os.environ.get("PYTEST_XDIST_WORKER") and not (
            os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
        ):
            # xdist runs one process per core already; OpenBLAS threads that spin-wait in every
            # worker oversubscribe the cores (measured: up to 10x slower on 2 cores).
            os.environ["OPENBLAS_NUM_THREADS"] = "1"
        for path in paths:
            if not path or (os.path.isabs(path) and not os.path.exists(path)):
                continue
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            desc = f"OpenBLAS {path}"
            break
        else:
            if choice != "auto":
                desc = f"mlx bundled (could not load PYTEST_KLD_BLAS={choice})"
    _STATE["blas"] = desc
    return desc
