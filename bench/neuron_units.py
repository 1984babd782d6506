"""MLP neuron units: held-out output error of the refit, per ridge, neuron order and dtype.

The order and the refit of down are fitted on the run's calibration statistics; the error is
measured on tokens they never saw (the validation split): for every MLP, the relative error
``‖MLP_k(x) − MLP(x)‖² / ‖MLP(x)‖²`` on its dense inputs, keeping a fraction of the neurons,
averaged over the layers. ``no refit`` keeps the selected columns of down as they are. Orders:
``greedy`` (blocked: 64 neurons per block from a pool of 256, what projection runs),
``serial`` (the exact greedy, one neuron per step, one host sync each), ``magnitude``; each
fitted in float32 (what projection runs) or float64. For gated (Llama-like) MLPs. Usage:

    python bench/neuron_units.py --config configs/demo.yaml [--ridges 1e-2,1e-1] \
        [--keeps 0.95,0.8,0.6,0.4] [--orders greedy,serial,magnitude] [--dtypes float32,float64]

Prints a Markdown table and writes bench/results/neuron_units.json.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from common import open_run, write_result
from sieve_pl.api import dense_weight, last_logits, neuron_basis


def mlp_inputs(net, mlps: dict, loader) -> dict[str, torch.Tensor]:
    """Each MLP's input over the loader's non-padding tokens (dense model)."""
    seen: dict[str, list] = {m: [] for m in mlps}
    masks = []
    handles = [net.get_submodule(m).register_forward_pre_hook(
        lambda mod, args, m=m: seen[m].append(args[0].detach())) for m in mlps]
    with torch.no_grad():
        for batch in loader:
            masks.append(batch["attention_mask"].bool())
            last_logits(net, batch)
    for h in handles:
        h.remove()
    return {m: torch.cat([x[mask] for x, mask in zip(xs, masks)]) for m, xs in seen.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ridges", default="1e-1")
    parser.add_argument("--keeps", default="0.95,0.8,0.6,0.4")
    parser.add_argument("--orders", default="greedy,serial,magnitude")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--out", default="bench/results/neuron_orders.json")
    args, cli_args = parser.parse_known_args()
    ridges = [float(r) for r in args.ridges.split(",")]
    keeps = [float(k) for k in args.keeps.split(",")]

    pipeline, run = open_run(cli_args)
    lm, data = pipeline.lm, pipeline.data
    net = lm.net
    groups = lm.adapter.input_groups(net)
    stats = pipeline.calibrate(run, groups)
    mlps = lm.adapter.mlps(net)
    key_of = {n: k for k, names in groups.items() for n in names}
    held_out = mlp_inputs(net, mlps, data.val_dataloader())

    rows = []
    for how, dtype, ridge in [(h, d, r) for h in args.orders.split(",")
                              for d in args.dtypes.split(",") for r in ridges]:
        seconds = 0.0
        errors = {k: [] for k in keeps}
        plain = {k: [] for k in keeps}
        for mlp, (inputs, output, blocks) in mlps.items():
            module = net.get_submodule(mlp)
            x = held_out[mlp]
            with torch.no_grad():
                y = module(x).double()
                act = module.act_fn(module.gate_proj(x)) * module.up_proj(x)
            key = key_of[output]
            c = stats[key].double() / int(stats[f"{key}.count"])
            w = dense_weight(module.down_proj).detach().double()
            t = getattr(torch, dtype)
            start = time.perf_counter()
            basis = neuron_basis(w.to(t), c.to(t), ridge,
                                 "magnitude" if how == "magnitude" else "greedy",
                                 **({"block": 1, "pool": 1} if how == "serial" else {}))
            seconds += time.perf_counter() - start
            order = basis.order
            act = act.double()
            for keep in keeps:
                k = int(keep * len(order))
                kept = order[:k]
                refit = act[:, kept] @ basis.refit(k).double().T
                errors[keep].append(float((refit - y).square().sum() / y.square().sum()))
                selected = act[:, kept] @ w[:, kept].T
                plain[keep].append(float((selected - y).square().sum() / y.square().sum()))
        for keep in keeps:
            rows.append({"order": how, "dtype": dtype, "ridge": ridge, "keep": keep,
                         "error": sum(errors[keep]) / len(errors[keep]),
                         "error_no_refit": sum(plain[keep]) / len(plain[keep]),
                         "fit_seconds": round(seconds, 1)})
            print(rows[-1], file=sys.stderr, flush=True)
    write_result(args.out, {"rows": rows, "model": lm.pretrained, "sizes": vars(data.sizes),
                            "held_out_tokens": int(next(iter(held_out.values())).shape[0])})
    print("| order | dtype | ridge | neurons kept | held-out relative error | (no refit) | "
          "seconds to fit every MLP |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['order']} | {r['dtype']} | {r['ridge']:g} | {r['keep']:.0%} | "
              f"{r['error']:.5f} | {r['error_no_refit']:.4f} | {r['fit_seconds']} |")


if __name__ == "__main__":
    main()
