"""Use the system's OpenBLAS for MLX's float32 matmuls on a Linux CPU.

The Linux ``mlx[cpu]`` wheel bundles a reference BLAS that runs sgemm at ~8 GFLOPS on our 2-core
machines. Loading an optimised OpenBLAS into the process's global symbol scope *before* mlx is
first imported makes MLX's BLAS calls resolve to it: ~90 GFLOPS, the same results up to float32
rounding (measured by ``benchmarks/bench_blas.py``). It is the same effect as
``LD_PRELOAD=.../libopenblas.so.0``, without asking the user to set it.

Where it comes from: the ``cmeel-openblas`` wheel from PyPI (a dependency on Linux: OpenBLAS
built as a plain shared library; it needs the GNU Fortran runtime, Debian's ``libgfortran5``),
found through the wheel's own metadata in site-packages only, else a system OpenBLAS at an
absolute system path (Debian's ``libopenblas0-pthread``). Native code is never loaded from a
path the working directory can influence.

``PYTEST_KLD_BLAS``: ``auto`` (default: the first OpenBLAS found, Linux only), ``bundled``
(leave MLX's own BLAS), or the absolute path of a BLAS library to load. Nothing happens when mlx was
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


def _site_dirs() -> list[str]:
    """The interpreter's own site-packages directories (the environment's, the user's): where
    pip installs wheels. Never the working directory or other sys.path entries."""
    import site
    import sysconfig

    dirs = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # some virtualenv layouts lack it
        pass
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return list(dict.fromkeys(os.path.realpath(d) for d in dirs if d))


def _wheel_openblas() -> list[str]:
    """OpenBLAS from the installed cmeel-openblas wheel, found through its own metadata (its
    RECORD of files) in the site-packages directories only: a ``cmeel.prefix`` planted in the
    working directory or next to the tests, which sit on sys.path under ``python -m`` and
    pytest, is never looked at, nor loaded."""
    from importlib.metadata import distributions

    out = []
    for site_dir in _site_dirs():
        for dist in distributions(path=[site_dir]):
            if (dist.metadata["Name"] or "").lower().replace("_", "-") != "cmeel-openblas":
                continue
            for f in dist.files or ():
                lib = os.path.realpath(dist.locate_file(f))
                if f.name == "libopenblas.so.0" and lib.startswith(site_dir + os.sep) and os.path.isfile(lib):
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
        if choice != "auto" and not os.path.isabs(choice):
            _STATE["blas"] = f"mlx bundled (PYTEST_KLD_BLAS={choice} ignored: give the library's absolute path)"
            return _STATE["blas"]
        paths = (
            [choice]
            if choice != "auto"
            else [*_wheel_openblas(), *CANDIDATES, ctypes.util.find_library("openblas")]
        )
        desc = "mlx bundled (no OpenBLAS found: pip install cmeel-openblas)"
        failed = None
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
            except OSError as e:
                failed = failed or f"{path}: {e}"
                continue
            desc = f"OpenBLAS {path}"
            break
        else:
            if choice != "auto":
                desc = f"mlx bundled (could not load PYTEST_KLD_BLAS={choice})"
            elif failed:  # e.g. the wheel's OpenBLAS without the GNU Fortran runtime it links
                hint = "; apt-get install libgfortran5" if "libgfortran" in failed else ""
                desc = f"mlx bundled, ~9x slower (OpenBLAS did not load: {failed}{hint})"
    _STATE["blas"] = desc
    return desc
