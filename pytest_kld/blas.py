"""Choose a BLAS this CPU can run for MLX's float32 matmuls on a Linux CPU, then bind it.

The Linux ``mlx[cpu]`` wheel bundles the netlib reference BLAS (~5 GFLOPS sgemm on our 2-core
machines). Loading an optimised OpenBLAS into the process's global symbol scope *before* mlx is
first imported makes MLX's BLAS calls resolve to it (~100-150 GFLOPS; ``benchmarks/bench_blas.py``).
It is the same effect as ``LD_PRELOAD=.../libopenblas.so.0``, without asking the user to set it.

An OpenBLAS built for one CPU target (``TARGET=SKYLAKEX``: AVX-512 kernels) kills the process with
SIGILL at the first sgemm on a CPU without those instructions. So no candidate is bound before it
is checked: it is opened with ``RTLD_LOCAL`` (which runs no kernel), asked what it was built for
(``openblas_get_config()``), and that is compared with the instruction sets of the CPU we run on.
A ``DYNAMIC_ARCH`` build picks its kernels at run time and fits any CPU of its architecture; a
single-target build fits only a CPU with every instruction set its target needs (``TARGETS``); an
unknown target is refused. Only then is the chosen library re-opened with ``RTLD_GLOBAL``.

The CPU's instruction sets come from the ``cpuid`` instruction on x86-64 (what the process really
runs on, also under an emulator whose ``/proc/cpuinfo`` shows the host's), from the kernel's
hardware capabilities (``getauxval``) on aarch64, else from ``/proc/cpuinfo``.

Candidates, in order: ``PYTEST_KLD_BLAS`` (an absolute path), OpenBLAS wheels in site-packages
(``ngsolve-openblas``: DYNAMIC_ARCH, a dependency on x86-64 Linux; ``cmeel-openblas``), found
through their own metadata only, then system libraries at absolute paths (Debian's
``libopenblas0-pthread``, DYNAMIC_ARCH on x86-64 and aarch64). Among those that fit, the first
whose thread cap (``MAX_THREADS``) covers the cores this process may use wins, else the first.
Native code is never loaded from a path the working directory can influence.

``PYTEST_KLD_BLAS``: ``auto`` (default), ``bundled`` (leave MLX's own BLAS), or the absolute path
of a BLAS library (checked like any candidate, unless it is not an OpenBLAS). Nothing happens when
mlx was already imported (binding then would be partial) or off Linux (MLX uses Accelerate/Metal).
Under pytest-xdist each worker's OpenBLAS runs one thread unless OPENBLAS_NUM_THREADS is set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import re
import sys
from dataclasses import dataclass, field

# OpenBLAS wheels on PyPI that export unprefixed CBLAS/LAPACK symbols: (distribution, file pattern).
WHEELS = (
    ("ngsolve-openblas", r"libopenblas.*\.so(\.\d+)*"),
    ("cmeel-openblas", r"libopenblas\.so\.0"),
)
SYSTEM = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
FIX = "sudo apt-get install libopenblas0-pthread"  # Debian/Ubuntu, x86-64 and aarch64: DYNAMIC_ARCH
# sgemm 1024x1024 on one AMD EPYC (2 cores, AVX2), benchmarks/bench_blas.py: MLX's bundled BLAS
# against a DYNAMIC_ARCH OpenBLAS.
SLOWER = "~30x slower sgemm"

_AVX512 = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")
_AVX2 = ("avx", "avx2", "fma", "f16c", "bmi1", "bmi2")
# What a single-target OpenBLAS build's kernels (and the -march it was compiled with) need.
TARGETS = {
    "x86_64": {
        **dict.fromkeys(("SKYLAKEX",), _AVX512),
        "COOPERLAKE": (*_AVX512, "avx512_bf16"),
        "SAPPHIRERAPIDS": (*_AVX512, "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16"),
        **dict.fromkeys(("HASWELL", "ZEN", "SKYLAKE"), _AVX2),
        **dict.fromkeys(("SANDYBRIDGE", "BULLDOZER"), ("avx",)),
        **dict.fromkeys(("PILEDRIVER", "STEAMROLLER", "EXCAVATOR"), ("avx", "fma")),
        **dict.fromkeys(("NEHALEM", "BARCELONA", "BOBCAT"), ("ssse3", "sse4_2")),
        **dict.fromkeys(("CORE2", "PENRYN", "DUNNINGTON", "ATOM"), ("ssse3",)),
        **dict.fromkeys(("PRESCOTT", "OPTERON_SSE3", "NANO"), ("pni",)),
        **dict.fromkeys(("GENERIC", "OPTERON", "ATHLON", "KATMAI", "COPPERMINE", "NORTHWOOD"), ()),
    },
    "aarch64": {
        **dict.fromkeys(("ARMV8", "CORTEXA53", "CORTEXA57", "CORTEXA72", "CORTEXA73", "FALKOR", "THUNDERX",
                         "THUNDERX2T99", "THUNDERX3T110", "TSV110", "EMAG8180", "VORTEX", "GENERIC"), ("asimd",)),
        **dict.fromkeys(("NEOVERSEN1", "CORTEXA55", "CORTEXA76", "CORTEXX1"), ("asimd", "asimdhp", "asimddp")),
        **dict.fromkeys(("NEOVERSEV1", "A64FX", "ARMV8SVE"), ("asimd", "sve")),
        **dict.fromkeys(("NEOVERSEN2", "NEOVERSEV2", "CORTEXA510", "CORTEXA710", "CORTEXX2", "ARMV9"),
                        ("asimd", "sve", "sve2")),
        "ARMV9SME": ("asimd", "sve", "sve2", "sme"),
    },
}

_STATE: dict = {}


@dataclass
class Choice:
    """What was decided: the library bound (or None: MLX's bundled BLAS), why, and the refusals."""

    path: str | None
    what: str  # the build configuration, or why MLX's own BLAS is used
    source: str = ""  # where the library was found
    refused: list[str] = field(default_factory=list)
    warning: str | None = None  # one line for the user when a slow fallback was taken
    threads: int | None = None  # OpenBLAS's thread count once bound

    @property
    def desc(self) -> str:
        if self.path is None or not self.source:
            return self.what
        threads = f", {self.threads} thread(s)" if self.threads else ""
        return f"{self.what}{threads} ({self.source} {self.path})"

    def line(self) -> str:
        return self.desc + (f"; refused: {'; '.join(self.refused)}" if self.refused else "")


# --------------------------------------------------------------------------- the CPU


def machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def cpu_features() -> frozenset[str]:
    """The instruction sets this process can use, named as Linux's /proc/cpuinfo names them."""
    if "features" not in _STATE:
        m = machine()
        got = None
        try:
            got = _x86_cpuid_features() if m == "x86_64" else _aarch64_hwcap_features() if m == "aarch64" else None
        except (OSError, ValueError, AttributeError):
            got = None
        _STATE["features"] = frozenset(got if got is not None else _proc_cpuinfo_features())
    return _STATE["features"]


def _proc_cpuinfo_features() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


# x86-64 machine code (System V ABI), run from an anonymous mapping: no file, no path.
# cpuid(leaf=edi, subleaf=esi) -> eax, ebx, ecx, edx stored at [rdx]
_CPUID = bytes.fromhex("53 89f8 89f1 4989d0 0fa2 418900 41895804 41894808 4189500c 5b c3".replace(" ", ""))
# xgetbv(0) -> edx:eax in rax (only called when the OS has enabled XSAVE)
_XGETBV = bytes.fromhex("31c9 0f01d0 48c1e220 4809d0 c3".replace(" ", ""))
_X86_BITS = {  # (leaf, subleaf, register index, bit): name
    (1, 0, 2, 0): "pni", (1, 0, 2, 9): "ssse3", (1, 0, 2, 12): "fma", (1, 0, 2, 19): "sse4_1",
    (1, 0, 2, 20): "sse4_2", (1, 0, 2, 28): "avx", (1, 0, 2, 29): "f16c", (1, 0, 3, 26): "sse2",
    (7, 0, 1, 3): "bmi1", (7, 0, 1, 5): "avx2", (7, 0, 1, 8): "bmi2", (7, 0, 1, 16): "avx512f",
    (7, 0, 1, 17): "avx512dq", (7, 0, 1, 28): "avx512cd", (7, 0, 1, 30): "avx512bw", (7, 0, 1, 31): "avx512vl",
    (7, 0, 3, 22): "amx_bf16", (7, 0, 3, 23): "avx512_fp16", (7, 0, 3, 24): "amx_tile",
    (7, 1, 0, 5): "avx512_bf16",
}


def _x86_cpuid_features() -> set[str] | None:
    """The CPU's own answer (cpuid), masked by what the OS saves on a context switch (xgetbv)."""
    import mmap

    try:
        buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError, AttributeError):
        return None  # W+X mappings forbidden here (e.g. SELinux execmem): /proc/cpuinfo instead
    try:
        buf.write(_CPUID + b"\x90" * (64 - len(_CPUID)) + _XGETBV)
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        cpuid = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)(base)
        xgetbv = ctypes.CFUNCTYPE(ctypes.c_uint64)(base + 64)
        regs = (ctypes.c_uint32 * 4)()

        def leaf(n, sub=0):
            cpuid(n, sub, ctypes.addressof(regs))
            return tuple(regs)

        top = leaf(0)[0]
        got = {(1, 0): leaf(1)}
        if top >= 7:
            got[(7, 0)] = leaf(7, 0)
            got[(7, 1)] = leaf(7, 1) if got[(7, 0)][0] >= 1 else (0, 0, 0, 0)
        xcr0 = xgetbv() if got[(1, 0)][2] >> 27 & 1 else 0  # OSXSAVE
    finally:
        try:
            buf.close()
        except BufferError:  # a ctypes object still refers to it; the mapping goes with the process
            pass
    out = {name for (lf, sub, reg, bit), name in _X86_BITS.items()
           if (lf, sub) in got and got[(lf, sub)][reg] >> bit & 1}
    if xcr0 & 0b110 != 0b110:  # the OS does not save YMM state: no AVX of any kind
        out -= {"avx", "avx2", "fma", "f16c", *_AVX512, "avx512_bf16", "avx512_fp16"}
    if xcr0 & 0b11100000 != 0b11100000:  # no opmask/ZMM state: no AVX-512
        out -= {*_AVX512, "avx512_bf16", "avx512_fp16"}
    if xcr0 & (0b11 << 17) != 0b11 << 17:  # no AMX tile state
        out -= {"amx_tile", "amx_bf16"}
    return out


_HWCAP = {1: "asimd", 8: "atomics", 10: "asimdhp", 20: "asimddp", 22: "sve"}
_HWCAP2 = {1: "sve2", 14: "bf16", 23: "sme"}


def _aarch64_hwcap_features() -> set[str]:
    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    hw, hw2 = libc.getauxval(16), libc.getauxval(26)  # AT_HWCAP, AT_HWCAP2
    return {n for b, n in _HWCAP.items() if hw >> b & 1} | {n for b, n in _HWCAP2.items() if hw2 >> b & 1}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- a library


def build_config(path: str) -> str | None:
    """``openblas_get_config()`` of the library at ``path``, opened RTLD_LOCAL (no kernel runs, no
    symbol becomes visible to MLX); None when it is not an OpenBLAS. OSError when it cannot load."""
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    fn = getattr(lib, "openblas_get_config", None)
    if fn is None:
        return None
    fn.restype = ctypes.c_char_p
    return (fn() or b"").decode("ascii", "replace").strip()


def fits(config: str, arch: str, features: frozenset[str] | set[str]) -> str | None:
    """None when an OpenBLAS built as ``config`` runs on this CPU, else why not (one phrase)."""
    words = config.split()
    if "DYNAMIC_ARCH" in words:
        return None
    target = next((w for w in words[2:] if w.upper() in TARGETS.get(arch, {})), None)
    if target is None:
        known = ", ".join(sorted(TARGETS.get(arch, {}))[:3])
        return f"built for a CPU target pytest-kld does not know on {arch} ({config!r}; known: {known}, ...)"
    missing = sorted(set(TARGETS[arch][target.upper()]) - set(features))
    if missing:
        return f"built for {target} only, which needs {' '.join(missing)}: this CPU lacks them"
    return None


def max_threads(config: str) -> int | None:
    m = re.search(r"MAX_THREADS=(\d+)", config)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- candidates


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


def _wheel_libraries() -> list[tuple[str, str]]:
    """(source, path) of the OpenBLAS wheels' libraries, found through each wheel's own metadata
    (its RECORD of files) in the site-packages directories only: a dist-info planted in the
    working directory or next to the tests, which sit on sys.path under ``python -m`` and pytest,
    is never looked at, nor loaded."""
    from importlib.metadata import distributions

    out = []
    for name, pattern in WHEELS:
        for site_dir in _site_dirs():
            for dist in distributions(path=[site_dir]):
                if (dist.metadata["Name"] or "").lower().replace("_", "-") != name:
                    continue
                for f in dist.files or ():
                    lib = os.path.realpath(dist.locate_file(f))
                    if re.fullmatch(pattern, f.name) and lib.startswith(site_dir + os.sep) and os.path.isfile(lib):
                        out.append((f"{name} wheel", lib))
    return list(dict.fromkeys(out))


def candidates(choice: str) -> list[tuple[str, str]]:
    if choice != "auto":
        return [("PYTEST_KLD_BLAS", choice)]
    found = ctypes.util.find_library("openblas")
    system = [p for p in (*SYSTEM, found) if p and os.path.isabs(p) and os.path.exists(p)]
    seen, out = set(), []
    for src, p in [*_wheel_libraries(), *(("system", p) for p in system)]:
        real = os.path.realpath(p)
        if real not in seen:
            seen.add(real)
            out.append((src, p))
    return out


def choose(cands: list[tuple[str, str]], arch: str, features, cores: int, probe=build_config) -> Choice:
    """The first candidate that fits this CPU and whose thread cap covers ``cores`` (else the first
    that fits), with one phrase per candidate refused or passed over on the way. ``probe(path)``
    gives the build configuration; candidates after the one taken are not opened."""
    fitting, refused, gfortran = [], [], False
    for src, path in cands:
        try:
            config = probe(path)
        except OSError as e:
            gfortran = gfortran or "libgfortran" in str(e)
            refused.append(f"{src} {path} does not load ({_short(e, path)})")
            continue
        why = fits(config, arch, features) if config is not None else None
        if why:
            refused.append(f"{src} {path}: {why}")
            continue
        fitting.append((src, path, config))
        if (max_threads(config or "") or cores) >= cores:
            break
    else:
        if not fitting:
            hint = "sudo apt-get install libgfortran5, or " if gfortran else ""
            warning = (f"pytest-kld: MLX runs on its bundled reference BLAS, {SLOWER} than OpenBLAS"
                       f"{' (' + '; '.join(refused) + ')' if refused else ' (no OpenBLAS found)'}; "
                       f"fix: {hint}{FIX}")
            return Choice(None, "mlx bundled", refused=refused, warning=warning)
    capped = fitting[-1][2] and (max_threads(fitting[-1][2]) or cores) < cores
    src, path, config = fitting[0] if capped else fitting[-1]
    skipped = [] if capped else [f"{s} {p}: capped at {max_threads(c or '')} threads, {cores} usable"
                                 for s, p, c in fitting[:-1]]
    what = config or "a BLAS library (not OpenBLAS: its CPU target was not checked)"
    return Choice(path, what, src, refused + skipped)


def _short(e: Exception, path: str) -> str:
    msg = str(e)
    return msg[len(path) + 2:] if msg.startswith(path + ": ") else msg


# --------------------------------------------------------------------------- binding


def _preloaded() -> str | None:
    for lib in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
        if "blas" in os.path.basename(lib):
            return lib
    return None


def decide() -> Choice:
    """Choose (once per process) and bind the BLAS; nothing is bound twice."""
    if "choice" in _STATE:
        return _STATE["choice"]
    choice = os.environ.get("PYTEST_KLD_BLAS", "auto").strip() or "auto"
    pre = _preloaded()
    if pre:
        result = Choice(pre, "a BLAS given by the user", "LD_PRELOAD")
    elif not sys.platform.startswith("linux"):
        result = Choice(None, "platform default")
    elif choice == "bundled":
        result = Choice(None, "mlx bundled (PYTEST_KLD_BLAS=bundled)")
    elif "mlx.core" in sys.modules:
        result = Choice(None, "mlx bundled (mlx was imported before pytest-kld could choose a BLAS)")
    elif choice != "auto" and not os.path.isabs(choice):
        result = Choice(None, f"mlx bundled (PYTEST_KLD_BLAS={choice} ignored: give the library's absolute path)")
    else:
        if os.environ.get("PYTEST_XDIST_WORKER") and not (
            os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
        ):
            # xdist runs one process per core already; OpenBLAS threads that spin-wait in every
            # worker oversubscribe the cores (measured: up to 10x slower on 2 cores). Set before
            # any candidate is opened: OpenBLAS reads it when it is loaded.
            os.environ["OPENBLAS_NUM_THREADS"] = "1"
        result = choose(candidates(choice), machine(), cpu_features(), usable_cores())
        if result.path is not None:
            lib = ctypes.CDLL(result.path, mode=ctypes.RTLD_GLOBAL)  # promotes the RTLD_LOCAL handle
            threads = getattr(lib, "openblas_get_num_threads", None)
            result.threads = threads() if threads is not None else None
    _STATE["choice"] = result
    return result


def prefer_system_blas() -> str:
    """Bind an optimised BLAS for MLX if one fits this CPU; return the line that says which."""
    return decide().line()


def bound_path() -> str | None:
    """The library MLX's BLAS calls resolve to, when pytest-kld bound one."""
    return decide().path


def fallback_warning() -> str | None:
    """One line when MLX was left on its bundled BLAS because nothing usable was found."""
    return decide().warning


def doctor() -> list[str]:
    """What ``pytest-kld doctor`` prints: the CPU, every candidate's verdict and the choice."""
    c = decide()
    feats = sorted(f for f in cpu_features() if f.startswith(("avx", "amx", "sve", "sme", "asimd")) or f == "fma")
    lines = [f"cpu: {machine()}, {usable_cores()} usable core(s), {' '.join(feats) or '(no vector extensions seen)'}",
             f"blas: {c.desc}"]
    lines += [f"refused: {r}" for r in c.refused]
    if c.warning:
        lines.append(c.warning)
    return lines
