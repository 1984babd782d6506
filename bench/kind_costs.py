"""What each kind of pruning unit costs: one kind cut at a time, the answers it changes.

For a finished run (its calibration and projection reused), every kind of unit (MLP, q, k, v,
o, …) is cut alone to each ``--keeps`` level, the other units dense, and scored on the
validation split against the dense model: the accuracy, the answers that flip, and the standard
deviation of the change of each example's class-score margin (a 0/1 accuracy hides how far
answers move; the margin does not). Then every unit at one uniform level, on validation and
test. Classification tasks (the margin is the first two classes' log-likelihood difference).
Usage:

    python bench/kind_costs.py --config configs/demo.yaml --run.name demo [--keeps 0.9,0.7]

Prints Markdown tables and writes bench/results/kind_costs.json.
"""
from __future__ import annotations

import argparse

import torch

from common import open_run, run_pruner, write_result
from sieve_pl.api import layer_and_kind


def margins(lm, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's margin of class 0 over class 1, and its label."""
    out, labels = [], []
    with torch.inference_mode():
        for batch in loader:
            scores = lm.task.class_scores(lm.net.eval(), batch)
            out.append(scores[:, 0] - scores[:, 1])
            labels.append(batch["labels"])
    return torch.cat(out), torch.cat(labels)


def compare(dense: tuple[torch.Tensor, torch.Tensor], pruned: torch.Tensor) -> dict:
    base, labels = dense
    return {"accuracy": float(((pruned < 0).long() == labels).float().mean()),
            "flips": int(((pruned < 0) != (base < 0)).sum()),
            "margin_shift_sd": float((pruned - base).std())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keeps", default="0.9,0.7")
    parser.add_argument("--uniform", default="0.8,0.7,0.6")
    parser.add_argument("--out", default="bench/results/kind_costs.json")
    args, cli_args = parser.parse_known_args()
    pipeline, run = open_run(cli_args)
    pruner, lm, data = run_pruner(pipeline, run), pipeline.lm, pipeline.data
    loaders = {"validation": data.val_dataloader(), "test": data.test_dataloader()}
    dense = {split: margins(lm, loader) for split, loader in loaders.items()}
    kinds: dict[str, list[str]] = {}
    for name in pruner.names:
        kinds.setdefault(layer_and_kind(name)[1], []).append(name)
    total = pruner.params(1.0)[1]

    def score(levels, splits) -> dict:
        with pruner.at(levels):
            row = {split: compare(dense[split], margins(lm, loaders[split])[0]) for split in splits}
        return {"removed": 1 - pruner.params(levels)[0] / total, **row}

    rows = []
    for kind, names in kinds.items():
        for keep in (float(k) for k in args.keeps.split(",")):
            levels = {n: (keep if n in names else 1.0) for n in pruner.names}
            rows.append({"kind": kind, "keep": keep, **score(levels, ["validation"])})
            print(rows[-1], flush=True)
    uniform = []
    for keep in (float(k) for k in args.uniform.split(",")):
        uniform.append({"keep": keep, **score(keep, ["validation", "test"])})
        print(uniform[-1], flush=True)
    base = {split: float(((m < 0).long() == y).float().mean()) for split, (m, y) in dense.items()}
    write_result(args.out, {"kinds": rows, "uniform": uniform, "base": base,
                            "run": str(run.path)})
    print(f"\nbase: validation {100 * base['validation']:.1f}%, test {100 * base['test']:.1f}%\n")
    print("| units cut | keep | decoder weights removed | validation | answers flipped | "
          "margin shift (sd) |\n|---|---|---|---|---|---|")
    for r in rows:
        v = r["validation"]
        print(f"| {r['kind']} | {r['keep']:g} | {100 * r['removed']:.1f}% | "
              f"{100 * v['accuracy']:.1f}% | {v['flips']} | {v['margin_shift_sd']:.3f} |")
    print("\n| uniform keep | removed | validation | flipped | test | flipped |\n"
          "|---|---|---|---|---|---|")
    for r in uniform:
        v, t = r["validation"], r["test"]
        print(f"| {r['keep']:g} | {100 * r['removed']:.1f}% | {100 * v['accuracy']:.1f}% | "
              f"{v['flips']} | {100 * t['accuracy']:.1f}% | {t['flips']} |")


if __name__ == "__main__":
    main()
