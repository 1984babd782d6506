"""Keep levels -> ranks -> factored Linears cut from stored bases, with exact parameter counts.

A keep fraction ``p`` of an ``H × D`` matrix means rank ``R = ⌊p·H·D/(H + D)⌋`` (at least 1), so
the factored matrix holds ``R·(H + D) ≤ p·H·D`` weights; ``p = 1`` keeps the dense Linear. Bases
are stored up to the largest rank that still saves parameters, ``⌊H·D/(H + D)⌋``, so one
projection serves every level by slicing.
"""
from __future__ import annotations

import torch
from torch import nn

from .factored import FactoredLinear, dense_shape, set_submodule


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


def matrix_params(out_features: int, in_features: int, rank: int | None) -> int:
    """Weights of one target matrix (bias excluded: it is kept unchanged)."""
    return out_features * in_features if rank is None else rank * (out_features + in_features)


class Pruner:
    """Swaps a model's target Linears (or Conv1Ds) between dense and factored forms.

    ``bases[name] = (A_full, B_full)`` with ``A_full`` (K × in) and ``B_full`` (out × K); the
    rank-R matrix is ``B_full[:, :R] @ A_full[:R]``. The dense Linears are kept aside so any level
    can be applied again without refitting.
    """

    def __init__(self, model: nn.Module, bases: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 rank_multiple: int = 1):
        self.model, self.bases, self.rank_multiple = model, bases, rank_multiple
        self.dense = {name: model.get_submodule(name) for name in bases}
        # factors refitted for one particular rank; used instead of the bases at that rank
        self.refitted: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def shape(self, name: str) -> tuple[int, int]:
        return dense_shape(self.dense[name])

    def levels(self, keep: float | dict[str, float]) -> dict[str, float]:
        return dict.fromkeys(self.dense, float(keep)) if isinstance(keep, (int, float)) else keep

    def ranks(self, keep: float | dict[str, float]) -> dict[str, int]:
        """Ranks of the matrices that are factored at these levels."""
        ranks = {n: rank_for(p, *self.shape(n), self.rank_multiple)
                 for n, p in self.levels(keep).items()}
        return {n: r for n, r in ranks.items() if r is not None}

    def params(self, keep: float | dict[str, float]) -> tuple[int, int]:
        """(target weights kept, target weights in the dense model)."""
        ranks = self.ranks(keep)
        kept = sum(matrix_params(*self.shape(n), ranks.get(n)) for n in self.dense)
        return kept, sum(matrix_params(*self.shape(n), None) for n in self.dense)

    def factored(self, name: str, rank: int) -> FactoredLinear:
        dense = self.dense[name]
        a_full, b_full = self.bases[name]
        if name in self.refitted and self.refitted[name][0].shape[0] == rank:
            a_full, b_full = self.refitted[name]
        w = dense.weight
        out_features, in_features = self.shape(name)
        module = FactoredLinear(in_features, out_features, rank,
                                bias=dense.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            module.A.weight.copy_(a_full[:rank])
            module.B.weight.copy_(b_full[:, :rank])
            if dense.bias is not None:
                module.B.bias.copy_(dense.bias)
        return module

    def apply(self, keep: float | dict[str, float]) -> dict[str, int]:
        """Put the model at these levels (in place); returns the ranks of factored matrices."""
        ranks = self.ranks(keep)
        device = next(self.model.parameters()).device  # the model may have moved since
        for name in self.dense:
            module = self.factored(name, ranks[name]) if name in ranks else self.dense[name]
            set_submodule(self.model, name, module.to(device))
        return ranks
