"""Put the repository's demo/ (the SmolLM2 GGUF converter) and tests/ (tiny models) on sys.path:
benchmarks run from a clone, and neither folder is part of the installed package."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for folder in ("demo", "tests"):
    if str(ROOT / folder) not in sys.path:
        sys.path.insert(0, str(ROOT / folder))
