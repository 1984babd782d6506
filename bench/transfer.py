"""Cross-dataset accuracy of every level set the search produced: is the loss on another
dataset of the same task a property of the cut's size, or of where the search put it?

Scores the run's uniform level, seed allocations and GA levels (from ``search/search.json``) on the
``transfer`` sources, with their decoder weights kept. Reuses the run's calibration, projection
and search; nothing is trained. Usage:

    python bench/transfer.py --config configs/demo.yaml --run.name demo_val600

Prints a Markdown table and writes bench/results/transfer.json.
"""
from __future__ import annotations

import argparse

from common import open_run, run_pruner, write_result
from sieve_pl.api import evaluate, read_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/transfer.json")
    args, cli_args = parser.parse_known_args()
    pipeline, run = open_run(cli_args)
    lm, data, trainer = pipeline.lm, pipeline.data, pipeline.trainer
    pruner = run_pruner(pipeline, run)
    found = read_json(run.path / "search" / "search.json")
    variants = [("base", 1.0), ("uniform", found["uniform"]["keep"])]
    if found.get("seed"):  # runs made before the sensitivity seed
        variants.append(("per-kind seed", found["seed"]["levels"]))
    for name, seed in (found.get("seeds") or {}).items():
        variants.append((f"seed: {name}", seed["levels"]))
    variants.append(("genetic", found["levels"]))
    others = {s: data.other_source(s, m, pipeline.transfer.examples)
              for s, m in pipeline.transfer.sources.items()}
    rows = []
    for name, keep in variants:
        kept, total = pruner.params(keep)
        with pruner.at(keep):
            row = {"variant": name, "kept": kept / total,
                   "test": evaluate(trainer, lm, data.test_dataloader())}
            for source, other in others.items():
                row[source] = evaluate(trainer, lm, other.test_dataloader())
        rows.append(row)
        print(row, flush=True)
    columns = ["test", *others]
    print("| levels | decoder weights kept | " + " | ".join(columns) + " |\n|---|---|"
          + "---|" * len(columns))
    for r in rows:
        print(f"| {r['variant']} | {100 * r['kept']:.1f}% | "
              + " | ".join(f"{100 * r[c]:.1f}%" for c in columns) + " |")
    write_result(args.out, {"rows": rows, "run": str(run.path),
                            "transfer_examples": pipeline.transfer.examples})


if __name__ == "__main__":
    main()
