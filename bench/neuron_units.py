"""MLP neuron units: held-out output error of the refit, per ridge and neuron order.

The order and the refit of down are fitted on the run's calibration statistics; the error is
measured on tokens they never saw (the validation split): for every MLP, the relative error
``‖MLP_k(x) − MLP(x)‖² / ‖MLP(x)‖²`` on its dense inputs, keeping a fraction of the neurons,
averaged over the layers. ``no refit`` keeps the selected columns of down as they are;
``damped towards zero`` is the refit sieve-pl used before (``W C[:, S] C_λ[S, S]⁻¹``, the same
order), beside the refit damped towards the dense weights (``W C_λ[:, S] C_λ[S, S]⁻¹``). For
gated (Llama-like) MLPs. Usage:

    python bench/neuron_units.py --config configs/demo.yaml [--ridges 1e-4,1e-3,1e-2,1e-1] \
        [--keeps 0.95,0.8,0.6,0.4]

Prints a Markdown table and writes bench/results/neuron_units.json.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from common import open_run, write_result
from sieve_pl.models.factored import dense_weight
from sieve_pl.units import neuron_basis
from sieve_pl.models.forward import last_logits


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
    parser.add_argument("--ridges", default="1e-4,1e-3,1e-2,1e-1")
    parser.add_argument("--keeps", default="0.95,0.8,0.6,0.4")
    parser.add_argument("--orders", default="greedy,magnitude")
    parser.add_argument("--out", default="bench/results/neuron_units.json")
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
    for how in args.orders.split(","):
        for ridge in ridges:
            start = time.perf_counter()
            errors = {k: [] for k in keeps}
            plain = {k: [] for k in keeps}
            to_zero = {k: [] for k in keeps}
            for mlp, (inputs, output, blocks) in mlps.items():
                module = net.get_submodule(mlp)
                x = held_out[mlp]
                with torch.no_grad():
                    y = module(x).double()
                    act = module.act_fn(module.gate_proj(x)) * module.up_proj(x)
                key = key_of[output]
                c = stats[key].double() / int(stats[f"{key}.count"])
                w = dense_weight(module.down_proj).detach().double()
                order, g, l_inv = neuron_basis(w, c, ridge, how)
                g_zero = w @ c[:, order] @ l_inv.T  # the refit damped towards zero (before)
                act = act.double()
                for keep in keeps:
                    k = int(keep * len(order))
                    kept = order[:k]
                    refit = act[:, kept] @ (g[:, :k] @ l_inv[:k, :k]).T
                    errors[keep].append(float((refit - y).square().sum() / y.square().sum()))
                    refit = act[:, kept] @ (g_zero[:, :k] @ l_inv[:k, :k]).T
                    to_zero[keep].append(float((refit - y).square().sum() / y.square().sum()))
                    selected = act[:, kept] @ w[:, kept].T
                    plain[keep].append(float((selected - y).square().sum() / y.square().sum()))
            seconds = round(time.perf_counter() - start, 1)
            for keep in keeps:
                rows.append({"order": how, "ridge": ridge, "keep": keep,
                             "error": sum(errors[keep]) / len(errors[keep]),
                             "error_no_refit": sum(plain[keep]) / len(plain[keep]),
                             "error_damped_to_zero": sum(to_zero[keep]) / len(to_zero[keep]),
                             "seconds": seconds})
                print(rows[-1], file=sys.stderr, flush=True)
    write_result(args.out, {"rows": rows, "model": lm.pretrained, "sizes": vars(data.sizes),
                            "held_out_tokens": int(next(iter(held_out.values())).shape[0])})
    print("| order | ridge | neurons kept | held-out relative error (refit damped towards dense) "
          "| (damped towards zero) | (no refit) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['order']} | {r['ridge']:g} | {r['keep']:.0%} | {r['error']:.4f} "
              f"| {r['error_damped_to_zero']:.4f} | {r['error_no_refit']:.4f} |")


if __name__ == "__main__":
    main()
