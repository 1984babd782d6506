"""The demo's pruned variants side by side at the same parameter count (the run's GA levels):
closed form, + sequential refit, + distillation, + LoRA (each that the run computed, whether or
not its validation check kept it), on the test split and on each ``transfer`` source.

Reuses the run's stages (calibration, projection, search, refit, distillation, recovery weights)
from its run directory; nothing is trained here. Usage:

    python bench/demo_variants.py --config configs/demo.yaml

Prints a Markdown table and writes bench/results/demo_variants.json.
"""
from __future__ import annotations

import argparse

from safetensors.torch import load_file

from common import open_run, write_result
from sieve_pl.api import Compensated, evaluate, Pruner, read_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/demo_variants.json")
    args, cli_args = parser.parse_known_args()
    pipeline, run = open_run(cli_args)
    lm, data, trainer = pipeline.lm, pipeline.data, pipeline.trainer
    groups = lm.adapter.input_groups(lm.net)
    bases = pipeline.project(run, groups, pipeline.calibrate(run, groups))
    levels = read_json(run.path / "search" / "search.json")["levels"]
    recovered = run.path / "recover" / "weights.safetensors"
    variants = [("base", 1.0, {}, {}), ("closed form", levels, {}, {})]
    for stage, name in (("refit", "+ sequential refit"), ("distill", "+ distillation")):
        if (run.path / stage / "refit.json").exists():
            step = Compensated.load(run.path / stage)
            if step.factors:
                variants.append((name, levels, step.factors, {}))
    if recovered.exists() and load_file(str(recovered)):
        variants.append(("+ LoRA", levels, {}, load_file(str(recovered))))
    others = {s: data.other_source(s, m, pipeline.transfer.examples)
              for s, m in pipeline.transfer.sources.items()}
    rows = []
    for name, keep, factors, weights in variants:
        pruner = pipeline.pruner(bases)  # its own factors only
        pruner.use(factors)
        with pruner.at(keep, weights):
            row = {"variant": name, "test": evaluate(trainer, lm, data.test_dataloader())}
            for source, other in others.items():
                row[source] = evaluate(trainer, lm, other.test_dataloader())
        rows.append(row)
        print(row, flush=True)
    columns = ["test", *others]
    print("| variant | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for r in rows:
        print(f"| {r['variant']} | " + " | ".join(f"{100 * r[c]:.1f}%" for c in columns) + " |")
    write_result(args.out, {
        "rows": rows, "levels_from": str(run.path / "search"),
        "transfer_examples": pipeline.transfer.examples})


if __name__ == "__main__":
    main()
