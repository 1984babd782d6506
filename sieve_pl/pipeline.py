"""Stage order, run directory, skip-if-done.

``checkpoints/<run>/<stage>/`` holds each stage's artifacts and ``stage.json`` with the stage's
fingerprint: a hash of its own config section and of the upstream stage's fingerprint. A stage
is written to a temporary folder and renamed when complete, so a finished-looking folder is always
whole. Rerunning skips stages whose fingerprint matches; a changed config re-runs that stage and
everything after it (their fingerprints chain).
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import load_file, save_file

from .report import format_summary, save_search
from .io import fingerprint, read_json, say, write_json
from .models.hf import save_pruned
from .models.module import SieveLM, evaluate
from .models.pruning import Pruner
from .stages.calibrate import CalibrationConfig, calibrate
from .stages.project import ProjectionConfig, project
from .stages.search import Fitness, SearchConfig, search
from .tasks.datamodule import TaskDataModule


@dataclass
class RunConfig:
    """Where the run lives.

    Args:
        name: run folder name under root.
        root: parent of run folders (a shared filesystem for multi-node runs).
    """

    name: str = "demo"
    root: str = "checkpoints"

    @property
    def path(self) -> Path:
        return Path(self.root) / self.name


class RunDir:
    """One folder per stage, fingerprinted, written atomically by rank 0 and read by every rank."""

    def __init__(self, path: Path, trainer: L.Trainer):
        self.path, self.trainer = Path(path), trainer
        self.upstream = ""
        self.timings: dict[str, float] = {}

    def stage(self, name: str, config: dict, compute: Callable[[Path], object],
              save: Callable[[object, Path], None], load: Callable[[Path], object]):
        """Load the stage's artifacts if its fingerprint matches, else compute and save them.

        ``compute`` gets a work folder that survives a kill (for a stage's own checkpoints); it is
        emptied when the fingerprint changes and removed once the stage is complete.
        """
        fp = fingerprint(name, config, self.upstream)
        self.upstream = fp
        final = self.path / name
        marker = final / "stage.json"
        if marker.exists() and read_json(marker)["fingerprint"] == fp:
            rank_zero_info(f"[sieve-pl] {name}: done earlier, loading {final}")
            self.timings[name] = read_json(marker)["seconds"]
            return load(final)
        work = self.path / f".{name}.work"
        if self.trainer.is_global_zero:
            if (work / "fingerprint").exists() and (work / "fingerprint").read_text() != fp:
                shutil.rmtree(work)
            work.mkdir(parents=True, exist_ok=True)
            (work / "fingerprint").write_text(fp)
        self.trainer.strategy.barrier()
        start = time.perf_counter()
        result = compute(work)
        if self.trainer.is_global_zero:
            tmp = final.with_name(f".{name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save(result, tmp)
            seconds = round(time.perf_counter() - start, 2)
            write_json(tmp / "stage.json", {"fingerprint": fp, "config": config,
                                            "seconds": seconds})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            shutil.rmtree(work, ignore_errors=True)
        self.trainer.strategy.barrier()
        self.timings[name] = round(time.perf_counter() - start, 2)
        rank_zero_info(f"[sieve-pl] {name}: {self.timings[name]:.1f}s -> {final}")
        return result


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _save_bases(bases, folder: Path) -> None:
    _save_tensors({f"{n}.{part}": t for n, ab in bases.items() for part, t in zip("AB", ab)},
                  folder / "bases.safetensors")


def _load_bases(folder: Path):
    flat = load_file(str(folder / "bases.safetensors"))
    return {n[:-2]: (flat[n], flat[n[:-2] + ".B"]) for n in flat if n.endswith(".A")}


class Pipeline:
    """``sieve-pl fit``: calibrate → project → search → export → evaluate, skipping done stages."""

    def __init__(self, trainer: L.Trainer, lm: SieveLM, data: TaskDataModule, run: RunConfig,
                 calibration: CalibrationConfig, projection: ProjectionConfig,
                 search: SearchConfig):
        self.trainer, self.lm, self.data, self.run = trainer, lm, data, run
        self.calibration, self.projection, self.search = calibration, projection, search

    def prepare(self) -> None:
        """Every check that needs no weights: architecture, data columns, label words, options."""
        self.search.check()
        self.lm.check()
        self.data.prepare(self.lm.tokenizer())

    def load(self) -> RunDir:
        """Checks, then weights; returns the run directory."""
        self.prepare()
        self.lm.load()
        self.lm.set_task(self.data.task)
        return RunDir(self.run.path, self.trainer)

    def calibrate(self, run: RunDir, groups: dict[str, list[str]]) -> dict:
        lm, data = self.lm, self.data
        config = {"model": {"pretrained": lm.pretrained, "dtype": lm.dtype_name},
                  "data": data.fingerprint_config("calibration"), **asdict(self.calibration)}
        return run.stage(
            "calibrate", config,
            lambda work: calibrate(self.trainer, lm.net, groups, data.calibration_dataloader(),
                              self.calibration),
            lambda s, d: _save_tensors(s, d / "stats.safetensors"),
            lambda d: load_file(str(d / "stats.safetensors")))

    def fit(self) -> dict:
        run = self.load()
        lm, data = self.lm, self.data
        groups = lm.adapter.input_groups(lm.net)
        dense_params = sum(p.numel() for p in lm.net.parameters())
        stats = self.calibrate(run, groups)
        bases = run.stage(
            "project", asdict(self.projection),
            lambda work: project(lm.net, groups, stats, self.projection), _save_bases, _load_bases)
        del stats
        pruner = Pruner(lm.net, bases)

        def run_search(work: Path) -> dict:
            fitness = Fitness(self.trainer, lm, pruner, data.val_dataloader(),
                              self.search.early_reject)
            return search(fitness, list(bases), self.search, work, self.trainer.is_global_zero)

        found = run.stage(
            "search", {"data": data.fingerprint_config("validation"), **asdict(self.search)},
            run_search, save_search, lambda d: read_json(d / "search.json"))
        levels = found["levels"]
        ranks = pruner.apply(levels)
        run.stage("export", {}, lambda work: ranks,
                  lambda r, d: save_pruned(lm.net, data.tokenizer, r, d / "model"),
                  lambda d: read_json(d / "model" / "config.json")["sieve_ranks"])

        def test_report(work: Path) -> dict:
            test = data.test_dataloader()
            rows = {}
            variants = [("pruned", levels, found["accuracy"]),
                        ("base", 1.0, found["base_accuracy"])]
            if self.search.strategy != "uniform":
                variants.append(("uniform", found["uniform"]["keep"],
                                 found["uniform"]["accuracy"]))
            for row, keep, val in variants:
                pruner.apply(keep)
                kept, total = pruner.params(keep)
                rows[row] = {"validation": val, "test": evaluate(self.trainer, lm, test),
                             "target_params_kept": kept,
                             "params": dense_params - (total - kept)}
            pruner.apply(levels)
            return {"strategy": self.search.strategy, "epsilon": self.search.epsilon,
                    "target_params": total, **rows, "factored_matrices": len(ranks),
                    "bottlenecks": found.get("bottlenecks", []), "cost": found.get("cost"),
                    "model_dir": str(self.run.path / "export" / "model")}

        report = run.stage("evaluate", {"data": data.fingerprint_config("test")}, test_report,
                           lambda r, d: write_json(d / "summary.json", r),
                           lambda d: read_json(d / "summary.json"))
        report["stage_seconds"] = dict(run.timings)
        if self.trainer.is_global_zero:
            write_json(self.run.path / "summary.json", report)
        say(format_summary(report))
        return report
