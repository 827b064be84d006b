"""Make this repo's quants of the reference into ./out/<name> with mlx-lm.

    python quantize.py [--reference HuggingFaceTB/SmolLM2-135M-Instruct] [--out out]

The names match tests/test_quants.py. (pytest-kld's own demo builds the same recipes from a
local copy of the reference with ``python demo/smollm2.py``.)
"""

import argparse
from pathlib import Path

from mlx_lm import convert

RECIPES = {
    "8bit-g64": dict(q_bits=8, q_group_size=64),
    "6bit-g64": dict(q_bits=6, q_group_size=64),
    "mixed_4_6": dict(q_bits=4, q_group_size=64, quant_predicate="mixed_4_6"),
    "4bit-g32": dict(q_bits=4, q_group_size=32),
    "4bit-g64": dict(q_bits=4, q_group_size=64),
    "mixed_3_6": dict(q_bits=3, q_group_size=64, quant_predicate="mixed_3_6"),
    "3bit-g64": dict(q_bits=3, q_group_size=64),
}

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--out", type=Path, default=Path("out"))
    args = ap.parse_args()
    for name, kw in RECIPES.items():
        dst = args.out / name
        if dst.exists():
            print(f"{dst} exists, skipped")
            continue
        convert(hf_path=args.reference, mlx_path=str(dst), quantize=True, **kw)
