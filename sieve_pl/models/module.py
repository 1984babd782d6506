"""The LightningModule the CLI builds: a causal LM scored on the task through Lightning loops."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torchmetrics import MeanMetric

from ..io import PeakMemory
from ..progress import named
from .loading import DEFAULT_MODEL, load_config, load_model, load_tokenizer, local_folder


class SieveLM(L.LightningModule):
    """A causal LM plus the task that scores it; weights load on first use, not at parse time.

    Args:
        pretrained: built-in offline model name, local HF folder or hub id.
        dtype: weight dtype while pruning (float32 is exact on CPU; bfloat16 halves memory).
        trust_remote_code: passed to ``from_pretrained`` (needed for custom architectures).
        placement: where the whole-model stages (sensitivity, search, evaluation, recovery)
            run the model. device: all of it on each process's accelerator (DDP over GPUs
            splits the data). split: one process, the decoder layers spread over every
            visible GPU by accelerate's device map (for models no single GPU holds; run
            with trainer.devices 1). auto: device when the weights take at most 70% of one
            accelerator's memory (or there is none), else split. Calibration and projection
            run layer by layer either way. ``sieve-pl plan`` shows what each choice needs.
    """

    def __init__(self, pretrained: str = DEFAULT_MODEL, dtype: str = "float32",
                 trust_remote_code: bool = False,
                 placement: Literal["auto", "device", "split"] = "auto"):
        super().__init__()
        self.pretrained, self.dtype_name, self.trust_remote_code = pretrained, dtype, trust_remote_code
        self.placement = placement
        self.split = False  # set once the model is spread over several GPUs
        self.quantize = "none"  # validate/test only: bitsandbytes format applied at load time
        self.net = None
        self.adapter = None
        self.task = None
        self.accuracy = None

    def place(self, device: torch.device) -> torch.nn.Module:
        """The model where the whole-model stages run it: on ``device``, or — with placement
        split (or auto, when it does not fit one accelerator) — spread over the GPUs once;
        returns it."""
        from .placement import choose, dispatch, is_split

        if self.split or is_split(self.net):
            return self.net
        if choose(self.placement, self.net, device) == "split":
            dispatch(self.net, self.adapter)
            self.split = True
            return self.net
        return self.net.to(device)

    def _apply(self, fn, recurse=True):
        """Lightning moves the module it runs to its device: a model split over GPUs stays."""
        if not self.split:
            return super()._apply(fn, recurse)
        net, self.net = self.net, None
        try:
            return super()._apply(fn, recurse)
        finally:
            self.net = net

    def check(self):
        """Architecture check from the config alone (before heavy work)."""
        from .adapters import adapter_for

        return adapter_for(load_config(self.pretrained, self.trust_remote_code))

    def tokenizer(self):
        return load_tokenizer(self.pretrained)

    def load(self) -> None:
        if self.net is None:
            self.net, self.adapter = load_model(self.pretrained, self.dtype_name,
                                                self.trust_remote_code, self.quantize)

    def set_task(self, task) -> None:
        """Score with ``task``: one mean of per-example scores per metric it reports."""
        self.task = task
        self.task_metrics = torch.nn.ModuleDict({name: MeanMetric() for name in task.metrics()})
        self.accuracy = self.task_metrics[task.metric]  # the primary one (accuracy, EM or F1)

    def predict_step(self, batch, batch_idx):
        """Accumulate the task's metrics; nothing is returned, so nothing piles up in memory."""
        scores = self.task.scores(self.net, batch)
        for name, metric in self.task_metrics.items():
            metric.update(scores[name])


def evaluate_metrics(trainer: L.Trainer, lm: SieveLM, dataloader, name: str = "evaluate"
                     ) -> dict[str, float]:
    """Every metric of the task on a dataloader, one predict loop (exact under DDP: no padded
    repeats); the primary metric first. ``name`` labels the progress bar."""
    for metric in lm.task_metrics.values():
        metric.reset()
    with named(trainer, name):
        trainer.predict(lm, dataloaders=dataloader, return_predictions=False)
    return {name: float(metric.compute()) for name, metric in lm.task_metrics.items()}


def evaluate(trainer: L.Trainer, lm: SieveLM, dataloader, name: str = "evaluate") -> float:
    """The task's primary metric (accuracy, exact match or F1) of ``lm`` on a dataloader."""
    return evaluate_metrics(trainer, lm, dataloader, name)[lm.task.metric]


@torch.no_grad()
def outputs(trainer: L.Trainer, net, loader, fn, fill=None) -> torch.Tensor:
    """``fn(net, batch)`` of every batch (per-example rows: the task's ``reference`` or
    ``teacher``, say), run on the trainer's device in eval mode and stacked on the CPU in loader
    order; narrower rows are padded with ``fill`` (``stack_rows``). Every rank computes every
    batch, so the result is the same on each without communication (a pool's one pass)."""
    from ..tasks.base import stack_rows

    from .placement import is_split

    device = trainer.strategy.root_device
    home = next(net.parameters()).device
    modes = [(m, m.training) for m in net.modules()]
    moves = not is_split(net)  # (a model split over GPUs stays where its layers are)
    if moves:
        net.to(device)
    net.eval()
    try:
        chunks = [fn(net, {k: v.to(device) if torch.is_tensor(v) else v
                           for k, v in batch.items()}).cpu() for batch in loader]
    finally:
        for module, training in modes:
            module.train(training)
        if moves:
            net.to(home)
    return stack_rows(chunks, fill)


def measure(trainer: L.Trainer, lm: SieveLM, data, quantize: str = "none",
            examples: int = 0) -> dict:
    """Accuracy, latency per test example, peak memory, bytes on disk of one model.

    Peak memory is measured while scoring the test split (after loading, so a quantized model is
    not charged for the full-precision copy it is loaded from): process RSS on CPU, allocated
    memory on CUDA. ``weights_mb`` is the model's own footprint. Run one model per fresh process.
    ``examples`` > 0 scores only that many test examples, spread over the split, and no
    validation: enough for latency and memory where bitsandbytes' CPU kernels are slow.
    """
    import tempfile
    import time

    lm.quantize = quantize
    lm.load()
    lm.set_task(data.task)
    validation = None if examples else evaluate(trainer, lm, data.val_dataloader())
    test_loader = data.loader("test", limit=examples or None)
    with PeakMemory(trainer.strategy.root_device) as peak:
        start = time.perf_counter()
        test = evaluate(trainer, lm, test_loader)
        seconds = time.perf_counter() - start
    if quantize == "none":
        disk = disk_bytes(lm)
    else:  # bitsandbytes-serialised weights, as a user would save them
        with tempfile.TemporaryDirectory() as tmp:
            lm.net.save_pretrained(tmp)
            disk = weight_file_bytes(Path(tmp))
    scored = len(test_loader.dataset)
    return {"validation": validation, "test": test, "test_examples": scored,
            "quantize": quantize, "latency_ms_per_example": 1000 * seconds / scored,
            "batch_size": data.batch_size,
            "peak_memory_mb": peak.mb, "weights_mb": lm.net.get_memory_footprint() / 2**20,
            "disk_mb": disk / 2**20}


def weight_file_bytes(folder: Path) -> int:
    """Bytes of a model folder's weight files: safetensors, else PyTorch .bin (not both: some
    hub repositories hold the same weights in each)."""
    files = list(folder.glob("*.safetensors")) or list(folder.glob("pytorch_model*.bin"))
    return sum(f.stat().st_size for f in files)


def disk_bytes(lm: SieveLM) -> int:
    """The unquantized model's size on disk, wherever its files are (a hub id's are in the HF
    cache); a model whose weight files are not on this disk counts its weights in memory, not 0."""
    folder = local_folder(lm.pretrained)
    size = weight_file_bytes(folder) if folder is not None else 0
    return size or sum(p.nbytes for p in lm.net.parameters())
