"""Shared fixtures: a tiny random Llama saved as a local HF folder, with the offline tokenizer."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from sieve_pl.models.loading import DEFAULT_MODEL, load_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """The built-in model's tokenizer (converted from the GGUF once, then cached)."""
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def make_tiny_llama(tmp_path_factory, tokenizer):
    """Random 2-layer Llamas saved as local folders: they load through the same path as any HF
    model. Keyword arguments override the config (e.g. sizes bitsandbytes' CPU kernel accepts)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(name: str, **overrides) -> str:
        torch.manual_seed(0)
        config = LlamaConfig(**{
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256, "tie_word_embeddings": True,
            "pad_token_id": tokenizer.pad_token_id, **overrides})
        path = tmp_path_factory.mktemp(name)
        LlamaForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return str(path)
    return make


@pytest.fixture(scope="session")
def tiny_llama(make_tiny_llama):
    return make_tiny_llama("tiny_llama")


@pytest.fixture
def trainer():
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False)


@pytest.fixture
def tiny_data(tokenizer):
    from sieve_pl.tasks import SplitSizes, TaskDataModule

    data = TaskDataModule(sizes=SplitSizes(calibration=12, validation=8, test=8), batch_size=5)
    data.prepare(tokenizer)
    return data


@pytest.fixture
def fake_device():
    """The fake accelerator (tests/fake_accelerator.py) for this test: tensors moved to the
    device it yields fail on a mix with host tensors, as on CUDA."""
    from fake_accelerator import fake_device as active

    with active() as device:
        yield device


@pytest.fixture
def fake_trainer(fake_device):
    """Like ``trainer``, on the fake accelerator: ``strategy.root_device`` is ``fake_device``."""
    from fake_accelerator import fake_trainer as make

    return make()
