"""Shared fixtures: tiny in-process models (built once per session) and a small text corpus."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pytest_kld.blas import prefer_system_blas

# The demo's GGUF converter lives outside the installed package, in the repository's demo/.
DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
sys.path.insert(0, str(DEMO_DIR))

from tiny import ARCHS, build_model, quantize  # noqa: E402  (tests/ is on sys.path: pytest's rootdir conftest)

# Before anything imports mlx: MLX's float32 matmuls on the system OpenBLAS (see pytest_kld/blas.py).
BLAS = prefer_system_blas()

PROSE = (
    "The river rose slowly through the night, and by morning the lower fields were under a "
    "sheet of brown water. Farmers moved their animals to the ridge; children watched from the "
    "church steps. In 1887 the same thing had happened, and the old men said the water would "
    "fall by Thursday. It fell on Friday.\n\n"
    "def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total / len(xs)\n\n"
    '{"id": 42, "name": "widget", "tags": ["red", "small"], "price": 3.75}\n\n'
    "Le train part à huit heures; nous arriverons à Lyon avant midi. "
    "Der Zug fährt um acht Uhr ab. 東京の天気は晴れです。 Москва — столица России.\n\n"
    "If 3x + 5 = 20, then x = 5, and 2x^2 = 50. The sum 1 + 2 + ... + 100 equals 5050.\n"
) * 3


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """``tiny_model(arch, bits=None, group_size=64)``: path of a tiny model or its quant (cached)."""
    # Imported now, before any test's pytester fixture snapshots sys.modules: a model built inside
    # such a test would import them there, the snapshot would drop them at teardown, and the next
    # import would load mlx's native module a second time (nanobind aborts the process).
    import mlx.core  # noqa: F401
    import mlx_lm.convert  # noqa: F401

    made = {}

    def get(arch: str = "llama", bits: int | None = None, group_size: int = 64, **kw):
        key = (arch, bits, group_size, tuple(sorted(kw.items())))
        if key not in made:
            base = tiny_dir / arch
            if not base.exists():
                build_model(base, arch)
            if bits is None:
                made[key] = base
            else:
                dst = tiny_dir / f"{arch}-q{bits}-g{group_size}" / "_".join(f"{k}{v}" for k, v in kw.items())
                dst.parent.mkdir(parents=True, exist_ok=True)
                made[key] = quantize(base, dst, bits=bits, group_size=group_size, **kw)
        return made[key]

    return get


@pytest.fixture(scope="session")
def prose_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "prose.txt"
    p.write_text(PROSE, encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def prose_spec(prose_file):
    """A small file corpus: chunks of 128 tokens on the tiny byte-level tokenizer."""
    from pytest_kld.corpus import corpus_spec

    return corpus_spec("file", dataset=str(prose_file), n_ctx=128)


@pytest.fixture(params=sorted(ARCHS))
def arch(request):
    return request.param
