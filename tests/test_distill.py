"""Distillation of the factored weights: KL to the dense model drops, only A/B change, resume."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from sieve_pl.models.module import SieveLM
from sieve_pl.models.pruning import Pruner
from sieve_pl.stages.calibrate import CalibrationConfig, calibrate
from sieve_pl.stages.distill import (DistillConfig, answer_logits, distill, distill_loader,
                                     kl_to_teacher)
from sieve_pl.stages.project import ProjectionConfig, project
from sieve_pl.tasks import SplitSizes, TaskDataModule

CONFIG = DistillConfig(enabled=True, lr=3e-3, epochs=3)


@pytest.fixture
def pruned(tiny_llama, tokenizer):
    data = TaskDataModule(sizes=SplitSizes(calibration=8, validation=8, test=4, train=12),
                          batch_size=5)
    data.prepare(tokenizer)
    lm = SieveLM(tiny_llama)
    lm.load()
    groups = lm.adapter.input_groups(lm.net)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    stats = calibrate(trainer, lm.net, groups, data.calibration_dataloader(), CalibrationConfig())
    pruner = Pruner(lm.net, project(lm.net, groups, stats, ProjectionConfig()))
    levels = {n: (0.4 if i % 3 else 1.0) for i, n in enumerate(pruner.dense)}
    return lm.net, pruner, levels, data


def make_trainer(*callbacks):
    def make(**kwargs):
        return L.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=list(callbacks), **kwargs)
    return make


def _distill(pruned, work, *callbacks):
    net, pruner, levels, data = pruned
    pruner.apply(levels, rebuild=True)  # fresh modules from the bases; they stay, trained
    return distill(make_trainer(*callbacks), net, pruner, levels,
                   distill_loader(data, CONFIG.splits), data.val_dataloader(), CONFIG, work)


@torch.no_grad()
def _kl(pruned, factors: dict) -> float:
    """Mean KL of the pruned model (with these factors) to the dense one on the distilled data."""
    net, pruner, levels, data = pruned
    saved = pruner.refitted
    pruner.refitted = factors
    try:
        kls = []
        for batch in distill_loader(data, CONFIG.splits):
            pruner.apply(1.0)
            teacher = answer_logits(net, batch)
            pruner.apply(levels)
            kls.append(float(kl_to_teacher(answer_logits(net, batch), teacher, 1.0)))
    finally:
        pruner.refitted = saved
    return sum(kls) / len(kls)


def test_kl_drops_and_only_factored_weights_change(pruned, tmp_path):
    net, pruner, levels, data = pruned
    before = _kl(pruned, {})
    pruner.apply(levels)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    dense = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in pruner.dense.items()}
    result = _distill(pruned, tmp_path)
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, state[k])}
    assert changed and all(k.endswith((".A.weight", ".B.weight")) for k in changed)
    assert all(torch.equal(v, dense[n][k])
               for n, m in pruner.dense.items() for k, v in m.state_dict().items())
    assert all(p.requires_grad for p in net.parameters())  # flags restored
    ranks = pruner.sizes(levels)
    assert result["factors"].keys() == ranks.keys()
    assert all(a.shape[0] == ranks[n] for n, (a, _) in result["factors"].items())
    after = _kl(pruned, result["factors"])
    print(f"KL to the dense model on the distilled prompts: {before:.4g} -> {after:.4g}")
    assert after < 0.7 * before
    assert len(result["val_kl"]) == CONFIG.epochs
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert ckpt and all(k.endswith((".A.weight", ".B.weight")) for k in ckpt)


class Killed(Exception):
    pass


class KillAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            raise Killed


def test_resume_from_last_ckpt_equals_uninterrupted(pruned, tmp_path):
    full = _distill(pruned, tmp_path / "a")
    steps_per_epoch = len(distill_loader(pruned[3], CONFIG.splits))
    with pytest.raises(Killed):  # dies in the middle of the second epoch
        _distill(pruned, tmp_path / "b", KillAt(steps_per_epoch + 1))
    resumed = _distill(pruned, tmp_path / "b")
    assert resumed["val_kl"] == pytest.approx(full["val_kl"], rel=0, abs=0)
    for name, (a, b) in full["factors"].items():
        torch.testing.assert_close(resumed["factors"][name][0], a, rtol=0, atol=0)
        torch.testing.assert_close(resumed["factors"][name][1], b, rtol=0, atol=0)


def test_answer_positions_of_batches_with_reference_answers(tiny_llama, tokenizer):
    """Generation batches: every position that predicts an answer token, the first of them the
    prompt's last position."""
    from transformers import AutoModelForCausalLM

    from sieve_pl.models.forward import last_logits
    from sieve_pl.tasks.base import encode_prompts, pad_tokens, prompt_part, with_answers

    net = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompts = encode_prompts(tokenizer, ["Question: a?", "A longer question: b c d?"], 64)
    batch = with_answers(prompts, *pad_tokens([[11, 12, 13], [14]], tokenizer.pad_token_id))
    with torch.no_grad():
        logits = answer_logits(net, batch)
        first = last_logits(net, prompt_part(batch))
    assert logits.shape[0] == 4
    torch.testing.assert_close(logits[[0, 3]], first, rtol=1e-4, atol=1e-5)


def test_config_check():
    from sieve_pl.errors import SieveError

    with pytest.raises(SieveError, match="distill"):
        DistillConfig(enabled=True, splits=["train"]).check(SplitSizes(train=0))
    DistillConfig(enabled=True, splits=["calibration"]).check(SplitSizes(train=0))
