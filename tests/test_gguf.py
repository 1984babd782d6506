"""Exports for serving engines. GGUF: llama.cpp's own loader and kernels (llama-cpp-python) read
what sieve-pl writes, with the transformers model's logits — pruned MLP widths per layer (deci),
factored and head-narrowed attention written back dense, q/k in llama.cpp's rotary layout.
DeciLM (vLLM / SGLang): the folder, built layer by layer as vLLM's DeciLM model builds it, gives
the same logits."""
import gguf
import numpy as np
import pytest
import torch

from sieve_pl.errors import SieveError
from sieve_pl.models.loading import DEFAULT_MODEL, builtin_gguf
from sieve_pl.models.module import SieveLM
from sieve_pl.models.pruning import Pruner
from sieve_pl.models.to_decilm import save_decilm, width
from sieve_pl.models.to_gguf import check, write_gguf
from sieve_pl.stages.calibrate import CalibrationConfig, calibrate
from sieve_pl.stages.project import ProjectionConfig, project

IDS = [1, 504, 3437, 314, 253, 1345, 28, 2365, 30, 282, 3600, 42, 216, 9840, 17, 4114]


def _pruned(make_tiny_llama, tiny_data, trainer, attention: str):
    """A tiny Llama (hidden 64: q8_0 blocks of 32) pruned per layer: neuron units whose
    widths differ by layer, and ``attention`` (factored or heads) on q/k/v/o."""
    lm = SieveLM(make_tiny_llama("gguf_llama", hidden_size=64, intermediate_size=96,
                                 num_attention_heads=4, num_key_value_heads=2))
    lm.load()
    groups = lm.adapter.input_groups(lm.net)
    stats = calibrate(trainer, lm.net, groups, tiny_data.calibration_dataloader(),
                      CalibrationConfig())
    bases = project(lm.net, groups, stats, ProjectionConfig(mlp="neurons", attention=attention),
                    mlps=lm.adapter.mlps(lm.net), attentions=lm.adapter.attentions(lm.net))
    pruner = Pruner(lm.net, bases)
    levels = {n: (0.5 if ".0." in n else 0.75) for n in pruner.names}
    return lm, pruner, levels


def _llama_cpp_logits(path, ids) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=2,
                          verbose=False)
    llm.eval(ids)
    return np.asarray(llm.scores[:len(ids)])


@pytest.mark.parametrize("attention", ["factored", "heads"])
def test_llama_cpp_reads_the_pruned_model_with_its_logits(make_tiny_llama, tiny_data, trainer,
                                                         tmp_path, attention):
    lm, pruner, levels = _pruned(make_tiny_llama, tiny_data, trainer, attention)
    with pruner.at(levels):
        with torch.no_grad():
            expected = lm.net(input_ids=torch.tensor([IDS])).logits[0].numpy()
        info = write_gguf(lm.net, lm.tokenizer(), tmp_path / "m.gguf", "f32",
                          builtin_gguf(DEFAULT_MODEL))
    assert info["architecture"] == "deci" and len(set(info["mlp_widths"])) == 2
    got = _llama_cpp_logits(tmp_path / "m.gguf", IDS)
    np.testing.assert_allclose(got, expected, atol=2e-3 * np.abs(expected).max())
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


def test_one_width_is_the_llama_architecture_and_q8_0_is_smaller_and_close(
        make_tiny_llama, tiny_data, trainer, tmp_path):
    lm, pruner, _ = _pruned(make_tiny_llama, tiny_data, trainer, "factored")
    with torch.no_grad():
        expected = lm.net(input_ids=torch.tensor([IDS])).logits[0].numpy()
    dense = write_gguf(lm.net, lm.tokenizer(), tmp_path / "dense.gguf", "q8_0",
                       builtin_gguf(DEFAULT_MODEL))
    assert dense["architecture"] == "llama" and dense["mlp_widths"] == [96, 96]
    got = _llama_cpp_logits(tmp_path / "dense.gguf", IDS)
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.99
    with pruner.at(0.5):
        smaller = write_gguf(lm.net, lm.tokenizer(), tmp_path / "p.gguf", "q8_0",
                             builtin_gguf(DEFAULT_MODEL))
    assert smaller["architecture"] == "llama" and smaller["bytes"] < dense["bytes"]


def test_the_tokenizer_and_chat_template_come_from_the_source_gguf(tiny_llama, tmp_path):
    lm = SieveLM(tiny_llama)
    lm.load()
    tokenizer = lm.tokenizer()
    write_gguf(lm.net, tokenizer, tmp_path / "m.gguf", "f16", builtin_gguf(DEFAULT_MODEL))
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    source = gguf.GGUFReader(str(builtin_gguf(DEFAULT_MODEL))).fields
    assert fields["tokenizer.chat_template"].contents() == \
        source["tokenizer.chat_template"].contents()
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, vocab_only=True,
                          verbose=False)
    for text in ["This movie was great!", "  spaces, numbers 12345 and émojis 🎬"]:
        assert llm.tokenize(text.encode(), add_bos=False) == tokenizer(text)["input_ids"]


def test_a_hf_tokenizer_is_written_as_its_bpe_vocabulary(tiny_llama, tmp_path):
    lm = SieveLM(tiny_llama)
    lm.load()
    write_gguf(lm.net, lm.tokenizer(), tmp_path / "m.gguf", "f16", None)
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].contents()) == len(lm.tokenizer())
    assert fields["tokenizer.ggml.merges"].contents()


def test_other_architectures_are_refused_in_one_line():
    from transformers import GPT2Config

    with pytest.raises(SieveError, match="this model is 'gpt2': export it as hf"):
        check(GPT2Config())


def _as_vllm_builds_it(folder):
    """The model vLLM's ``nemotron_nas.py`` builds from a DeciLM folder: per layer, Llama
    attention with ``heads / n_heads_in_group`` kv heads and a Llama MLP of the width that
    ``ffn_mult`` gives, loaded from the folder's shards by name."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__name__ == "DeciLMConfig" and config.model_type == "nemotron-nas"
    fields = {k: v for k, v in config.to_dict().items() if k not in ("block_configs", "auto_map")}
    model = LlamaForCausalLM(LlamaConfig(**{**fields, "intermediate_size": 1}))
    for layer, block in zip(model.model.layers, config.block_configs):
        assert not block.attention.no_op and not block.ffn.no_op
        assert config.num_attention_heads // block.attention.n_heads_in_group == \
            config.num_key_value_heads
        layer.mlp = LlamaMLP(LlamaConfig(**{**fields, "intermediate_size": width(
            block.ffn.ffn_mult, config.hidden_size)}))
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    state = {}
    for shard in sorted(set(index.values())):
        state.update(load_file(folder / shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


@pytest.mark.parametrize("attention", ["factored", "heads"])
def test_the_decilm_folder_is_the_pruned_model_for_vllm(make_tiny_llama, tiny_data, trainer,
                                                       tmp_path, attention):
    lm, pruner, levels = _pruned(make_tiny_llama, tiny_data, trainer, attention)
    ids = torch.tensor([IDS])
    with pruner.at(levels):
        with torch.no_grad():
            expected = lm.net(input_ids=ids).logits
        info = save_decilm(lm.net, lm.tokenizer(), tmp_path / "decilm")
    assert len(set(info["mlp_widths"])) == 2 and set(info["written_widths"]) == {256}
    with torch.no_grad():
        got = _as_vllm_builds_it(tmp_path / "decilm")(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4 * expected.abs().max(), rtol=0)
    from transformers import AutoTokenizer  # no code and no [y/N] prompt for the tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "decilm", trust_remote_code=False)
    assert tokenizer("a gem")["input_ids"] == lm.tokenizer()("a gem")["input_ids"]
