"""What a pipeline stage is, and the typed results that stages hand each other.

A :class:`Stage` names its run-directory folder, says what its results depend on
(``fingerprint``), computes them (``run``) and writes and reads them (``save`` / ``load``);
``RunDir.run`` skips it when a finished folder has the same fingerprint. Stages receive the
shared objects in a :class:`Context` and the earlier stages' results as arguments, so
``Pipeline._fit`` reads as the list of stages.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from safetensors.torch import load_file

from ..artifacts import load_factors, save_factors, save_tensors
from ..io import read_json, write_json

PROMPT_KEYS = ("input_ids", "attention_mask", "position_ids", "choice_ids", "choice_mask")

if TYPE_CHECKING:
    import lightning as L

    from ..models.module import SieveLM
    from ..tasks.datamodule import TaskDataModule


@dataclass
class Context:
    """What every stage works with: the CLI's trainer, the model, the task's data, a factory of
    trainers for the training stages (their own log plus the user's loggers), the run folder, and
    how many calibration examples the statistics use."""

    trainer: L.Trainer
    lm: SieveLM
    data: TaskDataModule
    make_trainer: Callable[..., L.Trainer]
    path: Path
    calibration_examples: int = 0
    calibration_pool: int = 0

    def calibration_loader(self, labelled: bool = False):
        """The calibration examples that statistics, gradients and learned projections use
        (``calibration.examples`` of the split, spread over it; 0: all), plus
        ``calibration.pool`` prompts from outside the task's splits (its sister datasets,
        unlabeled text), unless ``labelled`` batches are needed."""
        split = self.data.loader("calibration", limit=self.calibration_examples or None)
        if labelled or not self.calibration_pool:
            return split
        from torch.utils.data import DataLoader

        extra = self.data.pool_loader(limit=self.calibration_pool, outside=True)
        batches = [{k: v for k, v in b.items() if k in PROMPT_KEYS} for b in [*split, *extra]]
        return DataLoader(batches, batch_size=None)  # (ranks share the batches out)


class Stage:
    """One step of ``sieve-pl fit``; subclasses set ``name`` and implement the four methods."""

    name: str = ""
    format: int = 1  # of its results: raise it when the same settings now give other results
    # the stages whose results it reads (their fingerprints are in its own, so a change there
    # re-runs it); None: the stage run just before it, whose fingerprint chains the earlier ones
    needs: tuple[str, ...] | None = None

    def fingerprint(self) -> dict:
        """The settings (and data) its results depend on."""
        raise NotImplementedError

    def run(self, work: Path) -> Any:
        """Compute the results; ``work`` survives a kill (for the stage's own checkpoints)."""
        raise NotImplementedError

    def save(self, result: Any, folder: Path) -> None:
        raise NotImplementedError

    def load(self, folder: Path) -> Any:
        raise NotImplementedError


class CompensationStage(Stage):
    """Refit and distillation: new weights for the search's levels, kept only when validation
    accuracy does not fall below ``accuracy`` (what the pruned model scores before the stage)."""

    def __init__(self, ctx: Context, pruner, levels: dict, accuracy: float, config):
        self.ctx, self.pruner, self.levels, self.accuracy, self.config = (ctx, pruner, levels,
                                                                          accuracy, config)

    def fit(self, work: Path) -> tuple[dict, dict]:
        """``(factors for pruner.use, details for the summary)``; the model is at the levels."""
        raise NotImplementedError

    def run(self, work: Path) -> "Compensated":
        from ..models.module import evaluate

        if not self.config.enabled:
            return Compensated()
        ctx = self.ctx
        with self.pruner.at(self.levels):
            factors, details = self.fit(work)
            after = evaluate(ctx.trainer, ctx.lm, ctx.data.val_dataloader())
        return Compensated.judged(factors, self.accuracy, after, **details)

    def save(self, result: "Compensated", folder: Path) -> None:
        result.save(folder)

    def load(self, folder: Path) -> "Compensated":
        return Compensated.load(folder)


def settings(config, data: dict | None = None) -> dict:
    """What an optional stage's results depend on: all its settings (and data) when it runs,
    only that it is off when it does not — editing a disabled stage's options re-runs nothing."""
    if not config.enabled:
        return {"enabled": False}
    return {**({"data": data} if data is not None else {}), **asdict(config)}


@dataclass
class Searched:
    """The search's levels and their validation accuracy; ``details`` holds the rest of
    search.json (the uniform level, the seeds, the GA's logbook, its cost)."""

    levels: dict[str, float]
    accuracy: float
    base_accuracy: float
    details: dict = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: dict) -> "Searched":
        rest = {k: v for k, v in record.items()
                if k not in ("levels", "accuracy", "base_accuracy")}
        return cls(record["levels"], record["accuracy"], record["base_accuracy"], rest)

    def record(self) -> dict:
        return {**self.details, "levels": self.levels, "accuracy": self.accuracy,
                "base_accuracy": self.base_accuracy}


def levels_at(path: list[tuple[str, float, int]], names: list[str], j: int) -> dict[str, float]:
    """The allocation after the first ``j`` steps of a price path (``Searched.details["path"]``:
    ``(unit, keep, weights removed)`` steps, cheapest per weight first; the other units
    dense). The search bisects along it, confirmation steps back along it."""
    levels = dict.fromkeys(names, 1.0)
    for name, keep, _ in path[:j]:
        levels[name] = keep
    return levels


@dataclass
class Confirmed:
    """What is exported: the levels and whether recovery's LoRA goes with them. ``details``
    holds the confirmation (passed, accuracy, base accuracy, every step back, weights kept
    before and after) when the run has a confirmation split."""

    levels: dict[str, float]
    lora: bool
    details: dict = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: dict) -> "Confirmed":
        return cls(record["levels"], record["lora"], record.get("confirmation") or {})

    def record(self) -> dict:
        return {"levels": self.levels, "lora": self.lora, "confirmation": self.details}


@dataclass
class Compensated:
    """Refit's or distillation's weights for the chosen levels, and whether they are used:
    only when validation accuracy does not fall (``accuracy_after >= accuracy_before``)."""

    used: bool = False
    factors: dict = field(default_factory=dict)
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    details: dict = field(default_factory=dict)  # distillation's KL history, epochs

    @classmethod
    def judged(cls, factors: dict, before: float, after: float, **details) -> "Compensated":
        # (1e-6: the same accuracy re-evaluated may differ in the last float32 bit)
        return cls(after >= before - 1e-6, factors, before, after, details)

    def accuracy(self, otherwise: float) -> float:
        """Validation accuracy of the pruned model after this stage."""
        return self.accuracy_after if self.used else otherwise

    def summary(self) -> dict:
        return {"used": self.used, "accuracy_before": self.accuracy_before,
                "accuracy_after": self.accuracy_after, **self.details}

    def save(self, folder: Path) -> None:
        write_json(folder / "refit.json", self.summary())
        save_factors(self.factors, folder)

    @classmethod
    def load(cls, folder: Path) -> "Compensated":
        record = read_json(folder / "refit.json")
        fixed = {k: record.pop(k, None) for k in ("accuracy_before", "accuracy_after")}
        return cls(bool(record.pop("used")), load_factors(folder), **fixed, details=record)


def lora_gate(plain: list[float], with_lora: list[float], z: float) -> dict:
    """Whether LoRA earns its place in the export: its gain on the confirmation split, paired
    example by example with the pruned model's scores, is at least ``z`` standard errors
    (``z·sqrt(Σ(s_lora − s_plain)²)``; for 0/1 scores, z·sqrt(changed answers)). Recovery fits
    the task's own examples; a gain within the noise can come with a loss on the task's other
    data (bench/README, "Exports every engine loads": the standard search's LoRA, kept for +2
    of 800 confirmation answers, cost 12 points on drug reviews), so the pruned model the search
    chose is preferred unless LoRA clearly helps. z = 0: LoRA unless it lowers the score."""
    changed = sum((a - b) ** 2 for a, b in zip(with_lora, plain))
    return _gate(sum(with_lora) - sum(plain), changed, len(plain), z)


def _gate(gain: float, changed: float, examples: int, z: float) -> dict:
    # (1e-6 per example: the same accuracy re-evaluated may differ in the last float32 bit)
    return {"keep": gain >= z * changed ** 0.5 - 1e-6 * examples,
            "gain": gain / max(examples, 1), "changed": changed, "examples": examples, "z": z}


@dataclass
class Recovered:
    """LoRA's weights (empty when recovery is off), its best validation accuracy, and the
    dense + LoRA comparison (``dense``: its validation, test and confirmation accuracy).
    ``details`` holds the histories, epochs, steps, peak memory and, with a confirmation
    split, ``confirmation_before`` / ``confirmation_after``: the pruned model without and with
    LoRA on it, and ``confirmation_changed`` / ``confirmation_examples``: the paired evidence
    (``Σ(s_lora − s_plain)²`` over that many examples) the export decision weighs."""

    weights: dict = field(default_factory=dict)
    best_val_acc: float | None = None
    dense: dict | None = None
    details: dict = field(default_factory=dict)

    def keeps(self, accuracy: float, z: float = 0.0) -> bool:
        """Whether the export uses LoRA: with a confirmation split (which no selection read),
        where its gain there is at least ``z`` standard errors (:meth:`gate`; z = 0: where it
        does not lower accuracy); without one, on validation against ``accuracy``, the pruned
        model's (selection's own figure, optimistic)."""
        if not self.weights:
            return False
        gate = self.gate(z)
        if gate is not None:
            return gate["keep"]
        return self.best_val_acc is not None and self.best_val_acc >= accuracy - 1e-6

    def gate(self, z: float) -> dict | None:
        """:func:`lora_gate` from the confirmation scores recovery recorded (None without)."""
        d = self.details
        if d.get("confirmation_after") is None:
            return None
        n = d.get("confirmation_examples", 1)
        return _gate((d["confirmation_after"] - d["confirmation_before"]) * n,
                     d.get("confirmation_changed", 0.0), n, z)

    def summary(self) -> dict:
        return {"best_val_acc": self.best_val_acc, **self.details,
                **({"dense": self.dense} if self.dense is not None else {})}

    def save(self, folder: Path) -> None:
        write_json(folder / "recover.json", self.summary())
        save_tensors(self.weights, folder / "weights.safetensors")

    @classmethod
    def load(cls, folder: Path) -> "Recovered":
        record = read_json(folder / "recover.json")
        return cls(load_file(str(folder / "weights.safetensors")), record.pop("best_val_acc", None),
                   record.pop("dense", None), record)
