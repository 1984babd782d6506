"""One MLP's inner dimension: the first ``k`` neurons of one stored order, down refitted.

An MLP ``down(act(gate x) ⊙ up x)`` has inner dimension I; the activation is elementwise, so the
projection that commutes with it is a selection. Keeping a set S of ``k = ⌊p·I⌋`` neurons keeps
rows S of gate and up and columns S of down, whose kept columns are refitted to the dense output
on the task's tokens, damped towards the dense weights:
``W_down' = W C_λ[:, S] C_λ[S, S]⁻¹`` with ``C_λ = C + λI`` (keeping every neuron gives W back).
The result is three ordinary, smaller Linears: no factor cost, quantizable at any size.

One order per MLP makes every level a prefix. With ``L`` the Cholesky factor of ``C_λ`` in that
order, the refit of the first k neurons is ``g[:, :k] L[:k, :k]⁻¹`` with ``g = W C_λ[:, P] L⁻ᵀ``,
because the Cholesky factor of a leading block is the leading block of the factor. ``L`` is
stored packed by block rows (half the bytes of the square, and a prefix is contiguous).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..models.factored import dense_shape, dense_weight, linear_like
from ..maths import damped
from .base import Moment, Spec, Unit, host

PACK = 128  # rows per block of the packed Cholesky factor


@dataclass
class NeuronSpec(Spec):
    """``inputs``: the Linears whose rows are the neurons (``blocks`` times each, for a fused
    gate_up); ``output``: the Linear whose columns are."""

    inputs: tuple[str, ...] = ()
    blocks: int = 1


def _block_rows(n: int, block: int):
    """(first row, rows, columns, offset) of each block row ``l[j:j+b, :j+b]`` of a packed
    ``n × n`` lower-triangular matrix, in storage order."""
    offset = 0
    for j in range(0, n, block):
        rows, cols = min(block, n - j), min(j + block, n)
        yield j, rows, cols, offset
        offset += rows * cols


def pack_lower(l: torch.Tensor, block: int = PACK, rows: torch.Tensor | None = None
               ) -> torch.Tensor:
    """A lower-triangular ``n × n`` matrix as the concatenated block rows ``l[j:j+b, :j+b]``
    (above the diagonal: zeros, whatever ``l`` holds there). ``rows``: pack ``l[rows]``
    without forming it (a second ``n × n`` matrix: 0.8 GB for an 8B model's MLP)."""
    layout = list(_block_rows(l.shape[0], block))
    *_, (_, last_rows, last_cols, last) = layout
    packed = torch.empty(last + last_rows * last_cols, dtype=l.dtype, device=l.device)
    for j, height, cols, offset in layout:
        picked = slice(j, j + height) if rows is None else rows[j:j + height]
        packed[offset:offset + height * cols] = l[picked, :cols].tril(j).reshape(-1)
    return packed


def unpack_lower(packed: torch.Tensor, n: int, k: int, block: int = PACK,
                 device=None) -> torch.Tensor:
    """The leading ``k × k`` block of a matrix :func:`pack_lower` packed (its first block
    rows: only those are read), on ``device``."""
    out = torch.zeros(k, k, dtype=packed.dtype, device=device or packed.device)
    for j, rows, cols, offset in _block_rows(n, block):
        if j >= k:
            break
        part = packed[offset:offset + rows * cols].view(rows, cols)
        width = min(cols, k)
        out[j:j + min(rows, k - j), :width] = part[:k - j, :width].to(out.device)
    return out


def solve_packed(packed: torch.Tensor, n: int, k: int, rhs: torch.Tensor,
                 block: int = PACK) -> torch.Tensor:
    """``X`` with ``X L[:k, :k] = rhs`` (``rhs``: out × k, overwritten) for the ``L`` that
    :func:`pack_lower` packed, one block row of ``L`` at a time from the last: the square
    ``k × k`` factor never exists (0.8 GB for an 8B model's MLP, beside the model while a
    search rebuilds a unit)."""
    leading = [b for b in _block_rows(n, block) if b[0] < k]
    for j, rows, cols, offset in reversed(leading):
        end = min(j + block, k)
        part = packed[offset:offset + rows * cols].view(rows, cols)
        part = part[:end - j, :end].to(rhs.device, rhs.dtype)
        x = torch.linalg.solve_triangular(part[:, j:end], rhs[:, j:end], upper=False, left=False)
        rhs[:, j:end] = x
        if j:
            rhs[:, :j] -= x @ part[:, :j]
    return rhs


def greedy_order(w: torch.Tensor, c_lam: torch.Tensor, block: int = 64, pool: int = 4
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Neurons in the order a greedy refit wants them, and the Cholesky columns of ``C_λ`` in
    that order (``I × I``: row i is neuron i, column t the t-th kept neuron).

    Each next neuron is the one whose addition to the kept set explains the most remaining
    output energy of ``W``, ``‖W R[:, j]‖² / R[j, j]`` with ``R`` the residual of ``C_λ`` after
    the neurons kept (a pivoted Cholesky). Blocked: ``block`` neurons at a time are picked by
    the exact greedy rule among the ``pool·block`` with the largest gain when the block starts,
    then the Cholesky columns and ``W R`` are updated by matrix products. Within a block nothing
    leaves the device (no host sync per neuron); the order is the exact greedy one whenever its
    next ``block`` picks lie in that pool.
    """
    n = c_lam.shape[0]
    wr = w @ c_lam  # W R, R = C_λ minus what the kept neurons explain
    diag = c_lam.diagonal().clone()
    chol = torch.zeros_like(c_lam)
    free = torch.ones(n, dtype=torch.bool, device=w.device)
    order = torch.empty(n, dtype=torch.long, device=w.device)
    tiny = torch.finfo(w.dtype).tiny
    for t in range(0, n, block):
        b = min(block, n - t)
        gain = (wr.square().sum(0) / diag.clamp(min=tiny)).masked_fill(~free, -torch.inf)
        cand = gain.topk(min(pool * b, n - t)).indices
        r = c_lam[cand][:, cand] - chol[cand, :t] @ chol[cand, :t].T
        wr_c, alive, picked = wr[:, cand].clone(), torch.ones_like(cand, dtype=torch.bool), []
        for _ in range(b):
            best = (wr_c.square().sum(0) / r.diagonal().clamp(min=tiny)).masked_fill(
                ~alive, -torch.inf).argmax().view(1)
            pivot = r.index_select(1, best)  # (pool × 1), R[:, j] over the pool
            scale = pivot.index_select(0, best).clamp(min=tiny)
            wr_c -= wr_c.index_select(1, best) @ (pivot.T / scale)
            r -= pivot @ (pivot.T / scale)
            alive.index_fill_(0, best, False)
            picked.append(best)
        chosen = cand[torch.cat(picked)]
        cols = c_lam[:, chosen] - chol[:, :t] @ chol[chosen, :t].T  # R[:, chosen]
        block_l = torch.linalg.cholesky(cols[chosen])
        cols = torch.linalg.solve_triangular(block_l, cols.T, upper=False).T
        chol[:, t:t + b] = cols
        diag -= cols.square().sum(1)
        wr -= (w @ cols) @ cols.T
        free[chosen] = False
        order[t:t + b] = chosen
    return order, chol


@dataclass
class Neurons:
    """Bases of one MLP's inner dimension: ``order`` (most useful first), ``g = W C_λ[:, P]
    L⁻ᵀ`` (out × I) and ``L`` packed (:func:`pack_lower`), ``L`` the Cholesky factor of
    ``C_λ[P, P]``: the refit of the first k neurons is ``g[:, :k] L[:k, :k]⁻¹``."""

    order: torch.Tensor
    g: torch.Tensor
    l_packed: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.order)

    def refit(self, k: int, device=None) -> torch.Tensor:
        """Down's weight on the first k neurons (out × k), float32 (or the basis' float64)
        on ``device``."""
        dtype = torch.promote_types(self.g.dtype, torch.float32)  # (float64 bases stay so)
        rhs = torch.empty(self.g.shape[0], k, dtype=dtype, device=device or self.g.device)
        return solve_packed(self.l_packed, self.size, k, rhs.copy_(self.g[:, :k]))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"order": self.order, "g": self.g, "l": self.l_packed}

    def meta(self) -> dict:
        return {}

    @classmethod
    def stored(cls, tensors: dict, meta: dict) -> "Neurons":
        return cls(tensors["order"], tensors["g"], tensors["l"])


def neuron_basis(w_down: torch.Tensor, c: torch.Tensor, ridge: float, how: str = "greedy",
                 **blocking) -> Neurons:
    """The basis of one MLP from down's weight and input second moment (see the module
    docstring); ``how``: greedy (:func:`greedy_order`) or magnitude (``‖W[:, j]‖²·C[j, j]``,
    the cheap baseline). Computed on their device in their dtype."""
    c_lam = damped(c, ridge)
    if how == "greedy":
        order, chol = greedy_order(w_down, c_lam, **blocking)  # (block, pool)
        del c_lam  # (the largest layers hold a few I × I matrices: free each one early)
        g = w_down @ chol  # = W C_λ[:, P] L⁻ᵀ, since C_λ = chol cholᵀ and C_λ[:, P] = chol Lᵀ
        return Neurons(order, g, pack_lower(chol, rows=order))  # L = chol[P], never formed
    order = torch.argsort(w_down.square().sum(0) * c.diagonal(), descending=True)
    l = torch.linalg.cholesky(c_lam[order][:, order])
    g = torch.linalg.solve_triangular(l.T, w_down @ c_lam[:, order], upper=True, left=False)
    return Neurons(order, g, pack_lower(l))


class NeuronUnit(Unit):
    """One MLP's neurons: the first k of a stored order, down refitted to the dense output."""

    kind = "neurons"
    basis_type = Neurons

    def __init__(self, model: nn.Module, spec: NeuronSpec, load):
        super().__init__(model, spec, load)
        self.inputs, self.blocks = tuple(spec.inputs), spec.blocks
        self.inner = dense_shape(self._dense[self.output])[1]

    @classmethod
    def fit(cls, net, spec: NeuronSpec, moment: Moment, config, device) -> Neurons:
        dtype = getattr(torch, config.dtype)
        w = dense_weight(net.get_submodule(spec.output)).detach().to(device, dtype)
        basis = neuron_basis(w, moment(spec.output).to(device, dtype), config.ridge,
                             config.neuron_order)
        return Neurons(basis.order.cpu(), host(basis.g), host(basis.l_packed))

    def size(self, keep: float, multiple: int) -> int | None:
        """Neurons kept; at least one (or ``multiple``) — an MLP is never removed outright."""
        if keep >= 1.0:
            return None
        step = min(multiple, self.inner)
        return max(step, int(keep * self.inner) // step * step)

    def params(self, k: int | None) -> int:
        return self.total if k is None else self.total * k // self.inner

    def at_least(self, fraction: float, multiple: int) -> int | None:
        step = min(multiple, self.inner)
        k = -(-math.ceil(fraction * self.inner) // step) * step
        return None if k >= self.inner else max(k, step)

    def error(self, k: int, device=None) -> torch.Tensor:
        """``W_down − W_down'`` over all I columns (dropped neurons' columns whole): the change
        of down's output, since the kept neurons' activations are unchanged."""
        basis = self.basis
        delta = self.weights(self.output, device).clone()  # (may be the dense weight itself)
        delta[:, basis.order[:k].to(delta.device)] -= basis.refit(k, delta.device)
        return delta

    def modules(self, k: int, refitted=None, device=None) -> dict[str, nn.Module]:
        """``refitted``: ``(W_down,)`` fitted for these k neurons, used instead of the basis."""
        basis = self.basis
        device = device or self.dense[self.output].weight.device
        kept = basis.order[:k].to(device)
        out = {}
        for name in self.inputs:  # rows of gate / up (each block of a fused gate_up)
            old = self.dense[name]
            rows = torch.cat([kept + b * self.inner for b in range(self.blocks)])
            bias = None if old.bias is None else old.bias.detach().to(device)[rows]
            out[name] = linear_like(old, dense_weight(old).detach().to(device)[rows], bias,
                                    device)
        old = self.dense[self.output]
        down = (refitted[0] if refitted is not None and refitted[0].shape[1] == k
                else basis.refit(k, device))
        bias = None if old.bias is None else old.bias.detach().to(device)
        out[self.output] = linear_like(old, down.to(device, old.weight.dtype), bias, device)
        return out

    @staticmethod
    def nf4_skip(layout: dict) -> list[str]:
        return [name for name, (out, inner) in (layout.get("shapes") or {}).items()
                if out % 32 or inner % 64]
