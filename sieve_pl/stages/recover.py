"""Recovery: LoRA (peft) on the pruned model with the task loss, a normal Lightning ``fit``.

Every Linear of the decoder is a LoRA target: the untouched dense ones and the two children
(``A``, ``B``) of each factored matrix. After training, the best epoch's adapters (by validation
accuracy) are merged back, so the model keeps its structure and the export needs no peft.
Checkpoints hold only the adapter weights; ``last.ckpt`` resumes a killed run.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ..errors import SieveError


@dataclass
class RecoverConfig:
    """LoRA recovery after pruning, trained on the train split (``data.sizes.train``).

    Args:
        enabled: train LoRA adapters on the pruned model and merge them before export.
        rank: LoRA rank r.
        alpha: LoRA alpha (the adapter is scaled by alpha / r).
        dropout: LoRA dropout.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        epochs: most training epochs.
        patience: stop after this many epochs without a better validation accuracy.
        compare_dense: also train the dense model with the same LoRA budget and steps, the
            baseline a recovered pruned model has to be measured against.
        seed: seed of the shuffling and of the dropout masks.
    """

    enabled: bool = False
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    lr: float = 2e-4
    weight_decay: float = 0.0
    epochs: int = 2
    patience: int = 1
    compare_dense: bool = True
    seed: int = 0

    def check(self, train_examples: int) -> None:
        if self.enabled and train_examples < 1:
            raise SieveError("recover.enabled needs training examples: set data.sizes.train > 0")
        if self.rank < 1 or self.epochs < 1 or self.lr <= 0:
            raise SieveError("recover needs rank >= 1, epochs >= 1 and lr > 0")


def lora_targets(net: nn.Module, layers: str) -> list[str]:
    """Full names of every nn.Linear inside the decoder layers (factored children included)."""
    return [name for name, module in net.named_modules()
            if name.startswith(layers + ".") and isinstance(module, nn.Linear)]


class Recovery(L.LightningModule):
    """LoRA fine-tuning on the task loss; validation accuracy drives checkpoints and stopping."""

    def __init__(self, net: nn.Module, task, targets: list[str], config: RecoverConfig,
                 checkpoints: Path):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.config, self.task, self.checkpoints = config, task, Path(checkpoints)
        for p in net.parameters():
            p.requires_grad_(False)
        torch.manual_seed(config.seed)  # the adapters' initialisation
        self.net = get_peft_model(net, LoraConfig(
            r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
            target_modules=targets, bias="none"))
        self.accuracy = MulticlassAccuracy(task.num_classes(), average="micro")
        self.strict_loading = False  # checkpoints hold the adapters only

    def training_step(self, batch, batch_idx):
        loss = self.task.loss(self.net, batch)
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True,
                 batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch, batch_idx):
        self.accuracy.update(self.task.predict(self.net, batch), batch["labels"])
        self.log("val_acc", self.accuracy, prog_bar=True, on_epoch=True,
                 batch_size=len(batch["labels"]))

    def on_train_epoch_start(self) -> None:
        torch.manual_seed(self.config.seed + self.current_epoch)  # dropout: same after resume

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad],
                                 lr=self.config.lr, weight_decay=self.config.weight_decay)

    def configure_callbacks(self):
        return [ModelCheckpoint(dirpath=self.checkpoints, filename="best", monitor="val_acc",
                                mode="max", save_last=True, save_top_k=1),
                EarlyStopping(monitor="val_acc", mode="max", patience=self.config.patience)]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if "lora_" in k}

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """The best epoch's adapters merged into copies of the target weights.

        The model's own weights are not touched (``recover`` then removes the adapters), so the
        dense weights it shares with the pruner stay the original ones.
        """
        best = self.trainer.checkpoint_callback.best_model_path
        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            self.load_state_dict(state, strict=False)
        model = self.net.base_model.model
        merged = {}
        for name, layer in model.named_modules():
            if hasattr(layer, "get_delta_weight") and hasattr(layer, "get_base_layer"):
                weight = layer.get_base_layer().weight.detach()
                merged[f"{name}.weight"] = (weight + layer.get_delta_weight("default")).cpu()
        return merged


@contextmanager
def with_weights(net: nn.Module, weights: dict[str, torch.Tensor]):
    """Temporarily give ``net`` these weights (by parameter name); the originals come back."""
    params = dict(net.named_parameters())
    saved = {name: params[name].data for name in weights}
    try:
        for name, value in weights.items():
            params[name].data = value.to(saved[name].device, saved[name].dtype)
        yield net
    finally:
        for name, value in saved.items():
            params[name].data = value


def recover(make_trainer, net: nn.Module, task, targets: list[str], train_loader, val_loader,
            config: RecoverConfig, work: Path) -> dict:
    """Train LoRA on ``net``; returns the merged target weights (``net`` is left unchanged)."""
    work = Path(work)
    module = Recovery(net, task, targets, config, work)
    trainer = make_trainer(max_epochs=config.epochs, enable_checkpointing=True,
                           logger=CSVLogger(str(work), name="logs"))
    last = work / "last.ckpt"
    try:
        trainer.fit(module, train_loader, val_loader,
                    ckpt_path=str(last) if last.exists() else None)
        weights = module.merged_weights()
    finally:
        module.net.unload()  # the model leaves as it came, even when training fails
    history = _logged(work, "val_acc")
    return {"weights": weights, "val_acc": history,
            "best_val_acc": max(history) if history else None, "epochs": trainer.current_epoch,
            "train_loss": _logged(work, "train_loss")}


def _logged(work: Path, key: str) -> list[float]:
    """Values of one metric from the CSV logs of this stage (every version, in order)."""
    import csv

    values = []
    for path in sorted(Path(work, "logs").glob("version_*/metrics.csv")):
        with open(path) as f:
            values += [float(row[key]) for row in csv.DictReader(f) if row.get(key)]
    return values
