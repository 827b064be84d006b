"""Issue 14: the built wheel, installed into a fresh virtual environment (not this editable
tree), is a working plugin: pytest loads it, --help lists its options, a KLD test on a tiny model
passes and a broken budget fails; its console script reports the version."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("wheel")
    p = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", str(d), str(ROOT)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    (wheel,) = d.glob("*.whl")
    venv = d / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    p = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return venv


def test_the_installed_wheel_is_a_working_plugin(wheel_env, tiny_model, tmp_path):
    py = str(wheel_env / "bin" / "python")
    where = subprocess.run([py, "-c", "import pytest_kld; print(pytest_kld.__file__)"], capture_output=True,
                           text=True, check=True, cwd=tmp_path).stdout.strip()
    assert where.startswith(str(wheel_env)), where  # the wheel, not the source tree
    version = subprocess.run([str(wheel_env / "bin" / "pytest-kld"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("pytest-kld ")
    helped = subprocess.run([py, "-m", "pytest", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert "--kld-reference=REFERENCE" in helped.stdout
    (tmp_path / "test_quants.py").write_text(textwrap.dedent(f"""
        def test_within(assert_kld):
            assert_kld({str(tiny_model("llama", bits=8))!r}, mean=1.0)

        def test_over(assert_kld):
            assert_kld({str(tiny_model("llama", bits=3))!r}, mean=1e-6)
    """))
    run = subprocess.run([py, "-m", "pytest", f"--kld-reference={tiny_model('llama')}", "--kld-n-chunks=2",
                          f"--kld-cache-dir={tmp_path / 'cache'}", "-p", "no:cacheprovider", "-q"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-2000:]
    assert "1 failed, 1 passed" in run.stdout and "pytest-kld leaderboard" in run.stdout
    assert "KLD over threshold for" in run.stdout
