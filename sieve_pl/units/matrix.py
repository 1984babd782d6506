"""One matrix, factored: rank ``R`` of a task-aware low-rank factorisation.

For a weight ``W`` (out H × in D) whose input has second moment ``C``, the rank-R matrix
minimising ``‖WX − MX‖²`` is ``U_R U_Rᵀ W`` with ``U`` the eigenvectors of ``W C Wᵀ``
(``output_aligned``); ``weight_svd`` takes ``U`` from the SVD of ``W`` and ``input_pca``
projects the input on the top eigenvectors ``V`` of ``C`` (``W V_R V_Rᵀ``, SliceGPT-like).
The pair ``A`` (R × D), ``B`` (H × R) holds ``R·(H + D)`` weights, so a keep fraction ``p`` is
``R = ⌊p·H·D/(H + D)⌋`` and the bases reach ``⌊H·D/(H + D)⌋``, the largest rank that saves any.

A projection on one side is stored as that side's basis only (``A = B_Rᵀ W`` or ``B = W A_Rᵀ``
is one matrix product when the unit is built, on its device): half the bytes of both factors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..models.factored import FactoredLinear, dense_shape, dense_weight
from ..maths import eigh_desc
from .base import Moment, Spec, Unit, host, matrix_params


def max_rank(out_features: int, in_features: int) -> int:
    return out_features * in_features // (out_features + in_features)


def rank_for(keep: float, out_features: int, in_features: int, multiple: int = 1) -> int | None:
    """Rank for a keep fraction, rounded down to a multiple; None means keep the dense matrix.

    Ranks in multiples of 32 or 64 suit GPU kernels and bitsandbytes' CPU nf4 kernel.
    """
    if keep >= 1.0 or max_rank(out_features, in_features) < multiple:
        return None
    rank = int(keep * out_features * in_features / (out_features + in_features))
    return max(multiple, rank // multiple * multiple)


@dataclass
class Factors:
    """Bases of one matrix: rank R is ``B_R A_R`` with ``A_R = a[:R]`` (R × in) and ``B_R =
    b[:, :R]`` (out × R). An output projection stores ``b`` only (``a`` None: ``A_R = B_Rᵀ W``),
    an input projection ``a`` only (``B_R = W A_Rᵀ``), a learned factorisation both."""

    b: torch.Tensor | None
    a: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in (("A", self.a), ("B", self.b)) if v is not None}

    def meta(self) -> dict:
        return {}

    @classmethod
    def stored(cls, tensors: dict, meta: dict) -> "Factors":
        return cls(tensors.get("B"), tensors.get("A"))

    def pair(self, rank: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_R, B_R)`` of this basis for the dense weight ``w``, in ``w``'s dtype and device."""
        a = None if self.a is None else self.a[:rank].to(w)
        b = None if self.b is None else self.b[:, :rank].to(w)
        return (b.T @ w if a is None else a), (w @ a.T if b is None else b)


def output_aligned(w: torch.Tensor, c: torch.Tensor, k: int) -> Factors:
    return Factors(eigh_desc(w @ c @ w.T)[1][:, :k])


def weight_svd(w: torch.Tensor, c: torch.Tensor, k: int) -> Factors:
    return Factors(torch.linalg.svd(w, full_matrices=False)[0][:, :k])


def input_pca(w: torch.Tensor, c: torch.Tensor, k: int) -> Factors:
    return Factors(None, eigh_desc(c)[1][:, :k].T)


METHODS = {"output_aligned": output_aligned, "weight_svd": weight_svd, "input_pca": input_pca}


class MatrixUnit(Unit):
    """One target matrix, dense or factored at a rank cut from its bases."""

    kind = "matrix"
    basis_type = Factors

    def __init__(self, model: nn.Module, spec: Spec, load):
        super().__init__(model, spec, load)
        self.shape = dense_shape(self._dense[self.name])

    @classmethod
    def fit(cls, net, spec: Spec, moment: Moment, config, device) -> Factors:
        dtype = getattr(torch, config.dtype)
        w = dense_weight(net.get_submodule(spec.name)).detach().to(device, dtype)
        c = moment(spec.name).to(device, dtype)
        found = METHODS[config.method](w, c, max_rank(*w.shape))
        return Factors(*(None if t is None else host(t) for t in (found.b, found.a)))

    def size(self, keep: float, multiple: int) -> int | None:
        return rank_for(keep, *self.shape, multiple)

    def params(self, rank: int | None) -> int:
        return matrix_params(*self.shape, rank)

    def at_least(self, fraction: float, multiple: int) -> int | None:
        h, d = self.shape
        rank = -(-math.ceil(fraction * h * d / (h + d)) // multiple) * multiple
        return None if rank > max_rank(h, d) else max(rank, multiple)

    def factors(self, rank: int, refitted=None, device=None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_R, B_R)`` in float32 on ``device``."""
        if refitted is not None and refitted[0].shape[0] == rank:
            return tuple(t.to(device, torch.float32) for t in refitted)
        return self.basis.pair(rank, self.weights(self.name, device))

    def error(self, rank: int, device=None) -> torch.Tensor:
        a, b = self.factors(rank, device=device)
        return self.weights(self.name, device) - b @ a

    def modules(self, rank: int, refitted=None, device=None) -> dict[str, nn.Module]:
        dense = self.dense[self.name]
        a, b = self.factors(rank, refitted, device)
        out_features, in_features = self.shape
        module = FactoredLinear(in_features, out_features, rank, bias=dense.bias is not None,
                                device=a.device, dtype=dense.weight.dtype)
        with torch.no_grad():
            module.A.weight.copy_(a)
            module.B.weight.copy_(b)
            if dense.bias is not None:
                module.B.bias.copy_(dense.bias.to(a.device))
        return {self.name: module}

    @staticmethod
    def nf4_skip(layout: dict) -> list[str]:
        return [f"{name}.{child}" for name, rank in (layout.get("ranks") or {}).items()
                if rank % 64 for child in "AB"]
