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
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ..maths import second_moment
from ..models.factored import dense_shape
from ..models.hooks import Capture
from ..models.placement import is_split
from ..models.pruning import Pruner
from ..progress import quiet


@contextmanager
def for_gradients(net: nn.Module, checkpointing: bool):
    """``net`` ready for activation gradients only: every weight frozen (no weight gradient is
    computed or kept, nor the activations only weight gradients need), and with
    ``checkpointing`` each decoder layer's activations recomputed in the backward pass (train
    mode for transformers' checkpointing, every dropout left off). Restored afterwards."""
    params = list(net.parameters())
    flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in net.modules()]
    checkpointing = checkpointing and getattr(net, "supports_gradient_checkpointing", False)
    try:
        for p in params:
            p.requires_grad_(False)
        if checkpointing:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            net.train()
            for module in net.modules():
                if isinstance(module, nn.Dropout) or "dropout" in type(module).__name__.lower():
                    module.eval()
        yield net
    finally:
        if checkpointing:
            net.gradient_checkpointing_disable()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for module, training in modes:
            module.train(training)


def fisher_losses(task, net: nn.Module, batch: dict, fisher: str):
    """Losses whose output gradients' outer products, summed, give the batch's Fisher.

    ``model``: the model's own answer distribution (the true Fisher over the task's answers:
    for each answer a, the gradient of ``Σ_b sqrt(p_ba) log p_ba`` with the weights held, so
    the outer products add up to ``Σ_b Σ_a p_ba g_ba g_baᵀ``) — what a cut changes in the
    model's answers, whatever the labels; tasks without a finite answer set (generation) use
    the label loss. ``label``: the label loss (the empirical Fisher of the labelled answers).
    """
    logp = task.answer_logprobs(net, batch) if fisher == "model" else None
    if logp is None:
        yield task.loss(net, batch) * len(batch["input_ids"])  # a sum over examples
        return
    weights = logp.detach().exp().sqrt()
    for a in range(logp.shape[1]):
        present = weights[:, a] > 0  # (options a row lacks have log p = -inf)
        yield -(weights[present, a] * logp[present, a]).sum()


def gradient_moments(trainer, net: nn.Module, task, outputs: Iterable[str],
                     batches: Iterable[dict], fisher: str = "label",
                     checkpointing: bool = False) -> dict[str, torch.Tensor]:
    """``G = Σ g gᵀ / tokens`` at the output of each named Linear (float32, on the host),
    over :func:`fisher_losses` on ``batches`` (the dense model's; summed over DDP ranks).
    Only activations get gradients: the embedding output is the one leaf, every weight is
    frozen. Each batch's products are added into host sums, so the accelerator holds one
    batch's graph, not the sums (13 GB for Llama-3-8B in float64)."""
    strategy, device = trainer.strategy, trainer.strategy.root_device
    if not is_split(net):
        net = net.to(device)
    net.eval()
    sums = {n: torch.zeros((dense_shape(net.get_submodule(n))[0],) * 2, dtype=torch.float32)
            for n in outputs}
    leaves: list[torch.Tensor] = []

    def gradient_of(name: str, out: torch.Tensor) -> None:
        def add(grad):
            g = grad.detach().flatten(0, -2).to(torch.float32)
            sums[name] += (g.T @ g).cpu()
        if out.requires_grad:
            out.register_hook(add)

    def leaf(_, out: torch.Tensor) -> torch.Tensor:
        out = out.detach().requires_grad_(True)
        leaves.append(out)
        return out

    tokens = torch.zeros((), dtype=torch.float64)
    world, rank = trainer.world_size, trainer.global_rank
    with (Capture({n: net.get_submodule(n) for n in outputs}, gradient_of, outputs=True),
          Capture({"embeddings": net.get_input_embeddings()}, leaf, outputs=True)):
        with torch.enable_grad(), torch.inference_mode(False), for_gradients(net, checkpointing):
            for i, batch in enumerate(tqdm(list(batches), desc="search: sensitivity",
                                           disable=quiet(trainer))):
                if i % world != rank:
                    continue
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                leaves.clear()
                losses = list(fisher_losses(task, net, batch, fisher))
                for j, loss in enumerate(losses):
                    torch.autograd.grad(loss, leaves, retain_graph=j < len(losses) - 1)
                tokens += float(batch["attention_mask"].sum())
    if world > 1:
        sums = {n: strategy.reduce(s.to(device), reduce_op="sum").cpu() for n, s in sums.items()}
        tokens = strategy.reduce(tokens.to(device), reduce_op="sum").cpu()
    return {n: s / float(tokens.clamp(min=1)) for n, s in sums.items()}


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


def sensitivity_costs(trainer, lm, pruner: Pruner, loader, stats, groups: dict[str, list[str]],
                      ladder: list[float], fisher: str = "model") -> dict[str, list[dict]]:
    """:func:`unit_costs` of every unit, from calibration's statistics (``stats``, by input
    group) and one backward pass of the dense model over ``loader`` (``fisher``: see
    :func:`fisher_losses`); on an accelerator the layers' activations are recomputed."""
    group_of = {linear: key for key, linears in groups.items() for linear in linears}
    outputs = sorted({unit.output for unit in pruner.units.values()})
    device = trainer.strategy.root_device
    with pruner.at(1.0):
        net = lm.place(device)
        grads = gradient_moments(trainer, net, lm.task, outputs, loader, fisher,
                                 checkpointing=device.type != "cpu")

    def inputs(linear: str) -> torch.Tensor:
        return second_moment(stats, group_of[linear])

    return unit_costs(pruner, ladder, inputs, grads, bars=not quiet(trainer))
