"""models.py: resolution of paths and hub ids, fingerprints, model metadata."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from tiny import embed_head_8, routers_float_shared8_linear6

from pytest_kld.errors import KldError, ModelError
from pytest_kld.fingerprint import tokenizer_fingerprint, weights_fingerprint
from pytest_kld.hub import hub_cache_dir, resolve_model
from pytest_kld.models import read_safetensors_header
from pytest_kld.quantinfo import ModelInfo, display_name, model_info, tensor_role

COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def write_safetensors(file: Path, tensors: dict[str, tuple[str, list[int]]], *, fill=b"\0") -> None:
    """A valid safetensors file with the given (dtype, shape) tensors, data all ``fill``."""
    itemsize = {"F16": 2, "BF16": 2, "F32": 4, "U32": 4, "U8": 1}
    header: dict = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = itemsize[dtype]
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + fill * offset)


def fake_model(path: Path, *, tensors=None, config=None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    write_safetensors(path / "model.safetensors", tensors or {"w": ("F16", [4, 4])})
    return path


def make_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], *, commit=COMMIT) -> Path:
    """Lay out huggingface_hub's real cache: refs/main, snapshots/<commit>/* -> ../../blobs/<h>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", digest), snap / name)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache under HF_HOME, set only in the environment (after hf_hub's import)."""
    import huggingface_hub  # noqa: F401  (imported first, as in a real session)

    home = tmp_path / "hf_home"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    return home / "hub"


def tiny_files() -> dict[str, bytes]:
    tmp = {}
    tmp["config.json"] = json.dumps({"model_type": "llama"}).encode()
    tmp["tokenizer.json"] = json.dumps(
        {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}, "added_tokens": []}
    ).encode()
    header = json.dumps({"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    tmp["model.safetensors"] = struct.pack("<Q", len(header)) + header + b"\0" * 4
    return tmp


# ---------------------------------------------------------------------------------------------
# resolve_model: local paths
# ---------------------------------------------------------------------------------------------


def test_local_directory_resolves(tmp_path):
    m = fake_model(tmp_path / "m")
    assert resolve_model(m) == m.resolve()
    assert resolve_model(str(m)) == m.resolve()


def test_relative_and_home_paths(tmp_path, monkeypatch):
    fake_model(tmp_path / "models" / "m")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("models/m") == (tmp_path / "models" / "m").resolve()
    assert resolve_model("./models/m") == (tmp_path / "models" / "m").resolve()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model("~/models/m") == (tmp_path / "models" / "m").resolve()


def test_directory_without_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"is not a model directory \(no config.json\)") as e:
        resolve_model(tmp_path / "empty")
    assert "\n" not in str(e.value)


def test_file_is_refused(tmp_path):
    f = tmp_path / "config.json"
    f.write_text("{}")
    with pytest.raises(ModelError, match="not a model directory"):
        resolve_model(f)


@pytest.mark.parametrize(
    "name", ["./nope", "/definitely/not/here", "~/not-here-either", "a/b/c", "models/missing"]
)
def test_missing_paths_never_reach_the_hub(name, tmp_path, monkeypatch, hub):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    import huggingface_hub

    def boom(*a, **k):  # pragma: no cover - the assertion is that this is not called
        raise AssertionError("looked up on the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    with pytest.raises(ModelError, match="model path not found") as e:
        resolve_model(name)
    assert name in str(e.value) and "\n" not in str(e.value)


def test_missing_pathlike_is_a_path(tmp_path):
    with pytest.raises(ModelError, match="model path not found"):
        resolve_model(tmp_path / "org_name")


# ---------------------------------------------------------------------------------------------
# resolve_model: hub ids, against a real on-disk cache and the real huggingface_hub code
# ---------------------------------------------------------------------------------------------


def test_cache_dir_read_at_call_time(tmp_path, monkeypatch, hub):
    assert hub_cache_dir() == hub
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert hub_cache_dir() == tmp_path / "legacy"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "new"))
    assert hub_cache_dir() == tmp_path / "new"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE")
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"


def test_hub_id_from_cache_offline(hub, monkeypatch):
    snap = make_hub_cache(hub, "org/tiny", tiny_files())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got = resolve_model("org/tiny")
    assert got == snap.resolve() or got == snap
    assert json.loads((got / "config.json").read_text()) == {"model_type": "llama"}
    # the symlinked blob is read through: fingerprints work on a cache snapshot
    assert weights_fingerprint(got).startswith("sha256-full:")


def test_hub_id_by_commit_and_local_files_only(hub):
    make_hub_cache(hub, "org/tiny", tiny_files())
    assert resolve_model("org/tiny", revision=COMMIT, local_files_only=True).name == COMMIT
    assert resolve_model("org/tiny", local_files_only=True).name == COMMIT


def test_hub_id_missing_offline_says_how_to_fetch(hub, monkeypatch):
    make_hub_cache(hub, "org/tiny", tiny_files())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as e:
        resolve_model("org/other")
    msg = str(e.value)
    assert "\n" not in msg
    assert "org/other" in msg and "hf download org/other" in msg
    assert "HF_HUB_OFFLINE" in msg and str(hub) in msg


def test_hub_revision_missing_offline(hub):
    make_hub_cache(hub, "org/tiny", tiny_files())
    with pytest.raises(ModelError, match=r"org/tiny@v2 is not in the hub cache.*--revision v2"):
        resolve_model("org/tiny", revision="v2", local_files_only=True)


def test_offline_env_read_at_call_time_not_import(hub, monkeypatch):
    """HF_HUB_OFFLINE set after huggingface_hub's import still keeps us off the network."""
    import huggingface_hub

    seen = {}
    real = huggingface_hub.snapshot_download

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError):
        resolve_model("org/absent")
    assert seen["local_files_only"] is True
    assert seen["cache_dir"] == str(hub)
    assert "*.safetensors" in seen["allow_patterns"] and "tokenizer.model" in seen["allow_patterns"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    seen.clear()
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda *a, **k: seen.update(k) or str(hub)
    )
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model("org/absent")
    assert seen["local_files_only"] is False


def test_network_failure_is_one_line(hub, monkeypatch):
    """A hub that cannot be reached (a closed local port) and an empty cache: one clear line."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    with pytest.raises(ModelError) as e:
        resolve_model("org/absent", local_files_only=False)
    msg = str(e.value)
    assert "\n" not in msg and "org/absent" in msg and "hf download org/absent" in msg


def test_network_failure_falls_back_to_cache(hub, monkeypatch):
    import huggingface_hub.constants as c

    snap = make_hub_cache(hub, "org/tiny", tiny_files())
    monkeypatch.setattr(c, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    assert resolve_model("org/tiny", local_files_only=False).name == snap.name


def test_repository_not_found_is_one_line(hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import RepositoryNotFoundError

    class Resp:
        status_code = 404
        headers: dict = {}
        url = "x"
        request = None

    def raise_nf(*a, **k):
        raise RepositoryNotFoundError("404 Client Error\nRepository Not Found", response=Resp())

    monkeypatch.setattr(huggingface_hub, "snapshot_download", raise_nf)
    with pytest.raises(ModelError, match=r"model org/nope not found on the hub") as e:
        resolve_model("org/nope", local_files_only=False)
    assert "\n" not in str(e.value)


def test_invalid_hub_id(hub):
    with pytest.raises(ModelError, match="neither an existing directory nor a valid hub id"):
        resolve_model("bad id with spaces", local_files_only=True)


def test_modelerror_is_kld_error():
    assert issubclass(ModelError, KldError)


# ---------------------------------------------------------------------------------------------
# weights_fingerprint
# ---------------------------------------------------------------------------------------------


def test_weights_fingerprint_kinds_and_sensitivity(tmp_path):
    a = fake_model(tmp_path / "a", tensors={"w": ("F16", [4, 4]), "b": ("F32", [4])})
    fast, full = weights_fingerprint(a), weights_fingerprint(a, full=True)
    assert fast.startswith("sha256-full:") and full == fast
    assert len(fast.split(":")[1]) == 64
    assert weights_fingerprint(a) == fast  # stable

    # a copy, with times preserved or not, in another directory: the same fingerprints (content only)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert weights_fingerprint(b) == fast and weights_fingerprint(b, full=True) == full
    st = (b / "model.safetensors").stat()
    os.utime(b / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert weights_fingerprint(b) == fast and weights_fingerprint(b, full=True) == full

    # same header and size, other data: both see it (a small file is sampled whole)
    c = tmp_path / "c"
    shutil.copytree(a, c)
    write_safetensors(
        c / "model.safetensors", {"w": ("F16", [4, 4]), "b": ("F32", [4])}, fill=b"\1"
    )
    os.utime(c / "model.safetensors", ns=((a / "model.safetensors").stat().st_mtime_ns,) * 2)
    assert weights_fingerprint(c) != fast
    assert weights_fingerprint(c, full=True) != full

    # another shape: header differs, both differ
    d = fake_model(tmp_path / "d", tensors={"w": ("F16", [4, 8]), "b": ("F32", [4])})
    os.utime(d / "model.safetensors", ns=((a / "model.safetensors").stat().st_mtime_ns,) * 2)
    assert weights_fingerprint(d) != fast and weights_fingerprint(d, full=True) != full

    # config.json is covered
    e = tmp_path / "e"
    shutil.copytree(a, e)
    (e / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert weights_fingerprint(e) != fast and weights_fingerprint(e, full=True) != full


def test_weights_fingerprint_no_weights(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"no \*.safetensors weights"):
        weights_fingerprint(tmp_path / "m")


def test_corrupt_header(tmp_path):
    m = fake_model(tmp_path / "m")
    (m / "model.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(ModelError, match="not a valid safetensors file"):
        weights_fingerprint(m)
    (m / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(ModelError, match="corrupt safetensors header"):
        read_safetensors_header(m / "model.safetensors")


def test_read_header_matches_safetensors_library(tmp_path):
    from safetensors import safe_open

    m = fake_model(tmp_path / "m", tensors={"x": ("F32", [3, 5]), "y": ("F16", [7])})
    header = read_safetensors_header(m / "model.safetensors")
    assert header["__metadata__"] == {"format": "mlx"}
    with safe_open(str(m / "model.safetensors"), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(k for k in header if k != "__metadata__")
        assert list(f.get_slice("x").get_shape()) == header["x"]["shape"]


# ---------------------------------------------------------------------------------------------
# tokenizer_fingerprint
# ---------------------------------------------------------------------------------------------


def _write_tok(path: Path, merges=0) -> Path:
    from tiny import write_tokenizer

    write_tokenizer(path, merges=merges)
    return path


def test_tokenizer_fingerprint_ignores_chat_template(tmp_path):
    a = _write_tok(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    cfg = json.loads((b / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages }}"
    cfg["eos_token"] = "<|endoftext|>"
    (b / "tokenizer_config.json").write_text(json.dumps(cfg))
    fa = tokenizer_fingerprint(a)
    assert fa.startswith("vocab-sha256:")
    assert tokenizer_fingerprint(b) == fa
    # re-serialised tokenizer.json (other key order / whitespace): same vocabulary, same hash
    data = json.loads((b / "tokenizer.json").read_text())
    (b / "tokenizer.json").write_text(json.dumps(data, indent=None, sort_keys=True))
    assert tokenizer_fingerprint(b) == fa


def test_tokenizer_fingerprint_differs_for_other_vocab(tmp_path):
    a = tokenizer_fingerprint(_write_tok(tmp_path / "a"))
    assert tokenizer_fingerprint(_write_tok(tmp_path / "b", merges=2)) != a
    # the same tokens with two ids swapped
    c = _write_tok(tmp_path / "c")
    data = json.loads((c / "tokenizer.json").read_text())
    v = data["model"]["vocab"]
    ka, kb = list(v)[:2]
    v[ka], v[kb] = v[kb], v[ka]
    (c / "tokenizer.json").write_text(json.dumps(data))
    assert tokenizer_fingerprint(c) != a
    # an added token renamed
    d = _write_tok(tmp_path / "d")
    data = json.loads((d / "tokenizer.json").read_text())
    data["added_tokens"][0]["content"] = "<|other|>"
    (d / "tokenizer.json").write_text(json.dumps(data))
    assert tokenizer_fingerprint(d) != a


def test_tokenizer_fingerprint_fallback_files(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "tokenizer.model").write_bytes(b"sentencepiece-bytes")
    (a / "tokenizer_config.json").write_text(json.dumps({"chat_template": "x"}))
    fa = tokenizer_fingerprint(a)
    assert fa.startswith("files-sha256:")
    (a / "tokenizer_config.json").write_text(json.dumps({"chat_template": "y"}))
    assert tokenizer_fingerprint(a) == fa
    (a / "tokenizer_config.json").write_text(
        json.dumps({"added_tokens_decoder": {"5": {"content": "<x>"}}})
    )
    assert tokenizer_fingerprint(a) != fa
    (a / "tokenizer_config.json").unlink()
    (a / "tokenizer.model").write_bytes(b"other-bytes")
    assert tokenizer_fingerprint(a) != fa
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no tokenizer in"):
        tokenizer_fingerprint(empty)


# ---------------------------------------------------------------------------------------------
# model_info on real tiny models quantised by mlx_lm.convert
# ---------------------------------------------------------------------------------------------




# (source arch, name, quantize kwargs)
QUANTS = [
    ("llama", "llama-q4", dict(bits=4, group_size=64)),
    ("llama", "llama-q8g32", dict(bits=8, group_size=32)),
    ("llama", "llama-m36", dict(bits=4, group_size=64, predicate="mixed_3_6")),
    ("llama", "llama-m46", dict(bits=4, group_size=64, predicate="mixed_4_6")),
    ("llama", "llama-eh8", dict(bits=4, group_size=64, predicate=embed_head_8)),
    ("llama", "llama-mxfp4", dict(bits=4, group_size=32, mode="mxfp4")),
    ("llama", "llama-nvfp4", dict(bits=4, group_size=16, mode="nvfp4")),
    ("llama", "llama-mxfp8", dict(bits=8, group_size=32, mode="mxfp8")),
    ("qwen3", "qwen3-m46", dict(bits=4, group_size=64, predicate="mixed_4_6")),
    ("qwen3_5", "qwen3_5-q4", dict(bits=4, group_size=64)),
    ("qwen3_5", "qwen3_5-m36", dict(bits=4, group_size=64, predicate="mixed_3_6")),
    (
        "qwen3_5",
        "qwen3_5-custom",
        dict(bits=4, group_size=64, predicate=routers_float_shared8_linear6),
    ),
    ("qwen3_5_moe", "moe-q4", dict(bits=4, group_size=64)),
    ("qwen3_5_moe", "moe-m36", dict(bits=3, group_size=64, predicate="mixed_3_6")),
    (
        "qwen3_5_moe",
        "moe-custom",
        dict(bits=4, group_size=64, predicate=routers_float_shared8_linear6),
    ),
]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny references and their quants, built once: {name: path}."""
    pytest.importorskip("mlx_lm")
    from tiny import build_model, quantize

    root = tmp_path_factory.mktemp("tiny_models")
    out = {}
    for arch in ("llama", "qwen3", "qwen3_5", "qwen3_5_moe"):
        out[arch] = build_model(root / arch, arch)
    for src, name, kw in QUANTS:
        out[name] = quantize(out[src], root / name, **kw)
    return out


def test_reference_info(tiny):
    i = model_info(tiny["llama"])
    assert isinstance(i, ModelInfo)
    assert i.quantized is False and i.mode == "none" and i.family == "none"
    assert i.bits_per_weight == 16.0 and i.dtype == "float16" and i.label == "float16"
    assert i.base_bits is None and i.overrides == 0 and i.elevated == {}
    # llama tiny: embed 320x64, lm_head 320x64, 2 layers of q/k/v/o + 3 mlp + 2 norms, final norm
    per_layer = 64 * 64 + 2 * (32 * 64) + 64 * 64 + 3 * (64 * 128) + 2 * 64
    assert i.params == 2 * 320 * 64 + 2 * per_layer + 64
    assert i.weight_bytes == (tiny["llama"] / "model.safetensors").stat().st_size
    assert i.tensor_bytes == 2 * i.params
    assert i.model_type == "llama" and i.name == "llama"


@pytest.mark.parametrize("name", [q[1] for q in QUANTS])
def test_quant_params_equal_reference_params(tiny, name):
    src = next(s for s, n, _ in QUANTS if n == name)
    assert model_info(tiny[name]).params == model_info(tiny[src]).params


def test_uniform_affine(tiny):
    i = model_info(tiny["llama-q4"])
    assert (i.quantized, i.mode, i.base_bits, i.group_size) == (True, "affine", 4, 64)
    assert (
        i.family == "RTN uniform" and "mlx_lm.convert" in i.family_basis and "DWQ" in i.family_basis
    )
    assert i.overrides == 0 and i.override_bits == {} and i.elevated == {}
    assert i.n_quantized == 16 and i.label == "4-bit g64"
    # 4 bits + an fp16 scale and bias per 64 weights = 4.5 bits inside quantised modules
    assert i.quantized_bits_per_weight == pytest.approx(4.5)
    assert i.by_role == {
        "embed_tokens": {"4": 1},
        "lm_head": {"4": 1},
        "self_attn": {"4": 8},
        "mlp": {"4": 6},
    }
    j = model_info(tiny["llama-q8g32"])
    assert (j.base_bits, j.group_size, j.label) == (8, 32, "8-bit g32")
    assert j.quantized_bits_per_weight == pytest.approx(8 + 32 / 32)


@pytest.mark.parametrize(
    "name, mode, gs, bits, qbpw",
    [
        ("llama-mxfp4", "mxfp4", 32, 4, 4 + 8 / 32),  # uint8 e8m0 scale per 32, no bias
        ("llama-nvfp4", "nvfp4", 16, 4, 4 + 8 / 16),  # fp8 e4m3 scale per 16
        ("llama-mxfp8", "mxfp8", 32, 8, 8 + 8 / 32),
    ],
)
def test_float_quant_modes(tiny, name, mode, gs, bits, qbpw):
    i = model_info(tiny[name])
    assert (i.mode, i.group_size, i.base_bits, i.label) == (mode, gs, bits, mode)
    assert i.quantized_bits_per_weight == pytest.approx(qbpw)
    assert i.overrides == 0


@pytest.mark.parametrize(
    "name, recipe, base, high, elevated",
    [
        # llama, 2 layers: the rule's "more bits" layers are {1}: v_proj, down_proj, lm_head
        (
            "llama-m36",
            "mixed_3_6",
            3,
            6,
            {"lm_head": {"6": 1}, "self_attn": {"6": 1}, "mlp": {"6": 1}},
        ),
        (
            "llama-m46",
            "mixed_4_6",
            4,
            6,
            {"lm_head": {"6": 1}, "self_attn": {"6": 1}, "mlp": {"6": 1}},
        ),
        (
            "qwen3-m46",
            "mixed_4_6",
            4,
            6,
            {"lm_head": {"6": 1}, "self_attn": {"6": 1}, "mlp": {"6": 1}},
        ),
        # qwen3_5, 4 layers (1, 3 full attention; 0, 2 linear): more bits in layers {2, 3}
        (
            "qwen3_5-m36",
            "mixed_3_6",
            3,
            6,
            {"lm_head": {"6": 1}, "self_attn": {"6": 1}, "mlp": {"6": 2}},
        ),
        # MoE: down_proj of the experts and of the shared expert in layers 2 and 3
        (
            "moe-m36",
            "mixed_3_6",
            3,
            6,
            {
                "lm_head": {"6": 1},
                "self_attn": {"6": 1},
                "shared_expert": {"6": 2},
                "experts": {"6": 2},
            },
        ),
    ],
)
def test_mixed_recipes(tiny, name, recipe, base, high, elevated):
    i = model_info(tiny[name])
    assert i.recipe == recipe and i.family == "RTN mixed"
    assert i.base_bits == base and i.group_size == 64
    n = sum(sum(h.values()) for h in elevated.values())
    assert i.overrides == n == i.n_elevated
    assert i.override_bits == {str(high): n}
    assert i.elevated == elevated
    assert i.label == f"{recipe} g64"


def test_mixed_3_6_records_base_4_in_config(tiny):
    """convert writes the q_bits it was given (4) at the top, though 3 bits cover most weights."""
    i = model_info(tiny["llama-m36"])
    assert i.config_bits == 4 and i.base_bits == 3


def test_callable_predicate_embed_head(tiny):
    i = model_info(tiny["llama-eh8"])
    assert i.base_bits == 4 and i.group_size == 64 and i.recipe is None
    assert i.family == "RTN mixed" and i.label == "4-bit g64 mixed"
    assert i.elevated == {"embed_tokens": {"8": 1}, "lm_head": {"8": 1}}
    assert i.overrides == 2 and i.override_bits == {"8": 2}


def test_qwen3_5_linear_attention_elevated(tiny):
    i = model_info(tiny["qwen3_5-custom"])
    # 2 linear-attention layers x (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, out_proj)
    assert i.elevated == {"linear_attn": {"6": 10}}
    assert i.by_role["linear_attn"] == {"6": 10}
    assert i.by_role["self_attn"] == {"4": 8}
    assert i.n_float_matrices == 0 and i.overrides == 10


def test_moe_routers_and_shared_experts(tiny):
    q4 = model_info(tiny["moe-q4"])
    # qwen3_5_moe's own quant_predicate keeps mlp.gate and shared_expert_gate at 8 bits
    assert q4.elevated == {"router": {"8": 8}}
    assert q4.family == "RTN mixed" and q4.base_bits == 4
    assert q4.n_quantized == 52

    c = model_info(tiny["moe-custom"])
    # 4 layers x (mlp.gate, shared_expert_gate) left in float16; 4 x 3 shared-expert projections
    # at 8 bits; 2 linear-attention layers x 5 projections at 6 bits
    assert c.elevated == {
        "linear_attn": {"6": 10},
        "router": {"16": 8},
        "shared_expert": {"8": 12},
    }
    assert c.n_float_matrices == 8
    assert c.override_bits == {"6": 10, "8": 12, "16": 8}
    assert c.overrides == 30
    assert c.n_quantized == 52 - 8
    assert c.by_role["experts"] == {"4": 12}


@pytest.mark.parametrize(
    "name",
    ["llama", "llama-q4", "llama-m36", "llama-eh8", "llama-mxfp4", "llama-nvfp4", "llama-mxfp8"],
)
def test_bits_per_weight_matches_mlx_lm(tiny, name):
    from mlx_lm import load
    from mlx_lm.utils import compute_bits_per_weight, get_total_parameters

    model, _ = load(str(tiny[name]))
    i = model_info(tiny[name])
    assert i.params == get_total_parameters(model)
    assert i.bits_per_weight == pytest.approx(compute_bits_per_weight(model), rel=1e-12)


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_5-m36", "moe-q4", "moe-m36", "moe-custom"])
def test_bits_per_weight_vs_mlx_lm_on_hybrid(tiny, name):
    """mlx-lm counts parameters of leaf modules only, so it misses A_log and dt_bias, which sit on
    the (non-leaf) gated delta net module; we count every tensor. Same bytes, 16 more params."""
    from mlx_lm import load
    from mlx_lm.utils import compute_bits_per_weight, get_total_parameters

    model, _ = load(str(tiny[name]))
    i = model_info(tiny[name])
    header = read_safetensors_header(tiny[name] / "model.safetensors")
    missed = sum(v["shape"][0] for k, v in header.items() if k.endswith((".A_log", ".dt_bias")))
    assert missed == 16
    assert i.params == get_total_parameters(model) + missed
    mlx_bpw = compute_bits_per_weight(model)
    assert i.tensor_bytes * 8 / (i.params - missed) == pytest.approx(mlx_bpw, rel=1e-12)
    assert i.bits_per_weight < mlx_bpw


def test_to_dict_is_json(tiny):
    d = model_info(tiny["moe-custom"]).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) >= {
        "name",
        "params",
        "bits_per_weight",
        "mode",
        "base_bits",
        "group_size",
        "overrides",
        "override_bits",
        "elevated",
        "family",
        "dtype",
        "weight_bytes",
    }


def test_info_never_reads_the_name(tiny, tmp_path):
    """A 4-bit quant in a directory called 8bit-mxfp8-mixed_3_6 is still a 4-bit affine quant."""
    dst = tmp_path / "model-8bit-mxfp8-mixed_3_6-bf16"
    shutil.copytree(tiny["llama-q4"], dst)
    i = model_info(dst)
    assert (i.base_bits, i.mode, i.recipe, i.dtype) == (4, "affine", None, "float16")
    assert i.name == dst.name


def test_config_tensor_mismatch_is_clear(tiny, tmp_path):
    dst = tmp_path / "bad"
    shutil.copytree(tiny["llama-q4"], dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization"]["bits"] = 3
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="does not match the tensors") as e:
        model_info(dst)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# model_info on hand-written configs: the family signatures of mlx-lm's quant scripts
# ---------------------------------------------------------------------------------------------


def _q_model(tmp_path, quantization, modules=("model.layers.0.mlp.down_proj", "lm_head"), bits=4):
    tensors = {"model.norm.weight": ("F16", [64])}
    for m in modules:
        b = (
            quantization.get(m, {}).get("bits", bits)
            if isinstance(quantization.get(m), dict)
            else bits
        )
        tensors[m + ".weight"] = ("U32", [64, 64 * b // 32])
        tensors[m + ".scales"] = ("F16", [64, 1])
        tensors[m + ".biases"] = ("F16", [64, 1])
    return fake_model(
        tmp_path, tensors=tensors, config={"model_type": "llama", "quantization": quantization}
    )


def test_family_awq(tmp_path):
    q = {
        "group_size": 64,
        "bits": 4,
        "model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 4},
        "lm_head": {"group_size": 64, "bits": 4},
        "model.norm": False,
    }
    assert model_info(_q_model(tmp_path / "m", q)).family == "AWQ"


def test_family_gptq(tmp_path):
    q = {"bits": 4, "group_size": 64, "lm_head": {"bits": 6, "group_size": 64}}
    i = model_info(_q_model(tmp_path / "m", q))
    assert i.family == "GPTQ" and i.elevated == {"lm_head": {"6": 1}}


def test_family_dynamic(tmp_path):
    q = {
        "group_size": 64,
        "bits": 4,
        "mode": "affine",
        "model.layers.0.mlp.down_proj": {"bits": 6, "group_size": 64},
    }
    i = model_info(_q_model(tmp_path / "m", q))
    assert i.family == "dynamic" and i.elevated == {"mlp": {"6": 1}}


def test_family_explicit_quant_method(tmp_path):
    q = {"group_size": 64, "bits": 4, "mode": "affine"}
    m = _q_model(tmp_path / "m", q)
    cfg = json.loads((m / "config.json").read_text())
    cfg["quantization_config"] = {**q, "quant_method": "dwq"}
    (m / "config.json").write_text(json.dumps(cfg))
    i = model_info(m)
    assert i.family == "DWQ" and "quant_method" in i.family_basis


def test_family_unknown(tmp_path):
    q = {"group_size": 64, "bits": 4, "mode": "affine", "lm_head": "weird"}
    assert model_info(_q_model(tmp_path / "m", q)).family == "unknown"


@pytest.mark.parametrize(
    "path, role",
    [
        ("model.embed_tokens", "embed_tokens"),
        ("language_model.lm_head", "lm_head"),
        ("model.layers.0.self_attn.q_proj", "self_attn"),
        ("model.layers.0.linear_attn.in_proj_qkv", "linear_attn"),
        ("model.layers.0.mlp.gate_proj", "mlp"),
        ("model.layers.0.mlp.gate", "router"),
        ("model.layers.0.mlp.gate.gate_proj", "router"),
        ("model.layers.0.block_sparse_moe.gate", "router"),
        ("model.layers.0.mlp.shared_expert_gate", "router"),
        ("model.layers.0.mlp.shared_expert.down_proj", "shared_expert"),
        ("model.layers.0.mlp.switch_mlp.up_proj", "experts"),
        ("model.norm", "other"),
    ],
)
def test_tensor_role(path, role):
    assert tensor_role(path) == role


def test_display_name(tmp_path):
    assert (
        display_name(tmp_path / "hub" / "models--org--My-Model" / "snapshots" / COMMIT)
        == "org/My-Model"
    )
    assert display_name(tmp_path / "SmolLM2-4bit") == "SmolLM2-4bit"
