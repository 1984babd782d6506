"""How much pruning LoRA recovery buys back: accuracy before and after recovery, per keep level.

The run's own calibration and projection are reused from its run directory (made by
``sieve-pl fit``), the same splits for every row; each level gets the run's ``recover`` settings
(same objective, LoRA budget, steps and seed; with ``objective: distill`` the dense model's
answers on the pool are computed once and every level is distilled towards them). Rows: uniform keep levels (``--levels``; 1.0 is the dense
model, the fair baseline for every recovered row), the genetic search's levels if the run has
them, and optionally QLoRA (``--qlora nf4``) at the search's levels. Usage:

    python bench/recovery.py --config configs/demo.yaml [--levels 1.0,0.8,0.6,0.4] [--qlora nf4]

Prints a Markdown table and writes bench/results/recovery.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path


from common import open_run, run_pruner, write_result
from sieve_pl.api import evaluate, lora_targets, outputs, read_json, recover, recovery_loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1.0,0.8,0.6,0.4")
    parser.add_argument("--qlora", default="none", choices=["none", "nf4", "int8"])
    parser.add_argument("--out", default="bench/results/recovery.json")
    args, cli_args = parser.parse_known_args()

    pipeline, run = open_run(cli_args)
    lm, data, trainer = pipeline.lm, pipeline.data, pipeline.trainer
    pruner = run_pruner(pipeline, run)
    config = dataclasses.replace(pipeline.recover, enabled=True)

    variants = [(f"uniform {float(k):g}", float(k), "none") for k in args.levels.split(",")]
    searched = run.path / "search" / "search.json"
    if searched.exists():
        levels = read_json(searched)["levels"]
        variants.append(("genetic", levels, "none"))
        if args.qlora != "none":
            variants.append(("genetic", levels, args.qlora))

    def accuracies() -> dict:
        return {"validation": evaluate(trainer, lm, data.val_dataloader()),
                "test": evaluate(trainer, lm, data.test_dataloader())}

    teacher = None
    if config.objective == "distill":
        with pruner.at(1.0):
            teacher = outputs(trainer, lm.net, data.pool_loader(), data.task.teacher)

    rows = []
    work = Path(args.out).parent / ".recovery.work"

    def save() -> None:  # after every row: a long sweep that is stopped keeps what it measured
        write_result(args.out, {
            "rows": rows, "sizes": vars(data.sizes), "model": lm.pretrained,
            "pool": len(data.pool()),
            "recover": dataclasses.asdict(config)})

    for name, keep, fmt in variants:
        with pruner.at(keep):
            kept, total = pruner.params(keep)
            row = {"levels": name, "kept": kept / total, "lora": "none", **accuracies()}
            if fmt == "none":  # the un-recovered model is the same for LoRA and QLoRA
                rows.append(row)
                print(rows[-1], file=sys.stderr, flush=True)
                save()
            shutil.rmtree(work, ignore_errors=True)
            start = time.perf_counter()
            result = recover(pipeline.make_trainer, lm.net, data.task,
                             lora_targets(lm.net, lm.adapter.layers),
                             recovery_loader(data, config, teacher), data.val_dataloader(),
                             dataclasses.replace(config, quantize=fmt), work)
            seconds = time.perf_counter() - start
            with pruner.at(keep, result["weights"]):
                rows.append({**row, "lora": "qlora-" + fmt if fmt != "none" else "lora",
                             **accuracies(), "recover_seconds": seconds,
                             "recover_peak_memory_mb": result["peak_memory_mb"],
                             "epochs": result["epochs"]})
        print(rows[-1], file=sys.stderr, flush=True)
        save()
    shutil.rmtree(work, ignore_errors=True)

    print("| levels | decoder weights kept | recovery | validation acc | test acc "
          "| recovery s | recovery peak MB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        extra = (f"{r['recover_seconds']:.0f} | {r['recover_peak_memory_mb']:.0f}"
                 if "recover_seconds" in r else " | ")
        print(f"| {r['levels']} | {100 * r['kept']:.1f}% | {r['lora']} "
              f"| {100 * r['validation']:.1f}% | {100 * r['test']:.1f}% | {extra} |")


if __name__ == "__main__":
    main()
