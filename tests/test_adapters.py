"""Every adapter on a tiny random model of its family: calibrate, project, prune, export, reload.

Shapes are small and non-square (hidden 32, MLP 48 or 128, 2 KV heads) so a transposed weight or
a wrong input group shows up as a shape error or a wrong number.
"""
from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from sieve_pl.errors import SieveError
from sieve_pl.models.adapters import supported_model_types
from sieve_pl.models.factored import FactoredLinear, dense_weight
from sieve_pl.models.hf import save_pruned
from sieve_pl.models.loading import load_model
from sieve_pl.models.pruning import Pruner
from sieve_pl.units import rank_for
from sieve_pl.stages.calibrate import CalibrationConfig, calibrate
from sieve_pl.stages.project import ProjectionConfig, project
from sieve_pl.units import METHODS
from sieve_pl.stages.recover import lora_targets
from sieve_pl.stages.refit import refit
from sieve_pl.models.forward import last_logits

LLAMA_SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def family_config(family: str, vocab: int, pad: int):
    """A tiny random config of each supported family."""
    import transformers as tf

    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                             pad_token_id=pad, bos_token_id=pad, eos_token_id=pad)
    if family == "gemma3":  # multimodal: a language model next to a (tiny) vision tower
        return tf.Gemma3Config(
            text_config=dict(vocab_size=vocab, head_dim=8, pad_token_id=pad, **LLAMA_SIZES),
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, image_size=28, patch_size=14),
            mm_tokens_per_image=4)
    config = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
              "phi3": tf.Phi3Config, "gemma3_text": tf.Gemma3TextConfig}[family]
    return config(vocab_size=vocab, pad_token_id=pad, **LLAMA_SIZES)


@pytest.fixture(scope="module")
def data(tokenizer):
    from sieve_pl.tasks import SplitSizes, TaskDataModule

    data = TaskDataModule(sizes=SplitSizes(calibration=12, validation=8, test=8), batch_size=6)
    data.prepare(tokenizer)
    return data


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "phi3", "gemma3_text",
                                        "gemma3", "gpt2"])
def family(request, tmp_path_factory, tokenizer, data):
    """The family's model loaded from a local folder, calibrated, with bases of every method."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    config = family_config(request.param, len(tokenizer), tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    net, adapter = load_model(str(path))
    groups = adapter.input_groups(net)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    stats = calibrate(trainer, net, groups, data.calibration_dataloader(), CalibrationConfig())
    bases = {m: project(net, groups, stats, ProjectionConfig(method=m)) for m in METHODS}
    bases["neurons"] = project(net, groups, stats, ProjectionConfig(attention="heads"),
                               mlps=adapter.mlps(net),
                               attentions=adapter.attentions(net))
    return net, adapter, groups, stats, bases


@pytest.fixture
def batch(data):
    return next(iter(data.val_dataloader()))


class TestAdapter:
    def test_targets_are_every_matrix_of_the_layers(self, family):
        net, adapter, groups, *_ = family
        targets = adapter.targets(net)
        assert len(groups) == 4 * 2  # attention in/out, MLP in/out; 2 layers
        assert sorted(targets) == sorted(lora_targets(net, adapter.layers))

    def test_groups_share_an_input_and_weights_are_out_by_in(self, family, batch):
        net, adapter, groups, *_ = family
        seen = {}

        def keep(name):
            def hook(module, args, out):
                seen[name] = args[0], out
            return hook

        handles = [net.get_submodule(n).register_forward_hook(keep(n))
                   for n in adapter.targets(net)]
        last_logits(net, batch)
        for h in handles:
            h.remove()
        for names in groups.values():
            x = seen[names[0]][0]
            for name in names:
                module = net.get_submodule(name)
                assert torch.equal(seen[name][0], x)
                bias = 0 if module.bias is None else module.bias
                torch.testing.assert_close(x @ dense_weight(module).T + bias, seen[name][1])

    def test_calibration_statistics_are_finite_and_symmetric(self, family):
        _, _, groups, stats, _ = family
        for key in groups:
            assert torch.isfinite(stats[key]).all() and int(stats[f"{key}.count"]) > 0
            torch.testing.assert_close(stats[key], stats[key].T)

    def test_output_aligned_error_is_the_claimed_optimum(self, family):
        """At keep 0.5 each matrix's output error is the sum of the discarded eigenvalues of
        ``W C Wᵀ`` and no larger than either baseline's."""
        net, _, groups, stats, bases = family
        for key, names in groups.items():
            c = stats[key] / int(stats[f"{key}.count"])
            for name in names:
                w = dense_weight(net.get_submodule(name)).detach().double()
                rank = rank_for(0.5, *w.shape)
                energy = torch.linalg.eigvalsh(w @ c @ w.T).flip(0)
                err = {}
                for method in METHODS:
                    a, b = bases[method][name].pair(rank, w)
                    assert a.shape[1] == w.shape[1] and b.shape[0] == w.shape[0]
                    d = w - b @ a
                    err[method] = float((d @ c @ d.T).trace())
                tol = 1e-4 * float(energy.sum())
                assert err["output_aligned"] == pytest.approx(float(energy[rank:].sum()), abs=tol)
                assert err["output_aligned"] <= min(err.values()) + tol

    def test_refit_gives_factors_of_every_pruned_matrix(self, family, data, trainer):
        net, _, groups, _, bases = family
        pruner = Pruner(net, bases["output_aligned"])
        levels = dict.fromkeys(pruner.dense, 0.5)
        with pruner.at(levels):
            factors = refit(trainer, net, pruner, levels, data.calibration_dataloader())
        assert set(factors) == set(pruner.dense)
        for name, (a, b) in factors.items():
            h, d = pruner.units[name].shape
            assert a.shape == (rank_for(0.5, h, d), d) and b.shape == (h, a.shape[0])
            assert torch.isfinite(a).all() and torch.isfinite(b).all()

    def test_pruned_model_exports_reloads_and_takes_lora(self, family, batch, tokenizer,
                                                          tmp_path):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        net, adapter, _, _, bases = family
        pruner = Pruner(net, bases["neurons"])
        mlps, attns = adapter.mlps(net), adapter.attentions(net)
        assert (len(attns) == 2) == (adapter.name in ("llama", "gemma3"))  # v fused: factored
        assert set(mlps) | set(attns) <= set(pruner.names)
        assert len(pruner.names) == len(pruner.dense) + 2 + len(attns)
        dense = last_logits(net, batch)
        sizes = pruner.apply({n: (0.5 if i % 2 or n in mlps or n in attns else 1.0)
                              for i, n in enumerate(pruner.names)})
        ranks = {n: r for n, r in sizes.items() if n not in mlps and n not in attns}
        try:
            assert ranks and all(isinstance(net.get_submodule(n), FactoredLinear) for n in ranks)
            expected = last_logits(net, batch)
            assert torch.isfinite(expected).all() and not torch.allclose(expected, dense)

            targets = lora_targets(net, adapter.layers)
            assert {f"{n}.{c}" for n in ranks for c in "AB"} <= set(targets)
            assert set(pruner.dense) - set(ranks) <= set(targets)  # the dense ones too
            inputs, output, _ = next(iter(mlps.values()))
            assert {*inputs, output} <= set(targets)  # the resized MLP Linears too
            # peft adapts Conv1D too (it warns once that it sets fan_in_fan_out for them)
            lora = get_peft_model(copy.deepcopy(net), LoraConfig(r=2, target_modules=targets))
            torch.testing.assert_close(last_logits(lora, batch), expected)  # B starts at zero

            layout = save_pruned(net, tokenizer, tmp_path / "model")
            assert layout["ranks"] == ranks and len(layout["shapes"]) == 2 * (len(inputs) + 1)
            assert len(layout["heads"]) == 2 * len(attns)  # v and o of each narrowed layer
            reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model",
                                                            trust_remote_code=True).eval()
            assert type(reloaded).__name__ == f"Sieve{type(net).__name__}"
            assert reloaded.config.sieve["ranks"] == ranks
            torch.testing.assert_close(last_logits(reloaded, batch), expected, rtol=0, atol=1e-5)
        finally:
            pruner.apply(1.0)


def test_unsupported_architecture_fails_before_weights(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(SieveError, match="unsupported architecture 'bert'") as err:
        load_model(str(tmp_path))  # the folder has no weights: only the config may be read
    assert all(t in str(err.value) for t in supported_model_types())
