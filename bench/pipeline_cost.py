"""What the pipeline costs, as ratios measured side by side in one process.

1. Calibration throughput relative to a plain forward pass over the same batches (the
   statistics cost about one more forward, so ~0.5x is the arithmetic limit).
2. Projection seconds per matrix, by matrix type (one decoder layer, the run's statistics).
3. Search cost in forward tokens relative to a naive search (population x generations x the
   whole validation set): the run's search settings rerun with the current code on the run's
   projection (resumable: its checkpoints go to bench/results/.search.work/), next to the cost
   the run's own ``search.json`` recorded.
4. A LoRA training step on the pruned model relative to a plain peft LoRA step on the dense
   model (same batches, same LoRA rank, same optimiser).

Usage (after ``sieve-pl fit`` made the run):

    python bench/pipeline_cost.py --config configs/demo.yaml [--batches 8] [--steps 8] \
        [--parts calibration,projection,search,lora]

Prints a Markdown table and writes bench/results/pipeline_cost.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from common import open_run, run_pruner, write_result
from sieve_pl.api import calibrate, Fitness, last_logits, lora_targets, project, read_json, search


class Forward(L.LightningModule):
    """The plain forward the calibration is compared with (same predict loop, no hooks)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def predict_step(self, batch, batch_idx):
        last_logits(self.net, batch)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def lora_step_seconds(net, targets, task, batches, config) -> float:
    """Median seconds of one AdamW step of peft LoRA on ``net`` (adapters removed after)."""
    from peft import LoraConfig, get_peft_model

    for p in net.parameters():
        p.requires_grad_(False)
    model = get_peft_model(net, LoraConfig(r=config.rank, lora_alpha=config.alpha,
                                           target_modules=targets, bias="none"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=config.lr)

    def step(batch):
        optimizer.zero_grad()
        task.loss(model, batch).backward()
        optimizer.step()

    step(batches[0])  # warm-up
    times = [seconds(lambda b=b: step(b)) for b in batches]
    model.unload()
    net.eval()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--parts", default="calibration,projection,search,lora")
    parser.add_argument("--screens", default="1,0.5,0.25",
                        help="search.screen values to measure the search's cost at")
    parser.add_argument("--out", default="bench/results/pipeline_cost.json")
    args, cli_args = parser.parse_known_args()

    parts = set(args.parts.split(","))
    pipeline, run = open_run(cli_args)
    lm, data, trainer = pipeline.lm, pipeline.data, pipeline.trainer
    groups = lm.adapter.input_groups(lm.net)
    # parts measured separately accumulate in one file
    out = Path(args.out)
    result = read_json(out) if out.exists() else {}
    result.pop("machine", None)
    pruner = run_pruner(pipeline, run)
    found = read_json(run.path / "search" / "search.json")

    if "calibration" in parts:  # alternated, same batches
        loader = data.loader("calibration", limit=args.batches * data.batch_size)
        tokens = sum(int(b["attention_mask"].sum()) for b in loader)
        config = pipeline.calibration
        variants = {"plain": lambda: trainer.predict(Forward(lm.net), loader,
                                                     return_predictions=False),
                    "calibration": lambda: calibrate(trainer, lm.net, groups, loader, config),
                    "float64 products": lambda: calibrate(
                        trainer, lm.net, groups, loader,
                        dataclasses.replace(config, product_dtype="float64"))}
        times = {k: [] for k in variants}
        for _ in range(2):  # alternated: machine noise hits all alike; the fastest round counts
            for name, work in variants.items():
                times[name].append(seconds(work))
        best = {k: min(v) for k, v in times.items()}
        result["calibration"] = {
            "tokens": tokens, "dtype": config.dtype, "product_dtype": config.product_dtype,
            "plain_s": best["plain"], "calibration_s": best["calibration"],
            "throughput_ratio": best["plain"] / best["calibration"],
            "float64_products_s": best["float64 products"],
            "float64_products_ratio": best["plain"] / best["float64 products"]}

    if "projection" in parts:  # one decoder layer, per matrix
        stats = pipeline.calibrate(run, groups)
        layer = {k: v for k, v in groups.items() if k.startswith(f"{lm.adapter.layers}.0.")}
        per_matrix = {}
        for key, names in layer.items():
            for name in names:
                per_matrix[name.split(".", 3)[-1]] = seconds(
                    lambda: project(lm.net, {key: [name]}, stats, pipeline.projection))
        result["projection_s_per_matrix"] = per_matrix
        result["projection_s_model_estimate"] = sum(per_matrix.values()) * len(
            lm.net.get_submodule(lm.adapter.layers))

    if "search" in parts:  # the run's search settings, current code, resumable
        result["search"] = {}
        for screen in map(float, args.screens.split(",")):
            config = dataclasses.replace(pipeline.search, screen=screen)
            work = out.parent / f".search-screen{screen:g}.work"
            work.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            fitness = Fitness(trainer, lm, pruner, data.val_dataloader(), config.early_reject,
                              config.confidence)
            with pruner.at(1.0):  # the search scores inside pruner.at; the model stays dense
                rerun = search(fitness, pruner.names, config, work)
            cost = rerun.cost
            result["search"][f"{screen:g}"] = {
                **cost, "ratio": cost["search_tokens"] / cost["naive_tokens"],
                "ga_ratio": cost["ga_tokens"] / cost["naive_tokens"],
                "seconds_this_session": time.perf_counter() - start,
                "distinct_genomes": rerun.distinct_genomes,
                "scored_genomes": rerun.scored_genomes,
                "found": {"removed": rerun.value, "accuracy": rerun.accuracy,
                          "target": rerun.target}}
            print(screen, result["search"][f"{screen:g}"], flush=True)
        result["search_run_recorded"] = {"cost": found["cost"], "removed": found["value"],
                                         "accuracy": found["accuracy"]}

    if "lora" in parts:  # pruned (our recovery's targets) vs plain peft on the dense model
        batches = [b for _, b in zip(range(args.steps), data.train_dataloader())]
        times = {"dense": [], "pruned": []}
        for _ in range(2):  # alternated: machine noise hits both alike; the faster round counts
            for which in times:
                with pruner.at(found["levels"] if which == "pruned" else 1.0):
                    times[which].append(lora_step_seconds(
                        lm.net, lora_targets(lm.net, lm.adapter.layers), data.task, batches,
                        pipeline.recover))
        kept, total = pruner.params(found["levels"])
        dense_s, pruned_s = min(times["dense"]), min(times["pruned"])
        result["lora_step"] = {"dense_s": dense_s, "pruned_s": pruned_s, "rounds": times,
                               "ratio": pruned_s / dense_s, "target_params_kept": kept / total}

    print("| measure | value | target |\n|---|---|---|")
    if c := result.get("calibration"):
        print(f"| calibration throughput / plain forward | {c['throughput_ratio']:.2f}x "
              f"({c['tokens']} tokens: {c['plain_s']:.1f} s vs {c['calibration_s']:.1f} s) "
              f"| >= 0.45x |")
        print(f"| same, float64 products | {c['float64_products_ratio']:.2f}x "
              f"({c['float64_products_s']:.1f} s) | |")
    for name, t in result.get("projection_s_per_matrix", {}).items():
        print(f"| projection, {name} | {t:.2f} s | |")
    for screen, s in result.get("search", {}).items():
        print(f"| search tokens / naive search, screen {screen} | {100 * s['ratio']:.1f}% "
              f"({s['search_tokens']:,} / {s['naive_tokens']:,}; GA alone "
              f"{100 * s['ga_ratio']:.1f}%; {100 * s['found']['removed']:.1f}% removed at "
              f"{100 * s['found']['accuracy']:.1f}%) | <= 25% |")
    if lo := result.get("lora_step"):
        print(f"| LoRA step, pruned ({100 * lo['target_params_kept']:.1f}% kept) / dense | "
              f"{lo['ratio']:.2f}x ({lo['pruned_s']:.2f} s vs {lo['dense_s']:.2f} s) | |")
    write_result(args.out, {**result, "model": lm.pretrained, "batch_size": data.batch_size})


if __name__ == "__main__":
    main()
