"""Groups of tensors a quant could keep at more bits, read from the reference's and the quant's
safetensors headers (no mlx): per transformer layer and role (attention, linear attention, MLP,
experts, router, shared experts), plus the embedding and the output head (one group when tied).

Each weight matrix the quant stores is described against the reference's: its parameters, how
the quant stores it (bits and group size read from the shapes: a quantised matrix of ``n_in``
inputs packs ``32 / bits`` weights per uint32 and has ``n_in / group_size`` scales per row) and
its bytes there. From that, the bits per weight that elevating a group adds are exact:

    added bits/weight = Σ_modules (new bytes − quant's bytes) · 8 / parameters of the whole model

where a matrix re-quantised at ``w`` bits (affine, group ``g``: the quant's own when affine allows
it, else 32 — nvfp4's 16) takes ``params · w / 8`` bytes
plus a scale and a bias per group in the reference's float dtype, and a matrix put back in the
reference's own dtype takes ``params`` times that dtype's bytes. A matrix is never lowered: one
the quant already stores at ``w`` bits or more (or in float) stays as it is.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ModelError
from .models import read_safetensors_header, weight_files
from .quantinfo import tensor_role

FLOAT = 0  # the width asked for "the reference's own dtype"
_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
ROLE_ORDER = ("self_attn", "linear_attn", "mlp", "experts", "shared_expert", "router", "other")


@dataclass
class Module:
    """One weight matrix: where it is, how big, how the quant stores it."""

    path: str  # module path (the tensor name without ".weight")
    params: int
    n_in: int  # input features (the quantised axis)
    bits: int  # the quant's bits, or its float dtype's width for a matrix it left in float
    group_size: int | None  # None for a float matrix
    quantized: bool
    quant_bytes: int  # weight + scales + biases in the quant
    mode: str = "affine"  # the quant's mode for it (affine, mxfp4, nvfp4, mxfp8; config.json)


@dataclass
class Group:
    name: str
    role: str
    layer: int | None
    modules: list[Module] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)

    def to_dict(self) -> dict:
        return {"name": self.name, "role": self.role, "layer": self.layer,
                "modules": [asdict(m) for m in self.modules]}

    @classmethod
    def from_dict(cls, d: dict) -> Group:
        return cls(d["name"], d["role"], d["layer"], [Module(**m) for m in d["modules"]])


@dataclass
class Layout:
    """The groups of a quant against its reference, and what sizes are measured against."""

    groups: list[Group]
    params: int  # parameters of the whole (unquantised) model: the bits-per-weight denominator
    ref_dtype_bytes: int  # bytes per element of the reference's float weights
    quantized: bool  # whether the quant holds any quantised matrix
    tied: bool


def _tensors(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for f in weight_files(path):
        out.update((k, v) for k, v in read_safetensors_header(f).items() if k != "__metadata__")
    return out


def _nbytes(t: dict | None) -> int:
    return 0 if t is None else int(t["data_offsets"][1]) - int(t["data_offsets"][0])


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def is_matrix(name: str, t: dict) -> bool:
    """A reference tensor a quantiser could quantise: a float ``*.weight`` of two or more axes
    (not a norm or a convolution) whose input width is a multiple of 32."""
    shape = t.get("shape") or []
    return (name.endswith(".weight") and len(shape) >= 2 and t.get("dtype") in _FLOAT_BYTES
            and int(shape[-1]) % 32 == 0 and not any(x in name.lower() for x in ("conv", "norm")))


def layout(reference: Path, quant: Path) -> Layout:
    """The groups of ``quant`` against ``reference``; a one-line ModelError when the quant's
    module layout is not the reference's (a matrix missing, added or of another shape)."""
    ref, q = _tensors(Path(reference)), _tensors(Path(quant))
    mats = {k[: -len(".weight")]: t for k, t in ref.items() if is_matrix(k, t)}
    q_mods = {k[: -len(".weight")] for k, t in q.items() if k.endswith(".weight") and
              (k[: -len(".weight")] + ".scales" in q or is_matrix(k, t))}
    missing, extra = sorted(set(mats) - q_mods), sorted(q_mods - set(mats))
    if missing or extra:
        what = f"{len(missing)} of the reference's matrices missing (e.g. {missing[0]})" if missing else (
            f"{len(extra)} matrices the reference does not have (e.g. {extra[0]})")
        raise ModelError(f"{quant}: its module layout does not match the reference {reference}: {what}; "
                         "a quant must be made from this reference")
    modes = _modes(Path(quant))
    modules = [_module(quant, p, mats[p], q, modes) for p in sorted(mats)]
    dtypes = [ref[p + ".weight"]["dtype"] for p in mats]
    tied = not any(tensor_role(p) == "lm_head" for p in mats)
    params = sum(_prod(t["shape"]) for t in ref.values())
    return Layout(_group(modules, tied), params, _FLOAT_BYTES[max(set(dtypes), key=dtypes.count)] if dtypes else 2,
                  any(m.quantized for m in modules), tied)


def _modes(quant: Path) -> dict:
    """The quant's quantisation modes from its config.json: ``{module path or "": mode}``."""
    import json

    try:
        qconf = json.loads((quant / "config.json").read_text(encoding="utf-8")).get("quantization")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(qconf, dict):
        return {}
    out = {k: v["mode"] for k, v in qconf.items() if isinstance(v, dict) and isinstance(v.get("mode"), str)}
    return {**out, "": qconf["mode"]} if isinstance(qconf.get("mode"), str) else out


def _module(quant: Path, path: str, ref_t: dict, q: dict, modes: dict) -> Module:
    shape = [int(s) for s in ref_t["shape"]]
    n_in, params = shape[-1], _prod(shape)
    w, s = q[path + ".weight"], q.get(path + ".scales")
    owned = [q.get(path + sfx) for sfx in (".weight", ".scales", ".biases", ".global_scale")]
    if s is None:
        if [int(x) for x in w["shape"]] != shape:
            raise ModelError(f"{quant}: {path} is {w['shape']} where the reference's is {shape}: "
                             "its module layout does not match the reference's")
        return Module(path, params, n_in, 8 * _FLOAT_BYTES[w["dtype"]], None, False, _nbytes(w))
    packed, groups = int(w["shape"][-1]), int(s["shape"][-1])
    bits, rem = divmod(packed * 32, n_in)
    if rem or not groups or n_in % groups or [int(x) for x in w["shape"][:-1]] != shape[:-1]:
        raise ModelError(f"{quant}: {path} (weight {w['shape']}, scales {s['shape']}) is not a quantisation of "
                         f"the reference's {shape} matrix: its module layout does not match the reference's")
    mode = "affine" if path + ".biases" in q else modes.get(path, modes.get("", "mxfp4"))
    return Module(path, params, n_in, int(bits), n_in // groups, True, sum(_nbytes(t) for t in owned), mode)


def _group(modules: list[Module], tied: bool) -> list[Group]:
    by: dict[tuple, Group] = {}
    for m in modules:
        role = tensor_role(m.path)
        hit = _LAYER.search(m.path)
        layer = int(hit.group(1)) if hit else None
        if role in ("embed_tokens", "lm_head"):
            key = ("embed+head", None) if tied else (role, None)
            name = "embed_tokens (tied output)" if tied else role
            role = "embed_tokens" if tied else role
        else:
            key = (role, layer)
            name = role if layer is None else f"layers.{layer}.{role}"
        by.setdefault(key, Group(name, role, layer)).modules.append(m)
    order = {r: i for i, r in enumerate(("embed_tokens", "lm_head") + ROLE_ORDER)}
    return sorted(by.values(), key=lambda g: (g.layer is not None, g.layer or 0, order.get(g.role, 99)))


def step(width) -> tuple[int, int | None]:
    """(bits, group size) of a width: an int is bits at the module's own affine group size
    (None, :func:`affine_group`); ``"<bits>g<size>"`` is bits at a given group size (a finer
    group: more scales, each over fewer weights)."""
    if isinstance(width, str) and "g" in width:
        b, g = width.split("g")
        return int(b), int(g)
    return int(width), None


def width_key(width):
    """A width as the recipe and the stored savings spell it: an int, or ``"<bits>g<size>"``."""
    b, g = step(width)
    return b if g is None else f"{b}g{g}"


def spell(width) -> str:
    """A width in words: "8 bits", "4 bits, group 32", "reference dtype"."""
    if width == FLOAT:
        return "reference dtype"
    b, g = step(width)
    return f"{b} bits" + ("" if g is None else f", group {g}")


def elevated(m: Module, width) -> bool:
    """Whether putting ``m`` back at ``width`` (FLOAT: the reference's dtype) changes it: more
    bits, or as many at a smaller group size than the quant's."""
    if width == FLOAT:
        return True
    b, g = step(width)
    return m.quantized and (m.bits < b or (g is not None and m.bits == b and g < (m.group_size or 0)))


def affine_group(m: Module, width=None) -> int:
    """The group size ``m`` is re-quantised at (affine): the width's own, else the quant's when
    affine takes it."""
    g = None if width is None else step(width)[1]
    return g or (m.group_size if m.group_size in (32, 64, 128) else 32 if m.group_size else 64)


def new_bytes(m: Module, width, ref_dtype_bytes: int) -> int:
    """Bytes of ``m`` at ``width`` (affine, :func:`affine_group`; FLOAT: the reference's dtype)."""
    if width == FLOAT:
        return m.params * ref_dtype_bytes
    return m.params * step(width)[0] // 8 + 2 * (m.params // affine_group(m, width)) * ref_dtype_bytes


def added_bpw(group: Group, width, lay: Layout) -> float:
    """Bits per weight of the whole model that putting ``group`` back at ``width`` adds."""
    delta = sum(new_bytes(m, width, lay.ref_dtype_bytes) - m.quant_bytes for m in group.modules if elevated(m, width))
    return delta * 8 / lay.params if lay.params else 0.0


def finer(group: Group, sizes) -> list[str]:
    """The finer-group widths ``group`` may take: its lowest width at each of ``sizes`` smaller
    than the group size of every affine matrix there at that width (e.g. ``"4g32"`` for a 4-bit
    g64 group; none for a group in another mode)."""
    q = [m for m in group.modules if m.quantized]
    if not q:
        return []
    low = min(m.bits for m in q)
    at = [m for m in q if m.bits == low]
    return [f"{low}g{g}" for g in sorted(set(sizes), reverse=True)
            if all(m.mode == "affine" and g < (m.group_size or 0) for m in at)]


def widths(group: Group, top: int, sizes=()) -> list:
    """Widths a recipe may give ``group``: above its lowest quantised width, up to ``top`` (6 and 8
    being mlx-lm's usual high widths, 7 is skipped), and the finer groups of ``sizes``
    (:func:`finer`)."""
    low = min((m.bits for m in group.modules if m.quantized), default=None)
    if low is None or top == FLOAT:
        return [top] if top == FLOAT else []
    return finer(group, sizes) + [w for w in range(low + 1, top + 1) if w != 7 or top == 7]
