"""LoRA recovery: it learns, resumes exactly, and merges into an export that reloads."""
from __future__ import annotations

from dataclasses import replace

import lightning as L
import pytest
import torch

from sieve_pl.models.hf import save_pruned
from sieve_pl.models.module import SieveLM
from sieve_pl.models.pruning import Pruner, with_weights
from sieve_pl.stages.calibrate import CalibrationConfig, calibrate
from sieve_pl.stages.project import ProjectionConfig, project
from sieve_pl.stages.recover import (RecoverConfig, Recovery, left_as_it_came, lora_targets,
                                     recover)
from sieve_pl.tasks import SplitSizes, TaskDataModule
from sieve_pl.models.forward import last_logits

CONFIG = RecoverConfig(enabled=True, rank=4, alpha=8, lr=5e-3, epochs=3, patience=10)


def prune(model: str, tokenizer, keep) -> tuple[SieveLM, TaskDataModule, Pruner]:
    """``model`` calibrated, projected and cut at ``keep(index, name)`` per matrix."""
    data = TaskDataModule(sizes=SplitSizes(calibration=8, validation=8, test=4, train=24),
                          batch_size=6)
    data.prepare(tokenizer)
    lm = SieveLM(model)
    lm.load()
    lm.set_task(data.task)
    groups = lm.adapter.input_groups(lm.net)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    stats = calibrate(trainer, lm.net, groups, data.calibration_dataloader(), CalibrationConfig())
    pruner = Pruner(lm.net, project(lm.net, groups, stats, ProjectionConfig()))
    pruner.apply({n: keep(i, n) for i, n in enumerate(pruner.dense)})
    return lm, data, pruner


@pytest.fixture
def pruned(tiny_llama, tokenizer):
    lm, data, _ = prune(tiny_llama, tokenizer, lambda i, n: 0.5 if i % 2 else 1.0)
    return lm, data


def make_trainer(*callbacks):
    def make(**kwargs):
        return L.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=list(callbacks), **kwargs)
    return make


def _train_loss(lm, data) -> float:
    with torch.no_grad():
        losses = [float(lm.task.loss(lm.net, b)) for b in data.train_dataloader()]
    return sum(losses) / len(losses)


def _recover(lm, data, work, *callbacks):
    targets = lora_targets(lm.net, lm.adapter.layers)
    return recover(make_trainer(*callbacks), lm.net, data.task, targets,
                   data.train_dataloader(), data.val_dataloader(), CONFIG, work)


def test_targets_include_factored_children_and_dense_linears(pruned):
    lm, _ = pruned
    targets = lora_targets(lm.net, lm.adapter.layers)
    assert any(t.endswith(".A") for t in targets) and any(t.endswith(".B") for t in targets)
    assert any(t.endswith("q_proj") for t in targets) or any(t.endswith("k_proj") for t in targets)
    assert not any("lm_head" in t or "embed" in t for t in targets)


def test_recovery_lowers_task_loss_and_leaves_the_model_untouched(pruned, tmp_path):
    lm, data = pruned
    before = _train_loss(lm, data)
    original = {k: v.clone() for k, v in lm.net.state_dict().items()}
    result = _recover(lm, data, tmp_path)
    assert (tmp_path / "last.ckpt").exists()
    assert all(torch.equal(v, original[k]) for k, v in lm.net.state_dict().items())
    with with_weights(lm.net, result["weights"]):
        after = _train_loss(lm, data)
    assert after < before
    assert len(result["train_loss"]) == CONFIG.epochs
    # checkpoints hold the adapters only
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all("lora_" in k for k in state)


def test_recovery_gives_back_the_gradient_flags_and_eval_mode(pruned, tmp_path):
    """Recovery freezes every weight and trains in train mode; later stages get the model as
    it was (a stage that trains some weights itself must not find them frozen)."""
    lm, data = pruned
    lm.net.eval()
    trainable = {n for n, _ in lm.net.named_parameters() if "norm" in n}
    for name, p in lm.net.named_parameters():
        p.requires_grad_(name in trainable)
    recover(make_trainer(), lm.net, data.task, lora_targets(lm.net, lm.adapter.layers),
            data.train_dataloader(), data.val_dataloader(), replace(CONFIG, epochs=1), tmp_path)
    assert {n for n, p in lm.net.named_parameters() if p.requires_grad} == trainable
    assert not any(m.training for m in lm.net.modules())


def test_left_as_it_came_restores_flags_modes_and_dtypes_on_errors():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)).to(torch.bfloat16)
    net.eval()
    net[0].bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match="training failed"):
        with left_as_it_came(net):
            for p in net.parameters():
                p.requires_grad_(False)
            net[1].float()  # peft's preparation upcasts norms
            net.train()
            raise RuntimeError("training failed")
    assert [p.requires_grad for p in net.parameters()] == [True, False, True, True]
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    assert not any(m.training for m in net.modules())


class Killed(Exception):
    pass


class KillAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            raise Killed


def test_resume_from_last_ckpt_equals_uninterrupted(pruned, tmp_path):
    lm, data = pruned
    full = _recover(lm, data, tmp_path / "a")
    steps_per_epoch = len(data.train_dataloader())
    with pytest.raises(Killed):  # dies in the middle of the second epoch
        _recover(lm, data, tmp_path / "b", KillAt(steps_per_epoch + 2))
    resumed = _recover(lm, data, tmp_path / "b")
    assert resumed["weights"].keys() == full["weights"].keys()
    for key, value in full["weights"].items():
        torch.testing.assert_close(resumed["weights"][key], value, rtol=0, atol=0)


def test_merged_export_reloads_with_the_peft_models_logits(pruned, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    lm, data = pruned
    targets = lora_targets(lm.net, lm.adapter.layers)
    module = Recovery(lm.net, data.task, targets, CONFIG, tmp_path)
    trainer = make_trainer()(max_epochs=1, enable_checkpointing=True, logger=False)
    trainer.fit(module, data.train_dataloader(), data.val_dataloader())
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        expected = last_logits(module.net.eval(), batch)
    weights = module.merged_weights()
    module.net.unload()  # adapters removed, weights untouched
    with with_weights(lm.net, weights):
        save_pruned(lm.net, tokenizer, tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True)
    assert not any("lora" in k for k in reloaded.state_dict())
    # W x + s·B(A x) against (W + s·BA) x: equal up to float32 rounding
    torch.testing.assert_close(last_logits(reloaded.eval(), batch), expected,
                               rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny64(make_tiny_llama):
    """A tiny Llama whose Linears bitsandbytes' CPU nf4 kernel accepts (sizes multiple of 64)."""
    return make_tiny_llama("tiny64", hidden_size=64, intermediate_size=128,
                           num_key_value_heads=4)


def test_qlora_trains_on_nf4_weights_and_merges_into_full_precision(tiny64, tokenizer, tmp_path):
    from bitsandbytes.nn import Linear4bit

    from sieve_pl.stages.recover import quantized_copy

    lm, data, pruner = prune(tiny64, tokenizer, lambda i, n: 0.5 if "mlp" in n else 1.0)
    before = _train_loss(lm, data)
    original = {k: v.clone() for k, v in lm.net.state_dict().items()}
    config = RecoverConfig(enabled=True, rank=4, alpha=8, lr=5e-3, epochs=3, patience=10,
                           quantize="nf4")
    result = recover(make_trainer(), lm.net, data.task, lora_targets(lm.net, lm.adapter.layers),
                     data.train_dataloader(), data.val_dataloader(), config, tmp_path)
    assert result["quantize"] == "nf4"
    # the adapters trained on 4-bit frozen weights: every dense decoder Linear was quantized
    frozen = quantized_copy(lm.net, "nf4", tmp_path / "base-nf4")
    kinds = {type(frozen.get_submodule(n)) for n in pruner.dense
             if n in {k for k, v in lm.net.named_modules() if isinstance(v, torch.nn.Linear)}}
    assert kinds == {Linear4bit}
    # the deltas land on the full-precision weights, which stay untouched themselves
    assert all(torch.equal(v, original[k]) for k, v in lm.net.state_dict().items())
    assert all(v.dtype == torch.float32 for v in result["weights"].values())
    with with_weights(lm.net, result["weights"]):
        after = _train_loss(lm, data)
    assert after < before


def test_kbit_preparation_upcasts_only_the_norms(tiny64):
    from sieve_pl.models.loading import load_model
    from sieve_pl.stages.recover import _prepare_for_kbit_training

    net, _ = load_model(tiny64, "bfloat16", quantize="nf4")
    _prepare_for_kbit_training(net, gradient_checkpointing=False)
    dtypes = {n: p.dtype for n, p in net.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "norm" in n)
    assert dtypes["model.embed_tokens.weight"] == torch.bfloat16
    assert all(p.__class__.__name__ == "Params4bit" for n, p in net.named_parameters()
               if n.endswith("proj.weight"))
