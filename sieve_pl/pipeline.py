"""Stage order: calibrate → project → search → refit → distill → recover → export → evaluate.

Each stage goes through ``RunDir.stage`` (``rundir.py``): skipped when done earlier with the
same fingerprint, recomputed when its config, an upstream stage or its artifacts changed.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Callable

import lightning as L

from .artifacts import load_bases, load_recover, load_refit, save_bases, save_recover, save_refit
from .errors import SieveError
from .report import format_summary, model_card, save_search
from .rundir import RunConfig, RunDir  # noqa: F401  (RunConfig: imported from here by the CLI)
from .io import SafetensorsFolder, content_id, read_json, say, write_json, write_text
from .models.hf import push_to_hub, save_pruned
from .models.loading import BUILTIN_HUB_IDS, BUILTIN_MODELS, load_model, load_tokenizer
from .models.module import SieveLM, evaluate
from .models.pruning import Pruner
from .stages.calibrate import CalibrationConfig, calibrate
from .stages.distill import DistillConfig, distill, distill_loader
from .stages.evaluate import (ExportConfig, QuantizeConfig, TransferConfig, evaluate_variants,
                              measure_forms, variant_list)
from .stages.lm_eval import LmEvalConfig, score as lm_eval_score
from .stages.project import ProjectionConfig, project
from .stages.recover import RecoverConfig, lora_targets, recover
from .stages.refit import RefitConfig, refit
from .stages.search import Fitness, SearchConfig, search
from .stages.sensitivity import sensitivity_costs
from .tasks.datamodule import TaskDataModule


def _without_files(identity: dict) -> dict:
    """A run identity without content ids (``source_files``): names and settings only."""
    data = identity.get("data")
    if isinstance(data, dict):
        return {**identity, "data": {k: v for k, v in data.items() if k != "source_files"}}
    return identity


def _settings(config, data: dict | None = None) -> dict:
    """What a stage's results depend on: all its settings (and data) when it runs, only that it
    is off when it does not — editing a disabled stage's options re-runs nothing."""
    if not config.enabled:
        return {"enabled": False}
    return {**({"data": data} if data is not None else {}), **asdict(config)}


class Pipeline:
    """``sieve-pl fit``: the stages in the module docstring's order, then lm_eval (optional), the
    model card and the hub upload (optional).

    Finished stages are skipped; each stage's config section is in its fingerprint.
    """

    def __init__(self, trainer: L.Trainer, lm: SieveLM, data: TaskDataModule, run: RunConfig,
                 calibration: CalibrationConfig, projection: ProjectionConfig,
                 search: SearchConfig, refit: RefitConfig, recover: RecoverConfig,
                 quantize: QuantizeConfig, transfer: TransferConfig | None = None,
                 distill: DistillConfig | None = None, export: ExportConfig | None = None,
                 lm_eval: LmEvalConfig | None = None,
                 make_trainer: Callable[..., L.Trainer] | None = None):
        self.trainer, self.lm, self.data, self.run = trainer, lm, data, run
        self.calibration, self.projection, self.search = calibration, projection, search
        self.refit, self.recover, self.quantize = refit, recover, quantize
        self.transfer = transfer or TransferConfig()
        self.distill = distill or DistillConfig()
        self.export = export or ExportConfig()
        self.lm_eval = lm_eval or LmEvalConfig()
        self._make_trainer = make_trainer

    def make_trainer(self, **kwargs) -> L.Trainer:
        """A trainer for a training stage (recover, distill, learned): the stage's own CSV log,
        which it reads back, plus the user's ``trainer.logger``."""
        own = kwargs.pop("logger", None)
        loggers = [*([own] if own else []), *self.trainer.loggers]
        return self._make_trainer(logger=loggers or False, **kwargs)

    def log(self, metrics: dict, step: int | None = None) -> None:
        """Numbers to the user's loggers (``trainer.logger``), from rank 0."""
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers and self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics(numbers, step=step)
                logger.save()

    def _log_search(self, found: dict) -> None:
        """The bisection's steps and one row per GA generation."""
        for step, point in enumerate(found.get("uniform", {}).get("history", [])):
            self.log({"search/uniform_keep": point["keep"],
                      "search/uniform_feasible": int(point["feasible"]),
                      "search/uniform_accuracy": point["accuracy"]}, step)
        for row in found.get("logbook") or []:
            self.log({f"search/{k}": v for k, v in row.items() if k != "generation"},
                     row["generation"])

    def prepare(self, fitting: bool = True) -> None:
        """Every check that needs no weights: architecture, data columns, label words, options."""
        self.run.check()
        self.export.check()
        self.lm_eval.check()
        self.search.check()
        self.projection.check()
        self.recover.check(self.data.sizes.train)
        self.distill.check(self.data.sizes)
        sizes = self.data.sizes
        if fitting and min(sizes.calibration, sizes.validation) < 1:
            raise SieveError(f"fit needs calibration and validation examples, got {sizes}")
        self.lm.check()
        self.data.prepare(self.lm.tokenizer())
        if fitting:  # only fit scores them; a bad source fails here, before any weights load
            for source, label_map in self.transfer.sources.items():
                self.data.other_source(source, label_map, self.transfer.examples)

    def check_run_dir(self) -> None:
        """Refuse a run folder whose calibration came from another model or other data.

        Every stage would be recomputed and the other run's artifacts replaced, which is what
        ``run.overwrite`` is for; a changed search, recovery… setting just re-runs those stages,
        and so does a changed content under the same model path or data file (content ids are
        left out of this comparison: an edited file is this run's new input, not another run).
        """
        marker = self.run.path / "calibrate" / "stage.json"
        if self.run.overwrite or not marker.exists():
            return
        try:
            recorded = read_json(marker)["config"]
            recorded = {"model": recorded.get("model"), "data": recorded.get("data")}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return  # an unreadable record: the calibrate stage is recomputed
        if _without_files(recorded) != _without_files(self._run_identity()):
            raise SieveError(f"{self.run.path} holds another run (different model or calibration "
                             f"data); choose another run.name or pass --run.overwrite true")

    def _run_identity(self) -> dict:
        """The model and calibration data as configured (names and paths, not contents)."""
        return {"model": {"pretrained": self.lm.pretrained, "dtype": self.lm.dtype_name},
                "data": self.data.fingerprint_config("calibration")}

    def _calibrate_config(self) -> dict:
        """What the statistics depend on (passes and where the sums live change nothing;
        float32 and float64 products agree to ~1e-6, so either set of statistics serves).

        A local model's files are in it by content: a model re-saved under the same path is
        another input and recalibrates."""
        config = asdict(self.calibration)
        for setting in ("layers_per_pass", "device", "product_dtype"):
            config.pop(setting)
        files = {} if self.lm.pretrained in BUILTIN_MODELS else content_id(self.lm.pretrained)
        return {**self._run_identity(), **({"model_files": files} if files else {}), **config}

    def load(self) -> RunDir:
        """Checks, then weights; returns the run directory."""
        self.prepare()
        self.lm.load()
        if self.projection.attention == "heads":
            self.lm.adapter.attentions(self.lm.net)  # whole heads, or a one-line error now
        self.lm.set_task(self.data.task)
        return RunDir(self.run.path, self.trainer)

    def calibrate(self, run: RunDir, groups: dict[str, list[str]]) -> dict:
        lm, data = self.lm, self.data

        def compute(work: Path) -> Path:
            shards = work / "stats"
            if self.trainer.is_global_zero:
                shutil.rmtree(shards, ignore_errors=True)  # a killed pass's leftovers
                shards.mkdir()
            calibrate(self.trainer, lm.net, groups,
                      data.loader("calibration", limit=self.calibration.examples or None),
                      self.calibration, out=shards)
            return shards

        def save(shards: Path, folder: Path) -> None:
            for shard in sorted(shards.glob("stats-*.safetensors")):
                os.replace(shard, folder / shard.name)

        return run.stage("calibrate", self._calibrate_config(), compute, save, SafetensorsFolder)

    def project(self, run: RunDir, groups: dict[str, list[str]], stats) -> dict:
        """Bases of every target matrix; under DDP each rank decomposes every world-th group."""
        trainer = self.trainer
        mlps = self.lm.adapter.mlps(self.lm.net)
        attentions = (self.lm.adapter.attentions(self.lm.net)
                      if self.projection.attention == "heads" else {})

        def compute(work: Path) -> dict:
            if self.projection.method == "learned":  # one data-parallel fit of every matrix
                return project(self.lm.net, groups, stats, self.projection, self.make_trainer,
                               self.data.calibration_dataloader(), work, mlps, attentions)
            world, rank = trainer.world_size, trainer.global_rank
            mine = {key: names for i, (key, names) in enumerate(groups.items())
                    if i % world == rank}
            bases = project(self.lm.net, mine, stats, self.projection, mlps=mlps,
                            attentions=attentions)
            if world == 1:
                return bases
            save_bases(bases, work, f"bases-{rank}.safetensors")
            trainer.strategy.barrier()
            return {} if rank else {name: ab for r in range(world) for name, ab in
                                    load_bases(work, f"bases-{r}.safetensors").items()}

        config = asdict(self.projection)
        if self.projection.method != "learned":  # its settings change nothing then
            config.pop("learned")
        if self.projection.mlp != "neurons":
            config.pop("neuron_order")
            if self.projection.attention != "heads" or not attentions:
                config.pop("ridge")
        return run.stage("project", config, compute, save_bases, load_bases)

    def _recover(self, work: Path) -> dict:
        lm, data = self.lm, self.data
        return recover(self.make_trainer, lm.net, data.task,
                       lora_targets(lm.net, lm.adapter.layers), data.train_dataloader(),
                       data.val_dataloader(), self.recover, work)

    def fit(self, on_start: Callable[[], None] | None = None) -> dict:
        """Every stage, holding ``<run>/.lock`` throughout: two runs writing one folder would
        corrupt each other's stages. ``on_start`` runs first under the lock (the CLI writes
        the run's config.yaml there)."""
        self.run.check()  # before the lock creates the folder
        with RunDir(self.run.path, self.trainer).lock():
            if on_start is not None:
                on_start()
            return self._fit()

    def _fit(self) -> dict:
        run = self.load()
        lm, data = self.lm, self.data
        groups = lm.adapter.input_groups(lm.net)
        dense_params = sum(p.numel() for p in lm.net.parameters())
        stats = self.calibrate(run, groups)
        bases = self.project(run, groups, stats)
        pruner = Pruner(lm.net, bases, self.search.rank_multiple)

        def run_search(work: Path) -> dict:
            fitness = Fitness(self.trainer, lm, pruner, data.val_dataloader(),
                              self.search.early_reject, self.search.confidence)
            costs = partial(sensitivity_costs, self.trainer, lm, pruner,
                            data.calibration_dataloader(), stats, groups, self.search.ladder)
            return search(fitness, pruner.names, self.search, work, self.trainer.is_global_zero,
                          costs)

        found = run.stage(
            "search", {"data": data.fingerprint_config("validation"), **asdict(self.search)},
            run_search, save_search, lambda d: read_json(d / "search.json"))
        levels = found["levels"]
        self._log_search(found)

        def run_refit(work: Path) -> dict:
            if not self.refit.enabled:
                return {"used": False, "factors": {}}
            with pruner.at(levels):
                factors = refit(self.trainer, lm.net, pruner, levels,
                                data.loader("calibration", limit=self.refit.examples),
                                self.refit.ridge)
                after = evaluate(self.trainer, lm, data.val_dataloader())
            return {"used": after >= found["accuracy"] - 1e-6, "factors": factors,
                    "accuracy_before": found["accuracy"], "accuracy_after": after}

        refitted = run.stage("refit", _settings(self.refit), run_refit, save_refit, load_refit)
        if refitted["used"]:
            pruner.use(refitted["factors"])
        pruned_accuracy = refitted["accuracy_after"] if refitted["used"] else found["accuracy"]

        def run_distill(work: Path) -> dict:
            if not self.distill.enabled:
                return {"used": False, "factors": {}}
            with pruner.at(levels):
                result = distill(self.make_trainer, lm.net, pruner, levels,
                                 distill_loader(data, self.distill.splits),
                                 data.val_dataloader(), self.distill, work)
                after = evaluate(self.trainer, lm, data.val_dataloader())
            # (1e-6: the same accuracy re-evaluated may differ in the last float32 bit)
            return {**result, "used": after >= pruned_accuracy - 1e-6,
                    "accuracy_before": pruned_accuracy, "accuracy_after": after}

        distilled = run.stage("distill", _settings(self.distill, data.fingerprint_config("train")),
                              run_distill, save_refit,
                              load_refit)
        if distilled["used"]:
            pruner.use(distilled["factors"])
            pruned_accuracy = distilled["accuracy_after"]

        def run_recover(work: Path) -> dict:
            if not self.recover.enabled:
                return {"weights": {}}
            with pruner.at(levels):
                result = self._recover(work / "pruned")
            if self.recover.compare_dense:  # the same LoRA budget and steps on the dense model
                with pruner.at(1.0):
                    dense = self._recover(work / "dense")
                with pruner.at(1.0, dense.pop("weights")):
                    dense["validation"] = evaluate(self.trainer, lm, data.val_dataloader(),
                                                   "evaluate dense+lora/validation")
                    dense["test"] = evaluate(self.trainer, lm, data.test_dataloader(),
                                             "evaluate dense+lora/test")
                result["dense"] = dense
            return result

        recovered = run.stage(
            "recover", _settings(self.recover, data.fingerprint_config("train")),
            run_recover, save_recover, load_recover)
        # LoRA is exported only where it does not lower validation accuracy (selection on
        # validation, like refit and distillation)
        lora = (bool(recovered["weights"]) and recovered["best_val_acc"] is not None
                and recovered["best_val_acc"] >= pruned_accuracy - 1e-6)
        final = "pruned+lora" if lora else "pruned"
        with pruner.at(levels, recovered["weights"] if lora else {}):
            layout = run.stage("export", {}, lambda work: None,
                      lambda _, d: save_pruned(lm.net, data.tokenizer, d / "model"),
                      lambda d: read_json(d / "model" / "config.json")["sieve"])

        def test_report(work: Path) -> dict:
            variants = variant_list(found, levels, pruned_accuracy, recovered,
                                    self.search.strategy)
            rows, transfer, total = evaluate_variants(
                self.trainer, lm, data, pruner, variants, self.transfer, dense_params,
                recovered.get("dense"))
            if (self.quantize.measure or self.quantize.formats) and self.trainer.is_global_zero:
                # other ranks load rank 0's summary
                measure_forms(rows, final, work, self.run.path, self.quantize)
            return {"strategy": self.search.strategy, "epsilon": self.search.epsilon,
                    "relative": self.search.relative, "target_params": total, "rows": rows,
                    "final": final, "transfer": transfer,
                    "pruned_units": len(pruner.sizes(levels)), "units": len(pruner.names),
                    "bottlenecks": found.get("bottlenecks", []), "cost": found.get("cost"),
                    "refit": {k: v for k, v in refitted.items() if k != "factors"},
                    "distill": {k: v for k, v in distilled.items() if k != "factors"},
                    "recover": {**{k: v for k, v in recovered.items() if k != "weights"},
                                "used": lora, "accuracy_before": pruned_accuracy},
                    "model_dir": str(self.run.path / "export" / "model")}

        report = run.stage("evaluate", {"data": data.fingerprint_config("test"),
                                        "quantize": asdict(self.quantize),
                                        "transfer": asdict(self.transfer)}, test_report,
                           lambda r, d: write_json(d / "summary.json", r),
                           lambda d: read_json(d / "summary.json"))

        def run_lm_eval(work: Path) -> dict:
            """Standard benchmarks (lm-evaluation-harness) for the base and the exported model."""
            if not self.lm_eval.tasks or not self.trainer.is_global_zero:
                return {}  # other ranks read rank 0's scores when the stage loads
            device = self.trainer.strategy.root_device
            home = next(lm.net.parameters()).device
            with pruner.at(1.0):
                base = lm_eval_score(lm.net.to(device), data.tokenizer, self.lm_eval)
                lm.net.to(home)
            folder = str(self.run.path / "export" / "model")
            exported, _ = load_model(folder, lm.dtype_name)
            pruned = lm_eval_score(exported.to(device), load_tokenizer(folder), self.lm_eval)
            return {"base": base, final: pruned}

        scores = run.stage("lm_eval", self.lm_eval.fingerprint(), run_lm_eval,
                           lambda r, d: write_json(d / "lm_eval.json", r),
                           lambda d: read_json(d / "lm_eval.json"))
        if scores:
            report["lm_eval"] = scores
        report["stage_seconds"] = dict(run.timings)
        for row, values in report["rows"].items():
            self.log({f"final/{row}/{k}": v for k, v in values.items()})
        if self.trainer.is_global_zero:
            write_json(self.run.path / "summary.json", report)
            card = model_card(report, BUILTIN_HUB_IDS.get(lm.pretrained, lm.pretrained),
                              type(data.task).__name__, str(data.source),
                              getattr(data.task, "prompt", None), layout)
            write_text(self.run.path / "export" / "model" / "README.md", card)
            if self.export.push_to_hub:
                url = push_to_hub(self.run.path / "export" / "model", self.export.push_to_hub,
                                  self.export.private)
                say(f"pushed {self.run.path / 'export' / 'model'} to {url}")
        say(format_summary(report))
        return report
