"""What every pruning-unit kind provides (their shared maths is ``sieve_pl.maths``).

A *unit* is what the search gives one level: a keep fraction ``p`` of the unit's weights. Each
kind (``matrix``, ``neurons``, ``heads``: one module each) has

- a *basis* dataclass: what projection stores once per unit, so that every level is a slice of
  it ("decompose once, slice many"); ``tensors()`` / ``meta()`` write it, ``stored()`` reads it;
- a :class:`Unit` subclass: ``fit`` computes the basis from the dense weights and the input's
  second moment, on whatever device it is handed (the layer's); ``size`` / ``params`` turn a
  keep fraction into a size and a weight count; ``modules`` builds the pruned modules at a size
  and ``error`` the change of the output Linear's weight (what sensitivity prices), both on the
  device of the dense weights they replace; ``nf4_skip`` says which of its exported Linears
  bitsandbytes' CPU nf4 kernel cannot take.

Nothing here knows an architecture: the adapter (``models/adapters.py``) says which Linears form
a unit, and the :class:`~sieve_pl.models.pruning.Pruner` decides which level each unit is at.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
from torch import nn

from ..models.factored import dense_shape

Moment = Callable[[str], torch.Tensor]  # Linear name -> mean second moment of its input


def matrix_params(out_features: int, in_features: int, rank: int | None) -> int:
    """Weights of one target matrix (bias excluded: it is kept unchanged)."""
    return out_features * in_features if rank is None else rank * (out_features + in_features)


@dataclass
class Spec:
    """Which Linears one unit covers: ``output`` is the Linear whose output change prices the
    unit (its own matrix; down for an MLP; o for an attention layer's values)."""

    name: str
    linears: tuple[str, ...]
    output: str


class Unit:
    """One unit of a model: its dense Linears (kept aside while it is pruned) and its basis.

    ``basis`` is loaded on use through ``load`` (bases of a large model stay on disk, one unit
    at a time in memory), so a unit costs nothing until it is pruned. While it is pruned, the
    host weights of its dense Linears may wait on disk too (:meth:`park`): a model held once in
    host memory rather than twice (dense and pruned) at near-dense levels. ``dense`` always
    gives them back with their weights.
    """

    kind: ClassVar[str] = ""
    basis_type: ClassVar[type] = object

    def __init__(self, model: nn.Module, spec: Spec, load: Callable[[], object]):
        self.name, self.output, self.load = spec.name, spec.output, load
        self._dense = {n: model.get_submodule(n) for n in spec.linears}
        self.total = sum(matrix_params(*dense_shape(m), None) for m in self._dense.values())
        self.parked: Path | None = None  # the file holding the dense weights while dropped

    @property
    def dense(self) -> dict[str, nn.Module]:
        """The dense Linears by name, with their weights (read back if parked)."""
        self.unpark()
        return self._dense

    def resting(self) -> dict[str, nn.Module]:
        """The dense Linears as they are (parked ones without their weights): what stands in
        the model while the unit's next pruned modules are built, so the previous pruned
        ones are freed first."""
        return self._dense

    def _params(self) -> dict[str, nn.Parameter]:
        return {f"{name}.{key}": p for name, m in self._dense.items()
                for key, p in m.named_parameters()}

    def park(self, model: nn.Module, folder: Path) -> bool:
        """Drop the host weights of the dense Linears, kept in ``folder/<unit>.safetensors``
        (written once: dense weights never change), while ``model`` does not use them (the
        unit is pruned). Weights on an accelerator, or a Linear still in the model, are left
        as they are (returns False). Their shapes and dtypes stay; reading ``dense`` brings
        the weights back."""
        if self.parked is not None:
            return True
        params = self._params()
        if (any(p.device.type != "cpu" for p in params.values())
                or any(model.get_submodule(n) is m for n, m in self._dense.items())):
            return False
        path = Path(folder) / f"{self.name}.safetensors"
        if not path.exists():
            from ..artifacts import save_tensors
            from ..io import atomic
            with atomic(path) as tmp:
                save_tensors(params, tmp)
        for p in params.values():  # one element each, same shape, dtype and device
            p.data = torch.zeros((), dtype=p.dtype).expand(p.shape)
        self.parked = path
        return True

    def unpark(self) -> None:
        """Read the parked dense weights back into host memory (the file stays for the next
        :meth:`park`)."""
        if self.parked is None:
            return
        from safetensors.torch import load_file

        stored = load_file(str(self.parked))
        for key, p in self._params().items():
            p.data = stored[key]
        self.parked = None

    @property
    def basis(self):
        return self.load()

    def weights(self, name: str, device=None) -> torch.Tensor:
        """A dense Linear's weight (out × in) in float32 on ``device`` (default: its own); it
        may be the weight itself, not a copy: never change it in place."""
        from ..models.factored import dense_weight

        return dense_weight(self.dense[name]).detach().to(device, torch.float32)

    @classmethod
    def fit(cls, net: nn.Module, spec: Spec, moment: Moment, config, device: torch.device):
        """The basis of ``spec`` from ``net``'s dense weights and the inputs' second moments,
        computed on ``device`` in ``config.dtype`` and returned on the host in float32."""
        raise NotImplementedError

    def size(self, keep: float, multiple: int) -> int | None:
        """The size (rank, neurons, dimensions per head) for a keep fraction; None = dense."""
        raise NotImplementedError

    def params(self, size: int | None) -> int:
        raise NotImplementedError

    def at_least(self, fraction: float, multiple: int) -> int | None:
        """The smallest size (in steps of ``multiple``) that keeps at least ``fraction`` of
        the unit's weights; None: only the dense unit does."""
        raise NotImplementedError

    def error(self, size: int, device=None) -> torch.Tensor:
        """``W − W'`` of ``output``'s weight (out × in, float32) at this size, on ``device``
        (default: where the dense weights are)."""
        raise NotImplementedError

    def modules(self, size: int, refitted: tuple[torch.Tensor, ...] | None = None,
                device=None) -> dict[str, nn.Module]:
        """The pruned modules at this size by name, built on ``device`` (the layer's; default:
        where the dense weights are); ``refitted``: weights a later stage fitted for exactly
        this size, used instead of the basis'."""
        raise NotImplementedError

    @staticmethod
    def nf4_skip(layout: dict) -> list[str]:
        """Modules of an export's layout (``factored.structure``) made by this kind that
        bitsandbytes' CPU nf4 kernel cannot take (it needs sizes in multiples of 32 / 64):
        they stay unquantized."""
        return []


def host(t: torch.Tensor) -> torch.Tensor:
    """A basis tensor as stored: float32 on the host, contiguous."""
    return t.detach().to("cpu", torch.float32).contiguous()
