"""What a quant is, read from config.json and the safetensors headers: bytes, parameters,
effective bits per weight, quantisation mode, base bits and group, per-layer overrides, which
tensors were kept above the base width (by role), and the recipe family where the files say it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ModelError
from .models import read_safetensors_header, weight_files

# ---------------------------------------------------------------------------------------------
# model metadata
# ---------------------------------------------------------------------------------------------

# safetensors dtype -> (numpy-style name, bits per element)
_DTYPES = {
    "F64": ("float64", 64),
    "F32": ("float32", 32),
    "F16": ("float16", 16),
    "BF16": ("bfloat16", 16),
    "F8_E4M3": ("float8_e4m3", 8),
    "F8_E5M2": ("float8_e5m2", 8),
    "I64": ("int64", 64),
    "I32": ("int32", 32),
    "I16": ("int16", 16),
    "I8": ("int8", 8),
    "U64": ("uint64", 64),
    "U32": ("uint32", 32),
    "U16": ("uint16", 16),
    "U8": ("uint8", 8),
    "BOOL": ("bool", 8),
}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}

# Roles a weight matrix plays, in the order the report lists them.
ROLES = (
    "embed_tokens",
    "lm_head",
    "self_attn",
    "linear_attn",
    "mlp",
    "router",
    "shared_expert",
    "experts",
    "other",
)

# Group size and bits for a mode when the config does not say (mlx_lm.utils.quantize_model).
_MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}


# An MoE router: ``mlp.gate`` itself, or a projection inside it (``mlp.gate.gate_proj``,
# ``mlp.gate.proj``, ``mlp.gate.gate``); never the dense ``mlp.gate_proj``.
_ROUTER = re.compile(r"(^|\.)(mlp|moe|block_sparse_moe|feed_forward|ffn)\.(gate|router)(\.|$)")


def tensor_role(module: str) -> str:
    """The role of a module path (``model.layers.3.mlp.switch_mlp.down_proj`` -> ``experts``).

    Roles: ``embed_tokens``, ``lm_head``, ``self_attn``, ``linear_attn`` (SSM / gated delta
    net / mamba mixers), ``mlp`` (dense feed-forward), ``router`` (MoE gate ``mlp.gate``,
    ``router``, ``shared_expert_gate``), ``shared_expert``, ``experts`` (``switch_mlp`` or
    ``experts``), ``other``.
    """
    p = module.lower()
    parts = p.split(".")
    last = parts[-1] if parts else p
    if "embed_tokens" in p or last in ("wte", "tok_embeddings", "word_embeddings"):
        return "embed_tokens"
    if "lm_head" in p or (last == "output" and len(parts) <= 2):
        return "lm_head"
    if "shared_expert_gate" in p or last == "router" or _ROUTER.search(p):
        return "router"
    if "shared_expert" in p:  # shared_expert, shared_experts
        return "shared_expert"
    if "switch_mlp" in p or ".experts" in p or p.startswith("experts"):
        return "experts"
    if any(k in p for k in ("linear_attn", "mamba", "ssm", "mixer", "delta_net")):
        return "linear_attn"
    if any(k in parts for k in ("self_attn", "attn", "attention", "cross_attn")):
        return "self_attn"
    if any(k in parts for k in ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")):
        return "mlp"
    return "other"


def _hist(values) -> dict[str, int]:
    out: dict[int, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return {str(k): out[k] for k in sorted(out)}


@dataclass
class TensorQuant:
    """How one weight matrix is stored: a quantised module or a float matrix."""

    module: str
    role: str
    bits: int  # quantisation bits, or the float dtype's width for an unquantised matrix
    group_size: int | None
    mode: str  # affine, mxfp4, nvfp4, mxfp8, or "float"
    params: int  # parameters of the unquantised matrix


@dataclass
class ModelInfo:
    """What the files of a model say about it (config.json and safetensors headers only).

    Bits are per weight of the *unquantised* parameter count: ``bits_per_weight`` is every
    tensor's bytes (quantised weights, scales, biases, norms...) x 8 / ``params``, the figure
    ``mlx_lm.utils.compute_bits_per_weight`` prints for a loaded model, except that mlx-lm counts
    parameters of leaf modules only (it misses e.g. ``A_log``/``dt_bias`` of Qwen3.5's gated
    delta net, so it reads a little higher there); we count every tensor. The "base" quantisation
    is the (bits, group size, mode) that covers the most parameters; ``overrides`` counts the
    weight matrices stored otherwise (other bits, group size or mode, or left in float inside a
    quantised model), ``override_bits`` is their histogram (float matrices under their dtype's
    width, e.g. "16"), and ``elevated`` lists those above the base bits by role.
    """

    path: str
    name: str  # short display name: directory name, or org/name for a hub cache snapshot
    label: str  # short quantisation label: "float16", "4-bit g64", "mixed_3_6 g64", "mxfp4"
    model_type: str | None
    dtype: str | None  # dtype of the unquantised float weights (norms, float matrices)
    weight_bytes: int  # the *.safetensors files on disk
    tensor_bytes: int  # tensor data only (no headers)
    params: int  # parameters of the unquantised model
    bits_per_weight: float  # tensor_bytes * 8 / params
    quantized: bool
    mode: str  # affine, mxfp4, nvfp4, mxfp8, mixed, or "none"
    base_bits: int | None
    group_size: int | None
    config_bits: int | None  # the top-level "quantization" record of config.json
    config_group_size: int | None
    quantized_params: int  # parameters held in quantised matrices
    quantized_bits_per_weight: float | None  # bits/param inside quantised modules (with scales)
    n_quantized: int  # quantised weight matrices (an MoE expert stack counts once)
    n_float_matrices: int  # weight matrices left in float (quantisable shape)
    overrides: int
    override_bits: dict[str, int] = field(default_factory=dict)
    elevated: dict[str, dict[str, int]] = field(default_factory=dict)  # role -> {bits: count}
    by_role: dict[str, dict[str, int]] = field(default_factory=dict)  # all matrices, same form
    family: str = "unknown"  # "none", "RTN uniform", "RTN mixed", "AWQ", "GPTQ", "dynamic", ...
    family_basis: str = ""  # what in the files the family was read from
    recipe: str | None = None  # mlx-lm recipe when the layout matches one exactly ("mixed_3_6")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def n_elevated(self) -> int:
        return sum(sum(h.values()) for h in self.elevated.values())


def display_name(path: Path) -> str:
    """``org/name`` for a hub cache snapshot (``models--org--name/snapshots/<hash>``), else the
    directory's name."""
    path = Path(path)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name[len("models--") :].replace("--", "/")
    return path.name or str(path)


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def model_info(path: Path) -> ModelInfo:
    """Describe the model at ``path`` from its config.json and safetensors headers only."""
    path = Path(path)
    config = _read_config(path)
    tensors, weight_bytes = _read_tensors(path)
    qconf = config.get("quantization") if isinstance(config.get("quantization"), dict) else {}
    top = {k: qconf.get(k) if isinstance(qconf.get(k), t) else None
           for k, t in (("bits", int), ("group_size", int), ("mode", str))}
    matrices, owned, q_params, q_bytes = _quantized_matrices(path, tensors, qconf, top)
    float_elems, float_mats, float_params = _stored_as_is(tensors, owned)
    params = sum(m.params for m in matrices) + float_params + _bias_params(tensors, matrices)
    tensor_bytes = sum(_nbytes(t) for t in tensors.values())
    quantized = bool(matrices)
    base_bits, base_gs, mode, overrides, elevated = _base_and_overrides(matrices, float_mats)
    by_role: dict[str, dict[str, int]] = {}
    for m in matrices + float_mats:
        h = by_role.setdefault(m.role, {})
        h[str(m.bits)] = h.get(str(m.bits), 0) + 1
    dtype = _DTYPES[max(float_elems, key=float_elems.get)][0] if float_elems else None
    family, basis, recipe = _quant_family(config, qconf, matrices, float_mats, quantized)
    return ModelInfo(
        path=str(path), name=display_name(path),
        label=_label(dtype, quantized, recipe, mode, base_bits, base_gs, bool(overrides)),
        model_type=config.get("model_type"), dtype=dtype, weight_bytes=weight_bytes,
        tensor_bytes=tensor_bytes, params=params, bits_per_weight=tensor_bytes * 8 / params if params else 0.0,
        quantized=quantized, mode=mode, base_bits=base_bits, group_size=base_gs,
        config_bits=top["bits"], config_group_size=top["group_size"], quantized_params=q_params,
        quantized_bits_per_weight=(q_bytes * 8 / q_params) if q_params else None,
        n_quantized=len(matrices), n_float_matrices=len(float_mats) if quantized else 0,
        overrides=len(overrides), override_bits=_hist(m.bits for m in overrides),
        elevated=_ordered(elevated), by_role=_ordered(by_role),
        family=family, family_basis=basis, recipe=recipe,
    )


def _read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} is not a model directory (no config.json)") from None
    except ValueError as e:
        raise ModelError(f"{cfg_file} is not valid JSON ({e}); re-download or re-convert") from None


def _read_tensors(path: Path) -> tuple[dict[str, dict], int]:
    """Every tensor's header entry across the weight files, and the files' total bytes."""
    tensors: dict[str, dict] = {}
    weight_bytes = 0
    for f in weight_files(path):
        weight_bytes += f.stat().st_size
        tensors.update((k, v) for k, v in read_safetensors_header(f).items() if k != "__metadata__")
    return tensors, weight_bytes


def _nbytes(t: dict) -> int:
    off = t.get("data_offsets") or [0, 0]
    return int(off[1]) - int(off[0])


def _quantized_matrices(path: Path, tensors: dict, qconf: dict, top: dict):
    """The quantised modules (``P.weight`` with ``P.scales``): their TensorQuant, the tensor
    names they own (weight, scales, biases, bias...), their parameters and bytes."""
    matrices: list[TensorQuant] = []
    owned_all: set[str] = set()
    q_params = q_bytes = 0
    for mod in sorted(k[: -len(".weight")] for k in tensors
                      if k.endswith(".weight") and k[: -len(".weight")] + ".scales" in tensors):
        w, s = tensors[mod + ".weight"], tensors[mod + ".scales"]
        entry = qconf.get(mod) if isinstance(qconf.get(mod), dict) else {}
        bits, mode, gs = entry.get("bits", top["bits"]), entry.get("mode", top["mode"]), entry.get("group_size", top["group_size"])
        if mode is None:
            mode = "affine" if mod + ".biases" in tensors else "nvfp4" if gs == 16 else "mxfp8" if bits == 8 else "mxfp4"
        dgs, dbits = _MODE_DEFAULTS.get(mode, (64, 4))
        bits, gs = bits or dbits, gs or dgs
        n_in, rem = divmod(w["shape"][-1] * 32, bits)
        if rem or w.get("dtype") != "U32" or n_in != s["shape"][-1] * gs:
            raise ModelError(
                f"{path.name}: config.json quantization ({bits} bits, group {gs}, {mode}) does "
                f"not match the tensors of {mod} (weight {w['dtype']} {w['shape']}, scales "
                f"{s['shape']}); the config and weights are from different conversions"
            )
        n = _prod(w["shape"][:-1]) * n_in
        owned = [k for k in (mod + sfx for sfx in (".weight", ".scales", ".biases", ".global_scale", ".bias")) if k in tensors]
        owned_all.update(owned)
        q_bytes += sum(_nbytes(tensors[k]) for k in owned)
        bias = tensors.get(mod + ".bias")
        q_params += n + (_prod(bias["shape"]) if bias is not None else 0)
        matrices.append(TensorQuant(mod, tensor_role(mod), int(bits), int(gs), mode, n))
    return matrices, owned_all, q_params, q_bytes


def _bias_params(tensors: dict, matrices: list[TensorQuant]) -> int:
    """Parameters of the float biases of quantised modules."""
    return sum(_prod(tensors[m.module + ".bias"]["shape"]) for m in matrices if m.module + ".bias" in tensors)


def _stored_as_is(tensors: dict, owned: set[str]):
    """Tensors stored as they are: elements per float dtype, the float weight matrices (those a
    quantiser could have quantised), and their parameters."""
    float_elems: dict[str, int] = {}
    float_mats: list[TensorQuant] = []
    params = 0
    for k, t in tensors.items():
        if k in owned:
            continue
        n = _prod(t["shape"])
        params += n
        dt = t.get("dtype", "")
        if dt not in _FLOAT_DTYPES:
            continue
        float_elems[dt] = float_elems.get(dt, 0) + n
        mod, shape = (k[: -len(".weight")] if k.endswith(".weight") else None), t["shape"]
        if (mod is not None and len(shape) >= 2 and shape[-1] % 32 == 0 and shape[-1] > 1
                and not any(x in k.lower() for x in ("conv", "norm"))):
            float_mats.append(TensorQuant(mod, tensor_role(mod), _DTYPES[dt][1], None, "float", n))
    return float_elems, float_mats, params


def _base_and_overrides(matrices: list[TensorQuant], float_mats: list[TensorQuant]):
    """(base bits, base group, mode, overrides, elevated-by-role): the base is the (bits, group,
    mode) holding the most parameters (fewer bits on a tie); everything else overrides it."""
    if not matrices:
        return None, None, "none", [], {}
    weight: dict[tuple, int] = {}
    for m in matrices:
        key = (m.bits, m.group_size, m.mode)
        weight[key] = weight.get(key, 0) + m.params
    base = max(weight, key=lambda k: (weight[k], -k[0]))
    base_bits, base_gs, mode = base
    overrides = [m for m in matrices if (m.bits, m.group_size, m.mode) != base] + float_mats
    elevated: dict[str, dict[str, int]] = {}
    for m in overrides:
        if m.bits > base_bits:
            h = elevated.setdefault(m.role, {})
            h[str(m.bits)] = h.get(str(m.bits), 0) + 1
    if len({m.mode for m in matrices}) > 1:
        mode = "mixed"
    return base_bits, base_gs, mode, overrides, elevated


def _ordered(d: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {r: dict(sorted(d[r].items(), key=lambda kv: int(kv[0]))) for r in ROLES if r in d}


def _label(dtype, quantized: bool, recipe, mode: str, base_bits, base_gs, has_overrides: bool) -> str:
    if not quantized:
        return dtype or "float"
    if recipe:
        return f"{recipe} g{base_gs}"
    if mode in ("mxfp4", "nvfp4", "mxfp8") and not has_overrides:
        return mode
    label = f"{base_bits}-bit g{base_gs}" + (" mixed" if has_overrides else "")
    return label if mode in ("affine", "mixed") else f"{mode} {label}"


_RECIPES = {(2, 6): "mixed_2_6", (3, 4): "mixed_3_4", (3, 6): "mixed_3_6", (4, 6): "mixed_4_6"}


def _mixed_recipe(matrices: list[TensorQuant]) -> str | None:
    """The mlx-lm mixed recipe (``mlx_lm.convert.mixed_quant_predicate_builder``) whose rule gives
    exactly these bits, or None."""
    bits = sorted({m.bits for m in matrices})
    if len(bits) != 2 or tuple(bits) not in _RECIPES:
        return None
    low, high = bits
    layer_ids = set()
    for m in matrices:
        for part in m.module.split("."):
            if part.isdigit():
                layer_ids.add(int(part))
                break
    if not layer_ids:
        return None
    n = max(layer_ids) + 1
    for m in matrices:
        idx = next((int(p) for p in m.module.split(".") if p.isdigit()), 0)
        more = idx < n // 8 or idx >= 7 * n // 8 or (idx - n // 8) % 3 == 2
        if ("v_proj" in m.module or "v_a_proj" in m.module or "v_b_proj" in m.module) and more:
            want = high
        elif "down_proj" in m.module and more:
            want = high
        elif "lm_head" in m.module:
            want = high
        else:
            want = low
        if m.bits != want:
            return None
    return _RECIPES[(low, high)]


def _quant_family(config, qconf, matrices, float_mats, quantized):
    """(family, basis, recipe) from what the files record.

    mlx-lm's quantisation scripts record no method name; each leaves its own shape of
    ``config.json["quantization"]``:

    - ``mlx_lm.convert`` / ``quantize_model``: top level ``{group_size, bits, mode}``; per-module
      entries only from a predicate, each with ``mode``. Reported as ``RTN uniform`` or
      ``RTN mixed``. ``mlx_lm.quant.dwq`` keeps this config unchanged, so a DWQ model cannot be
      told from RTN by its files: the basis says so.
    - ``mlx_lm.quant.dynamic_quant``: the same top level, with per-module ``{bits, group_size}``
      entries *without* ``mode`` for the sensitive layers: ``dynamic``.
    - ``mlx_lm.quant.awq``: top level ``{group_size: 64, bits: 4}`` without ``mode`` and an entry
      for every leaf module, ``false`` for the unquantised ones (norms...): ``AWQ``.
    - ``mlx_lm.quant.gptq``: top level ``{bits, group_size}`` without ``mode``, per-module entries
      (the fallback bits) only for layers outside the transformer blocks: ``GPTQ``.

    An explicit ``quantization_config.quant_method`` (the transformers convention) wins.
    """
    # one piece: an ordered ladder of rules, first match wins; split up, the precedence between
    # the scripts' config shapes above would be scattered over several functions.
    if not quantized:
        return "none", "no quantised tensors", None
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and isinstance(qc.get("quant_method"), str):
        method = qc["quant_method"]
        return method.upper(), "config.json quantization_config.quant_method", None
    for key in ("quant_method", "quantization_method"):
        v = qconf.get(key)
        if isinstance(v, str):
            return v.upper() if len(v) <= 5 else v, f"config.json quantization.{key}", None
    entries = {k: v for k, v in qconf.items() if k not in ("bits", "group_size", "mode")}
    dict_entries = {k: v for k, v in entries.items() if isinstance(v, dict)}
    false_entries = [k for k, v in entries.items() if v is False]
    has_top_mode = "mode" in qconf
    if any(not isinstance(v, dict) and v is not False for v in entries.values()):
        return "unknown", "config.json quantization has entries no known writer makes", None
    # Model classes' own quant_predicate (qwen3_5_moe, minimax, bailing...) keeps MoE routers at
    # 8 bits with mode-less entries; those are not a sign of another writer.
    dict_entries = {
        k: v for k, v in dict_entries.items() if "mode" in v or tensor_role(k) != "router"
    }
    mixed = len({(m.bits, m.group_size, m.mode) for m in matrices}) > 1 or bool(float_mats)
    if not has_top_mode and false_entries:
        return (
            "AWQ",
            "config as mlx_lm.quant.awq writes it (no mode; an entry for every leaf module, "
            "false for unquantised ones)",
            None,
        )
    if (
        not has_top_mode
        and dict_entries
        and not any(re.search(r"(^|\.)layers\.\d+\.", k) for k in dict_entries)
        and all("mode" not in v for v in dict_entries.values())
    ):
        return (
            "GPTQ",
            "config as mlx_lm.quant.gptq writes it (no mode; fallback entries only outside the "
            "transformer blocks)",
            None,
        )
    if has_top_mode and dict_entries and any("mode" not in v for v in dict_entries.values()):
        return (
            "dynamic",
            "config as mlx_lm.quant.dynamic_quant writes it (per-module bits without mode)",
            None,
        )
    if has_top_mode and all("mode" in v for v in dict_entries.values()):
        recipe = _mixed_recipe(matrices) if mixed else None
        caveat = "; DWQ keeps the same config, so it cannot be told apart from the files"
        if recipe:
            return (
                "RTN mixed",
                f"config as mlx_lm.convert writes it; bits follow the {recipe} rule" + caveat,
                recipe,
            )
        if mixed:
            return (
                "RTN mixed",
                "config as mlx_lm.convert writes it, with a per-module predicate" + caveat,
                None,
            )
        return "RTN uniform", "config as mlx_lm.convert writes it" + caveat, None
    if not entries and not has_top_mode:
        return (
            "RTN uniform" if not mixed else "unknown",
            "config as older mlx_lm.convert versions wrote it (no mode)",
            None,
        )
    return "unknown", "config.json quantization matches no known writer", None

