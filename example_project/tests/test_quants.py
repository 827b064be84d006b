"""Release gate: every published quant stays within its KLD budget against the reference.

Thresholds are in nats of KL(reference || quant) per token, measured on pytest-kld's short
prompt set (52 prompts: prose, code, JSON, maths, other languages, chat; 8,952 scored positions
on SmolLM2's tokenizer). Each is the recipe's measured figure with ~30-60% headroom (the measured
leaderboard is in pytest-kld's README); a quant whose recipe or weights regress beyond them fails
the release. SmolLM2-135M is small and was itself trained from a
4-bit-sensitive checkpoint, so its 4-bit and 3-bit budgets are far looser than a 7B model's.
"""

import os
from pathlib import Path

import pytest

# Where quantize.py wrote the quants (CI and the pytest-kld demo point this elsewhere).
OUT = Path(os.environ.get("KLD_QUANT_DIR", Path(__file__).resolve().parent.parent / "out"))

# name -> thresholds for assert_kld (mean/p99/max KLD in nats; top1: share of positions where
# the quant's most likely token is the reference's).
BUDGETS = {
    "8bit-g64": dict(mean=0.005, p99=0.04, top1=0.95),
    "6bit-g64": dict(mean=0.06, p99=0.5, top1=0.85),
    "4bit-g32": dict(mean=0.5, p99=3.5),
    "mixed_4_6": dict(mean=0.55, p99=3.5),
    "gptq-4bit-g64": dict(mean=0.6, p99=4.0),
    "4bit-g64": dict(mean=0.7, p99=4.0),
    "mixed_3_6": dict(mean=2.4, p99=9.0),
    "3bit-g64": dict(mean=3.0, p99=10.0),
}


@pytest.mark.parametrize("name", list(BUDGETS))
def test_quant_within_budget(assert_kld, name):
    path = OUT / name
    assert path.is_dir(), f"quant {name} not found at {path}: run `python quantize.py` first"
    assert_kld(str(path), name=name, **BUDGETS[name])


def test_reference_against_itself(assert_kld, kld_reference):
    """The reference's own cache must reproduce it exactly: a wrong tokenisation or cache shows here."""
    ref = kld_reference.manifest["reference"]["path"]
    assert_kld(ref, name="reference", mean=1e-6, max=1e-5)
