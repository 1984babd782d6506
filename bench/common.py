"""What every benchmark script shares: opening a finished run, and writing results with the
machine they were measured on."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from sieve_pl.api import Pruner, SieveCLI


def open_run(cli_args: list[str]):
    """The run's pipeline with the model loaded, and its run directory (stages reused)."""
    cli = SieveCLI(args=cli_args + ["--trainer.enable_progress_bar", "false"], run=False)
    pipeline = cli.pipeline()
    return pipeline, pipeline.load()


def run_pruner(pipeline, run) -> Pruner:
    """A Pruner over the run's own projection (its calibration and projection stages reused)."""
    net = pipeline.lm.net
    groups = pipeline.lm.adapter.input_groups(net)
    bases = pipeline.project(run, groups, pipeline.calibrate(run, groups))
    return pipeline.pruner(bases)


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def write_result(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    Path(path).write_text(json.dumps({**payload, "machine": machine}, indent=2) + "\n")
