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

from .report import format_summary
from .io import fingerprint, read_json, write_json
from .models.hf import save_pruned
from .models.module import SieveLM, evaluate
from .models.pruning import Pruner
from .stages.calibrate import CalibrationConfig, calibrate
from .stages.project import ProjectionConfig, project
from .stages.search import SearchConfig, uniform_search
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

    def stage(self, name: str, config: dict, compute: Callable[[], object],
              save: Callable[[object, Path], None], load: Callable[[Path], object]):
        """Load the stage's artifacts if its fingerprint matches, else compute and save them."""
        fp = fingerprint(name, config, self.upstream)
        self.upstream = fp
        final = self.path / name
        marker = final / "stage.json"
        if marker.exists() and read_json(marker)["fingerprint"] == fp:
            rank_zero_info(f"[sieve-pl] {name}: done earlier, loading {final}")
            self.timings[name] = read_json(marker)["seconds"]
            return load(final)
        start = time.perf_counter()
        result = compute()
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
                  "data": data.fingerprint_config(), **asdict(self.calibration)}
        return run.stage(
            "calibrate", config,
            lambda: calibrate(self.trainer, lm.net, groups, data.calibration_dataloader(),
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
            lambda: project(lm.net, groups, stats, self.projection), _save_bases, _load_bases)
        del stats
        pruner = Pruner(lm.net, bases)

        def val_accuracy(keep) -> float:
            pruner.apply(keep)
            return evaluate(self.trainer, lm, data.val_dataloader())

        found = run.stage(
            "search", asdict(self.search),
            lambda: uniform_search(val_accuracy, val_accuracy(1.0), self.search),
            lambda r, d: write_json(d / "search.json", r),
            lambda d: read_json(d / "search.json"))
        ranks = pruner.apply(found["keep"])
        run.stage("export", {}, lambda: ranks,
                  lambda r, d: save_pruned(lm.net, data.tokenizer, r, d / "model"),
                  lambda d: read_json(d / "model" / "config.json")["sieve_ranks"])

        def test_report() -> dict:
            kept, total = pruner.params(found["keep"])
            pruned_test = evaluate(self.trainer, lm, data.test_dataloader())
            pruner.apply(1.0)
            base_test = evaluate(self.trainer, lm, data.test_dataloader())
            pruner.apply(found["keep"])
            return {"keep": found["keep"], "epsilon": self.search.epsilon,
                    "base": {"validation": found["base_accuracy"], "test": base_test},
                    "pruned": {"validation": found["accuracy"], "test": pruned_test},
                    "target_params": {"kept": kept, "total": total},
                    "model_params": {"dense": dense_params,
                                     "pruned": dense_params - (total - kept)},
                    "factored_matrices": len(ranks),
                    "model_dir": str(self.run.path / "export" / "model")}

        report = run.stage("evaluate", {}, test_report,
                           lambda r, d: write_json(d / "summary.json", r),
                           lambda d: read_json(d / "summary.json"))
        report["stage_seconds"] = dict(run.timings)
        if self.trainer.is_global_zero:
            write_json(self.run.path / "summary.json", report)
        rank_zero_info(format_summary(report))
        return report
