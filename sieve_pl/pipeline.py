"""Stage order: calibrate → project → search → refit → distill → recover → confirm → export →
evaluate.

Each stage is a :class:`~sieve_pl.stages.stage.Stage` in its own module, run through
``RunDir.run`` (``rundir.py``): skipped when done earlier with the same fingerprint, recomputed
when its config, an upstream stage or its artifacts changed. Here: the checks before any weight
loads, the order of the stages (``_fit``) and what happens after them (``_publish``).
"""
from __future__ import annotations

import shutil
from typing import Callable

import lightning as L

from .errors import SieveError
from .report import format_summary, model_card
from .rundir import RunConfig, RunDir  # noqa: F401  (RunConfig: imported from here by the CLI)
from .io import content_id, read_json, say, write_json, write_text
from .models.hf import push_to_hub
from .models.loading import BUILTIN_MODELS, hub_id
from .models.module import SieveLM
from .models.pruning import PARK_ABOVE, Pruner
from .stages.calibrate import Calibrate, CalibrationConfig
from .stages.confirm import Confirm
from .stages.distill import Distill, DistillConfig
from .stages.evaluate import Evaluate, Export, ExportConfig, QuantizeConfig, TransferConfig
from .stages.lm_eval import LmEval, LmEvalConfig
from .stages.project import Project, ProjectionConfig
from .stages.recover import Recover, RecoverConfig
from .stages.refit import Refit, RefitConfig
from .stages.search import Search
from .stages.search_config import SearchConfig
from .stages.stage import Compensated, Context
from .tasks.datamodule import TaskDataModule


def _without_files(identity: dict) -> dict:
    """A run identity without content ids (``source_files``): names and settings only."""
    data = identity.get("data")
    if isinstance(data, dict):
        return {**identity, "data": {k: v for k, v in data.items() if k != "source_files"}}
    return identity


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
        if self.search.space == "standard" and self.projection.mlp != "neurons":
            raise SieveError("search.space standard prunes MLP neurons: set projection.mlp "
                             "neurons")
        if "standard" in self.export.formats and self.search.space != "standard":
            raise SieveError("export.formats standard needs search.space standard (one MLP "
                             "width in every layer)")
        for name in sorted({"gguf", "decilm"} & set(self.export.formats)):
            from .models.loading import load_config
            from .models.to_gguf import check as gguf_check

            gguf_check(load_config(self.lm.pretrained, self.lm.trust_remote_code), name)
        self.data.prepare(self.lm.tokenizer())
        if fitting:  # only fit scores them; a bad source fails here, before any weights load
            for source, label_map in self.transfer.sources.items():
                self.data.other_source(source, label_map, self.transfer.examples)
            # the pool after them (it leaves their rows out): a bad sister fails here too
            self.recover.check(sizes.train, len(self.data.pool()))

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

    def _calibration_identity(self) -> dict:
        """The model and data the statistics come from; a local model's files by content (a
        model re-saved under the same path is another input and recalibrates)."""
        files = {} if self.lm.pretrained in BUILTIN_MODELS else content_id(self.lm.pretrained)
        return {**self._run_identity(), **({"model_files": files} if files else {})}

    def context(self) -> Context:
        return Context(self.trainer, self.lm, self.data, self.make_trainer, self.run.path,
                       self.calibration.examples, self.calibration.pool)

    def load(self) -> RunDir:
        """Checks, then weights; returns the run directory."""
        self.prepare()
        self.lm.load()
        if self.projection.attention == "heads":
            self.lm.adapter.attentions(self.lm.net)  # whole heads, or a one-line error now
        self.lm.set_task(self.data.task)
        return RunDir(self.run.path, self.trainer)

    def calibrate(self, run: RunDir, groups: dict[str, list[str]]):
        return run.run(Calibrate(self.context(), groups, self.calibration,
                                 self._calibration_identity()))

    def project(self, run: RunDir, groups: dict[str, list[str]], stats) -> dict:
        return run.run(Project(self.context(), groups, stats, self.projection))

    def pruner(self, bases) -> Pruner:
        """The Pruner of this run: ranks in multiples of ``search.rank_multiple``, no unit
        below the ladder's smallest rung; dense weights of pruned units wait on disk in
        ``<run>/.parked`` when the units hold more than ``PARK_ABOVE`` bytes on the host."""
        pruner = Pruner(self.lm.net, bases, self.search.rank_multiple, min(self.search.ladder))
        held = sum(p.numel() * p.element_size() for unit in pruner.units.values()
                   for m in unit.dense.values() for p in m.parameters()
                   if p.device.type == "cpu")
        if held > PARK_ABOVE:
            pruner.park = self._parked()
            shutil.rmtree(pruner.park, ignore_errors=True)  # a killed run's files
            pruner.park.mkdir(parents=True)
        return pruner

    def _parked(self):
        """This rank's folder of parked dense weights (removed when the run ends)."""
        return self.run.path / ".parked" / f"rank-{getattr(self.trainer, 'global_rank', 0)}"

    def fit(self, on_start: Callable[[], None] | None = None) -> dict:
        """Every stage, holding ``<run>/.lock`` throughout: two runs writing one folder would
        corrupt each other's stages. ``on_start`` runs first under the lock (the CLI writes
        the run's config.yaml there)."""
        self.run.check()  # before the lock creates the folder
        with RunDir(self.run.path, self.trainer).lock():
            if on_start is not None:
                on_start()
            try:
                return self._fit()
            finally:
                shutil.rmtree(self._parked(), ignore_errors=True)

    def _fit(self) -> dict:
        run, ctx = self.load(), self.context()
        net = self.lm.net
        groups = self.lm.adapter.input_groups(net)
        dense_params = sum(p.numel() for p in net.parameters())
        stats = self.calibrate(run, groups)
        bases = self.project(run, groups, stats)
        pruner = self.pruner(bases)  # owns the model's levels
        found = run.run(Search(ctx, pruner, stats, groups, self.search))
        self._log_search(found.record())
        levels, accuracy = found.levels, found.accuracy
        refitted = run.run(Refit(ctx, pruner, levels, accuracy, self.refit))
        accuracy = self._use(pruner, refitted, accuracy)
        distilled = run.run(Distill(ctx, pruner, levels, accuracy, self.distill))
        accuracy = self._use(pruner, distilled, accuracy)
        recovered = run.run(Recover(ctx, pruner, levels, self.recover))
        # what is exported: the levels the confirmation split accepts (stepped back if need
        # be), with LoRA where it raises confirmation accuracy beyond the noise
        confirmed = run.run(Confirm(ctx, pruner, found, recovered, accuracy, self.search,
                                    self.recover.keep_z))
        final = "pruned+lora" if confirmed.lora else "pruned"
        layout = run.run(Export(ctx, pruner, confirmed.levels,
                                recovered.weights if confirmed.lora else {}, self.export))
        report = run.run(Evaluate(ctx, pruner, self.search, found, confirmed,
                                  {"refit": refitted, "distill": distilled}, recovered,
                                  accuracy, final, self.transfer, self.quantize, dense_params))
        scores = run.run(LmEval(ctx, pruner, final, self.lm_eval))
        if scores:
            report["lm_eval"] = scores
        report["stage_seconds"] = dict(run.timings)
        self._publish(report, layout)
        return report

    def _log_plots(self) -> None:
        """The search's plots (levels.png, fitness.png) to the loggers that take images: W&B
        and others with ``log_image``, TensorBoard, MLflow (as artifacts). The CSV logger has
        them as files in the run folder."""
        from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

        for path in sorted((self.run.path / "search").glob("*.png")):
            key = f"search/{path.stem}"
            for logger in self.trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    import matplotlib.image

                    logger.experiment.add_image(key, matplotlib.image.imread(path),
                                                dataformats="HWC")
                elif isinstance(logger, MLFlowLogger):
                    logger.experiment.log_artifact(logger.run_id, str(path), "search")
                elif hasattr(logger, "log_image"):
                    logger.log_image(key=key, images=[str(path)])

    @staticmethod
    def _use(pruner: Pruner, step: Compensated, accuracy: float) -> float:
        """Hand a compensation stage's weights to the pruner when they are kept; the pruned
        model's validation accuracy after it."""
        if step.used:
            pruner.use(step.factors)
        return step.accuracy(accuracy)

    def _engine_files(self) -> dict:
        """What the export stage wrote besides the hf folder: ``{"gguf": gguf.json,
        "decilm": decilm.json, "standard": True}`` for the formats written."""
        folder, written = self.run.path / "export", {}
        for name in ("gguf", "decilm"):
            if name in self.export.formats and (folder / f"{name}.json").exists():
                written[name] = read_json(folder / f"{name}.json")
        if "standard" in self.export.formats and (folder / "standard").exists():
            written["standard"] = True
        return written

    def _publish(self, report: dict, layout: dict) -> None:
        """The summary to the loggers and the run folder, the model card, the hub upload."""
        for row, values in report["rows"].items():
            self.log({f"final/{row}/{k}": v for k, v in values.items()})
        if self.trainer.is_global_zero:
            self._log_plots()
            write_json(self.run.path / "summary.json", report)
            prompt = getattr(self.data.task, "prompt", None)  # as the model saw it
            prompt = prompt and self.data.task.chat(self.data.tokenizer, prompt)
            card = model_card(report, hub_id(self.lm.pretrained), type(self.data.task).__name__,
                              str(self.data.source), prompt,
                              layout, getattr(self.data.task, "metric", "accuracy"),
                              self.export.push_to_hub, **self._engine_files())
            folder = self.run.path / "export" / "model"
            write_text(folder / "README.md", card)
            if self.export.push_to_hub:
                url = push_to_hub(folder, self.export.push_to_hub, self.export.private)
                say(f"pushed {folder} to {url}")
        say(format_summary(report))
