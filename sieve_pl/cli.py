"""``sieve-pl``: a LightningCLI whose ``fit`` runs the whole pruning pipeline.

``fit`` calibrates, projects, searches, exports and evaluates (stages skipped when done);
``validate`` / ``test`` score the base model and, when the run has finished, its pruned model on
the validation / test split.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from .errors import SieveError
from .io import say, write_json
from .models.module import SieveLM, evaluate, measure
from .pipeline import Pipeline, RunConfig
from .stages.calibrate import CalibrationConfig
from .stages.distill import DistillConfig
from .stages.evaluate import ExportConfig, QuantizeConfig, TransferConfig
from .stages.lm_eval import LmEvalConfig
from .stages.project import ProjectionConfig
from .stages.recover import RecoverConfig
from .stages.refit import RefitConfig
from .stages.search import SearchConfig
from .tasks.datamodule import TaskDataModule

STAGE_CONFIGS = {"run": RunConfig, "calibration": CalibrationConfig,
                 "projection": ProjectionConfig, "search": SearchConfig, "refit": RefitConfig,
                 "distill": DistillConfig, "recover": RecoverConfig, "quantize": QuantizeConfig,
                 "transfer": TransferConfig, "export": ExportConfig, "lm_eval": LmEvalConfig}


class SieveCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        super().__init__(
            SieveLM, TaskDataModule, args=args, run=run, save_config_callback=None,
            auto_configure_optimizers=False, seed_everything_default=0,
            trainer_defaults={"logger": True, "enable_checkpointing": False,
                              "default_root_dir": None},
            parser_kwargs={"description": __doc__})

    def add_arguments_to_parser(self, parser) -> None:
        for name, cls in STAGE_CONFIGS.items():
            parser.add_class_arguments(cls, name, help=cls.__doc__)
        parser.add_argument("--evaluate", type=Literal["auto", "base", "pruned"], default="auto",
                            help="validate/test: which model to score (auto: base, plus the "
                                 "pruned one when the run has been exported)")
        parser.add_argument("--quantized", type=Literal["none", "int8", "nf4"], default="none",
                            help="validate/test: load the scored model(s) quantized by "
                                 "bitsandbytes")
        parser.add_argument("--measure_json", type=Optional[str], default=None,
                            help="validate/test: score one model on the validation and test "
                                 "splits and write accuracy, latency per example, peak memory "
                                 "while scoring, weights in memory and bytes on disk as JSON")

    def before_instantiate_classes(self) -> None:
        """Lightning's default logger (TensorBoard if installed, else CSV) writes into the run
        folder (``<run>/lightning_logs``) unless ``trainer.default_root_dir`` says otherwise."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.trainer.default_root_dir is None:
            cfg.trainer.default_root_dir = str(Path(cfg.run.root) / cfg.run.name)
        callbacks = cfg.trainer.callbacks or []
        own_bar = any("ProgressBar" in str(getattr(c, "class_path", c)) for c in callbacks)
        if cfg.trainer.enable_progress_bar is not False and not own_bar:  # named stage bars
            cfg.trainer.callbacks = [*callbacks, Namespace(class_path="sieve_pl.progress.StageBar")]
        if self.subcommand == "fit" and cfg.trainer.max_epochs is not None:
            rank_zero_warn("trainer.max_epochs is not used: recover.epochs, distill.epochs and "
                           "projection.learned.epochs set each training stage's epochs")

    def pipeline(self, subcommand: str | None = None) -> Pipeline:
        cfg = self.config_init[subcommand] if subcommand else self.config_init
        return Pipeline(self.trainer, self.model, self.datamodule,
                        **{name: cfg[name] for name in STAGE_CONFIGS},
                        make_trainer=self.instantiate_trainer)

    def _run_subcommand(self, subcommand: str) -> None:
        if self.config[subcommand].get("ckpt_path"):
            raise SieveError("--ckpt_path is not used: sieve-pl resumes from its run folder "
                             "(run.root/run.name); rerun the same command to resume")
        pipeline = self.pipeline(subcommand)
        if subcommand == "fit":
            pipeline.prepare()
            pipeline.check_run_dir()

            def save_config() -> None:  # the run's own config, reusable with --config
                if self.trainer.is_global_zero:
                    self._parser("fit").save(self.config["fit"], pipeline.run.path / "config.yaml",
                                             overwrite=True, skip_check=True)

            pipeline.fit(save_config)
            return
        cfg = self.config_init[subcommand]
        pipeline.prepare(fitting=False)
        exported = pipeline.run.path / "export" / "model"
        rows = []
        if cfg["evaluate"] in ("auto", "base"):
            rows.append(("base", self.model))
        if cfg["evaluate"] == "pruned" or (cfg["evaluate"] == "auto"
                                           and (exported / "config.json").exists()):
            if not (exported / "config.json").exists():
                raise SieveError(f"no exported model at {exported}: run `sieve-pl fit` first")
            rows.append(("pruned", SieveLM(str(exported), self.model.dtype_name)))
        if cfg["measure_json"]:
            if len(rows) != 1:
                raise SieveError("--measure_json scores one model: add --evaluate base|pruned")
            write_json(Path(cfg["measure_json"]), measure(self.trainer, rows[0][1],
                                                          self.datamodule, cfg["quantized"]))
            return
        split = "validation" if subcommand == "validate" else "test"
        data = self.datamodule
        for name, lm in rows:
            lm.quantize = cfg["quantized"]
            lm.load()
            lm.set_task(data.task)
            acc = evaluate(self.trainer, lm, data.loader(split))
            params = sum(p.numel() for p in lm.net.parameters())
            say(f"{name:>6}: {split} {data.task.metric} {100 * acc:.2f}% "
                f"({len(data.splits[split])} examples, {params / 1e6:.2f}M parameters"
                f"{'' if lm.quantize == 'none' else ', ' + lm.quantize})")


def main(args=None) -> None:
    try:
        SieveCLI(args)
    except SieveError as err:
        print(f"sieve-pl: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
