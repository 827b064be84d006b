"""Tiny in-process models for tests: real mlx-lm model classes, random weights, a byte-level
tokenizer, saved as ordinary MLX model directories that ``mlx_lm.load`` reads.

Used by our own test suite and usable by quant authors testing their tooling without a download.
Nothing here is imported by the plugin's import path.
"""

from __future__ import annotations

import json
from pathlib import Path

# Architectures we build, with configs small enough to run in milliseconds on a CPU. Hidden sizes
# are multiples of 64 so that mlx-lm quantises every linear layer at group size 64 and 32.
_BASE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}

# The hybrid (gated delta net + full attention every 2nd layer) text config of qwen3_5 models.
_HYBRID = {
    **_BASE,
    "num_hidden_layers": 4,
    "head_dim": 16,
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 2,
}

ARCHS: dict[str, dict] = {
    "llama": {**_BASE, "model_type": "llama", "rope_theta": 10000.0},
    "qwen3": {**_BASE, "model_type": "qwen3", "head_dim": 16, "rope_theta": 10000.0},
    "qwen3_5": {"model_type": "qwen3_5", "text_config": {**_HYBRID, "model_type": "qwen3_5_text"}},
    "qwen3_5_moe": {
        "model_type": "qwen3_5_moe",
        "text_config": {
            **_HYBRID,
            "model_type": "qwen3_5_moe_text",
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 64,
            "decoder_sparse_step": 1,
        },
    },
}


def routers_float_shared8_linear6(path, module):
    """A quant predicate for mixed-precision tests: MoE routers left in float, shared experts
    8-bit, linear attention 6-bit, everything else at the base bits."""
    if path.endswith("mlp.gate") or "shared_expert_gate" in path:
        return False
    if "shared_expert." in path:
        return {"bits": 8, "group_size": 64, "mode": "affine"}
    if "linear_attn" in path:
        return {"bits": 6, "group_size": 64, "mode": "affine"}
    return True


def embed_head_8(path, module):
    """A quant predicate: embedding and output head 8-bit (group 32), the rest at the base."""
    if "embed_tokens" in path or "lm_head" in path:
        return {"bits": 8, "group_size": 32, "mode": "affine"}
    return True


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_vocab() -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet(), key=lambda c: ord(c))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    return vocab


def write_tokenizer(path: Path, *, merges: int = 0) -> int:
    """Write a byte-level BPE tokenizer (256 bytes + 3 specials) to ``path``; return its size.

    ``merges`` adds that many extra merged tokens (their ids follow the specials), which changes
    the ids the tokenizer gives for the same text: a different tokenizer of another vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = _byte_vocab()
    merge_list = []
    for a, b in [("t", "h"), ("th", "e"), ("a", "n"), ("i", "n"), ("e", "r"), ("o", "n")][:merges]:
        merge_list.append((a, b))
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_list))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "model_max_length": 4096,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    return tok.get_vocab_size()


def build_model(
    path: str | Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    vocab_size: int = 320,
    peak: float = 6.0,
    tokenizer_merges: int = 0,
    dtype: str = "float16",
) -> Path:
    """Build a tiny model of ``arch`` with random weights and save it as an MLX model dir.

    ``vocab_size`` may exceed the tokenizer's 259 tokens (padding rows, as real models have).
    ``peak`` scales the output projection so next-token distributions are peaked (a realistic
    entropy, not a near-uniform one, so that quantisation changes KL measurably).
    """
    from pytest_kld.blas import prefer_system_blas

    prefer_system_blas()
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map_with_path
    from mlx_lm.utils import save_config, save_model

    path = Path(path)
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {sorted(ARCHS)}")
    config = json.loads(json.dumps(ARCHS[arch]))
    text = config.get("text_config", config)
    text["vocab_size"] = vocab_size
    config["torch_dtype"] = dtype
    arch_module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")  # public model classes
    model_class, args_class = arch_module.Model, arch_module.ModelArgs
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    # Re-draw every weight from a seeded normal so the model depends on ``seed`` alone, then
    # sharpen the output head.
    keys = iter(mx.random.split(mx.random.key(seed), len(tree_flatten(model.parameters()))))

    def redraw(name, v):
        k = next(keys)
        if not mx.issubdtype(v.dtype, mx.floating):
            return v
        if name.endswith("norm.weight") or "A_log" in name or "dt_bias" in name:
            return v
        if v.ndim == 1:
            return 0.02 * mx.random.normal(v.shape, key=k)
        fan_in = v.shape[-1]
        w = mx.random.normal(v.shape, key=k) / (fan_in**0.5)
        if "lm_head" in name:
            w = w * peak
        elif "embed_tokens" in name:
            w = w * (fan_in**0.5) * 0.5
        return w

    model.update(tree_map_with_path(redraw, model.parameters()))
    target = getattr(mx, dtype)
    model.update(
        tree_map_with_path(
            lambda n, v: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v,
            model.parameters(),
        )
    )
    mx.eval(model.parameters())
    save_model(path, model)
    save_config(config, path / "config.json")
    write_tokenizer(path, merges=tokenizer_merges)
    return path


def quantize(
    src: str | Path,
    dst: str | Path,
    *,
    bits: int = 4,
    group_size: int = 64,
    mode: str = "affine",
    predicate=None,
) -> Path:
    """Quantise the model at ``src`` into ``dst`` with mlx-lm's own ``convert``."""
    import contextlib
    import io

    from pytest_kld.blas import prefer_system_blas

    prefer_system_blas()
    from mlx_lm import convert

    with contextlib.redirect_stdout(io.StringIO()):
        convert(
            hf_path=str(src),
            mlx_path=str(dst),
            quantize=True,
            q_bits=bits,
            q_group_size=group_size,
            q_mode=mode,
            quant_predicate=predicate,
        )
    return Path(dst)


def validate_results(doc: dict) -> None:
    """Check a results document against the JSON Schema shipped in the package."""
    from importlib.resources import files

    import jsonschema

    schema = json.loads(files("pytest_kld").joinpath("data/results.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)
