"""Sensitivity: what each level of each unit costs the task, from one backward pass (K-FAC).

A unit's cut changes one Linear's output by ``ΔW x`` (its own matrix; down for an MLP's
neurons; o for an attention layer's value dimensions). To second order the task loss grows by
``½ E[(gᵀ ΔW x)²]``, ``g`` the loss gradient at that output; taking ``x`` and ``g`` independent
(the K-FAC approximation of the Fisher, as LLM Surgeon does) this is ``½ tr(ΔW C ΔWᵀ G)`` with
``C = E[x xᵀ]`` — calibration's statistics — and ``G = E[g gᵀ]``, from one backward pass of the
task loss over the calibration split. Every unit then has a cost per level, and one global
price per weight removed allocates all levels at once (the knapsack's Lagrangian): the search
bisects that price against ε as it bisects the uniform level, at a handful of evaluations
instead of one bisection per kind of unit.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.factored import dense_shape
from ..models.pruning import Pruner
from ..progress import quiet


def gradient_moments(trainer, net: nn.Module, task, outputs: Iterable[str],
                     batches: Iterable[dict]) -> dict[str, torch.Tensor]:
    """``G = Σ g gᵀ / tokens`` at the output of each named Linear, over the task loss on
    ``batches`` (the dense model's; summed over DDP ranks). Only activations get gradients:
    the embedding output is the one leaf, so no weight gradient is computed or kept."""
    strategy, device = trainer.strategy, trainer.strategy.root_device
    net = net.to(device).eval()
    sums: dict[str, torch.Tensor] = {}
    leaves: list[torch.Tensor] = []

    def capture(name: str):
        def hook(module, args, out):
            def add(grad):
                g = grad.detach().flatten(0, -2).to(torch.float32)
                product = (g.T @ g).double()
                sums[name] = sums[name] + product if name in sums else product
            out.register_hook(add)
        return hook

    def leaf(module, args, out):
        out = out.detach().requires_grad_(True)
        leaves.append(out)
        return out

    handles = [net.get_submodule(n).register_forward_hook(capture(n)) for n in outputs]
    handles.append(net.get_input_embeddings().register_forward_hook(leaf))
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    world, rank = trainer.world_size, trainer.global_rank
    try:
        with torch.enable_grad(), torch.inference_mode(False):
            for i, batch in enumerate(tqdm(list(batches), desc="search: sensitivity",
                                           disable=quiet(trainer))):
                if i % world != rank:
                    continue
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                leaves.clear()
                loss = task.loss(net, batch) * len(batch["input_ids"])  # a sum over examples
                torch.autograd.grad(loss, leaves)
                tokens += batch["attention_mask"].sum()
    finally:
        for handle in handles:
            handle.remove()
    for name in outputs:
        if name not in sums:  # a rank without batches
            width = dense_shape(net.get_submodule(name))[0]
            sums[name] = torch.zeros(width, width, dtype=torch.float64, device=device)
    if world > 1:
        sums = {n: strategy.reduce(s.to(device), reduce_op="sum") for n, s in sums.items()}
        tokens = strategy.reduce(tokens, reduce_op="sum")
    return {n: (s / tokens.clamp(min=1)).cpu() for n, s in sums.items()}


def unit_costs(pruner: Pruner, ladder: list[float], inputs: Callable[[str], torch.Tensor],
               grads: dict[str, torch.Tensor], bars: bool = True) -> dict[str, list[dict]]:
    """Per unit, the distinct sizes its ladder rungs give, dense first:
    ``{"keep", "params", "cost"}`` with ``cost = ½ tr(ΔW C ΔWᵀ G)``; ``inputs(linear)`` gives
    ``C`` of a Linear's input (a mean over tokens)."""
    costs = {}
    for name, unit in tqdm(pruner.units.items(), desc="search: costs", leave=False,
                           disable=not bars):
        points, seen = [], set()
        device = pruner.device(name)  # the unit's layer: its error is computed there
        c = inputs(unit.output).to(device, torch.float32)  # read once per unit
        g = grads[unit.output].to(device, torch.float32)
        for keep in [1.0, *sorted(ladder, reverse=True)]:
            size = unit.size(keep, pruner.rank_multiple)
            if size in seen:
                continue
            seen.add(size)
            if size is None:
                points.append({"keep": keep, "params": unit.total, "cost": 0.0})
                continue
            delta = unit.error(size, device)
            cost = 0.5 * float(((delta @ c) * (g @ delta)).sum())
            points.append({"keep": keep, "params": unit.params(size), "cost": cost})
        costs[name] = points
    return costs


def price_path(costs: dict[str, list[dict]]) -> list[tuple[str, float, int]]:
    """Every unit's cuts as steps ``(unit, keep, weights removed)``, cheapest per weight first.

    Each unit contributes the steps along the lower convex hull of its (weights removed, cost)
    points, whose prices rise along the hull; merging all units' steps by price gives, after
    any prefix, the allocation that minimises the summed cost for the weights it removes (for
    some price per weight). A prefix of this path is one global threshold on that price."""
    steps = []
    for name, points in costs.items():
        hull = [points[0]]  # dense
        for p in sorted(points[1:], key=lambda p: -p["params"]):
            if p["params"] >= hull[-1]["params"]:
                continue
            while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-2], p):
                hull.pop()  # above the segment to p: never the cheapest at any price
            hull.append(p)
        steps += [(_slope(before, after), name, after["keep"], before["params"] - after["params"])
                  for before, after in zip(hull, hull[1:])]
    steps.sort(key=lambda s: s[0])
    return [(name, keep, removed) for _, name, keep, removed in steps]


def _slope(a: dict, b: dict) -> float:
    """Cost per weight removed from ``a`` to ``b`` (``b`` smaller)."""
    return (b["cost"] - a["cost"]) / max(a["params"] - b["params"], 1)


def levels_at(path: list[tuple[str, float, int]], names: list[str], j: int) -> dict[str, float]:
    """The allocation after the first ``j`` steps of the path (the other units dense)."""
    levels = dict.fromkeys(names, 1.0)
    for name, keep, _ in path[:j]:
        levels[name] = keep
    return levels


def sensitivity_costs(trainer, lm, pruner: Pruner, loader, stats, groups: dict[str, list[str]],
                      ladder: list[float]) -> dict[str, list[dict]]:
    """:func:`unit_costs` of every unit, from calibration's statistics (``stats``, by input
    group) and one backward pass of the dense model over ``loader``."""
    group_of = {linear: key for key, linears in groups.items() for linear in linears}
    outputs = sorted({unit.output for unit in pruner.units.values()})
    with pruner.at(1.0):
        grads = gradient_moments(trainer, lm.net, lm.task, outputs, loader)

    def inputs(linear: str) -> torch.Tensor:
        key = group_of[linear]
        return stats[key] / max(int(stats[f"{key}.count"]), 1)

    return unit_costs(pruner, ladder, inputs, grads, bars=not quiet(trainer))
