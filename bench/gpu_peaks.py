"""``sieve-pl fit`` with the peak CUDA memory of each stage recorded (for bench/gpu_smoke.sh).

    python bench/gpu_peaks.py <sieve-pl fit options> --peaks peaks.json
"""
from __future__ import annotations

import json
import sys

import torch

from sieve_pl.api import RunDir, main

args = sys.argv[1:]
where = args.index("--peaks")
out = args[where + 1]
del args[where:where + 2]
peaks: dict[str, float] = {}
original = RunDir.run


def run(self, stage):
    """Each stage's own peak: the allocator's high-water mark is reset before it starts."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    try:
        return original(self, stage)
    finally:
        torch.cuda.synchronize()
        peaks[stage.name] = round(torch.cuda.max_memory_allocated() / 2**20)
        with open(out, "w") as f:
            json.dump(peaks, f, indent=2)


RunDir.run = run
main(["fit", *args])
