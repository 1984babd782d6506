"""Padding: tokens a batched forward computes vs the examples' real tokens, per scored split.

Batches pad every example to the longest in its batch, so a forward pass costs
``batch × longest`` tokens. Compares the split in random order (as drawn), sorted by length (as
the data module now stores the validation and test splits) and the search's order (hardest
first, each run of 4 batches sorted by length). Tokenizer only: no model runs.

    HF_HUB_OFFLINE=1 python bench/padding.py --config configs/demo.yaml [--data.sizes.validation 600]
"""
from __future__ import annotations

import argparse
import random

from common import write_result

from sieve_pl.api import SieveCLI


def padded(lengths: list[int], batch: int) -> int:
    return sum(max(lengths[i:i + batch]) * len(lengths[i:i + batch])
               for i in range(0, len(lengths), batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/padding.json")
    args, cli_args = parser.parse_known_args()
    pipeline = SieveCLI(cli_args, run=False).pipeline()
    pipeline.prepare(fitting=False)  # the splits only: no weights
    data = pipeline.data
    batch = data.batch_size
    rows = []
    for split in ("validation", "test"):
        lengths = [int(x) for b in data.loader(split) for x in b["attention_mask"].sum(1)]
        shuffled = lengths[:]
        random.Random(0).shuffle(shuffled)
        # the search: hardest first is unrelated to length (a random order stands in for it),
        # then each run of 4 batches sorted
        runs = [x for s in range(0, len(shuffled), 4 * batch)
                for x in sorted(shuffled[s:s + 4 * batch])]
        real = sum(lengths)
        for order, values in (("random", shuffled), ("sorted", lengths),
                              ("search (runs of 4 batches sorted)", runs)):
            rows.append({"split": split, "order": order, "examples": len(lengths),
                         "real_tokens": real, "computed_tokens": padded(values, batch),
                         "ratio": padded(values, batch) / real})
    print(f"| split | order | examples | real tokens | computed (batch {batch}) | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['split']} | {r['order']} | {r['examples']} | {r['real_tokens']:,} | "
              f"{r['computed_tokens']:,} | {r['ratio']:.2f}x |")
    write_result(args.out, {"rows": rows, "args": cli_args})


if __name__ == "__main__":
    main()
