"""Sequential compensation: refit the chosen levels on the pruned model's own inputs.

The projections were fitted on the dense model's inputs, but inside the pruned model each unit
receives inputs already distorted by the pruned layers before it. Layer by layer, in forward
order, this refits every pruned unit so that, on the calibration tokens, the pruned model's
input ``x̃`` reproduces the dense model's output ``W x``, ridge-damped towards the weights it
replaces (``λ = ridge · mean(diag C̃)``, with ``C̃ = Σ x̃ x̃ᵀ`` and ``K = Σ x x̃ᵀ``):

- a factored matrix (rank R): ``M* = (W K + λW)(C̃ + λI)⁻¹``, then ``M = U_R U_Rᵀ M*`` with ``U``
  the eigenvectors of ``M* C̃ M*ᵀ`` (the projection's reduced-rank regression, on ``x̃``);
- an MLP's kept neurons: down's input is the kept neurons' activations ``h̃`` (k of them), and
  ``W_down' = (W_down K + λ W_S)(C̃ + λI)⁻¹`` with ``W_S`` the down it replaces.

Units of a layer are refitted together from inputs of the pruned model whose earlier layers are
refitted already.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.factored import dense_weight
from ..maths import damped, damping, eigh_desc, reduce_sums
from ..units import MatrixUnit, NeuronUnit
from ..progress import named, quiet
from ..models.forward import last_logits
from ..models.hooks import Capture, until_stop
from .stage import CompensationStage, settings


@dataclass
class RefitConfig:
    """Sequential compensation of the chosen levels (after the search).

    Args:
        enabled: refit the pruned units layer by layer on the pruned model's own inputs; the
            refit is kept only if validation accuracy does not drop.
        examples: calibration examples used (the refit runs the model twice per layer, so its
            cost grows with layers x examples).
        ridge: strength of the pull towards the weights being refitted, relative to the mean
            input energy (larger: closer to the plain projection, less fitted to the
            calibration set).
    """

    enabled: bool = False
    examples: int = 256
    ridge: float = 1e-2


class PairedMoments(L.LightningModule):
    """One layer's ``C̃`` and ``K`` per fit point: the dense and the pruned model on the same
    tokens (the pruner swaps the ``dense`` modules in for the dense forward). A fit point is
    ``(dense module, pruned module)``: the module whose input is ``x`` in the dense model and
    the one whose input is ``x̃`` in the pruned model."""

    def __init__(self, net, pruner, layer: str, points: dict[str, tuple[nn.Module, nn.Module]],
                 dense: dict[str, nn.Module], pruned: dict[str, nn.Module]):
        super().__init__()
        self.net, self.pruner, self.layer, self.points = net, pruner, layer, points
        self.dense, self.pruned = dense, pruned
        self.sums: dict[str, torch.Tensor] = {}
        self._seen: dict[str, torch.Tensor] = {}
        self._capture: Capture | None = None

    def on_predict_start(self) -> None:
        device = next(self.net.parameters()).device
        for module in [*self.dense.values(), *self.pruned.values()]:
            module.to(device)
        self.sums = {}
        for key, (dense, pruned) in self.points.items():
            inner, outer = dense_weight(dense).shape[1], dense_weight(pruned).shape[1]
            self.sums[f"{key}.ctt"] = torch.zeros(outer, outer, dtype=torch.float64, device=device)
            self.sums[f"{key}.k"] = torch.zeros(inner, outer, dtype=torch.float64, device=device)

        def seen(point: tuple[str, int], x: torch.Tensor) -> None:
            self._seen[point[0]] = x  # whichever of the point's two modules is in the model

        inputs = {(key, i): module for key, pair in self.points.items()
                  for i, module in enumerate(pair)}
        self._capture = Capture(inputs, seen, stop_after=self.net.get_submodule(self.layer))

    def _inputs(self, batch: dict, mask: torch.Tensor) -> dict:
        self._seen = {}
        until_stop(last_logits, self.net, batch)
        return {k: v[mask].double() for k, v in self._seen.items()}

    def predict_step(self, batch, batch_idx):
        mask = batch["attention_mask"].bool()
        with self.pruner.swapped(self.dense):
            x = self._inputs(batch, mask)
        xt = self._inputs(batch, mask)
        for key in self.points:
            self.sums[f"{key}.ctt"] += xt[key].T @ xt[key]
            self.sums[f"{key}.k"] += x[key].T @ xt[key]

    def on_predict_end(self) -> None:
        self._capture.remove()
        reduce_sums(self.sums)


def refit_matrix(w: torch.Tensor, ctt: torch.Tensor, k: torch.Tensor, rank: int,
                 ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-R ``(A, B)`` minimising ``Σ ‖W x − B A x̃‖² + λ‖M − W‖²`` given ``C̃``, ``K``.

    The ridge term shrinks the unconstrained solution towards the original ``W`` (not towards
    zero): ``M* = (W K + λ W)(C̃ + λ I)⁻¹`` with ``λ = ridge · mean(diag C̃)``.
    """
    reg = damping(ctt, ridge)
    m_star = torch.linalg.solve(damped(ctt, ridge), (w @ k + reg * w).T).T  # C̃ is symmetric
    _, u = eigh_desc(m_star @ ctt @ m_star.T)
    u = u[:, :rank]
    return u.T @ m_star, u


def refit_down(w: torch.Tensor, ctt: torch.Tensor, k: torch.Tensor, current: torch.Tensor,
               ridge: float) -> torch.Tensor:
    """Down's kept columns: ``(W K + λ W_S)(C̃ + λI)⁻¹``, shrunk towards ``current`` (W_S)."""
    return torch.linalg.solve(damped(ctt, ridge), (w @ k + damping(ctt, ridge) * current).T).T


def _layer(unit: str) -> str:
    """``model.layers.3.mlp`` / ``model.layers.3.self_attn.q_proj`` -> ``model.layers.3``."""
    return re.match(r"(.*?\.\d+)\.", unit).group(1)


def refit(trainer: L.Trainer, net, pruner, levels: dict, dataloader, ridge: float = 1e-2
          ) -> dict[str, tuple[torch.Tensor, ...]]:
    """Refitted weights of every pruned unit at ``levels`` (``(A, B)`` of a factored matrix,
    ``(W_down,)`` of an MLP, for ``pruner.use``). The model must be at ``levels`` (``with
    pruner.at(levels)``); its pruned modules are refitted in place."""
    sizes = pruner.require(levels, "refit")
    units = {name: pruner.units[name] for name in sizes  # head units keep their projection refit
             if isinstance(pruner.units[name], (MatrixUnit, NeuronUnit))}
    dense = {n: m for u in pruner.units.values() for n, m in u.dense.items()}
    pruned = {n: net.get_submodule(n) for u in units.values() for n in u.dense}
    by_layer: dict[str, list[str]] = {}
    for name in units:
        by_layer.setdefault(_layer(name), []).append(name)
    refitted = {}
    for layer, names in tqdm(by_layer.items(), desc="refit", unit="layer",
                             disable=quiet(trainer)):
        point = {n: units[n].output for n in names}  # the module whose input is refitted against
        moments = PairedMoments(net, pruner, layer, {n: (dense[m], pruned[m]) for n, m in point.items()},
                                dense, pruned)
        with named(trainer, f"refit {layer}"):
            trainer.predict(moments, dataloaders=dataloader, return_predictions=False)
        for name in names:
            ctt, k = moments.sums[f"{name}.ctt"], moments.sums[f"{name}.k"]
            w = dense_weight(dense[point[name]]).detach().to(ctt.device, torch.float64)
            module = pruned[point[name]]
            with torch.no_grad():
                if isinstance(units[name], MatrixUnit):
                    a, b = refit_matrix(w, ctt, k, sizes[name], ridge)
                    module.A.weight.copy_(a)
                    module.B.weight.copy_(b)
                    refitted[name] = (module.A.weight.detach().cpu().clone(),
                                      module.B.weight.detach().cpu().clone())
                else:
                    current = dense_weight(module).detach().to(ctt.device, torch.float64)
                    down = refit_down(w, ctt, k, current, ridge)
                    dense_weight(module).copy_(down)
                    refitted[name] = (dense_weight(module).detach().cpu().clone(),)
    return refitted


class Refit(CompensationStage):
    """Sequential compensation of the search's levels, kept if validation does not fall."""

    name = "refit"

    def fingerprint(self) -> dict:
        return settings(self.config)

    def fit(self, work: Path) -> tuple[dict, dict]:
        ctx = self.ctx
        return refit(ctx.trainer, ctx.lm.net, self.pruner, self.levels,
                     ctx.data.loader("calibration", limit=self.config.examples),
                     self.config.ridge), {}
