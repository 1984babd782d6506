"""Task-level distillation of the factored weights (after the search, before recovery).

The projections minimise each matrix's own output error, but inside the pruned model those errors
add up through the layers, and what the task needs is the model's answer, not any one matrix's
output. This stage trains only the factored ``A`` / ``B`` weights of the pruned model (no new
parameters; dense matrices, norms and embeddings stay frozen) so that its next-token distribution
at the answer positions matches the original dense model's:

    KL(p_dense(· / T) ‖ p_pruned(· / T)) · T²   over the whole vocabulary

on the prompts of the calibration and train splits; validation KL picks the best epoch.

The answer positions are the last prompt position (where classification and multiple choice read
their answer) and, for batches that carry their reference answer (``answer_mask``: generation),
every position that predicts an answer token, teacher-forced on the reference.

The teacher is the same model with its dense matrices put back: the pruner keeps the dense
Linears anyway, so each step has it swap them in (``Pruner.swapped``) for one no-grad forward and
the factored ones back for the student's. No second model is held and nothing is cached, the KL
is over the full vocabulary (no top-k truncation), and a resumed or DDP run needs no teacher
state; the price is one extra forward per step (about a third more compute than the student's
forward and backward).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from ..errors import SieveError
from ..models.factored import FactoredLinear
from ..models.forward import last_logits
from ..tasks.datamodule import EpochShuffle
from ..training import Checkpointed, frozen_except, logged, resume_fit, trainer_for
from .stage import CompensationStage, settings


@dataclass
class DistillConfig:
    """Distillation of the pruned model's factored weights towards the dense model.

    Args:
        enabled: train the factored A/B weights at the chosen levels so the pruned model's
            answer distribution matches the dense model's (kept only if validation accuracy
            does not drop).
        splits: splits whose prompts are distilled (the validation split picks the best epoch).
        lr: Adam learning rate.
        epochs: training epochs.
        temperature: softmax temperature of teacher and student (the loss is scaled by T²).
    """

    enabled: bool = False
    splits: list[Literal["calibration", "train"]] = field(
        default_factory=lambda: ["calibration", "train"])
    lr: float = 1e-4
    epochs: int = 3
    temperature: float = 1.0

    def __post_init__(self) -> None:
        self.check()  # a bad value fails where the config is built (parsing), not mid-run

    def check(self, sizes=None) -> None:
        """Own values; with the data's ``sizes``, fail before any weight loads if there is
        nothing to train on."""
        if self.enabled and sizes is not None and sum(getattr(sizes, s) for s in self.splits) < 1:
            raise SieveError(f"distill.enabled needs examples in {self.splits}")
        if self.epochs < 1 or self.lr <= 0 or self.temperature <= 0:
            raise SieveError("distill needs epochs >= 1, lr > 0 and temperature > 0")


def distill_loader(data, splits: list[str]) -> DataLoader:
    """The examples of these splits in one loader, shuffled per epoch (same order on resume)."""
    loaders = [data.loader(s) for s in splits if len(data.splits[s])]
    dataset = ConcatDataset([loader.dataset for loader in loaders])
    return DataLoader(dataset, batch_size=data.batch_size, collate_fn=loaders[0].collate_fn,
                      sampler=EpochShuffle(len(dataset), data.seed))


def answer_logits(model, batch: dict) -> torch.Tensor:
    """Next-token logits at the answer positions (positions × vocabulary)."""
    if "answer_mask" not in batch:
        return last_logits(model, batch)
    mask = batch["answer_mask"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=mask.shape[1] + 1,
                use_cache=False)
    return out.logits[:, :-1][mask.bool()]  # position t predicts token t + 1


def kl_to_teacher(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    """Mean over positions of ``KL(teacher ‖ student)`` at a temperature, times T²."""
    t = temperature
    return F.kl_div((student.float() / t).log_softmax(-1), (teacher.float() / t).log_softmax(-1),
                    log_target=True, reduction="batchmean") * t * t


class Distillation(Checkpointed):
    """The pruned model learns the dense model's answers; only factored A/B weights train."""

    monitor = ("val_kl", "min")

    def __init__(self, net: nn.Module, pruner, config: DistillConfig, checkpoints: Path):
        super().__init__(checkpoints)
        self.net, self.pruner, self.config = net, pruner, config
        dense = pruner.dense
        self.factored = {name: net.get_submodule(name) for name in dense
                         if isinstance(net.get_submodule(name), FactoredLinear)}
        self.dense = {name: dense[name] for name in self.factored}  # not submodules: not saved
        self.trainable = [f"net.{name}.{part}.weight" for name in self.factored for part in "AB"]

    def _kl(self, batch) -> tuple[torch.Tensor, int]:
        with torch.no_grad(), self.pruner.swapped(self.dense):  # the teacher: dense matrices
            teacher = answer_logits(self.net, batch)
        student = answer_logits(self.net, batch)
        return kl_to_teacher(student, teacher, self.config.temperature), len(teacher)

    def on_fit_start(self) -> None:
        for module in self.dense.values():
            module.to(self.device)

    def on_train_epoch_start(self) -> None:
        self.net.eval()  # teacher and student without dropout: the deployed behaviour

    def training_step(self, batch, batch_idx):
        loss, positions = self._kl(batch)
        self.log("train_kl", loss, prog_bar=True, on_step=False, on_epoch=True,
                 batch_size=positions)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, positions = self._kl(batch)
        self.log("val_kl", loss, prog_bar=True, on_epoch=True, batch_size=positions)

    def configure_optimizers(self):
        params = dict(self.named_parameters())
        return torch.optim.Adam([params[k] for k in self.trainable], lr=self.config.lr)

    def saves(self, key: str) -> bool:
        return key in self.trainable  # the factored weights

    def best_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The best epoch's ``(A, B)`` of every factored matrix (loaded into the model too)."""
        self.load_best()
        return {name: (m.A.weight.detach().cpu().clone(), m.B.weight.detach().cpu().clone())
                for name, m in self.factored.items()}


def distill(make_trainer, net: nn.Module, pruner, levels: dict[str, float], train_loader,
            val_loader, config: DistillConfig, work: Path) -> dict:
    """Distil the factored weights at ``levels``; returns ``{"factors": {name: (A, B)}, ...}``.

    The factors have the shape of ``refit``'s (for ``pruner.use``). The model must be at
    ``levels`` (``with pruner.at(levels)``); its factored modules are trained in place, its
    dense weights (and the pruner's) are untouched. ``last.ckpt`` in ``work`` resumes a killed run.
    """
    work = Path(work)
    pruner.require(levels, "distill")
    module = Distillation(net, pruner, config, work)
    if not module.factored:
        return {"factors": {}, "val_kl": [], "train_kl": [], "epochs": 0}
    trainer = trainer_for(make_trainer, work, max_epochs=config.epochs)
    params = dict(module.named_parameters())
    with frozen_except(net, [params[k] for k in module.trainable]):
        resume_fit(trainer, module, train_loader, val_loader)
    factors = module.best_factors()
    history = logged(work, "val_kl")
    return {"factors": factors, "val_kl": history, "best_val_kl": min(history, default=None),
            "train_kl": logged(work, "train_kl"), "epochs": trainer.current_epoch}


class Distill(CompensationStage):
    """Distillation of the kept factors towards the dense model, kept if validation does not
    fall below the accuracy it starts from."""

    name = "distill"

    def fingerprint(self) -> dict:
        return settings(self.config, self.ctx.data.fingerprint_config("train"))

    def fit(self, work: Path) -> tuple[dict, dict]:
        ctx = self.ctx
        result = distill(ctx.make_trainer, ctx.lm.net, self.pruner, self.levels,
                         distill_loader(ctx.data, self.config.splits), ctx.data.val_dataloader(),
                         self.config, work)
        return result.pop("factors"), result
