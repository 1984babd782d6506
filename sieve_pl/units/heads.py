"""One attention layer's value dimension: ``r`` of ``d`` per kv head, v and o shrunk together.

Each kv head's value dimension d is a bottleneck between its rows of v and the columns of o of
the query heads that read it; attention mixes positions, not dimensions, so any projection
``P`` (r × d) of the values commutes with it: ``v' = P W_v`` and, for each query head h reading
it, o's columns refitted on the head's attention output (second moment ``C_h``, damped towards
the dense o): ``W_o,h' = W_o,h C_λ,h Pᵀ (P C_λ,h Pᵀ)⁻¹``. ``P``'s rows are the leading
generalised eigenvectors of ``(Σ_h C_λ,h W_o,hᵀ W_o,h C_λ,h, Σ_h C_λ,h)`` over the group's heads,
computed once per kv head, so a level is a prefix. The export holds v as a smaller Linear whose
output is zero-padded to d per head (attention kernels run unchanged) and o as a smaller Linear
reading the first r dimensions of each head.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..models.factored import HeadPad, HeadSlice, dense_weight, linear_like
from ..maths import damped, damping, eigh_desc
from .base import Moment, Spec, Unit, host


@dataclass
class HeadSpec(Spec):
    """``v`` / ``o`` Linears (head-major rows / columns), ``heads`` query heads, ``kv`` heads
    and ``head_dim`` d."""

    v: str = ""
    o: str = ""
    heads: int = 1
    kv: int = 1
    head_dim: int = 1


@dataclass
class HeadDims:
    """Bases of one layer's value dimension: ``e`` (kv × d × d), per kv head the rows of its
    projection, best first; ``c`` (heads × d × d) each query head's second moment of its o
    input and ``ridge`` (heads) the damping added to it in o's refit."""

    e: torch.Tensor
    c: torch.Tensor
    ridge: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"e": self.e, "c": self.c, "ridge": self.ridge}

    def meta(self) -> dict:
        return {}

    @classmethod
    def stored(cls, tensors: dict, meta: dict) -> "HeadDims":
        return cls(tensors["e"], tensors["c"], tensors["ridge"])


def head_basis(w_o: torch.Tensor, c: torch.Tensor, heads: int, kv: int, ridge: float
               ) -> HeadDims:
    """``e`` per kv head from o's weight and its input's second moment ``c`` (heads·d square).

    Keeping the span of ``P``'s rows and refitting o captures ``Σ_h tr(W_h C_λ,h Pᵀ (P C_λ,h
    Pᵀ)⁻¹ P C_λ,h W_hᵀ)`` of o's output energy; with one head that is maximised by the top
    generalised eigenvectors of ``(C_λ,h W_hᵀ W_h C_λ,h, C_λ,h)``; a group uses the sums.
    """
    d = c.shape[0] // heads
    blocks = torch.stack([c[h * d:(h + 1) * d, h * d:(h + 1) * d] for h in range(heads)])
    c_lam = damped(blocks, ridge)
    w = w_o.unflatten(1, (heads, d)).transpose(0, 1)  # heads × out × d
    cw = c_lam @ w.transpose(1, 2) @ w @ c_lam
    eye = torch.eye(d, dtype=c.dtype, device=c.device)
    rep, e = heads // kv, []
    for g in range(kv):
        a, b = cw[g * rep:(g + 1) * rep].sum(0), c_lam[g * rep:(g + 1) * rep].sum(0)
        chol_inv = torch.linalg.solve_triangular(torch.linalg.cholesky(b), eye, upper=False)
        e.append(eigh_desc(chol_inv @ a @ chol_inv.T)[1].T @ chol_inv)
    return HeadDims(torch.stack(e), blocks, damping(blocks, ridge))


class HeadUnit(Unit):
    """One attention layer's value dimension: ``r`` of ``d`` per kv head, o refitted."""

    kind = "heads"
    basis_type = HeadDims

    def __init__(self, model: nn.Module, spec: HeadSpec, load):
        super().__init__(model, spec, load)
        self.v, self.o = spec.v, spec.o
        self.heads, self.kv, self.head_dim = spec.heads, spec.kv, spec.head_dim

    @classmethod
    def fit(cls, net, spec: HeadSpec, moment: Moment, config, device) -> HeadDims:
        dtype = getattr(torch, config.dtype)
        w = dense_weight(net.get_submodule(spec.o)).detach().to(device, dtype)
        basis = head_basis(w, moment(spec.o).to(device, dtype), spec.heads, spec.kv,
                           config.ridge)
        return HeadDims(*(host(t) for t in (basis.e, basis.c, basis.ridge)))

    def size(self, keep: float, multiple: int) -> int | None:
        """Dimensions kept per kv head, at least one; in steps of ``multiple`` but at most
        d/8: a head's d (64 or 128) is too small for steps of 32 to leave any level but d/2."""
        if keep >= 1.0:
            return None
        step = max(1, min(multiple, self.head_dim // 8))
        return max(step, int(keep * self.head_dim) // step * step)

    def params(self, r: int | None) -> int:
        return self.total if r is None else self.total * r // self.head_dim

    def at_least(self, fraction: float, multiple: int) -> int | None:
        step = max(1, min(multiple, self.head_dim // 8))
        r = -(-math.ceil(fraction * self.head_dim) // step) * step
        return None if r >= self.head_dim else max(r, step)

    def _refit(self, r: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``P`` per kv head (kv × r × d) and o's refitted columns per query head (heads × r ×
        out): ``W_o,h C_λ,h Pᵀ (P C_λ,h Pᵀ)⁻¹`` for every head at once, in float64 (d × d
        systems: exact and cheap), on ``device``. At r = d the pair is the dense one."""
        basis, d = self.basis, self.head_dim
        w_o = dense_weight(self.dense[self.o]).detach().to(device, torch.float64)
        device = w_o.device
        w_o = w_o.unflatten(1, (self.heads, d))
        p = basis.e[:, :r].to(device, torch.float64)
        p_h = p.repeat_interleave(self.heads // self.kv, 0)  # the kv head each head reads
        eye = torch.eye(d, dtype=torch.float64, device=device)
        c_lam = (basis.c.to(device, torch.float64)
                 + basis.ridge.to(device, torch.float64)[:, None, None] * eye)
        cp = c_lam @ p_h.transpose(1, 2)  # heads × d × r
        return p, torch.linalg.solve(p_h @ cp, torch.einsum("ohd,hdr->hro", w_o, cp))

    def error(self, r: int, device=None) -> torch.Tensor:
        """The change of o's weight over o's dense input (every head's d dimensions): the
        narrowed v feeds o ``P z_h``, so the pair acts on ``z`` as ``W_o,h' P``."""
        p, new_o = self._refit(r, device)
        effective = torch.einsum("hro,hrd->ohd", new_o,
                                 p.repeat_interleave(self.heads // self.kv, 0))
        return self.weights(self.o, p.device) - effective.flatten(1).float()

    def modules(self, r: int, refitted=None, device=None) -> dict[str, nn.Module]:
        kv, d = self.kv, self.head_dim
        v, o = self.dense[self.v], self.dense[self.o]
        p, new_o = self._refit(r, device)  # kv × r × d, heads × r × out
        device, dtype = p.device, v.weight.dtype
        new_v = torch.einsum("grd,gdi->gri", p, dense_weight(v).detach().to(
            device, torch.float64).unflatten(0, (kv, d)))
        bias_v = None if v.bias is None else torch.einsum(
            "grd,gd->gr", p, v.bias.detach().to(device, torch.float64).unflatten(0, (kv, d)))
        new_o = new_o.permute(2, 0, 1).flatten(1)  # out × heads·r
        bias_o = None if o.bias is None else o.bias.detach().to(device)
        return {self.v: HeadPad(linear_like(v, new_v.flatten(0, 1).to(dtype),
                                            None if bias_v is None else bias_v.flatten().to(dtype),
                                            device), kv, r, d),
                self.o: HeadSlice(linear_like(o, new_o.to(dtype), bias_o, device),
                                  self.heads, r, d)}

    @staticmethod
    def nf4_skip(layout: dict) -> list[str]:
        return [f"{name}.linear" for name, (kind, heads, kept, _) in
                (layout.get("heads") or {}).items()
                if heads * kept % (32 if kind == "pad" else 64)]  # v: out, o: in narrowed
