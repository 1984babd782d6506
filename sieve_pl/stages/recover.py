"""Recovery: LoRA (peft) on the pruned model, a normal Lightning ``fit``.

The objective (``objective: distill``, the default) is distillation from the dense model:
KL(dense ‖ pruned) over the task's answers (the label words, the options; for generation the
cross-entropy of the dense model's own greedy answer, sequence-level distillation) on every
prompt of the unlabeled pool (``data.pool``: calibration and train prompts, sister datasets),
plus ``label_weight`` × the task loss on the labelled train split. What the pruned model has to
recover is the dense model's behaviour, which thousands of unlabeled prompts describe; the few
labels alone pull it towards the train split. The dense model's answers are computed once,
before training, and kept in the stage's work folder (no second model is held; a resumed run
reads them back). Each training batch is either pool prompts with those answers or labelled
train examples, the batches in a seeded order per epoch; ``steps`` sets the fewest optimizer
steps (the epochs are raised to reach them, and early stopping waits for them).

Every Linear of the decoder is a LoRA target: the untouched dense ones and the two children
(``A``, ``B``) of each factored matrix. After training, the best epoch's adapters (by validation
accuracy: model selection may read validation) are merged back, so the model keeps its structure
and the export needs no peft. Checkpoints hold only the adapter weights; ``last.ckpt`` resumes a
killed run. Whether the export uses them is decided on the confirmation split when there is one
(``Recovered.keeps``): the pruned model with and without LoRA are both scored on it here.

QLoRA (``quantize: nf4`` or ``int8``): the adapters train on a copy of the pruned model whose frozen
weights bitsandbytes quantized at load time (factored children included), prepared by peft's
``prepare_model_for_kbit_training``; the learned deltas are then merged into the full-precision
weights, like plain LoRA.
"""
from __future__ import annotations

import gc
import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.callbacks import EarlyStopping
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from ..errors import SieveError
from ..models.placement import is_split
from ..io import PeakMemory, atomic, crash_point, resumable
from ..models.module import evaluate, outputs
from ..training import Checkpointed, logged, resume_fit, seeded, trainer_for
from .fitness import Fitness
from .stage import Context, Recovered, Stage, lora_gate, settings


@dataclass
class RecoverConfig:
    """LoRA recovery after pruning: distillation from the dense model on the unlabeled pool
    (``data.pool``) plus the task loss on the train split (``data.sizes.train``).

    Args:
        enabled: train LoRA adapters on the pruned model and merge them before export (only if
            they raise confirmation accuracy by ``keep_z`` standard errors; without a
            confirmation split, if they do not lower validation accuracy).
        objective: ``distill``: KL(dense ‖ pruned) over the task's answer distribution
            (classification: the label words; multiple choice: the options; generation: the
            cross-entropy of the dense model's own greedy answer tokens) on every data.pool
            prompt, plus label_weight × the task loss on the train split; ``label``: the task
            loss (cross-entropy of the answer tokens) on the train split only.
        label_weight: weight of the task loss on the train split's labels in the ``distill``
            objective (0: distillation only, and no train split is needed).
        rank: LoRA rank r.
        alpha: LoRA alpha (the adapter is scaled by alpha / r).
        dropout: LoRA dropout.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        epochs: most training epochs (raised to reach ``steps``).
        steps: fewest optimizer steps: enough to leave the first transient of training; the
            epochs are raised to reach them and early stopping waits for them. 0 = epochs only.
        batch_size: examples per optimizer step (0 = data.batch_size): smaller batches give
            more steps for the same passes over the data.
        patience: stop after this many epochs without a better validation accuracy.
        compare_dense: also train the dense model with the same recovery (objective, budget
            and steps; distilled from itself, its KL starts at zero and anchors it to its own
            answers), the baseline a recovered pruned model has to be measured against.
        seed: seed of the shuffling and of the dropout masks.
        quantize: QLoRA: train the adapters on the pruned model loaded through bitsandbytes
            (nf4 or int8 frozen weights) to cut training memory; none trains on the weights as
            they are.
        gradient_checkpointing: recompute activations in the backward pass (less memory, about
            one more forward of time).
        keep_z: the export uses LoRA only where its gain on the confirmation split, paired
            example by example with the pruned model's answers, is at least keep_z standard
            errors (``keep_z·sqrt(changed answers)``): recovery fits the task's own examples,
            and a gain within the noise can hide a loss on the task's other data. 0: where
            it does not lower confirmation accuracy. Read by the confirm stage only.
    """

    enabled: bool = False
    objective: Literal["distill", "label"] = "distill"
    label_weight: float = 1.0
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    lr: float = 2e-4
    weight_decay: float = 0.0
    epochs: int = 2
    steps: int = 100
    batch_size: int = 0
    patience: int = 1
    compare_dense: bool = True
    seed: int = 0
    quantize: Literal["none", "nf4", "int8"] = "none"
    gradient_checkpointing: bool = False
    keep_z: float = 1.0

    def __post_init__(self) -> None:
        self.check()  # a bad value fails where the config is built (parsing), not mid-run

    @property
    def uses_labels(self) -> bool:
        return self.objective == "label" or self.label_weight > 0

    def check(self, train_examples: int | None = None, pool_prompts: int | None = None) -> None:
        """Own values; with ``train_examples`` / ``pool_prompts`` (known once the data is),
        that the objective has something to train on."""
        if self.objective not in ("distill", "label"):
            raise SieveError(f"recover.objective must be distill or label, got "
                             f"{self.objective!r}")
        if self.rank < 1 or self.epochs < 1 or self.lr <= 0:
            raise SieveError("recover needs rank >= 1, epochs >= 1 and lr > 0")
        if self.keep_z < 0:
            raise SieveError(f"recover.keep_z must be >= 0, got {self.keep_z}")
        if self.steps < 0 or self.batch_size < 0 or self.label_weight < 0:
            raise SieveError(f"recover needs steps >= 0, batch_size >= 0 and label_weight >= 0, "
                             f"got {self.steps}, {self.batch_size}, {self.label_weight}")
        if not self.enabled:
            return
        if self.uses_labels and train_examples is not None and train_examples < 1:
            raise SieveError("recover.enabled needs training examples: set data.sizes.train > 0"
                             + (" (or recover.label_weight 0)" if self.objective == "distill"
                                else ""))
        if self.objective == "distill" and pool_prompts is not None and pool_prompts < 1:
            raise SieveError("recover.objective distill needs unlabeled prompts: data.pool is "
                             "empty")


def lora_targets(net: nn.Module, layers: str) -> list[str]:
    """Full names of every nn.Linear inside the decoder layers (factored children included).

    GPT-2's dense matrices are transformers Conv1Ds, which peft also adapts (transposed).
    """
    from transformers.pytorch_utils import Conv1D

    return [name for name, module in net.named_modules()
            if name.startswith(layers + ".") and isinstance(module, (nn.Linear, Conv1D))]


def recovery_loader(data, config: RecoverConfig, teacher: torch.Tensor | None) -> DataLoader:
    """The training batches (``TaskDataModule.training_loader``): the pool's prompts with the
    dense model's ``teacher`` rows when distilling, the train split's labelled examples when
    the task loss counts; their order shuffled per epoch with ``recover.seed``."""
    return data.training_loader(teacher, config.batch_size or data.batch_size,
                                config.uses_labels, config.seed)


class Recovery(Checkpointed):
    """LoRA fine-tuning: distillation on batches that carry the dense model's answers
    (``teacher``), the task loss on labelled ones; validation accuracy drives checkpoints and
    stopping."""

    monitor = ("val_acc", "max")

    def __init__(self, net: nn.Module, task, targets: list[str], config: RecoverConfig,
                 checkpoints: Path):
        super().__init__(checkpoints)
        from peft import LoraConfig, get_peft_model

        self.config, self.task = config, task
        for p in net.parameters():
            p.requires_grad_(False)
        if getattr(net, "hf_quantizer", None) is not None:
            _prepare_for_kbit_training(net, config.gradient_checkpointing)
        elif config.gradient_checkpointing:  # (peft's preparation turns it on for k-bit only)
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with seeded(config.seed):  # the adapters' initialisation
            self.net = get_peft_model(net, LoraConfig(
                r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                target_modules=targets, bias="none"))
        self._epoch_rng = ExitStack()  # an epoch's dropout draws (see on_train_epoch_start)
        self.net.train()  # the pruning stages left the model in eval mode (dropout off)
        self.accuracy = MeanMetric()  # the task's primary metric, logged as val_acc

    def training_step(self, batch, batch_idx):
        size = len(batch["input_ids"])
        if "teacher" in batch:
            loss = self.task.self_loss(self.net, batch, batch["teacher"])
            self.log("train_distill", loss, on_step=False, on_epoch=True, batch_size=size)
        else:
            loss = self.task.loss(self.net, batch)
            self.log("train_label", loss, on_step=False, on_epoch=True, batch_size=size)
            loss = loss * (self.config.label_weight if self.config.objective == "distill"
                           else 1.0)
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True,
                 batch_size=size)
        return loss

    def validation_step(self, batch, batch_idx):
        self.accuracy.update(self.task.score(self.net, batch))
        self.log("val_acc", self.accuracy, prog_bar=True, on_epoch=True,
                 batch_size=len(batch["input_ids"]))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        crash_point("recover:step")

    def on_train_epoch_start(self) -> None:
        # dropout draws from an RNG seeded per epoch (the same after a resume), inside this
        # epoch only: the process's RNG is put back when the epoch ends
        self._epoch_rng.close()
        self._epoch_rng.enter_context(seeded(self.config.seed + self.current_epoch))

    def on_train_epoch_end(self) -> None:
        self._epoch_rng.close()

    def on_fit_end(self) -> None:
        self._epoch_rng.close()

    def on_exception(self, exception: BaseException) -> None:
        self._epoch_rng.close()

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad],
                                 lr=self.config.lr, weight_decay=self.config.weight_decay)

    def configure_callbacks(self):
        return [*super().configure_callbacks(),
                EarlyStopping(monitor="val_acc", mode="max", patience=self.config.patience)]

    def saves(self, key: str) -> bool:
        return "lora_" in key  # the adapters

    def merged_weights(self, into: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The best epoch's adapters merged into copies of the target weights.

        The model's own weights are not touched (``recover`` then removes the adapters), so the
        dense weights it shares with the pruner stay the original ones. ``into``: the
        full-precision model whose weights receive the deltas (QLoRA trains a quantized copy).
        """
        self.load_best()
        model = self.net.base_model.model
        params = dict(into.named_parameters()) if into is not None else {}
        merged = {}
        for name, layer in model.named_modules():
            if hasattr(layer, "get_delta_weight") and hasattr(layer, "get_base_layer"):
                weight = (params[f"{name}.weight"] if params
                          else layer.get_base_layer().weight).detach()
                delta = layer.get_delta_weight("default").to(weight.device, weight.dtype)
                merged[f"{name}.weight"] = (weight + delta).cpu()
        return merged


def _prepare_for_kbit_training(net: nn.Module, gradient_checkpointing: bool) -> None:
    """peft's preparation (input gradients, optional checkpointing), keeping weight dtypes.

    ``prepare_model_for_kbit_training`` casts every unquantized half-precision weight to fp32;
    only the norms need that for stable gradients, so the others (embeddings, factored children
    that stayed unquantized) go back to their dtype instead of doubling their memory.
    """
    from peft import prepare_model_for_kbit_training

    dtypes = {id(p): p.dtype for p in net.parameters()}
    prepare_model_for_kbit_training(net, use_gradient_checkpointing=gradient_checkpointing)
    for module in net.modules():
        if "norm" not in type(module).__name__.lower():
            for p in module.parameters(recurse=False):
                p.data = p.data.to(dtypes[id(p)])


def quantized_copy(net: nn.Module, fmt: str, folder: Path) -> nn.Module:
    """``net`` saved once under ``folder`` and reloaded through bitsandbytes (for QLoRA).

    The reload goes through the same ``from_pretrained`` path as a deployed quantized export, so
    the factored children are quantized exactly as they will be at inference.
    """
    from ..models.hf import save_pruned
    from ..models.loading import load_model

    folder = Path(folder)
    if not (folder / "config.json").exists():  # written whole or not at all
        with atomic(folder) as tmp:
            save_pruned(net, None, tmp)
    dtype = str(next(net.parameters()).dtype).removeprefix("torch.")
    quantized, _ = load_model(str(folder), dtype, quantize=fmt)
    return quantized


@contextmanager
def left_as_it_came(net: nn.Module):
    """Put back what training changes on ``net``: which weights take gradients, train / eval
    modes, weight dtypes (norms upcast for training) and the device (QLoRA parks ``net`` on the
    CPU; Lightning's teardown moves a trained model there). Later stages expect the model as
    they left it."""
    params = list(net.parameters())
    before = [(p, p.requires_grad, p.dtype) for p in params]
    modes = [(m, m.training) for m in net.modules()]
    device = params[0].device if params else None
    checkpointing = getattr(net, "is_gradient_checkpointing", False)
    try:
        yield net
    finally:
        if getattr(net, "is_gradient_checkpointing", False) and not checkpointing:
            net.gradient_checkpointing_disable()
        for p, flag, dtype in before:
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
            p.requires_grad_(flag)
        for module, training in modes:  # (parents first: a child's own mode is set last)
            module.train(training)
        if (device is not None and not is_split(net)
                and next(net.parameters()).device != device):
            gc.collect()  # free a QLoRA copy and the trainer's cycles before moving back
            net.to(device)


def recover(make_trainer, net: nn.Module, task, targets: list[str], train_loader, val_loader,
            config: RecoverConfig, work: Path) -> dict:
    """Train LoRA on ``net``; returns the merged target weights (``net`` is left as it came).

    With ``config.quantize`` the adapters train on a bitsandbytes copy of ``net`` (QLoRA) and
    ``net`` waits on the CPU; the deltas are merged into ``net``'s own weights.
    """
    with left_as_it_came(net):
        return _recover(make_trainer, net, task, targets, train_loader, val_loader, config, work)


def _recover(make_trainer, net: nn.Module, task, targets: list[str], train_loader, val_loader,
             config: RecoverConfig, work: Path) -> dict:
    work = Path(work)
    trained = net
    if config.quantize != "none":
        net.to("cpu")
        trained = quantized_copy(net, config.quantize, work / f"base-{config.quantize}")
    module = Recovery(trained, task, targets, config, work)
    trainer = trainer_for(make_trainer, work, max_epochs=config.epochs,
                          min_steps=config.steps or None)
    per_epoch = math.ceil(len(train_loader) / trainer.world_size)  # each rank's share
    trainer.fit_loop.max_epochs = max(config.epochs, math.ceil(config.steps / max(per_epoch, 1)))
    try:
        with PeakMemory(trainer.strategy.root_device) as peak:
            resume_fit(trainer, module, train_loader, val_loader)
        weights = module.merged_weights(into=None if trained is net else net)
    finally:
        module.net.unload()  # the model leaves as it came, even when training fails
    history = logged(work, "val_acc")
    return {"weights": weights, "val_acc": history,
            "best_val_acc": max(history) if history else None, "epochs": trainer.current_epoch,
            "steps": trainer.global_step, "train_loss": logged(work, "train_loss"),
            **{key: logged(work, key) for key in ("train_distill", "train_label")
               if logged(work, key)},
            "quantize": config.quantize, "peak_memory_mb": peak.mb}


def dense_answers(ctx: Context, pruner, work: Path) -> torch.Tensor:
    """The dense model's ``task.teacher`` outputs on every pool prompt (pool order), computed
    once and kept in ``work/teacher.safetensors`` (a resumed run, and the dense comparison,
    read them back)."""
    path = Path(work) / "teacher.safetensors"
    saved = resumable(path, lambda file: load_file(str(file))["teacher"],
                      "computing the dense model's answers again")
    if saved is not None:
        return saved
    with pruner.at(1.0):
        teacher = outputs(ctx.trainer, ctx.lm.net, ctx.data.pool_loader(), ctx.data.task.teacher)
    if ctx.trainer.is_global_zero:  # (every rank computed the same rows)
        with atomic(path) as tmp:
            save_file({"teacher": teacher.contiguous()}, str(tmp))
    return teacher


class Recover(Stage):
    """LoRA on the pruned model and, with ``compare_dense``, the same recovery on the dense one
    (the fair baseline: what the pruning costs once both are fine-tuned). With a confirmation
    split, both the pruned model and the pruned model + LoRA are scored on it: the export keeps
    LoRA only where it raises that accuracy beyond the noise (``confirm.lora_gate``)."""

    name = "recover"
    format = 2  # 2: confirmation scored per example (the paired evidence of the LoRA gate)

    def __init__(self, ctx: Context, pruner, levels: dict, config: RecoverConfig):
        self.ctx, self.pruner, self.levels, self.config = ctx, pruner, levels, config

    def fingerprint(self) -> dict:
        data = self.ctx.data
        read = data.fingerprint_config("confirmation" if data.sizes.confirmation else "train")
        if self.config.objective == "distill":
            read = {**read, "pool": data.pool_fingerprint()}
        recorded = settings(self.config, read)
        recorded.pop("keep_z", None)  # the confirm stage's decision, not training's
        return recorded

    def _train(self, work: Path, teacher: torch.Tensor | None) -> dict:
        lm, data = self.ctx.lm, self.ctx.data
        return recover(self.ctx.make_trainer, lm.net, data.task,
                       lora_targets(lm.net, lm.adapter.layers),
                       recovery_loader(data, self.config, teacher), data.val_dataloader(),
                       self.config, work)

    def _scores(self, row: str, splits: tuple[str, ...]) -> dict[str, float]:
        """The model as it is now, on these splits (the empty ones skipped)."""
        data = self.ctx.data
        return {split: evaluate(self.ctx.trainer, self.ctx.lm, data.loader(split),
                                f"evaluate {row}/{split}")
                for split in splits if len(data.splits[split])}

    def _confirmation_evidence(self, weights: dict) -> dict:
        """The export decision's evidence, on a split no selection has read: the pruned model's
        confirmation scores without and with LoRA, paired example by example."""
        check = Fitness(self.ctx.trainer, self.ctx.lm, self.pruner,
                        self.ctx.data.confirmation_dataloader())
        with self.pruner.at(self.levels):
            plain = check.correct(self.levels, label="evaluate pruned/confirmation")
            check.weights = weights
            lora = check.correct(self.levels, label="evaluate pruned+lora/confirmation")
        paired = lora_gate(plain, lora, 0.0)
        return {"confirmation_before": sum(plain) / len(plain),
                "confirmation_after": sum(lora) / len(lora),
                "confirmation_changed": paired["changed"], "confirmation_examples": len(plain)}

    def run(self, work: Path) -> Recovered:
        if not self.config.enabled:
            return Recovered()
        teacher = (dense_answers(self.ctx, self.pruner, work)
                   if self.config.objective == "distill" else None)
        with self.pruner.at(self.levels):
            result = self._train(work / "pruned", teacher)
        weights = result.pop("weights")
        if len(self.ctx.data.splits["confirmation"]):
            result.update(self._confirmation_evidence(weights))
        dense = None
        if self.config.compare_dense:
            with self.pruner.at(1.0):
                dense = self._train(work / "dense", teacher)
            with self.pruner.at(1.0, dense.pop("weights")):
                dense.update(self._scores("dense+lora", ("validation", "test", "confirmation")))
        return Recovered(weights, result.pop("best_val_acc"), dense, result)

    def save(self, result: Recovered, folder: Path) -> None:
        result.save(folder)

    def load(self, folder: Path) -> Recovered:
        return Recovered.load(folder)
