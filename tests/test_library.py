"""sieve_pl as a library: importing it changes no process-wide state (warning filters)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]

# imports the third-party packages first (their own filters are theirs), then every sieve_pl
# module, and prints the filters each import added
SCRIPT = r"""
import importlib, pkgutil, warnings
import torch, lightning, transformers, deap, jsonargparse, torchmetrics  # noqa: F401
import sieve_pl
names = sorted(m.name for m in pkgutil.walk_packages(sieve_pl.__path__, "sieve_pl."))
for name in names:
    before = list(warnings.filters)
    importlib.import_module(name)
    added = [f for f in warnings.filters if f not in before]
    if added:
        print(name, added)
print("modules", len(names))
"""


def test_importing_sieve_pl_leaves_the_warning_filters_alone():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("modules") and int(lines[-1].split()[1]) > 20
    assert lines[:-1] == [], "\n".join(lines[:-1])


def test_opening_a_run_seeds_no_process_rng(tiny_llama):
    """Every draw is seeded where it happens: parsing a command (LightningCLI seeds the
    process's RNGs by default) leaves python's and torch's RNG state as it was."""
    import random

    import torch

    from sieve_pl.api import SieveCLI

    random.seed(123)
    torch.manual_seed(456)
    before = random.getstate(), torch.random.get_rng_state()
    SieveCLI(args=["--model.pretrained", tiny_llama], run=False)
    assert random.getstate() == before[0]
    assert torch.equal(torch.random.get_rng_state(), before[1])
