"""The one object that puts a model at a set of levels: :class:`Pruner`.

The units themselves (what a level of a matrix, an MLP's neurons or an attention layer's value
dimensions is) live in :mod:`sieve_pl.units`; the Pruner owns the model's pruned state and is
the only thing that swaps its modules. Applying levels rebuilds only the units whose size
changed, each on the device its dense weights are on.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..units import Bases, MatrixUnit, Unit, unit_for
from .factored import set_submodule

PARK_ABOVE = 1 << 30  # host bytes of the units' dense weights above which a run parks them


def layer_and_kind(name: str) -> tuple[int, str]:
    """``model.layers.3.self_attn.q_proj`` -> (3, ``self_attn.q_proj``); ``model.layers.3.mlp``
    -> (3, ``mlp``): units of one kind play the same part in every layer."""
    match = re.search(r"\.(\d+)\.(.+)$", name)
    return (int(match.group(1)), match.group(2)) if match else (0, name)


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

    ``floor``: no unit keeps less than this share of its weights, whatever its level (sizes
    round up to it: with ranks in multiples of 32, a level of 0.4 would leave a small k or v
    matrix at 22%).

    ``bases`` (:class:`~sieve_pl.units.Bases`) gives every unit's spec and, when it is pruned,
    its basis. The dense modules are kept aside so any level can be applied again without
    refitting. ``refitted`` holds weights refitted for one size of a unit (``(A, B)`` of a
    matrix at one rank, ``(W_down,)`` of an MLP at one neuron count); they are used instead of
    the bases at that size.

    ``park``: a folder where the host weights of a pruned unit's dense Linears wait while the
    model does not use them (:meth:`Unit.park <sieve_pl.units.Unit.park>`), so a model on the
    host is held about once, not dense plus pruned; None keeps them in memory (small models,
    or weights on an accelerator).
    """

    def __init__(self, model: nn.Module, bases: Bases | dict, rank_multiple: int = 1,
                 floor: float = 0.0, park: Path | None = None):
        self.model, self.rank_multiple, self.floor = model, rank_multiple, floor
        self.park = park
        if not isinstance(bases, Bases):  # (no units: a model scored as it is)
            if bases:
                raise TypeError("Pruner takes sieve_pl.units.Bases (what projection returns)")
            bases = Bases({}, {}.__getitem__)
        self.units: dict[str, Unit] = {
            name: unit_for(spec)(model, spec, lambda name=name: bases[name])
            for name, spec in bases.specs.items()}
        self.refitted: dict[str, tuple[torch.Tensor, ...]] = {}
        self.keep: float | dict[str, float] = 1.0  # the levels the model is at
        self.built: dict[str, int | None] = dict.fromkeys(self.units)  # each unit's size now

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
        sizes = {}
        for name, p in self.levels(keep).items():
            unit = self.units[name]
            size = unit.size(p, self.rank_multiple)
            if size is not None and self.floor > 0 and unit.params(size) < self.floor * unit.total:
                size = unit.at_least(self.floor, self.rank_multiple)
            if size is not None:
                sizes[name] = size
        return sizes

    def params(self, keep: float | dict[str, float]) -> tuple[int, int]:
        """(target weights kept, target weights in the dense model)."""
        sizes = self.sizes(keep)
        kept = sum(u.params(sizes.get(n)) for n, u in self.units.items())
        return kept, sum(u.total for u in self.units.values())

    def apply(self, keep: float | dict[str, float], rebuild: bool = False) -> dict[str, int]:
        """Put the model at these levels (in place); returns the sizes of the pruned units.
        Only units whose size changed are rebuilt (all with ``rebuild``), each where its dense
        weights are. Stages use :meth:`at`, which also puts the model back."""
        sizes = self.sizes(keep)
        self.keep = keep
        for name, unit in self.units.items():
            size = sizes.get(name)
            if size == self.built[name] and not rebuild:
                continue
            device = self.device(name)
            if self.built[name]:  # the old pruned modules go first (an 8B MLP's: 0.7 GB)
                for module_name, module in unit.resting().items():
                    set_submodule(self.model, module_name, module)
            try:
                modules = (unit.modules(size, self.refitted.get(name), device) if size
                           else unit.dense)
            except BaseException:  # never left half-built: the unit goes back dense
                self._place(name, unit.dense, None, device)
                raise
            self._place(name, modules, size, device)
            if size and self.park is not None:
                unit.park(self.model, self.park)
        return sizes

    def _place(self, name: str, modules: dict[str, nn.Module], size: int | None,
               device: torch.device) -> None:
        for module_name, module in modules.items():
            set_submodule(self.model, module_name, module.to(device))
        self.built[name] = size

    def device(self, name: str) -> torch.device:
        """Where a unit's layer is now (the model may have moved, or be split over devices):
        the device of the module in the model at its output Linear's place."""
        live = self.model.get_submodule(self.units[name].output)
        return next(live.parameters()).device


    def use(self, refitted: dict[str, tuple[torch.Tensor, ...]]) -> None:
        """Weights refitted for one size of some units (refit, distillation) replace the bases'
        at that size from now on; the model, if pruned, is rebuilt with them."""
        self.refitted = {**self.refitted, **refitted}
        if self.sizes(self.keep):
            self.apply(self.keep, rebuild=True)

    def fitting(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights (by parameter name, e.g. merged LoRA) that fit the model at its levels
        now: those of a unit moved to another size since they were trained (confirmation's
        step back) have another name or shape and are left out, so that unit is the projection
        alone while every unit left where it was keeps its recovery."""
        if not weights:  # (the search's candidates: no lookup per candidate)
            return {}
        params = dict(self.model.named_parameters())
        return {name: value for name, value in weights.items()
                if name in params and params[name].shape == value.shape}

    def require(self, keep: float | dict[str, float], who: str) -> dict[str, int]:
        """The sizes at ``keep``, which the model must be at: stages that train or refit the
        pruned modules work on the model the caller put at its levels (``at``)."""
        if self.sizes(keep) != self.sizes(self.keep):
            raise ValueError(f"{who}: put the model at the levels first (Pruner.at)")
        return self.sizes(keep)

    @contextmanager
    def swapped(self, modules: dict[str, nn.Module]):
        """These modules in the model at their names inside the block (the dense matrices for
        a teacher's or a dense input's forward), the model's own back afterwards."""
        own = {name: self.model.get_submodule(name) for name in modules}
        try:
            for name, module in modules.items():
                set_submodule(self.model, name, module)
            yield self.model
        finally:
            for name, module in own.items():
                set_submodule(self.model, name, module)

    @contextmanager
    def at(self, keep: float | dict[str, float], weights: dict[str, torch.Tensor] | None = None):
        """The model at these levels (and these weights by parameter name, e.g. merged LoRA)
        inside the block, and back at the levels it had before afterwards: a stage scoring
        several variants never leaves the model where the next stage does not expect it.
        Units are built afresh on the way in and out (a stage may train them in place);
        levels the model is already at are left as they are (apply after changing
        ``refitted``); only the ``weights`` that fit these levels are used (:meth:`fitting`).
        The search moves from candidate to candidate with :meth:`apply`."""
        before = self.keep
        moved = self.levels(keep) != self.levels(before)
        if moved:
            self.apply(keep, rebuild=True)
        try:
            with with_weights(self.model, self.fitting(weights or {})):
                yield self.model
        finally:
            if moved:
                self.apply(before, rebuild=True)
