"""Pruned vs dense inference: latency and peak memory at batch 1 and 16, next to the size ratio.

Both models are loaded the way users load them (the base through sieve_pl, the export through
``from_pretrained(..., trust_remote_code=True)``) and timed alternately on the same real
prompts (test split), so machine noise hits both alike. Two workloads: prompt processing (one
forward over the batch) and generation of 32 new tokens (greedy, KV cache). Usage:

    python bench/inference.py --config configs/demo.yaml [--repeats 5]

Prints a Markdown table and writes bench/results/inference.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import write_result
from sieve_pl.api import load_model, PeakMemory, SieveCLI


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn`` over repeats (after one warm-up) and the memory it added at
    its peak (activations, KV cache) in MB, on top of the weights already loaded."""
    fn()
    times = []
    with PeakMemory() as peak:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times), peak.extra_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--out", default="bench/results/inference.json")
    args, cli_args = parser.parse_known_args()
    torch.manual_seed(0)

    cli = SieveCLI(args=cli_args + ["--trainer.enable_progress_bar", "false"], run=False)
    pipeline = cli.pipeline()
    pipeline.prepare()
    data, lm = pipeline.data, pipeline.lm
    exported = pipeline.run.path / "export" / "model"
    models = {"dense": load_model(lm.pretrained, lm.dtype_name)[0],
              "pruned": load_model(str(exported), lm.dtype_name, trust_remote_code=True)[0]}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    tokenizer = data.tokenizer

    rows = []
    for batch_size in (1, 16):
        examples = list(data.splits["test"].select(range(batch_size)))
        collated = data.task.collate(examples, tokenizer, data.max_length)
        batch = {k: collated[k] for k in ("input_ids", "attention_mask")}
        results = {}
        for workload in ("prompt", "generate"):
            for name, model in models.items():
                if workload == "prompt":
                    def fn(model=model):
                        with torch.inference_mode():
                            model(**batch, use_cache=False)
                else:
                    def fn(model=model):
                        with torch.inference_mode():
                            model.generate(**batch, max_new_tokens=args.new_tokens,
                                           min_new_tokens=args.new_tokens, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id)
                results[name] = timed(fn, args.repeats)
            (dense_s, dense_mb), (pruned_s, pruned_mb) = results["dense"], results["pruned"]
            rows.append({"batch_size": batch_size, "workload": workload,
                         "prompt_tokens": int(batch["input_ids"].shape[1]),
                         "dense_ms": 1000 * dense_s, "pruned_ms": 1000 * pruned_s,
                         "latency_ratio": pruned_s / dense_s,
                         "dense_peak_mb": dense_mb, "pruned_peak_mb": pruned_mb,
                         "param_ratio": params["pruned"] / params["dense"],
                         "weights_mb": {k: m.get_memory_footprint() / 2**20
                                        for k, m in models.items()}})
            print(rows[-1], flush=True)

    print("| batch | workload | dense ms | pruned ms | latency ratio | parameter ratio "
          "| dense peak MB | pruned peak MB | peak ratio |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:  # peak: the weights plus what the workload added on top of them
        dense_mb = r["weights_mb"]["dense"] + r["dense_peak_mb"]
        pruned_mb = r["weights_mb"]["pruned"] + r["pruned_peak_mb"]
        print(f"| {r['batch_size']} | {r['workload']} | {r['dense_ms']:.0f} | {r['pruned_ms']:.0f} "
              f"| {r['latency_ratio']:.3f} | {r['param_ratio']:.3f} | {dense_mb:.0f} "
              f"| {pruned_mb:.0f} | {pruned_mb / dense_mb:.3f} |")
    write_result(args.out, {
        "rows": rows, "params": params, "model": lm.pretrained, "export": str(exported),
        "repeats": args.repeats, "new_tokens": args.new_tokens})


if __name__ == "__main__":
    main()
