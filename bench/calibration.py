"""How much calibration data the projections need, and whether weighting the position the task
reads helps: the uniform keep level found at epsilon, its test accuracy and its transfer to
another dataset of the task, per calibration setting.

Every variant draws the same 2,048-example calibration split (``--data.sizes.calibration
2048``) and uses ``--calibration.examples`` of it, so the validation and test splits, drawn after
it, are the same examples in every row. Each variant is one ``sieve-pl fit`` run (search
strategy uniform, no recovery, no quantization), one after another. Usage:

    python bench/calibration.py --config configs/demo.yaml

Extra options after ``--config`` go to every run. The uniform bisection's answer moves with the
validation split's noise, so each run's projection is also scored at fixed uniform keep levels
(``--keeps``) on the test split. Rerunning skips the finished fits. Prints Markdown tables and
writes bench/results/calibration.json.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from common import open_run, run_pruner, write_result
from sieve_pl.api import evaluate, read_json

VARIANTS = {  # run name: calibration options
    "cal_256": ["--calibration.examples", "256"],
    "cal_1024": ["--calibration.examples", "1024"],
    "cal_2048": ["--calibration.examples", "0"],
    "cal_256_read8": ["--calibration.examples", "256", "--calibration.read_weight", "8"],
}
COMMON = ["--data.sizes.calibration", "2048", "--search.strategy", "uniform",
          "--search.resolution", "0.01", "--recover.enabled", "false",
          "--quantize.formats", "[]", "--quantize.measure", "false",
          "--transfer.examples", "200", "--trainer.enable_progress_bar", "false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--root", default="checkpoints")
    parser.add_argument("--out", default="bench/results/calibration.json")
    parser.add_argument("--keeps", type=float, nargs="*", default=[0.7, 0.6, 0.5])
    args, extra = parser.parse_known_args()
    rows = []
    for name, options in VARIANTS.items():
        run_args = ["--config", args.config, *COMMON, *options, *extra, "--run.name", name,
                    "--run.root", args.root]
        print("sieve-pl fit " + " ".join(run_args), flush=True)
        subprocess.run(["sieve-pl", "fit", *run_args], check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        summary = read_json(Path(args.root) / name / "summary.json")
        base, pruned = summary["rows"]["base"], summary["rows"]["pruned"]
        transfer = {source: {"base": scores["base"], "pruned": scores["pruned"]}
                    for source, scores in summary["transfer"].items()}
        rows.append({"run": name, "options": options,
                     "removed": 1 - pruned["target_params_kept"] / summary["target_params"],
                     "validation": pruned["validation"], "test": pruned["test"],
                     "base_validation": base["validation"], "base_test": base["test"],
                     "transfer": transfer, "seconds": summary["stage_seconds"],
                     "fixed": fixed_keeps(run_args, args.keeps)})
        print(rows[-1], flush=True)
    print("| calibration | removed | validation | test (base) | " +
          " | ".join(f"{s} (base)" for s in rows[0]["transfer"]) + " | calibrate s |")
    print("|---|---|---|---|" + "---|" * len(rows[0]["transfer"]) + "---|")
    for r in rows:
        cells = [f"{100 * r['removed']:.1f}%", f"{100 * r['validation']:.1f}%",
                 f"{100 * r['test']:.1f}% ({100 * r['base_test']:.1f}%)",
                 *(f"{100 * t['pruned']:.1f}% ({100 * t['base']:.1f}%)"
                   for t in r["transfer"].values()),
                 f"{r['seconds'].get('calibrate', 0):.0f}"]
        print(f"| {' '.join(r['options'])} | " + " | ".join(cells) + " |")
    print("\n| calibration | " + " | ".join(f"test at keep {k:g} (weights kept)"
                                           for k in args.keeps) + " |")
    print("|---|" + "---|" * len(args.keeps))
    for r in rows:
        print(f"| {' '.join(r['options'])} | " + " | ".join(
            f"{100 * f['test']:.1f}% ({100 * f['kept']:.1f}%)" for f in r["fixed"]) + " |")
    write_result(args.out, {"rows": rows, "config": args.config, "common": COMMON,
                            "python": sys.version.split()[0]})


def fixed_keeps(run_args: list[str], keeps: list[float]) -> list[dict]:
    """Test accuracy of the run's projection at each uniform keep level."""
    pipeline, run = open_run(run_args)
    pruner = run_pruner(pipeline, run)
    scored = []
    for keep in keeps:
        kept, total = pruner.params(keep)
        with pruner.at(keep):
            test = evaluate(pipeline.trainer, pipeline.lm, pipeline.data.test_dataloader())
        scored.append({"keep": keep, "kept": kept / total, "test": test})
    return scored


if __name__ == "__main__":
    main()
