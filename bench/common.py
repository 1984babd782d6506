"""What every benchmark script shares: opening a finished run, and writing results with the
machine they were measured on."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from sieve_pl.cli import SieveCLI


def open_run(cli_args: list[str]):
    """The run's pipeline with the model loaded, and its run directory (stages reused)."""
    cli = SieveCLI(args=cli_args + ["--trainer.enable_progress_bar", "false"], run=False)
    pipeline = cli.pipeline()
    return pipeline, pipeline.load()


def write_result(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    Path(path).write_text(json.dumps({**payload, "machine": machine}, indent=2) + "\n")
