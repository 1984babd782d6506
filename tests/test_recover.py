"""LoRA recovery: it learns, resumes exactly, and merges into an export that reloads."""
from __future__ import annotations

from dataclasses import replace

import lightning as L
import pytest
import torch

from sieve_pl.errors import SieveError
from sieve_pl.models.hf import save_pruned
from sieve_pl.models.module import SieveLM
from sieve_pl.models.pruning import Pruner, with_weights
from sieve_pl.stages.calibrate import CalibrationConfig, calibrate
from sieve_pl.stages.project import ProjectionConfig, project
from sieve_pl.stages.recover import (RecoverConfig, Recovery, left_as_it_came, lora_targets,
                                     recover)
from sieve_pl.tasks import SplitSizes, TaskDataModule
from sieve_pl.models.forward import last_logits

CONFIG = RecoverConfig(enabled=True, objective="label", rank=4, alpha=8, lr=5e-3, epochs=3,
                       patience=10, steps=0)


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


def test_recovery_repeats_without_seeding_the_process_rng(pruned, tmp_path):
    """The adapters' initialisation and dropout draw from an RNG seeded with recover.seed
    inside the fit only: the same adapters whatever the process's RNG held, and the process's
    RNG is not left seeded (its state after still depends on its state before)."""
    lm, data = pruned
    weights, states = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        weights.append(_recover(lm, data, tmp_path / str(seed))["weights"])
        states.append(torch.random.get_rng_state())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(states[0], states[1])


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
    config = RecoverConfig(enabled=True, objective="label", rank=4, alpha=8, lr=5e-3, epochs=3,
                           patience=10, steps=0, quantize="nf4")
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


# --- distillation from the dense model ---------------------------------------------------------

DISTILL = RecoverConfig(enabled=True, rank=4, alpha=8, lr=5e-3, epochs=2, patience=10, steps=0,
                        batch_size=5, label_weight=0.5)


@pytest.fixture(scope="module")
def sharp_llama(make_tiny_llama):
    """A tiny Llama with larger random weights: its answers are far from uniform, so pruning
    moves them measurably."""
    return make_tiny_llama("sharp", initializer_range=0.2)


@pytest.fixture
def distilling(sharp_llama, tokenizer):
    """A pruned tiny Llama and the dense model's answer distributions on its pool."""
    from sieve_pl.models.module import outputs

    lm, data, pruner = prune(sharp_llama, tokenizer, lambda i, n: 0.3 if i % 2 else 1.0)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with pruner.at(1.0):
        teacher = outputs(trainer, lm.net, data.pool_loader(), data.task.teacher)
    return lm, data, pruner, teacher


def _pool_kl(lm, data, teacher) -> float:
    with torch.no_grad():
        losses = [float(lm.task.self_loss(lm.net, b, t)) for b, t in
                  zip(data.pool_loader(batch_size=len(teacher)), [teacher])]
    return losses[0]


def test_recovery_loader_gives_pool_batches_with_the_teachers_rows_and_labelled_ones(distilling):
    from sieve_pl.stages.recover import recovery_loader

    lm, data, _, teacher = distilling
    assert teacher.shape == (len(data.pool()), data.task.num_classes())  # 8 + 24 prompts
    loader = recovery_loader(data, DISTILL, teacher)
    batches = list(loader)
    pool = [b for b in batches if "teacher" in b]
    labelled = [b for b in batches if "teacher" not in b]
    assert len(pool) == 7 and len(labelled) == 5  # 32 pool prompts, 24 train examples, by 5
    assert all("labels" not in b for b in pool) and all("labels" in b for b in labelled)
    # the teacher rows belong to their prompts: the pool order, chunked
    rows = {tuple(b["input_ids"][0].tolist()): b["teacher"][0] for b in pool}
    for batch, expected in zip(data.pool_loader(batch_size=5), teacher.split(5)):
        assert torch.equal(rows[tuple(batch["input_ids"][0].tolist())], expected[0])
    # the batches' order is shuffled per epoch, the same after a resume
    order = [tuple(b["input_ids"][0].tolist()) for b in batches]
    loader.sampler.set_epoch(1)
    again = [tuple(b["input_ids"][0].tolist()) for b in loader]
    assert sorted(again) == sorted(order) and again != order
    assert recovery_loader(data, replace(DISTILL, label_weight=0), teacher).dataset.parts[-1][1] \
        is not None  # distillation only: no labelled batches


def test_distillation_brings_the_pruned_answers_towards_the_dense_ones(distilling, tmp_path):
    from sieve_pl.stages.recover import recovery_loader

    lm, data, _, teacher = distilling
    before = _pool_kl(lm, data, teacher)
    config = replace(DISTILL, label_weight=0)  # distillation only: nothing pulls elsewhere
    result = recover(make_trainer(), lm.net, data.task, lora_targets(lm.net, lm.adapter.layers),
                     recovery_loader(data, config, teacher), data.val_dataloader(), config,
                     tmp_path)
    with with_weights(lm.net, result["weights"]):
        after = _pool_kl(lm, data, teacher)
    assert before > 1e-3 and after < before / 2
    assert len(result["train_distill"]) == DISTILL.epochs and "train_label" not in result
    assert result["steps"] == DISTILL.epochs * 7


def test_steps_raise_the_epochs_and_early_stopping_waits_for_them(pruned, tmp_path):
    lm, data = pruned
    config = replace(CONFIG, epochs=1, steps=10, patience=0)
    result = recover(make_trainer(), lm.net, data.task, lora_targets(lm.net, lm.adapter.layers),
                     data.train_dataloader(), data.val_dataloader(), config, tmp_path)
    per_epoch = len(data.train_dataloader())  # 4 batches of 6
    # 3 epochs of 4 steps; or, when patience 0 stops it after epoch 2 (8 steps), Lightning
    # trains on to the 10 steps asked for and stops there
    assert per_epoch == 4 and result["steps"] in (10, 12) and len(result["val_acc"]) >= 2


def test_distillation_resumes_from_last_ckpt_exactly(distilling, tmp_path):
    from sieve_pl.stages.recover import recovery_loader

    lm, data, _, teacher = distilling
    targets = lora_targets(lm.net, lm.adapter.layers)

    def run(work, *callbacks):
        return recover(make_trainer(*callbacks), lm.net, data.task, targets,
                       recovery_loader(data, DISTILL, teacher), data.val_dataloader(), DISTILL,
                       work)

    full = run(tmp_path / "a")
    assert len(full["train_distill"]) == len(full["train_label"]) == DISTILL.epochs
    assert full["steps"] == DISTILL.epochs * 12
    with pytest.raises(Killed):  # dies in the middle of the second epoch
        run(tmp_path / "b", KillAt(12 + 3))
    resumed = run(tmp_path / "b")
    for key, value in full["weights"].items():
        torch.testing.assert_close(resumed["weights"][key], value, rtol=0, atol=0)


def test_dense_answers_are_computed_once_and_read_back(distilling, tmp_path, monkeypatch):
    from sieve_pl.stages import recover as stage
    from sieve_pl.stages.stage import Context

    lm, data, pruner, teacher = distilling
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    ctx = Context(trainer, lm, data, make_trainer(), tmp_path)
    first = stage.dense_answers(ctx, pruner, tmp_path)
    assert torch.equal(first, teacher) and (tmp_path / "teacher.safetensors").exists()
    monkeypatch.setattr(stage, "outputs", lambda *a, **k: pytest.fail("computed again"))
    assert torch.equal(stage.dense_answers(ctx, pruner, tmp_path), teacher)


def test_lora_is_exported_on_confirmation_when_there_is_one():
    from sieve_pl.stages.stage import Recovered

    weights = {"w": torch.zeros(1)}
    confirmed = {"confirmation_before": 0.80, "confirmation_after": 0.79}
    assert not Recovered(weights, 0.9, None, confirmed).keeps(0.7)  # validation rose: no
    assert Recovered(weights, 0.6, None, {**confirmed, "confirmation_after": 0.8}).keeps(0.7)
    assert Recovered(weights, 0.7, None, {}).keeps(0.7)  # no confirmation: validation decides
    assert not Recovered(weights, 0.69, None, {}).keeps(0.7)
    assert not Recovered({}, 0.9, None, {}).keeps(0.7)


@pytest.mark.parametrize("kwargs,check,message", [
    ({"steps": -1}, {}, "recover needs steps >= 0"),
    ({"batch_size": -1}, {}, "batch_size >= 0"),
    ({"label_weight": -0.5}, {}, "label_weight >= 0"),
    ({"objective": "kl"}, {}, "recover.objective must be distill or label"),
    ({"enabled": True}, {"train_examples": 0}, r"set data.sizes.train > 0 \(or recover.label"),
    ({"enabled": True, "objective": "label"}, {"train_examples": 0}, "data.sizes.train > 0$"),
    ({"enabled": True}, {"pool_prompts": 0}, "data.pool is empty"),
])
def test_config_errors(kwargs, check, message):
    with pytest.raises(SieveError, match=message):
        RecoverConfig(**kwargs).check(**check)
    RecoverConfig(enabled=True, label_weight=0).check(train_examples=0, pool_prompts=5)
