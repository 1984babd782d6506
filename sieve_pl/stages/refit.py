"""Error-compensating refit of the chosen levels.

The projections were fitted on the dense model's inputs, but inside the pruned model each matrix
receives inputs already distorted by the pruned layers before it. Layer by layer, in forward
order, this refits every factored matrix so the pruned model's input ``x̃`` reproduces the dense
model's output ``W x`` on the calibration tokens:

    min over rank-R M of Σ ‖W x − M x̃‖²   →   M* = W K C̃⁻¹,  M = U_R U_Rᵀ M*

with ``C̃ = Σ x̃ x̃ᵀ``, ``K = Σ x x̃ᵀ`` and ``U`` the eigenvectors of ``M* C̃ M*ᵀ`` (the same
reduced-rank regression as the projection, on the pruned model's inputs). Matrices of a layer
are refitted together from inputs of the pruned model whose earlier layers are refitted already.
"""
from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from tqdm.auto import tqdm

from ..models.factored import dense_shape, dense_weight, set_submodule
from ..tasks.base import last_logits
from .calibrate import reduce_sums
from .project import _eigh_desc


@dataclass
class RefitConfig:
    """Error-compensating refit of the chosen levels (after the search).

    Args:
        enabled: refit the factored matrices on the pruned model's own inputs; the refit is
            kept only if validation accuracy does not drop.
        examples: calibration examples used (the refit runs the model twice per layer, so its
            cost grows with layers x examples).
        ridge: strength of the pull towards the original weights, relative to the mean input
            energy (larger: closer to the plain projection, less fitted to the calibration set).
    """

    enabled: bool = False
    examples: int = 64
    ridge: float = 1e-6


class _Stop(Exception):
    """Raised after the layer of interest: later layers are not needed."""


class PairedMoments(L.LightningModule):
    """One layer's ``C̃`` and ``K`` per input group: dense and pruned model on the same tokens."""

    def __init__(self, net, layer: str, groups: dict[str, list[str]], dense: dict, pruned: dict):
        super().__init__()
        self.net, self.layer, self.groups = net, layer, groups
        self.variants = {"dense": dense, "pruned": pruned}
        self.sums: dict[str, torch.Tensor] = {}
        self._seen: dict[str, torch.Tensor] = {}
        self._handles = []

    def _use(self, variant: str) -> None:
        for name, module in self.variants[variant].items():
            set_submodule(self.net, name, module)

    def on_predict_start(self) -> None:
        def capture(key):
            def hook(module, args):
                self._seen[key] = args[0]
            return hook

        def stop(module, args, output):
            raise _Stop

        device = next(self.net.parameters()).device
        for variant in self.variants.values():
            for module in variant.values():
                module.to(device)
        self.sums = {}
        for key, names in self.groups.items():
            first = self.net.get_submodule(names[0])
            d, device = dense_shape(first)[1], first.weight.device
            for part in ("ctt", "k"):
                self.sums[f"{key}.{part}"] = torch.zeros(d, d, dtype=torch.float64, device=device)
        # hooks sit on the modules of both variants (the dense and the pruned first Linear)
        for key, names in self.groups.items():
            for variant in self.variants.values():
                self._handles.append(variant[names[0]].register_forward_pre_hook(capture(key)))
        self._handles.append(self.net.get_submodule(self.layer).register_forward_hook(stop))

    def _inputs(self, variant: str, batch: dict, mask: torch.Tensor) -> dict:
        self._use(variant)
        self._seen = {}
        try:
            last_logits(self.net, batch)
        except _Stop:
            pass
        return {k: v[mask].double() for k, v in self._seen.items()}

    def predict_step(self, batch, batch_idx):
        mask = batch["attention_mask"].bool()
        x = self._inputs("dense", batch, mask)
        xt = self._inputs("pruned", batch, mask)
        for key in self.groups:
            self.sums[f"{key}.ctt"] += xt[key].T @ xt[key]
            self.sums[f"{key}.k"] += x[key].T @ xt[key]

    def on_predict_end(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._use("pruned")
        reduce_sums(self.sums)


def refit_matrix(w: torch.Tensor, ctt: torch.Tensor, k: torch.Tensor, rank: int,
                 ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-R ``(A, B)`` minimising ``Σ ‖W x − B A x̃‖² + λ‖M − W‖²`` given ``C̃``, ``K``.

    The ridge term shrinks the unconstrained solution towards the original ``W`` (not towards
    zero): ``M* = (W K + λ W)(C̃ + λ I)⁻¹`` with ``λ = ridge · mean(diag C̃)``.
    """
    eye = torch.eye(ctt.shape[0], dtype=ctt.dtype, device=ctt.device)
    reg = ridge * ctt.diagonal().mean().clamp(min=1e-30)
    m_star = torch.linalg.solve(ctt + reg * eye, (w @ k + reg * w).T).T  # C̃ is symmetric
    _, u = _eigh_desc(m_star @ ctt @ m_star.T)
    u = u[:, :rank]
    return u.T @ m_star, u


def refit(trainer: L.Trainer, net, pruner, groups: dict[str, list[str]], levels: dict,
          dataloader, ridge: float = 1e-6) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Refitted ``(A, B)`` of every factored matrix at ``levels``; leaves the model at them."""
    ranks = pruner.apply(levels)
    pruned = {name: net.get_submodule(name) for name in pruner.dense}
    by_layer: dict[str, dict[str, list[str]]] = {}
    for key, names in groups.items():
        if any(n in ranks for n in names):
            by_layer.setdefault(key.rsplit(".", 1)[0], {})[key] = names
    refitted = {}
    for layer, layer_groups in tqdm(by_layer.items(), desc="refit", unit="layer",
                                    disable=not trainer.is_global_zero):
        moments = PairedMoments(net, layer, layer_groups, pruner.dense, pruned)
        trainer.predict(moments, dataloaders=dataloader, return_predictions=False)
        for key, names in layer_groups.items():
            ctt, k = moments.sums[f"{key}.ctt"], moments.sums[f"{key}.k"]
            for name in (n for n in names if n in ranks):
                w = dense_weight(pruner.dense[name]).detach().to(ctt.device, torch.float64)
                a, b = refit_matrix(w, ctt, k, ranks[name], ridge)
                module = pruned[name]
                with torch.no_grad():
                    module.A.weight.copy_(a)
                    module.B.weight.copy_(b)
                refitted[name] = (module.A.weight.detach().cpu().clone(),
                                  module.B.weight.detach().cpu().clone())
    return refitted
