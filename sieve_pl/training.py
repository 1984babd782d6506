"""What the training stages share (recovery's LoRA, distillation, learned projections).

Each trains a few weights of a model it does not own as a Lightning fit that a killed run
resumes: a :class:`Checkpointed` module (checkpoints hold only the weights it trains, the best
epoch by one metric), a trainer from :func:`trainer_for` (CSV metrics in the stage's work
folder, read back by :func:`logged`) and :func:`resume_fit` (from ``last.ckpt`` when it loads
as plain tensors). :func:`frozen_except` leaves only the trained weights requiring gradients;
:func:`seeded` repeats a fit's random draws without seeding the process's RNG.
"""
from __future__ import annotations

import csv
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from .io import resume_checkpoint


@contextmanager
def seeded(seed: int):
    """torch's RNG (host and every initialised CUDA device) seeded with ``seed`` inside, and
    put back as it was after: what draws from it here (initialisation, dropout) repeats run to
    run, and the process's own RNG state is neither seeded nor advanced."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


class Checkpointed(L.LightningModule):
    """A module whose checkpoints (in ``checkpoints``) hold only what :meth:`saves` keeps.

    ``monitor``: ``(metric, "min" | "max")`` keeps the best epoch's checkpoint as well as the
    last (:meth:`load_best` reads it back); None keeps the last only.
    """

    monitor: tuple[str, str] | None = None

    def __init__(self, checkpoints: Path):
        super().__init__()
        self.checkpoints = Path(checkpoints)
        self.strict_loading = False  # checkpoints hold the trained weights only

    def saves(self, key: str) -> bool:
        """Whether a state-dict entry goes into the checkpoints (the trained weights)."""
        raise NotImplementedError

    def configure_callbacks(self):
        if self.monitor is None:
            return [ModelCheckpoint(dirpath=self.checkpoints, save_last=True)]
        metric, mode = self.monitor
        return [ModelCheckpoint(dirpath=self.checkpoints, filename="best", monitor=metric,
                                mode=mode, save_last=True, save_top_k=1)]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if self.saves(k)}

    def load_best(self) -> None:
        """The best epoch's weights back in the module (none saved: left as they are)."""
        best = self.trainer.checkpoint_callback.best_model_path
        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            self.load_state_dict(state, strict=False)


def trainer_for(make_trainer, logs: Path, **settings) -> L.Trainer:
    """A trainer for a resumable fit: checkpointing on, metrics in
    ``logs/logs/version_*/metrics.csv`` (one version per run, resumed or not)."""
    return make_trainer(**settings, enable_checkpointing=True,
                        logger=CSVLogger(str(logs), name="logs"))


def resume_fit(trainer: L.Trainer, module: Checkpointed, *loaders) -> None:
    """``trainer.fit`` continuing from ``module``'s ``last.ckpt`` when it loads as plain tensors
    (a killed fit resumes), else from the start; never unpickles anything else."""
    trainer.fit(module, *loaders, ckpt_path=resume_checkpoint(module.checkpoints / "last.ckpt"),
                weights_only=True)


def logged(work: Path, key: str) -> list[float]:
    """Values of one metric from the CSV logs of this stage (every version, in order)."""
    values = []
    for path in sorted(Path(work, "logs").glob("version_*/metrics.csv")):
        with open(path) as f:
            values += [float(row[key]) for row in csv.DictReader(f) if row.get(key)]
    return values


@contextmanager
def frozen_except(net: nn.Module, trainable=()):
    """Only ``trainable`` parameters require gradients inside; the flags come back afterwards.

    (DDP wraps every parameter that requires a gradient and insists that each gets one.)
    """
    flags = {p: p.requires_grad for p in net.parameters()}
    keep = {id(p) for p in trainable}
    try:
        for p in net.parameters():
            p.requires_grad_(id(p) in keep)
        yield net
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
