"""``sieve-pl``: task-specific pruning of causal LMs (LLM-Sieve) as a Lightning pipeline.

``fit`` calibrates, projects, searches, exports and evaluates (stages skipped when done);
``validate`` / ``test`` score the base model and, when the run has finished, its pruned model on
the validation / test split; ``measure`` writes one model's accuracy, latency, memory and size
as JSON (``fit`` runs it in a fresh process per deployable form).
"""
from __future__ import annotations

import signal
import sys
import warnings
from pathlib import Path
from typing import Literal, Optional

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn
from safetensors import SafetensorError

from .errors import SieveError, one_line, write_error
from .io import die_with_parent, say, write_json
from .models.module import SieveLM, evaluate, measure
from .pipeline import Pipeline, RunConfig
from .rundir import verify
from .stages.calibrate import CalibrationConfig
from .stages.distill import DistillConfig
from .stages.evaluate import ExportConfig, QuantizeConfig, TransferConfig
from .stages.lm_eval import LmEvalConfig
from .stages.project import ProjectionConfig
from .stages.recover import RecoverConfig
from .stages.refit import RefitConfig
from .stages.search_config import SearchConfig
from .tasks.datamodule import TaskDataModule

STAGE_CONFIGS = {"run": RunConfig, "calibration": CalibrationConfig,
                 "projection": ProjectionConfig, "search": SearchConfig, "refit": RefitConfig,
                 "distill": DistillConfig, "recover": RecoverConfig, "quantize": QuantizeConfig,
                 "transfer": TransferConfig, "export": ExportConfig, "lm_eval": LmEvalConfig}


COMMANDS = {
    "fit": "prune: calibrate, project, search, refit, distill, recover, export, evaluate "
           "(finished stages are skipped; rerun the same command to resume)",
    "validate": "score the base model and, once exported, the pruned one on the validation split",
    "test": "score the base model and, once exported, the pruned one on the test split",
    "measure": "one model's accuracy, latency per example, peak memory, weights in memory and "
               "bytes on disk, as JSON (--out); run it in a fresh process per model",
    "plan": "accelerator memory, host memory, disk and time of every stage, from the model's "
            "config and the data alone (no weights are read)",
}
USAGE = ("usage: sieve-pl {fit,validate,test,measure,plan} [--config CONFIG] [options]\n\n"
         + "\n".join(f"  {name:<9} {text}" for name, text in COMMANDS.items())
         + "\n\nsieve-pl <command> --help lists every option.")


class SieveCLI(LightningCLI):
    """The parser and the objects (trainer, model, data) of one command.

    LightningCLI parses and instantiates (``run=False``: its subcommands map to Trainer methods,
    and pruning is not a Trainer method); :func:`main` runs the command.
    """

    def __init__(self, args=None, run: bool = False, command: str = "fit"):
        self.command = command
        super().__init__(
            SieveLM, TaskDataModule, args=args, run=run, save_config_callback=None,
            auto_configure_optimizers=False,
            # every draw is seeded where it happens (data.seed, search.seed, recover.seed…):
            # the process's RNGs are left alone unless --seed_everything asks
            seed_everything_default=False,
            trainer_defaults={"logger": True, "enable_checkpointing": False,
                              "default_root_dir": None},
            parser_kwargs={"prog": f"sieve-pl {command}",
                           "description": f"sieve-pl {command}: {COMMANDS[command]}."})

    def add_arguments_to_parser(self, parser) -> None:
        for name, cls in STAGE_CONFIGS.items():
            parser.add_class_arguments(cls, name, help=cls.__doc__)
        if self.command == "plan":
            parser.add_argument("--gpus", type=Optional[int], default=None,
                                help="accelerators to plan for (default: the visible GPUs; 0 = "
                                     "everything on the host)")
            parser.add_argument("--gpu_memory", type=Optional[float], default=None,
                                help="GiB per GPU (default: the visible GPU's, else 80)")
            parser.add_argument("--tflops", type=Optional[float], default=None,
                                help="sustained TFLOP/s for the time estimates (default: 200 "
                                     "on GPUs, 0.15 on the host; bench/README, \"Big models "
                                     "layer by layer\")")
            parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                                help="not used")
            return
        if self.command != "fit":
            which = ("base", "pruned") if self.command == "measure" else ("auto", "base", "pruned")
            parser.add_argument(
                "--evaluate", type=Literal[which], default=which[0],
                help="which model to score: base, pruned (the run's export)"
                     + ("" if self.command == "measure" else
                        ", or auto: base, plus the pruned one when the run has been exported"))
            parser.add_argument("--quantized", type=Literal["none", "int8", "nf4"],
                                default="none",
                                help="load the scored model(s) quantized by bitsandbytes")
        if self.command == "measure":
            parser.add_argument("--out", type=str, required=True,
                                help="the JSON file written: validation and test accuracy, "
                                     "latency per test example, peak memory while scoring, "
                                     "weights in memory, bytes on disk")
            parser.add_argument("--examples", type=int, default=0,
                                help="score only N test examples, spread over the split, and "
                                     "no validation (0: both whole splits)")
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="not used: a run resumes from its run folder (run.root / "
                                 "run.name) when the same command is run again")

    def before_instantiate_classes(self) -> None:
        """Lightning's default logger (TensorBoard if installed, else CSV) writes into the run
        folder (``<run>/lightning_logs``) unless ``trainer.default_root_dir`` says otherwise
        (``fit`` only: the readers ``validate`` / ``test`` / ``measure`` log nothing);
        prediction loops get named bars unless bars are off or the user brings one; with bars
        off, no library draws one either."""
        cfg = self.config
        if cfg.ckpt_path:
            raise SieveError("--ckpt_path is not used: sieve-pl resumes from its run folder "
                             "(run.root/run.name); rerun the same command to resume")
        if self.command != "fit":  # readers write nothing into the run folder (read-only ok)
            if cfg.trainer.logger is True:
                cfg.trainer.logger = False
        elif cfg.trainer.default_root_dir is None:
            cfg.trainer.default_root_dir = str(Path(cfg.run.root) / cfg.run.name)
        # (a run's saved config.yaml lists the StageBar added here: drop it, then add it back
        # only where a bar is wanted — the measuring subprocesses turn bars off)
        callbacks = [c for c in cfg.trainer.callbacks or []
                     if str(getattr(c, "class_path", c)) != "sieve_pl.progress.StageBar"]
        own_bar = any("ProgressBar" in str(getattr(c, "class_path", c)) for c in callbacks)
        if cfg.trainer.enable_progress_bar is not False and not own_bar:
            callbacks.append(Namespace(class_path="sieve_pl.progress.StageBar"))
        if cfg.trainer.enable_progress_bar is False:  # transformers' and datasets' bars too
            import datasets
            import transformers

            transformers.utils.logging.disable_progress_bar()
            datasets.disable_progress_bars()
        cfg.trainer.callbacks = callbacks
        if self.command == "fit" and cfg.trainer.max_epochs is not None:
            rank_zero_warn("trainer.max_epochs is not used: recover.epochs, distill.epochs and "
                           "projection.learned.epochs set each training stage's epochs")

    def pipeline(self) -> Pipeline:
        cfg = self.config_init
        return Pipeline(self.trainer, self.model, self.datamodule,
                        **{name: cfg[name] for name in STAGE_CONFIGS},
                        make_trainer=self.instantiate_trainer)


def fit(cli: SieveCLI) -> None:
    pipeline = cli.pipeline()
    pipeline.prepare()
    pipeline.check_run_dir()
    planned(cli, pipeline)

    def save_config() -> None:  # the run's own config, reusable with --config
        if cli.trainer.is_global_zero:
            cli.parser.save(cli.config, pipeline.run.path / "config.yaml", overwrite=True,
                            skip_check=True)

    pipeline.fit(save_config)


def models(cli: SieveCLI) -> list[tuple[str, SieveLM]]:
    """The models ``--evaluate`` names (the base model and/or the run's export), after the
    checks that need no weights."""
    pipeline = cli.pipeline()
    pipeline.prepare(fitting=False)
    which = cli.config_init["evaluate"]
    exported = pipeline.run.path / "export" / "model"
    rows = [("base", cli.model)] if which in ("auto", "base") else []
    if which == "pruned" or (which == "auto" and (exported / "config.json").exists()):
        if not (exported / "config.json").exists():
            raise SieveError(f"no exported model at {exported}: run `sieve-pl fit` first")
        verify(exported.parent)  # the checksums export/stage.json recorded
        rows.append(("pruned", SieveLM(str(exported), cli.model.dtype_name)))
    return rows


def score(cli: SieveCLI, split: str) -> None:
    """``validate`` / ``test``: the base model and, once exported, the pruned one."""
    data = cli.datamodule
    for name, lm in models(cli):
        lm.quantize = cli.config_init["quantized"]
        lm.load()
        lm.set_task(data.task)
        acc = evaluate(cli.trainer, lm, data.loader(split), f"evaluate {name}/{split}")
        params = sum(p.numel() for p in lm.net.parameters())
        say(f"{name:>6}: {split} {data.task.metric} {100 * acc:.2f}% "
            f"({len(data.splits[split])} examples, {params / 1e6:.2f}M parameters"
            f"{'' if lm.quantize == 'none' else ', ' + lm.quantize})")


def planned(cli: SieveCLI, pipeline: Pipeline, gpus: int | None = None,
            gpu_gib: float | None = None, tflops: float | None = None):
    """The plan of this run: (rows, model shapes, gpus, GiB per GPU, split), for ``gpus``
    accelerators (default: those this process would use). Without arguments (``fit``) it
    refuses, in one line before any weight loads, a run a stage of which cannot fit."""
    import torch

    from .plan import check, estimate, shapes

    refuse = gpus is None and gpu_gib is None
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus is None:
        accelerator = str(cli.config.trainer.accelerator)
        gpus = 0 if accelerator == "cpu" or not visible else (
            visible if cli.model.placement == "split" else 1)
    gpu_gib = gpu_gib or (torch.cuda.get_device_properties(0).total_memory / 2**30
                          if visible else 80.0)
    found = shapes(cli.model, cli.datamodule, pipeline.projection)
    split = bool(gpus) and (cli.model.placement == "split" or (
        cli.model.placement == "auto" and found.model_bytes > 0.7 * gpu_gib * 2**30))
    rows = estimate(found, pipeline.calibration, pipeline.search, pipeline.recover, gpus,
                    tflops or (200.0 if gpus else 0.15), split, cli.datamodule.batch_size)
    if refuse:
        host = _host_gib()
        check(rows, gpus, gpu_gib * 1024, host * 1024 if host else None)
    return rows, found, gpus, gpu_gib, split


def plan(cli: SieveCLI) -> None:
    """``plan``: the per-stage estimates for ``--gpus`` accelerators, and whether they fit."""
    import torch

    from .plan import table

    cfg = cli.config_init
    pipeline = cli.pipeline()
    pipeline.prepare()
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    rows, found, gpus, gpu_gib, split = planned(
        cli, pipeline, visible if cfg["gpus"] is None else cfg["gpus"], cfg["gpu_memory"],
        cfg["tflops"])
    say(f"{cli.model.pretrained}: {found.layers} layers, {found.model_bytes / 2**30:.1f} GiB of "
        f"{cli.model.dtype_name} weights; whole-model stages "
        f"{'split over the GPUs' if split else 'on each process' + chr(39) + 's device'}")
    say(table(rows, gpus))
    host = _host_gib()
    for row in rows:
        if gpus and row.accelerator_mb > gpu_gib * 1024:
            say(f"does not fit: {row.stage} needs {row.accelerator_mb / 1024:.1f} GiB per GPU "
                f"of {gpu_gib:.0f}")
        if host and row.host_mb > host * 1024:
            say(f"does not fit here: {row.stage} needs {row.host_mb / 1024:.1f} GiB of host "
                f"memory of this machine's {host:.0f}")


def _host_gib() -> float | None:
    try:
        line = next(l for l in Path("/proc/meminfo").read_text().splitlines()
                    if l.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 2**20


def measure_one(cli: SieveCLI) -> None:
    """``measure``: one model, in this process (peak memory is the process's own)."""
    cfg = cli.config_init
    [(name, lm)] = models(cli)
    result = measure(cli.trainer, lm, cli.datamodule, cfg["quantized"], cfg["examples"])
    write_json(Path(cfg["out"]), result)
    say(f"{name}: test {100 * result['test']:.2f}%, "
        f"{result['latency_ms_per_example']:.1f} ms per example, "
        f"peak {result['peak_memory_mb']:.0f} MB, disk {result['disk_mb']:.0f} MB -> {cfg['out']}")


def stop_on_sigterm() -> None:
    """SIGTERM (``kill``, a scheduler's preemption) ends the run. Lightning's own handler only
    sets a flag that fit loops read, so without this a run in calibration, the search or an
    evaluation ignores it; Lightning keeps a handler found in place and calls it after its own
    (which forwards the signal to the processes it launched). Stages write atomically, so the
    rerun resumes where this one stopped."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(args=None) -> None:
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] not in COMMANDS:
        asked = bool(args) and args[0] in ("-h", "--help")
        print(USAGE, file=sys.stdout if asked else sys.stderr)
        sys.exit(0 if asked else 2)
    command, rest = args[0], args[1:]
    # the options are passed explicitly (sys.argv also holds the command, and stays as it is so
    # DDP can relaunch this process); LightningCLI warns about that case
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # predict_step returns nothing on purpose (metrics accumulate in the module)
    warnings.filterwarnings("ignore", message="predict returned None")
    stop_on_sigterm()
    die_with_parent()  # a measuring child of `fit` ends with it
    try:
        cli = SieveCLI(rest, command=command)
        if command == "fit":
            fit(cli)
        elif command == "measure":
            measure_one(cli)
        elif command == "plan":
            plan(cli)
        else:
            score(cli, "validation" if command == "validate" else "test")
    except SieveError as err:
        print(f"sieve-pl: error: {err}", file=sys.stderr)
        sys.exit(2)
    except (OSError, SafetensorError) as err:  # a full disk where no stage caught it (--out)
        if not write_error(err):
            raise
        print(f"sieve-pl: error: a write failed ({one_line(err)}); free space or fix "
              f"permissions and rerun", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
