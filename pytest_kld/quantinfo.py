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
    cfg_file = path / "config.json"
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} is not a model directory (no config.json)") from None
    except ValueError as e:
        raise ModelError(f"{cfg_file} is not valid JSON ({e}); re-download or re-convert") from None
    files = weight_files(path)
    tensors: dict[str, dict] = {}
    weight_bytes = 0
    for f in files:
        weight_bytes += f.stat().st_size
        for k, v in read_safetensors_header(f).items():
            if k != "__metadata__":
                tensors[k] = v

    qconf = config.get("quantization")
    if not isinstance(qconf, dict):
        qconf = {}
    top_bits = qconf.get("bits") if isinstance(qconf.get("bits"), int) else None
    top_gs = qconf.get("group_size") if isinstance(qconf.get("group_size"), int) else None
    top_mode = qconf.get("mode") if isinstance(qconf.get("mode"), str) else None

    def nbytes(t: dict) -> int:
        off = t.get("data_offsets") or [0, 0]
        return int(off[1]) - int(off[0])

    tensor_bytes = sum(nbytes(t) for t in tensors.values())

    # quantised modules: P.weight together with P.scales
    quant_modules = sorted(
        k[: -len(".weight")]
        for k in tensors
        if k.endswith(".weight") and k[: -len(".weight")] + ".scales" in tensors
    )
    aux = set()
    matrices: list[TensorQuant] = []
    params = 0
    q_params = 0
    q_bytes = 0
    for mod in quant_modules:
        w = tensors[mod + ".weight"]
        s = tensors[mod + ".scales"]
        entry = qconf.get(mod)
        entry = entry if isinstance(entry, dict) else {}
        bits = entry.get("bits", top_bits)
        mode = entry.get("mode", top_mode)
        gs = entry.get("group_size", top_gs)
        if mode is None:
            if mod + ".biases" in tensors:
                mode = "affine"
            elif gs == 16:
                mode = "nvfp4"
            else:
                mode = "mxfp8" if bits == 8 else "mxfp4"
        dgs, dbits = _MODE_DEFAULTS.get(mode, (64, 4))
        bits = bits or dbits
        gs = gs or dgs
        packed = w["shape"][-1]
        n_in, rem = divmod(packed * 32, bits)
        if rem or w.get("dtype") != "U32" or n_in != s["shape"][-1] * gs:
            raise ModelError(
                f"{path.name}: config.json quantization ({bits} bits, group {gs}, {mode}) does "
                f"not match the tensors of {mod} (weight {w['dtype']} {w['shape']}, scales "
                f"{s['shape']}); the config and weights are from different conversions"
            )
        n = _prod(w["shape"][:-1]) * n_in
        owned = [mod + sfx for sfx in (".weight", ".scales", ".biases", ".global_scale")]
        owned = [k for k in owned if k in tensors]
        aux.update(owned)
        q_bytes += sum(nbytes(tensors[k]) for k in owned)
        bias = tensors.get(mod + ".bias")
        q_params += n
        params += n
        if bias is not None:
            aux.add(mod + ".bias")
            params += _prod(bias["shape"])
            q_bytes += nbytes(bias)
            q_params += _prod(bias["shape"])
        matrices.append(TensorQuant(mod, tensor_role(mod), int(bits), int(gs), mode, n))

    # everything else is stored as is
    float_elems: dict[str, int] = {}
    float_mats: list[TensorQuant] = []
    for k, t in tensors.items():
        if k in aux:
            continue
        n = _prod(t["shape"])
        params += n
        dt = t.get("dtype", "")
        if dt in _FLOAT_DTYPES:
            float_elems[dt] = float_elems.get(dt, 0) + n
            mod = k[: -len(".weight")] if k.endswith(".weight") else None
            shape = t["shape"]
            if (
                mod is not None
                and len(shape) >= 2
                and shape[-1] % 32 == 0
                and shape[-1] > 1
                and not any(x in k.lower() for x in ("conv", "norm"))
            ):
                float_mats.append(
                    TensorQuant(mod, tensor_role(mod), _DTYPES[dt][1], None, "float", n)
                )
    dtype = _DTYPES[max(float_elems, key=float_elems.get)][0] if float_elems else None
    quantized = bool(matrices)
    bpw = tensor_bytes * 8 / params if params else 0.0

    base_bits = base_gs = None
    mode = "none"
    overrides: list[TensorQuant] = []
    elevated: dict[str, dict[str, int]] = {}
    if quantized:
        weight: dict[tuple, int] = {}
        for m in matrices:
            key = (m.bits, m.group_size, m.mode)
            weight[key] = weight.get(key, 0) + m.params
        base = max(weight, key=lambda k: (weight[k], -k[0]))
        base_bits, base_gs, mode = base
        overrides = [m for m in matrices if (m.bits, m.group_size, m.mode) != base] + float_mats
        for m in overrides:
            if m.bits > base_bits:
                h = elevated.setdefault(m.role, {})
                h[str(m.bits)] = h.get(str(m.bits), 0) + 1
        if len({m.mode for m in matrices}) > 1:
            mode = "mixed"
    by_role: dict[str, dict[str, int]] = {}
    for m in matrices + float_mats:
        h = by_role.setdefault(m.role, {})
        h[str(m.bits)] = h.get(str(m.bits), 0) + 1

    def ordered(d: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        return {r: dict(sorted(d[r].items(), key=lambda kv: int(kv[0]))) for r in ROLES if r in d}

    family, basis, recipe = _quant_family(config, qconf, matrices, float_mats, quantized)
    name = display_name(path)
    if not quantized:
        label = dtype or "float"
    elif recipe:
        label = f"{recipe} g{base_gs}"
    elif mode in ("mxfp4", "nvfp4", "mxfp8") and not overrides:
        label = mode
    else:
        label = f"{base_bits}-bit g{base_gs}" + (" mixed" if overrides else "")
        if mode not in ("affine", "mixed"):
            label = f"{mode} " + label
    return ModelInfo(
        path=str(path),
        name=name,
        label=label,
        model_type=config.get("model_type"),
        dtype=dtype,
        weight_bytes=weight_bytes,
        tensor_bytes=tensor_bytes,
        params=params,
        bits_per_weight=bpw,
        quantized=quantized,
        mode=mode,
        base_bits=base_bits,
        group_size=base_gs,
        config_bits=top_bits,
        config_group_size=top_gs,
        quantized_params=q_params,
        quantized_bits_per_weight=(q_bytes * 8 / q_params) if q_params else None,
        n_quantized=len(matrices),
        n_float_matrices=len(float_mats) if quantized else 0,
        overrides=len(overrides),
        override_bits=_hist(m.bits for m in overrides),
        elevated=ordered(elevated),
        by_role=ordered(by_role),
        family=family,
        family_basis=basis,
        recipe=recipe,
    )


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

