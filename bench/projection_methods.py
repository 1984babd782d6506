"""Validation and test accuracy at uniform keep levels for each projection method.

One calibration (the run's own, reused from its run directory when it exists), the same splits
for every row. Usage:

    python bench/projection_methods.py --config configs/demo.yaml [--levels 0.9,0.75,0.5] \
        [--methods output_aligned,weight_svd,input_pca,learned] [--mlp factored,neurons] \
        [--neuron_order greedy,magnitude] [--attention factored,heads] [--units all|mlp|vo]

``--mlp neurons`` prunes each MLP as one unit (neurons kept, down refitted) and the attention
matrices factored by the method; ``--attention heads`` prunes each layer's v and o as one unit
(value dimensions kept per kv head, o refitted). ``--units mlp`` cuts the MLPs only, ``vo`` v and
o only (everything else stays dense).

Rows of methods not measured in this call are kept from an earlier output file, so the slow
``learned`` projection (a gradient-descent fit, the run's ``projection.learned`` settings) can be
measured on its own.

Prints a Markdown table and writes bench/results/projection_methods.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


from common import open_run, write_result
from sieve_pl.api import evaluate, METHODS, project, Pruner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="0.9,0.75,0.5")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--mlp", default="factored")
    parser.add_argument("--neuron_order", default="greedy")
    parser.add_argument("--attention", default="factored")
    parser.add_argument("--units", choices=["all", "mlp", "vo"], default="all")
    parser.add_argument("--out", default="bench/results/projection_methods.json")
    args, cli_args = parser.parse_known_args()
    levels = [float(x) for x in args.levels.split(",")]

    pipeline, run = open_run(cli_args)
    lm, data, trainer = pipeline.lm, pipeline.data, pipeline.trainer
    groups = lm.adapter.input_groups(lm.net)
    stats = pipeline.calibrate(run, groups)

    def accuracies() -> dict:
        return {"validation": evaluate(trainer, lm, data.val_dataloader()),
                "test": evaluate(trainer, lm, data.test_dataloader())}

    variants = [(method, mlp, order if mlp == "neurons" else None, attention)
                for method in args.methods.split(",") for mlp in args.mlp.split(",")
                for order in args.neuron_order.split(",")
                for attention in args.attention.split(",")]
    variants = list(dict.fromkeys(variants))

    def variant(r: dict) -> tuple:
        return (r["method"], r.get("mlp", "factored"), r.get("neuron_order"),
                r.get("attention", "factored"), r.get("units", "all"))

    measured = {(m, mlp, order, attention, args.units) for m, mlp, order, attention in variants}
    out = Path(args.out)
    earlier = json.loads(out.read_text())["rows"] if out.exists() else []
    rows = [r for r in earlier if variant(r) not in measured and r["method"] != "dense"]
    rows.insert(0, {"method": "dense", "keep": 1.0, "kept": 1.0, **accuracies()})
    (out.parent / ".learned.work").mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every row: a stopped sweep keeps what it measured
        write_result(args.out, {"rows": rows, "sizes": vars(data.sizes), "model": lm.pretrained})

    cut = {"all": lambda n: True, "mlp": lambda n: ".mlp" in n,
           "vo": lambda n: n.endswith(("self_attn", "v_proj", "o_proj"))}[args.units]
    for method, mlp, order, attention in variants:
        config = dataclasses.replace(pipeline.projection, method=method, mlp=mlp,
                                     neuron_order=order or "greedy", attention=attention)
        start = time.perf_counter()
        pruner = Pruner(lm.net, project(lm.net, groups, stats, config, pipeline.make_trainer,
                                        data.calibration_dataloader(),
                                        out.parent / ".learned.work", lm.adapter.mlps(lm.net),
                                        lm.adapter.attentions(lm.net)),
                        pipeline.search.rank_multiple)
        seconds = round(time.perf_counter() - start, 1)
        for keep in levels:
            if args.units != "all":  # only the named units
                keep = {n: keep if cut(n) else 1.0 for n in pruner.names}
            kept, total = pruner.params(keep)
            level = keep if args.units == "all" else next(v for v in keep.values() if v < 1)
            with pruner.at(keep):
                rows.append({"method": method, "mlp": mlp, "neuron_order": order,
                             "attention": attention, "units": args.units, "keep": level,
                             "kept": kept / total, "projection_seconds": seconds,
                             **accuracies()})
            print(rows[-1], file=sys.stderr, flush=True)
            save()

    print("| method | MLP as | v/o as | units cut | keep | decoder weights kept | validation acc "
          "| test acc |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        mlp = r.get("mlp", "factored") + (f" ({r['neuron_order']})" if r.get("neuron_order") else "")
        print(f"| {r['method']} | {mlp} | {r.get('attention', 'factored')} "
              f"| {r.get('units', 'all')} | {r['keep']} "
              f"| {100 * r['kept']:.1f}% | {100 * r['validation']:.1f}% | {100 * r['test']:.1f}% |")
    save()


if __name__ == "__main__":
    main()
