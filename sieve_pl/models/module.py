"""The LightningModule the CLI builds: a causal LM scored on the task through Lightning loops."""
from __future__ import annotations

import warnings

import lightning as L
import torch
from torchmetrics.classification import MulticlassAccuracy

from .loading import DEFAULT_MODEL, load_config, load_model, load_tokenizer

# predict_step returns nothing on purpose (metrics accumulate in the module)
warnings.filterwarnings("ignore", message="predict returned None")


class SieveLM(L.LightningModule):
    """A causal LM plus the task that scores it; weights load on first use, not at parse time.

    Args:
        pretrained: built-in offline model name, local HF folder or hub id.
        dtype: weight dtype while pruning (float32 is exact on CPU; bfloat16 halves memory).
        trust_remote_code: passed to ``from_pretrained`` (needed for custom architectures).
    """

    def __init__(self, pretrained: str = DEFAULT_MODEL, dtype: str = "float32",
                 trust_remote_code: bool = False):
        super().__init__()
        self.pretrained, self.dtype_name, self.trust_remote_code = pretrained, dtype, trust_remote_code
        self.net = None
        self.adapter = None
        self.task = None
        self.accuracy = None

    def check(self):
        """Architecture check from the config alone (before heavy work)."""
        from .adapters import adapter_for

        return adapter_for(load_config(self.pretrained, self.trust_remote_code))

    def tokenizer(self):
        return load_tokenizer(self.pretrained)

    def load(self) -> None:
        if self.net is None:
            self.net, self.adapter = load_model(self.pretrained, self.dtype_name,
                                                self.trust_remote_code)

    def set_task(self, task) -> None:
        self.task = task
        self.accuracy = MulticlassAccuracy(task.num_classes(), average="micro")

    def predict_step(self, batch, batch_idx):
        """Accumulate accuracy; nothing is returned so predictions never pile up in memory."""
        self.accuracy.update(self.task.predict(self.net, batch), batch["labels"])


def evaluate(trainer: L.Trainer, lm: SieveLM, dataloader) -> float:
    """Accuracy of ``lm`` on a dataloader, one predict loop (exact under DDP: no padded repeats)."""
    lm.accuracy.reset()
    trainer.predict(lm, dataloaders=dataloader, return_predictions=False)
    return float(lm.accuracy.compute())
