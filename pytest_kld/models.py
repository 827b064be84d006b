"""A model's files, read without loading it: safetensors headers, sizes, the output width, and
checks that fail in one line before mlx reads anything. Nothing imports mlx or mlx_lm.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .errors import ModelError

# ---------------------------------------------------------------------------------------------
# safetensors headers
# ---------------------------------------------------------------------------------------------


def weight_files(path: Path) -> list[Path]:
    """The ``*.safetensors`` files of a model directory, sorted by name; error if there are none."""
    path = Path(path)
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if not files:
        raise ModelError(
            f"no *.safetensors weights in {path}: mlx_lm needs safetensors weights "
            "(convert the model with mlx_lm.convert)"
        )
    return files


def read_header_bytes(file: Path) -> bytes:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{file} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise ModelError(
                f"{file} is not a valid safetensors file (header length {n} exceeds the file); "
                "re-download or re-convert it"
            )
        data = f.read(n)
    return data


def read_safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file: ``{name: {dtype, shape, data_offsets}, ...}``.

    Reads the 8-byte little-endian header length and the header; no tensor data. The
    ``__metadata__`` entry, if present, is kept.
    """
    file = Path(file)
    data = read_header_bytes(file)
    try:
        header = json.loads(data)
    except ValueError:
        raise ModelError(
            f"{file} has a corrupt safetensors header (not JSON); re-download or re-convert it"
        ) from None
    if not isinstance(header, dict):
        raise ModelError(f"{file} has a corrupt safetensors header (not a JSON object)")
    return header


def check_weight_files(path: Path) -> None:
    """One clear line, before mlx reads anything, for a weight file whose data is shorter than
    its header says (an interrupted download or copy) or a path mlx cannot open (not UTF-8)."""
    try:
        os.fsencode(str(path)).decode("utf-8")
    except UnicodeDecodeError:
        raise ModelError(
            f"{os.fsdecode(os.fsencode(str(path)))!r}: the model path is not valid UTF-8, which mlx cannot open; "
            "rename the directory or point to it through a symlink with a UTF-8 name"
        ) from None
    for f in weight_files(Path(path)):
        header = read_safetensors_header(f)
        need = 8 + len(read_header_bytes(f)) + max(
            (int(t["data_offsets"][1]) for t in header.values() if isinstance(t, dict) and "data_offsets" in t),
            default=0,
        )
        have = f.stat().st_size
        if have < need:
            raise ModelError(
                f"{f} is truncated: its header describes {need} bytes but the file has {have}; "
                "re-download or re-convert the model"
            )


def output_width(path: Path) -> int | None:
    """The model's number of output logits, read from its headers (the output layer's rows, or
    the tied embedding's); None when no such tensor is named."""
    heads, embeds = [], []
    for f in weight_files(Path(path)):
        for name, t in read_safetensors_header(f).items():
            if not isinstance(t, dict) or not t.get("shape"):
                continue
            if name.endswith("lm_head.weight"):
                heads.append(int(t["shape"][0]))
            elif name.endswith("embed_tokens.weight"):
                embeds.append(int(t["shape"][0]))
    found = heads or embeds
    return found[0] if found else None


