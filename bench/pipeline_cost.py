"""What the pipeline costs, as ratios measured side by side in one process.

1. Calibration throughput relative to a plain forward pass over the same batches (the
   statistics cost about one more forward, so ~0.5x is the arithmetic limit).
2. Projection seconds per matrix, by matrix type (one decoder layer, the run's statistics).
3. Search cost in forward tokens relative to a naive search (population x generations x the
   whole validation set), from the run's ``search.json``.
4. A LoRA training step on the pruned model relative to a plain peft LoRA step on the dense
   model (same batches, same LoRA rank, same optimiser).

Usage (after ``sieve-pl fit`` made the run):

    python bench/pipeline_cost.py --config configs/demo.yaml [--batches 8] [--steps 8]

Prints a Markdown table and writes bench/results/pipeline_cost.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

from common import open_run, write_result
from sieve_pl.io import SafetensorsFolder, read_json
from sieve_pl.models.pruning import Pruner
from sieve_pl.stages.calibrate import Calibration
from sieve_pl.stages.project import project
from sieve_pl.stages.recover import lora_targets
from sieve_pl.tasks.base import last_logits


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
    parser.add_argument("--out", default="bench/results/pipeline_cost.json")
    args, cli_args = parser.parse_known_args()

    pipeline, run = open_run(cli_args)
    lm, data, trainer = pipeline.lm, pipeline.data, pipeline.trainer
    groups = lm.adapter.input_groups(lm.net)
    result = {}

    # 1. calibration vs plain forward, alternated, same batches
    loader = data.loader("calibration", limit=args.batches * data.batch_size)
    tokens = sum(int(b["attention_mask"].sum()) for b in loader)
    plain, calib = [], []
    for _ in range(2):
        plain.append(seconds(lambda: trainer.predict(Forward(lm.net), loader,
                                                     return_predictions=False)))
        calib.append(seconds(lambda: trainer.predict(Calibration(lm.net, groups), loader,
                                                     return_predictions=False)))
    result["calibration"] = {"tokens": tokens, "plain_s": min(plain), "calibration_s": min(calib),
                             "throughput_ratio": min(plain) / min(calib)}

    # 2. projection of one layer, per matrix
    stats = SafetensorsFolder(run.path / "calibrate")
    layer = {k: v for k, v in groups.items() if k.startswith(f"{lm.adapter.layers}.0.")}
    per_matrix = {}
    for key, names in layer.items():
        for name in names:
            per_matrix[name.split(".", 3)[-1]] = seconds(
                lambda: project(lm.net, {key: [name]}, stats, pipeline.projection))
    result["projection_s_per_matrix"] = per_matrix
    result["projection_s_model_estimate"] = sum(per_matrix.values()) * len(
        lm.net.get_submodule(lm.adapter.layers))

    # 3. search tokens vs naive
    search = read_json(run.path / "search" / "search.json")
    cost = search["cost"]
    result["search"] = {**cost, "ratio": cost["ga_tokens"] / cost["naive_tokens"]}

    # 4. LoRA step: pruned (our recovery's targets) vs plain peft on the dense model
    batches = [b for _, b in zip(range(args.steps), data.train_dataloader())]
    config = pipeline.recover
    dense_targets = lora_targets(lm.net, lm.adapter.layers)
    dense_s = lora_step_seconds(lm.net, dense_targets, data.task, batches, config)
    bases = SafetensorsFolder(run.path / "project")
    pruner = Pruner(lm.net, {n[:-2]: (bases[n], bases[n[:-2] + ".B"]) for n in bases
                             if n.endswith(".A")}, pipeline.search.rank_multiple)
    pruner.apply(search["levels"])
    pruned_s = lora_step_seconds(lm.net, lora_targets(lm.net, lm.adapter.layers), data.task,
                                 batches, config)
    kept, total = pruner.params(search["levels"])
    pruner.apply(1.0)
    result["lora_step"] = {"dense_s": dense_s, "pruned_s": pruned_s,
                           "ratio": pruned_s / dense_s, "target_params_kept": kept / total}

    c, s, lo = result["calibration"], result["search"], result["lora_step"]
    print("| measure | value | target |\n|---|---|---|")
    print(f"| calibration throughput / plain forward | {c['throughput_ratio']:.2f}x "
          f"({c['tokens']} tokens: {c['plain_s']:.1f} s vs {c['calibration_s']:.1f} s) "
          f"| >= 0.45x |")
    for name, t in per_matrix.items():
        print(f"| projection, {name} | {t:.2f} s | |")
    print(f"| search tokens / naive search | {100 * s['ratio']:.1f}% "
          f"({s['ga_tokens']:,} / {s['naive_tokens']:,}) | <= 25% |")
    print(f"| LoRA step, pruned ({100 * lo['target_params_kept']:.1f}% kept) / dense | "
          f"{lo['ratio']:.2f}x ({lo['pruned_s']:.2f} s vs {lo['dense_s']:.2f} s) | |")
    write_result(args.out, {
        **result, "model": lm.pretrained, "batch_size": data.batch_size})


if __name__ == "__main__":
    main()
