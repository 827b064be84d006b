"""models.py: resolution of paths and hub ids, fingerprints, model metadata."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from pytest_kld.errors import KldError, ModelError
from pytest_kld.models import (
    hub_cache_dir,
    read_safetensors_header,
    resolve_model,
    tokenizer_fingerprint,
    weights_fingerprint,
)

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
    assert weights_fingerprint(got).startswith("sha256-fast:")


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
    assert fast.startswith("sha256-fast:") and full.startswith("sha256-full:")
    assert len(fast.split(":")[1]) == 64
    assert weights_fingerprint(a) == fast  # stable

    # a copy with times preserved: same fast and full; without: same full, different fast
    b = tmp_path / "b"
    shutil.copytree(a, b)  # copy2 preserves mtime
    assert weights_fingerprint(b) == fast and weights_fingerprint(b, full=True) == full
    st = (b / "model.safetensors").stat()
    os.utime(b / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert weights_fingerprint(b) != fast
    assert weights_fingerprint(b, full=True) == full

    # same header and size, other data: the fast fingerprint cannot see it (documented), full can
    c = tmp_path / "c"
    shutil.copytree(a, c)
    write_safetensors(c / "model.safetensors", {"w": ("F16", [4, 4]), "b": ("F32", [4])}, fill=b"\1")
    os.utime(c / "model.safetensors", ns=((a / "model.safetensors").stat().st_mtime_ns,) * 2)
    assert weights_fingerprint(c) == fast
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


def test_weights_fingerprint_reads_no_tensor_data(tmp_path, monkeypatch):
    """The fast fingerprint reads only the 8 + header bytes of each file."""
    a = fake_model(tmp_path / "a", tensors={"w": ("F32", [256, 256])})
    size = (a / "model.safetensors").stat().st_size
    import builtins

    real_open = builtins.open
    read = []

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def counting_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return Counting(f) if str(file).endswith(".safetensors") and "b" in mode else f

    monkeypatch.setattr(builtins, "open", counting_open)
    weights_fingerprint(a)
    assert 0 < sum(read) < 1024 < size


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
    from pytest_kld.testing import write_tokenizer

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
