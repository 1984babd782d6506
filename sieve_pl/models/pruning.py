"""Pruning units and the one object that puts a model at a set of levels.

A *unit* is what the search gives one level (a keep fraction ``p`` of the unit's weights):

- :class:`MatrixUnit` — one ``H × D`` matrix stored factored: rank ``R = ⌊p·H·D/(H + D)⌋`` (at
  least 1), so the pair holds ``R·(H + D) ≤ p·H·D`` weights; ``p = 1`` keeps the dense Linear.
  Its bases reach the largest rank that still saves parameters, ``⌊H·D/(H + D)⌋``.
- :class:`NeuronUnit` — the inner dimension ``I`` of one MLP (``down(act(gate x) ⊙ up x)``):
  ``k = ⌊p·I⌋`` neurons kept, the first ``k`` of one stored order (rows of gate/up, columns of
  down); down's kept columns are refitted to the dense output, ``W_down C[:, S](C[S, S] + λI)⁻¹``.
  The result is three ordinary, smaller Linears: no factor cost.
- :class:`HeadUnit` — the value dimension of one attention layer: each kv head keeps
  ``r = ⌊p·d⌋`` of its ``d`` dimensions, projected by the first ``r`` rows of one stored basis
  ``E_g`` (``v' = E_g[:r] W_v``), and o's columns of every query head reading it are refitted,
  ``W_o,h C_h Pᵀ(P C_h Pᵀ + λI)⁻¹`` with ``P = E_g[:r]``. v and o both shrink by ``r/d``.

Every level is a slice of what projection stored once ("decompose once, slice many").
:class:`Pruner` owns the model's pruned state: nothing else swaps its modules.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .factored import (FactoredLinear, HeadPad, HeadSlice, dense_shape, dense_weight,
                       linear_like, set_submodule)


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


def layer_and_kind(name: str) -> tuple[int, str]:
    """``model.layers.3.self_attn.q_proj`` -> (3, ``self_attn.q_proj``); ``model.layers.3.mlp``
    -> (3, ``mlp``): units of one kind play the same part in every layer."""
    match = re.search(r"\.(\d+)\.(.+)$", name)
    return (int(match.group(1)), match.group(2)) if match else (0, name)


class Factors(NamedTuple):
    """Bases of one matrix: ``a`` (K × in) and ``b`` (out × K); rank R is ``b[:, :R] @ a[:R]``."""

    a: torch.Tensor
    b: torch.Tensor


@dataclass
class Neurons:
    """Bases of one MLP's inner dimension (see :func:`sieve_pl.stages.project.neuron_basis`).

    ``order``: neurons, most useful first. With ``P`` that order, ``C_λ = C + λI`` the second
    moment of down's input and ``L`` the Cholesky factor of ``C_λ[P, P]``: ``g = W_down C[:, P]
    L⁻ᵀ`` (out × I) and ``l_inv = L⁻¹`` (I × I, lower triangular). Both are triangular in the
    order, so keeping the first k neurons refits down as ``g[:, :k] @ l_inv[:k, :k]``.
    ``inputs`` are the Linears whose rows are the neurons (``blocks`` times each, for a fused
    gate_up), ``output`` the Linear whose columns are.
    """

    order: torch.Tensor
    g: torch.Tensor
    l_inv: torch.Tensor
    inputs: tuple[str, ...]
    output: str
    blocks: int = 1

    @property
    def size(self) -> int:
        return len(self.order)


@dataclass
class HeadDims:
    """Bases of one attention layer's value dimension (see
    :func:`sieve_pl.stages.project.head_basis`).

    ``e`` (kv × d × d): per kv head, the rows of its projection, most useful first. ``c``
    (heads × d × d): each query head's second moment of its o input (its attention output) and
    ``ridge`` (heads): the damping added to it in o's refit. ``v`` and ``o`` are the Linears.
    """

    e: torch.Tensor
    c: torch.Tensor
    ridge: torch.Tensor
    v: str
    o: str

    @property
    def size(self) -> int:
        return self.e.shape[-1]


class MatrixUnit:
    """One target matrix, dense or factored at a rank cut from its bases."""

    def __init__(self, model: nn.Module, name: str, factors: Factors):
        self.name, self.factors, self.output = name, factors, name
        self.dense = {name: model.get_submodule(name)}
        self.shape = dense_shape(self.dense[name])
        self.total = matrix_params(*self.shape, None)

    def size(self, keep: float, multiple: int) -> int | None:
        return rank_for(keep, *self.shape, multiple)

    def params(self, rank: int | None) -> int:
        return matrix_params(*self.shape, rank)

    def error(self, rank: int) -> torch.Tensor:
        """The change ``W − W'`` (``out × in``) of ``output``'s weight at this rank: what
        :mod:`~sieve_pl.stages.sensitivity` prices."""
        w = dense_weight(self.dense[self.name]).detach()
        a, b = self.factors
        return w - (b[:, :rank] @ a[:rank]).to(w.dtype)

    def modules(self, rank: int, refitted: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> dict[str, nn.Module]:
        """``refitted``: ``(A, B)`` fitted for this rank, used instead of the bases."""
        dense = self.dense[self.name]
        a, b = (refitted if refitted is not None and refitted[0].shape[0] == rank
                else (self.factors.a, self.factors.b))
        w = dense.weight
        out_features, in_features = self.shape
        module = FactoredLinear(in_features, out_features, rank, bias=dense.bias is not None,
                                device=w.device, dtype=w.dtype)
        with torch.no_grad():
            module.A.weight.copy_(a[:rank])
            module.B.weight.copy_(b[:, :rank])
            if dense.bias is not None:
                module.B.bias.copy_(dense.bias)
        return {self.name: module}


class NeuronUnit:
    """One MLP's neurons: the first k of a stored order, down refitted to the dense output."""

    def __init__(self, model: nn.Module, name: str, basis: Neurons):
        self.name, self.basis, self.output = name, basis, basis.output
        self.dense = {n: model.get_submodule(n) for n in (*basis.inputs, basis.output)}
        self.total = sum(matrix_params(*dense_shape(m), None) for m in self.dense.values())

    def size(self, keep: float, multiple: int) -> int | None:
        """Neurons kept; at least one (or ``multiple``) — an MLP is never removed outright."""
        if keep >= 1.0:
            return None
        step = min(multiple, self.basis.size)
        return max(step, int(keep * self.basis.size) // step * step)

    def params(self, k: int | None) -> int:
        return self.total if k is None else self.total * k // self.basis.size

    def error(self, k: int) -> torch.Tensor:
        """``W_down − W_down'`` over all I columns (dropped neurons' columns whole): the change
        of down's output, since the kept neurons' activations are unchanged."""
        b = self.basis
        w = dense_weight(self.dense[b.output]).detach()
        delta = w.clone()
        delta[:, b.order[:k].to(w.device)] -= (b.g[:, :k] @ b.l_inv[:k, :k]).to(w.dtype)
        return delta

    def modules(self, k: int, refitted: tuple[torch.Tensor] | None = None
                ) -> dict[str, nn.Module]:
        """``refitted``: ``(W_down,)`` fitted for these k neurons, used instead of the bases."""
        basis, inner = self.basis, self.basis.size
        kept = basis.order[:k]
        out = {}
        for name in basis.inputs:  # rows of gate / up (each block of a fused gate_up)
            old = self.dense[name]
            rows = torch.cat([kept + b * inner for b in range(basis.blocks)]).to(old.weight.device)
            w = dense_weight(old).detach()[rows]
            bias = None if old.bias is None else old.bias.detach()[rows]
            out[name] = linear_like(old, w, bias)
        old = self.dense[basis.output]
        w = dense_weight(old)
        down = (refitted[0] if refitted is not None and refitted[0].shape[1] == k
                else basis.g[:, :k] @ basis.l_inv[:k, :k]).to(w.device, w.dtype)
        out[basis.output] = linear_like(old, down, None if old.bias is None else old.bias.detach())
        return out


class HeadUnit:
    """One attention layer's value dimension: ``r`` of ``d`` per kv head, o refitted."""

    def __init__(self, model: nn.Module, name: str, basis: HeadDims):
        self.name, self.basis, self.output = name, basis, basis.o
        self.dense = {n: model.get_submodule(n) for n in (basis.v, basis.o)}
        self.total = sum(matrix_params(*dense_shape(m), None) for m in self.dense.values())

    def size(self, keep: float, multiple: int) -> int | None:
        """Dimensions kept per kv head, at least one; in steps of ``multiple`` but at most
        d/8: a head's d (64 or 128) is too small for steps of 32 to leave any level but d/2."""
        if keep >= 1.0:
            return None
        step = max(1, min(multiple, self.basis.size // 8))
        return max(step, int(keep * self.basis.size) // step * step)

    def params(self, r: int | None) -> int:
        return self.total if r is None else self.total * r // self.basis.size

    def _refit(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``P`` per kv head (kv × r × d) and o's refitted columns per query head (heads × r ×
        out): ``W_o,h C_λ,h Pᵀ (P C_λ,h Pᵀ)⁻¹`` for every head h at once, in float64 (damped
        towards the dense ``W_o,h``: at r = d the pair is exactly the dense one)."""
        b = self.basis
        kv, d, heads = b.e.shape[0], b.size, b.c.shape[0]
        p = b.e[:, :r].to(torch.float64)
        w_o = dense_weight(self.dense[b.o]).detach().double().unflatten(1, (heads, d))
        p_h = p.repeat_interleave(heads // kv, 0)  # the kv head each query head reads
        eye = torch.eye(d, dtype=torch.float64, device=p.device)
        c_lam = b.c.double() + b.ridge.double()[:, None, None] * eye
        cp = c_lam @ p_h.transpose(1, 2)  # heads × d × r
        return p, torch.linalg.solve(p_h @ cp, torch.einsum("ohd,hdr->hro", w_o, cp))

    def error(self, r: int) -> torch.Tensor:
        """The change of o's weight over o's dense input (every head's d dimensions): the
        narrowed v feeds o ``P z_h``, so the pair acts on ``z`` as ``W_o,h' P``."""
        b = self.basis
        p, new_o = self._refit(r)
        heads, kv = b.c.shape[0], b.e.shape[0]
        w_o = dense_weight(self.dense[b.o]).detach()
        effective = torch.einsum("hro,hrd->ohd", new_o, p.repeat_interleave(heads // kv, 0))
        return w_o - effective.flatten(1).to(w_o.dtype)

    def modules(self, r: int, refitted=None) -> dict[str, nn.Module]:
        b = self.basis
        kv, d, heads = b.e.shape[0], b.size, b.c.shape[0]
        v, o = self.dense[b.v], self.dense[b.o]
        w_v = dense_weight(v).detach()
        p, new_o = self._refit(r)  # kv × r × d, heads × r × out
        new_v = torch.einsum("grd,gdi->gri", p, w_v.unflatten(0, (kv, d)).double())
        bias_v = None if v.bias is None else torch.einsum(
            "grd,gd->gr", p, v.bias.detach().unflatten(0, (kv, d)).double()).flatten()
        new_o = new_o.permute(2, 0, 1).flatten(1)  # out × heads·r
        dtype = w_v.dtype
        return {b.v: HeadPad(linear_like(v, new_v.flatten(0, 1).to(dtype),
                                         None if bias_v is None else bias_v.to(dtype)),
                             kv, r, d),
                b.o: HeadSlice(linear_like(o, new_o.to(dtype),
                                           None if o.bias is None else o.bias.detach()),
                               heads, r, d)}


UNITS = {Factors: MatrixUnit, Neurons: NeuronUnit, HeadDims: HeadUnit}


@contextmanager
def with_weights(net: nn.Module, weights: dict[str, torch.Tensor]):
    """Temporarily give ``net`` these weights (by parameter name, e.g. merged LoRA); the
    originals come back, on the device the parameter is on by then."""
    params = dict(net.named_parameters())
    saved = {name: params[name].data for name in weights}
    try:
        for name, value in weights.items():
            params[name].data = value.to(saved[name].device, saved[name].dtype)
        yield net
    finally:
        params = dict(net.named_parameters())
        for name, value in saved.items():
            params[name].data = value.to(params[name].device)


class Pruner:
    """Owns a model's pruned state: puts it at any levels, and back to dense, from stored bases.

    ``bases`` maps a unit name to :class:`Factors` (a matrix, by its module name),
    :class:`Neurons` (an MLP) or :class:`HeadDims` (an attention layer's v/o). The dense modules are kept aside so any level can be applied again
    without refitting. ``refitted`` holds weights refitted for one size of a unit (``(A, B)`` of
    a matrix at one rank, ``(W_down,)`` of an MLP at one neuron count); they are used instead of
    the bases at that size.
    """

    def __init__(self, model: nn.Module, bases: dict[str, Factors | Neurons],
                 rank_multiple: int = 1):
        self.model, self.rank_multiple = model, rank_multiple
        self.units = {name: UNITS[type(b)](model, name, b) for name, b in bases.items()}
        self.refitted: dict[str, tuple[torch.Tensor, ...]] = {}
        self.keep: float | dict[str, float] = 1.0  # the levels the model is at

    @property
    def names(self) -> list[str]:
        """The units, one search gene each."""
        return list(self.units)

    @property
    def dense(self) -> dict[str, nn.Module]:
        """Dense modules of the matrices pruned as factored units (refit and distill train those)."""
        return {n: u.dense[n] for n, u in self.units.items() if isinstance(u, MatrixUnit)}

    def levels(self, keep: float | dict[str, float]) -> dict[str, float]:
        return dict.fromkeys(self.units, float(keep)) if isinstance(keep, (int, float)) else keep

    def sizes(self, keep: float | dict[str, float]) -> dict[str, int]:
        """Size (rank, or neurons kept) of every unit that is not dense at these levels."""
        sizes = {n: self.units[n].size(p, self.rank_multiple) for n, p in self.levels(keep).items()}
        return {n: s for n, s in sizes.items() if s is not None}

    def params(self, keep: float | dict[str, float]) -> tuple[int, int]:
        """(target weights kept, target weights in the dense model)."""
        sizes = self.sizes(keep)
        kept = sum(u.params(sizes.get(n)) for n, u in self.units.items())
        return kept, sum(u.total for u in self.units.values())

    def apply(self, keep: float | dict[str, float]) -> dict[str, int]:
        """Put the model at these levels (in place); returns the sizes of the pruned units.
        Stages use :meth:`at`, which also puts the model back."""
        sizes = self.sizes(keep)
        self.keep = keep
        device = next(self.model.parameters()).device  # the model may have moved since
        for name, unit in self.units.items():
            modules = (unit.modules(sizes[name], self.refitted.get(name)) if name in sizes
                       else unit.dense)
            for module_name, module in modules.items():
                set_submodule(self.model, module_name, module.to(device))
        return sizes


    def use(self, refitted: dict[str, tuple[torch.Tensor, ...]]) -> None:
        """Weights refitted for one size of some units (refit, distillation) replace the bases'
        at that size from now on; the model, if pruned, is rebuilt with them."""
        self.refitted = {**self.refitted, **refitted}
        if self.sizes(self.keep):
            self.apply(self.keep)

    def require(self, keep: float | dict[str, float], who: str) -> dict[str, int]:
        """The sizes at ``keep``, which the model must be at: stages that train or refit the
        pruned modules work on the model the caller put at its levels (``at``)."""
        if self.sizes(keep) != self.sizes(self.keep):
            raise ValueError(f"{who}: put the model at the levels first (Pruner.at)")
        return self.sizes(keep)

    @contextmanager
    def at(self, keep: float | dict[str, float], weights: dict[str, torch.Tensor] | None = None):
        """The model at these levels (and these weights by parameter name, e.g. merged LoRA)
        inside the block, and back at the levels it had before afterwards: a stage scoring
        several variants never leaves the model where the next stage does not expect it.
        Levels the model is already at are not rebuilt (apply after changing ``refitted``)."""
        before = self.keep
        moved = self.levels(keep) != self.levels(before)
        if moved:
            self.apply(keep)
        try:
            with with_weights(self.model, weights or {}):
                yield self.model
        finally:
            if moved:
                self.apply(before)


def flatten_bases(bases: dict[str, Factors | Neurons]) -> tuple[dict[str, torch.Tensor],
                                                                 dict[str, str]]:
    """Tensors and string metadata for one safetensors file."""
    tensors, neurons, heads = {}, {}, {}
    for name, b in bases.items():
        if isinstance(b, Factors):
            tensors.update({f"{name}.A": b.a, f"{name}.B": b.b})
        elif isinstance(b, HeadDims):
            tensors.update({f"{name}.e": b.e, f"{name}.c": b.c, f"{name}.ridge": b.ridge})
            heads[name] = {"v": b.v, "o": b.o}
        else:
            tensors.update({f"{name}.order": b.order, f"{name}.g": b.g,
                            f"{name}.l_inv": b.l_inv})
            neurons[name] = {"inputs": list(b.inputs), "output": b.output, "blocks": b.blocks}
    return ({k: v.contiguous() for k, v in tensors.items()},
            {"neurons": json.dumps(neurons, sort_keys=True),
             "heads": json.dumps(heads, sort_keys=True)})


def unflatten_bases(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
                    ) -> dict[str, Factors | Neurons]:
    neurons = json.loads((metadata or {}).get("neurons", "{}"))
    bases: dict[str, Factors | Neurons] = {
        n[:-2]: Factors(tensors[n], tensors[n[:-2] + ".B"]) for n in tensors if n.endswith(".A")}
    for name, meta in neurons.items():
        bases[name] = Neurons(tensors[f"{name}.order"], tensors[f"{name}.g"],
                              tensors[f"{name}.l_inv"], tuple(meta["inputs"]), meta["output"],
                              meta["blocks"])
    for name, meta in json.loads((metadata or {}).get("heads", "{}")).items():
        bases[name] = HeadDims(tensors[f"{name}.e"], tensors[f"{name}.c"],
                               tensors[f"{name}.ridge"], meta["v"], meta["o"])
    return bases
