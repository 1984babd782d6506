"""Where a forward pass spends its time, dense vs pruned: matrix products vs everything else.

Profiles the same random batch (``--batch`` × ``--tokens``) through the base model and a run's
export, ``--repeats`` forwards each after two warm-ups, in one process, and splits the CPU time
into ``aten::mm`` (the Linears and lm_head, which pruning shrinks) and the rest (norms, rotary,
activations, attention, residual adds, which it does not). Usage:

    python bench/profile_forward.py --run checkpoints/demo_heads [--batch 16] [--tokens 57]

Prints a Markdown table and writes bench/results/profile_forward.json.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from common import write_result
from sieve_pl.api import DEFAULT_MODEL, load_model


def split_time(path: str, ids: torch.Tensor, repeats: int) -> dict:
    net, _ = load_model(path)
    with torch.no_grad():
        for _ in range(2):
            net(input_ids=ids)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                net(input_ids=ids)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    mm = sum(e.self_cpu_time_total for e in events if e.key == "aten::mm") / 1e6
    return {"model": path, "total_s": total, "mm_s": mm, "other_s": total - mm,
            "params": sum(p.numel() for p in net.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished run folder (its export is used)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=57)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/profile_forward.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(0, 40000, (args.batch, args.tokens))
    rows = [split_time(DEFAULT_MODEL, ids, args.repeats),
            split_time(f"{args.run}/export/model", ids, args.repeats)]
    dense, pruned = rows
    print("| model | parameters | matrix products s | other s | total s |\n|---|---|---|---|---|")
    for name, r in zip(("dense", "pruned"), rows):
        print(f"| {name} | {r['params'] / 1e6:.1f}M | {r['mm_s']:.2f} | {r['other_s']:.2f} "
              f"| {r['total_s']:.2f} |")
    print(f"| ratio | {pruned['params'] / dense['params']:.3f} "
          f"| {pruned['mm_s'] / dense['mm_s']:.3f} | {pruned['other_s'] / dense['other_s']:.3f} "
          f"| {pruned['total_s'] / dense['total_s']:.3f} |")
    write_result(args.out, {"rows": rows, "batch": args.batch, "tokens": args.tokens,
                            "repeats": args.repeats})


if __name__ == "__main__":
    main()
